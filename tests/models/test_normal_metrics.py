"""Surface-normal metrics (kzoo.models.stablenormal.metrics) against float64 numpy references."""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from kzoo.models.stablenormal.metrics import (THRESHOLDS, angular_error, discontinuities, error_sums, read_normals,
                                             summarize)


def unit_vectors(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random unit vectors (*shape, 3), float64, uniform on the sphere."""
    v = rng.standard_normal((*shape, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def rotated(rng: np.random.Generator, v: np.ndarray, degrees) -> np.ndarray:
    """v (..., 3) unit vectors turned by ``degrees`` (scalar or (...)) about random axes perpendicular
    to them: Rodrigues' formula in float64."""
    k = np.cross(v, rng.standard_normal(v.shape))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    theta = np.deg2rad(np.asarray(degrees, dtype=np.float64))[..., None]
    return (v * np.cos(theta) + np.cross(k, v) * np.sin(theta)
            + k * (k * v).sum(axis=-1, keepdims=True) * (1 - np.cos(theta)))


def encode_png(normals: np.ndarray) -> np.ndarray:
    """kzoo's PNG encoding: round((n + 1) / 2 * 255) as uint8 RGB."""
    return np.round((normals + 1) / 2 * 255).astype(np.uint8)


@pytest.mark.parametrize("degrees", [0.0, 10.0, 45.0, 90.0, 135.0, 180.0])
def test_angular_error_of_known_rotations(degrees):
    rng = np.random.default_rng(int(degrees * 100) + 1)
    gt = unit_vectors(rng, (4, 5, 6))
    pred = rotated(rng, gt, degrees) * rng.uniform(0.1, 10, (4, 5, 6, 1))  # the norm must not matter
    error = angular_error(torch.from_numpy(pred), torch.from_numpy(gt))
    assert error.shape == (4, 5, 6) and error.dtype == torch.float64
    np.testing.assert_allclose(error.numpy(), degrees, rtol=0, atol=1e-6)


def test_angular_error_of_random_rotations_in_float32():
    rng = np.random.default_rng(0)
    gt = unit_vectors(rng, (1000,))
    degrees = rng.uniform(0, 180, 1000)
    pred = rotated(rng, gt, degrees)
    np.testing.assert_allclose(angular_error(torch.from_numpy(pred), torch.from_numpy(gt)).numpy(), degrees,
                               rtol=0, atol=1e-6)
    single = angular_error(torch.from_numpy(pred).float(), torch.from_numpy(gt).float())
    assert single.dtype == torch.float64
    np.testing.assert_allclose(single.numpy(), degrees, rtol=0, atol=0.05)  # float32 inputs: 6e-8 relative


def test_angular_error_of_a_zero_prediction_is_90_degrees():
    gt = torch.from_numpy(unit_vectors(np.random.default_rng(1), (8,)))
    assert torch.allclose(angular_error(torch.zeros(8, 3), gt), torch.full((8,), 90.0, dtype=torch.float64))


def test_summarize_matches_numpy():
    rng = np.random.default_rng(2)
    for n in (1001, 1000):  # odd and even counts: numpy's median of an even count averages the middle two
        errors = np.concatenate([rng.uniform(0, 60, n - len(THRESHOLDS)), THRESHOLDS])  # "within" is strict
        rng.shuffle(errors)
        summary = summarize(torch.from_numpy(errors).float())
        errors = errors.astype(np.float32).astype(np.float64)
        assert summary["pixels"] == n
        assert summary["mean"] == pytest.approx(np.mean(errors), abs=1e-9)
        assert summary["median"] == pytest.approx(np.median(errors), abs=1e-9)
        assert summary["rmse"] == pytest.approx(np.sqrt(np.mean(errors ** 2)), abs=1e-9)
        for t in THRESHOLDS:
            assert summary[f"within_{t:g}"] == pytest.approx(100 * np.mean(errors < t), abs=1e-9)
    assert set(summary) == {"mean", "median", "rmse", "within_11.25", "within_22.5", "within_30", "pixels"}


def test_summarize_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no valid pixels"):
        summarize(torch.zeros(0))


def test_error_sums_add_up_across_a_split():
    rng = np.random.default_rng(3)
    errors = torch.from_numpy(rng.uniform(0, 90, 777))
    split = int(rng.integers(1, 776))
    whole, first, second = error_sums(errors), error_sums(errors[:split]), error_sums(errors[split:])
    assert set(whole) == {"angle", "angle_sq", "within_11.25", "within_22.5", "within_30", "count"}
    for key in whole:
        assert first[key] + second[key] == pytest.approx(whole[key], rel=1e-12)
    summary = summarize(errors)
    assert whole["count"] == 777
    assert whole["angle"] / whole["count"] == pytest.approx(summary["mean"], rel=1e-12)
    assert (whole["angle_sq"] / whole["count"]) ** 0.5 == pytest.approx(summary["rmse"], rel=1e-12)
    for t in THRESHOLDS:
        assert 100 * whole[f"within_{t:g}"] / whole["count"] == pytest.approx(summary[f"within_{t:g}"], rel=1e-12)


def test_discontinuities_match_a_loop_over_neighbours():
    rng = np.random.default_rng(11)
    base = unit_vectors(rng, (2, 1, 1))
    # smooth turns of 0-10 degrees everywhere, jumps of 20-90 degrees on a random third of the pixels
    turns = np.where(rng.random((2, 5, 7)) < 0.33, rng.uniform(20, 90, (2, 5, 7)), rng.uniform(0, 10, (2, 5, 7)))
    normals = rotated(rng, np.broadcast_to(base, (2, 5, 7, 3)).copy(), turns)
    valid = rng.random((2, 5, 7)) > 0.15
    expected = np.zeros((2, 5, 7), dtype=bool)
    for n, y, x in np.ndindex(*valid.shape):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = min(max(y + dy, 0), 4), min(max(x + dx, 0), 6)
                angle = np.degrees(np.arccos(np.clip(normals[n, y, x] @ normals[n, ny, nx], -1, 1)))
                expected[n, y, x] |= valid[n, y, x] and (not valid[n, ny, nx] or angle > 15)
    got = discontinuities(torch.from_numpy(normals).float(), torch.from_numpy(valid))
    assert 0 < expected.sum() < valid.sum()
    assert np.array_equal(got.numpy(), expected)


def test_discontinuities_of_a_crease_are_the_two_columns_beside_it():
    normals = torch.zeros(1, 4, 6, 3)
    normals[..., :3, 2] = 1  # facing the camera left of the crease
    normals[..., 3:, 0] = 1  # facing right beyond it
    near = discontinuities(normals, torch.ones(1, 4, 6, dtype=torch.bool))
    assert near[0].any(dim=0).tolist() == [False, False, True, True, False, False]
    assert near[..., 2:4].all()
    assert not discontinuities(normals, torch.ones(1, 4, 6, dtype=torch.bool), degrees=91).any()
    with pytest.raises(ValueError, match=r"\(1, 4, 6, 3\).*\(1, 4, 5\)"):
        discontinuities(normals, torch.ones(1, 4, 5, dtype=torch.bool))


def test_png_round_trip_is_within_quantisation(tmp_path):
    rng = np.random.default_rng(4)
    normals = unit_vectors(rng, (5, 7))
    normals[0, 0], normals[0, 1] = (0, 0, 1), (1, 0, 0)
    rgb = encode_png(normals)
    assert tuple(rgb[0, 0]) == (128, 128, 255)  # a camera-facing surface
    Image.fromarray(rgb).save(tmp_path / "n.png")
    read, valid = read_normals(tmp_path / "n.png")
    assert read.dtype == np.float32 and read.shape == (5, 7, 3) and valid.dtype == bool and valid.all()
    np.testing.assert_allclose(read, rgb / 255 * 2 - 1, rtol=0, atol=1e-6)
    error = angular_error(torch.from_numpy(read), torch.from_numpy(normals))
    assert error.max() < 0.5


def test_png_black_pixels_are_invalid_and_alpha_is_ignored(tmp_path):
    rng = np.random.default_rng(5)
    rgb = encode_png(unit_vectors(rng, (5, 7)))
    black = rng.random((5, 7)) < 0.3
    rgb[black] = 0
    rgba = np.dstack([rgb, rng.integers(0, 256, (5, 7), dtype=np.uint8)])  # alpha 0 does not invalidate
    Image.fromarray(rgba).save(tmp_path / "n.png")
    read, valid = read_normals(tmp_path / "n.png")
    np.testing.assert_array_equal(valid, ~black)
    np.testing.assert_allclose(read, rgb / 255 * 2 - 1, rtol=0, atol=1e-6)


def test_npy_validity(tmp_path):
    rng = np.random.default_rng(6)
    normals = unit_vectors(rng, (5, 7))
    scale = np.ones((5, 7))
    scale[0, :4] = (0.0, 0.4, 0.6, 1.4)
    scale[1, :2] = (1.6, 1e6)
    normals = normals * scale[..., None]
    normals[2, 0, 1] = np.nan
    normals[2, 1, 2] = np.inf
    np.save(tmp_path / "n.npy", normals)
    read, valid = read_normals(tmp_path / "n.npy")
    expected = np.ones((5, 7), bool)
    expected[0, :2] = expected[1, :2] = expected[2, :2] = False
    np.testing.assert_array_equal(valid, expected)
    assert read.dtype == np.float32 and np.isfinite(read).all()
    np.testing.assert_allclose(read[valid], normals[valid], rtol=1e-6)


def png_16bit_rgb(path, height: int, width: int) -> None:
    """A valid 16-bit RGB PNG, which Pillow cannot write (and would read as 8-bit)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + np.full((width, 3), 40000, ">u2").tobytes() for _ in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def bad_files(tmp_path):
    """(path, reason pattern) for every kind of bad file."""
    cases = [(tmp_path / "missing.npy", "no such file"), (tmp_path / "missing.png", "no such file")]
    (tmp_path / "garbage.png").write_bytes(b"not a png at all")
    (tmp_path / "garbage.npy").write_bytes(b"not an npy at all")
    np.savez(tmp_path / "archive.npy", normals=np.zeros((5, 7, 3)))
    (tmp_path / "archive.npy.npz").rename(tmp_path / "archive.npy")
    cases += [(tmp_path / "garbage.png", ""), (tmp_path / "garbage.npy", "not an .npy"),
              (tmp_path / "archive.npy", "not an .npy")]
    np.save(tmp_path / "flat.npy", np.zeros((5, 7)))
    np.save(tmp_path / "four.npy", np.zeros((5, 7, 4)))
    np.save(tmp_path / "ints.npy", np.zeros((5, 7, 3), np.int64))
    cases += [(tmp_path / "flat.npy", "shape"), (tmp_path / "four.npy", "shape"), (tmp_path / "ints.npy", "dtype")]
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(tmp_path / "jpeg.png", format="JPEG")
    png_16bit_rgb(tmp_path / "deep.png", 5, 7)
    cases += [(tmp_path / "gray.png", "8-bit RGB"), (tmp_path / "jpeg.png", "JPEG"), (tmp_path / "deep.png", "16-bit")]
    (tmp_path / "normals.txt").write_text("0 0 1")
    return cases + [(tmp_path / "normals.txt", ".npy or .png")]


def test_16bit_png_helper_is_a_real_png(tmp_path):
    png_16bit_rgb(tmp_path / "deep.png", 5, 7)
    with Image.open(tmp_path / "deep.png") as image:  # Pillow reads it, as 8-bit: the case read_normals refuses
        assert image.mode == "RGB" and np.asarray(image).shape == (5, 7, 3)


def test_bad_files_raise_one_line_value_errors(tmp_path):
    for path, reason in bad_files(tmp_path):
        with pytest.raises(ValueError) as caught:
            read_normals(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and reason in message and "\n" not in message, message
