"""``kzoo data normals``: synthetic scenes for surface-normal training, and the dataset that reads them.

Two layouts, both with a ``manifest.json`` that records what drew them (seed, size, shapes,
textures, count):

- ``npz`` (for training): ``shard-NNNNN.npz`` files of ``SHARD_SIZE`` samples, each holding
  ``image`` uint8 (n, H, W, 3), ``normal`` float16 (n, H, W, 3), ``mask`` bool (n, H, W) and
  ``intrinsics`` float32 (n, 3, 3);
- ``png`` (for ``kzoo normal`` and ``kzoo eval normal``): ``images/NNNNNN.png``,
  ``normals/NNNNNN.npy`` (float32, zero where invalid), ``normals/NNNNNN.png`` (the 8-bit
  encoding, black where invalid), ``masks/NNNNNN.png`` and ``intrinsics/NNNNNN.json``.

Images are rendered by worker processes, one thread each: the renderer is many small torch ops,
which scale better across processes than across threads.
"""
from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from kzoo.data.scenes import SHAPES, TEXTURES, render, sample_scene

SHARD_SIZE = 256
LAYOUTS = ("npz", "png")


def encode_normals(normal: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The 8-bit PNG encoding ``round((n + 1) / 2 * 255)``; black where ``mask`` is False."""
    encoded = np.rint((np.clip(normal, -1, 1) + 1) / 2 * 255).astype(np.uint8)
    if mask is not None:
        encoded[~mask] = 0
    return encoded


def _render_sample(job: tuple) -> dict:
    seed, index, size, shapes, textures = job
    torch.set_num_threads(1)
    out = render(sample_scene(seed, index, size, shapes, textures))
    return {"image": (out.image.numpy() * 255).round().astype(np.uint8),
            "normal": out.normal.numpy(), "mask": out.mask.numpy(), "intrinsics": out.intrinsics.numpy()}


def render_samples(seed: int, indices, size: tuple[int, int], shapes=SHAPES, textures=TEXTURES,
                   workers: int = 0, progress: bool = False):
    """Rendered samples (dicts of numpy arrays) in ``indices`` order, on ``workers`` processes (0: here)."""
    jobs = [(seed, index, size, tuple(shapes), tuple(textures)) for index in indices]
    bar = tqdm(total=len(jobs), desc="rendering", unit="img", disable=not progress)
    if workers <= 0:
        for job in jobs:
            yield _render_sample(job)
            bar.update()
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for sample in pool.imap(_render_sample, jobs, chunksize=4):
                yield sample
                bar.update()
    bar.close()


def export(out: Path, count: int, size: int, seed: int, layout: str = "npz", shapes=SHAPES,
           textures=TEXTURES, workers: int = 2, first_index: int = 0) -> dict:
    """Render ``count`` scenes into ``out``; returns the manifest."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if count < 1 or size < 8:
        raise ValueError(f"need at least one image of at least 8 px, got --n {count} --size {size}")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "kzoo-normals", "layout": layout, "count": count, "size": [size, size], "seed": seed,
                "first_index": first_index, "shapes": list(shapes), "textures": list(textures),
                "convention": "opengl camera space: +x right, +y up, +z toward the camera", "shards": []}
    samples = render_samples(seed, range(first_index, first_index + count), (size, size), shapes, textures,
                             workers, progress=True)
    if layout == "npz":
        for shard_index in range(math.ceil(count / SHARD_SIZE)):
            batch = [next(samples) for _ in range(min(SHARD_SIZE, count - shard_index * SHARD_SIZE))]
            name = f"shard-{shard_index:05d}.npz"
            np.savez(out / name, image=np.stack([s["image"] for s in batch]),
                     normal=np.stack([s["normal"] for s in batch]).astype(np.float16),
                     mask=np.stack([s["mask"] for s in batch]), intrinsics=np.stack([s["intrinsics"] for s in batch]))
            manifest["shards"].append({"file": name, "count": len(batch)})
    else:
        for folder in ("images", "normals", "masks", "intrinsics"):
            (out / folder).mkdir(exist_ok=True)
        for offset, sample in enumerate(samples):
            stem = f"{first_index + offset:06d}"
            Image.fromarray(sample["image"]).save(out / "images" / f"{stem}.png")
            np.save(out / "normals" / f"{stem}.npy", sample["normal"].astype(np.float32))
            Image.fromarray(encode_normals(sample["normal"], sample["mask"])).save(out / "normals" / f"{stem}.png")
            Image.fromarray(sample["mask"].astype(np.uint8) * 255).save(out / "masks" / f"{stem}.png")
            (out / "intrinsics" / f"{stem}.json").write_text(json.dumps(sample["intrinsics"].tolist()))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(root: Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{root}: no manifest.json (write the set with `kzoo data normals --out {root}`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    if manifest.get("format") != "kzoo-normals":
        raise ValueError(f"{path}: not a kzoo normals manifest")
    return manifest


class NormalScenes(Dataset):
    """Samples of an ``npz`` set: ``(image, normal, mask, intrinsics)`` with the image as float
    (3, H, W) in [0, 1], normals float (3, H, W), mask bool (H, W) and K (3, 3).

    Augmentation draws from torch's global stream, which the loop seeds: ``crop`` cuts a random
    ``crop`` x ``crop`` window (the principal point moves with it, so the rays stay true);
    ``flip`` mirrors a sample left-right with probability 1/2 (the x component of the normals
    changes sign and cx moves to W - cx).
    """

    def __init__(self, root: Path | str, flip: bool = False, crop: int | None = None, limit: int | None = None):
        self.root = Path(root)
        manifest = read_manifest(self.root)
        if manifest["layout"] != "npz":
            raise ValueError(f"{self.root}: training reads the npz layout, this set is {manifest['layout']!r}")
        arrays = {key: [] for key in ("image", "normal", "mask", "intrinsics")}
        for shard in manifest["shards"]:
            with np.load(self.root / shard["file"]) as data:
                for key in arrays:
                    arrays[key].append(data[key])
        self.arrays = {key: np.concatenate(value)[:limit] for key, value in arrays.items()}
        height, width = self.arrays["image"].shape[1:3]
        if crop is not None and not 0 < crop <= min(height, width):
            raise ValueError(f"{self.root}: crop {crop} does not fit {height}x{width} images")
        self.manifest = manifest
        self.flip = flip
        self.crop = crop

    def __len__(self) -> int:
        return len(self.arrays["image"])

    def names(self) -> list[str]:
        return [f"{self.manifest['seed']}/{self.manifest['first_index'] + i}" for i in range(len(self))]

    def __getitem__(self, index: int):
        image = torch.from_numpy(self.arrays["image"][index]).permute(2, 0, 1).float() / 255
        normal = torch.from_numpy(self.arrays["normal"][index]).permute(2, 0, 1).float()
        mask = torch.from_numpy(self.arrays["mask"][index])
        intrinsics = torch.from_numpy(self.arrays["intrinsics"][index]).clone()
        if self.crop is not None:
            height, width = mask.shape
            top = int(torch.randint(height - self.crop + 1, ()))
            left = int(torch.randint(width - self.crop + 1, ()))
            window = (slice(None), slice(top, top + self.crop), slice(left, left + self.crop))
            image, normal, mask = image[window], normal[window], mask[window[1:]]
            intrinsics[0, 2] -= left
            intrinsics[1, 2] -= top
        if self.flip and torch.rand(()) < 0.5:
            image, normal, mask = image.flip(-1), normal.flip(-1), mask.flip(-1)
            normal[0] = -normal[0]
            intrinsics[0, 2] = image.shape[-1] - intrinsics[0, 2]
        return image, normal, mask, intrinsics
