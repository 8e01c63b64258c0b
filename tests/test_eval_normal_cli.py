"""``kzoo eval normal`` (kzoo.normal_eval) on tiny datasets whose errors are known by construction."""
import argparse
import json
import re

import numpy as np
import pytest
from PIL import Image

from kzoo import normal_eval
from tests.models.test_normal_metrics import encode_png, rotated, unit_vectors

H, W = 5, 7
# stem: (ground-truth format, valid pixels, range of the prediction's errors in degrees); the counts
# differ, so the pooled mean is far from the mean of the per-image means
IMAGES = {"scenes/a/img0": ("png", 30, (0, 20)), "scenes/a/img1": ("npy", 5, (30, 50)),
          "scenes/b/img2": ("png", 15, (60, 80))}


def evaluate(capsys, *argv):
    parser = argparse.ArgumentParser()
    normal_eval.add_arguments(parser)
    code = normal_eval.run(parser.parse_args([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return code, out, err


def printed(out: str, key: str) -> float:
    return float(re.search(rf"\b{key} ([\d.]+)", out).group(1))


@pytest.fixture
def dataset(tmp_path):
    """GT and .npy predictions for IMAGES, with the errors of each image's valid pixels."""
    rng = np.random.default_rng(7)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    errors = {}
    for stem, (kind, count, (low, high)) in IMAGES.items():
        normals = unit_vectors(rng, (H, W))
        valid = np.zeros(H * W, bool)
        valid[rng.choice(H * W, count, replace=False)] = True
        valid = valid.reshape(H, W)
        (gt_dir / stem).parent.mkdir(parents=True, exist_ok=True)
        (pred_dir / stem).parent.mkdir(parents=True, exist_ok=True)
        if kind == "png":
            rgb = encode_png(normals) * valid[..., None]
            Image.fromarray(rgb).save(gt_dir / f"{stem}.png")
            normals = rgb / 255 * 2 - 1  # the ground truth as decoded, which the prediction is turned from
            normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
        else:
            np.save(gt_dir / f"{stem}.npy", (normals * valid[..., None]).astype(np.float32))
        degrees = rng.uniform(low, high, (H, W))
        pred = np.where(valid[..., None], rotated(rng, normals, degrees), unit_vectors(rng, (H, W)))
        np.save(pred_dir / f"{stem}.npy", pred.astype(np.float32))
        errors[stem] = degrees[valid]
    return gt_dir, pred_dir, errors


def check_summary(record, errors, stems):
    pooled = np.concatenate([errors[s] for s in stems])
    assert record["images"] == len(stems) and record["pixels"] == pooled.size
    assert record["mean"] == pytest.approx(pooled.mean(), abs=1e-3)
    assert record["median"] == pytest.approx(np.median(pooled), abs=1e-3)
    assert record["rmse"] == pytest.approx(np.sqrt(np.mean(pooled ** 2)), abs=1e-3)
    for t in (11.25, 22.5, 30):
        assert record[f"within_{t:g}"] == pytest.approx(100 * np.mean(pooled < t), abs=1e-9)
    assert set(record["per_image_mean"]) == set(stems)
    for s in stems:
        assert record["per_image_mean"][s] == pytest.approx(errors[s].mean(), abs=1e-3)


def test_pooled_over_pixels_not_images(dataset, capsys, tmp_path):
    gt_dir, pred_dir, errors = dataset
    code, out, err = evaluate(capsys, "--pred", pred_dir, "--gt", gt_dir, "--json", tmp_path / "out" / "r.json")
    assert code == 0 and "kzoo eval normal" not in err
    pooled = np.concatenate(list(errors.values()))
    per_image = np.mean([e.mean() for e in errors.values()])
    assert abs(pooled.mean() - per_image) > 2  # the dataset tells the two apart
    assert len(out.splitlines()) == 1
    assert printed(out, "images") == 3 and printed(out, "pixels") == 50
    assert abs(printed(out, "mean") - pooled.mean()) < 0.006
    assert abs(printed(out, "median") - np.median(pooled)) < 0.006
    assert abs(printed(out, "rmse") - np.sqrt(np.mean(pooled ** 2))) < 0.006
    assert f"11.25° {100 * np.mean(pooled < 11.25):.1f}%" in out and f"30° {100 * np.mean(pooled < 30):.1f}%" in out
    record = json.loads((tmp_path / "out" / "r.json").read_text())
    check_summary(record, errors, list(IMAGES))
    assert record["failed"] == {}


def test_missing_prediction_and_size_mismatch_are_reported(dataset, capsys, tmp_path):
    gt_dir, pred_dir, errors = dataset
    (pred_dir / "scenes/a/img1.npy").unlink()
    np.save(pred_dir / "scenes/b/img2.npy", unit_vectors(np.random.default_rng(8), (H + 1, W)).astype(np.float32))
    code, out, err = evaluate(capsys, "--pred", pred_dir, "--gt", gt_dir, "--json", tmp_path / "r.json")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("kzoo eval normal: ") for line in lines)
    assert str(gt_dir / "scenes/a/img1.npy") in lines[0] and "no prediction" in lines[0]
    assert str(gt_dir / "scenes/b/img2.png") in lines[1] and str(pred_dir / "scenes/b/img2.npy") in lines[1]
    assert f"{W}x{H}" in lines[1] and f"{W}x{H + 1}" in lines[1]
    assert printed(out, "images") == 1 and abs(printed(out, "mean") - errors["scenes/a/img0"].mean()) < 0.006
    record = json.loads((tmp_path / "r.json").read_text())
    check_summary(record, errors, ["scenes/a/img0"])
    assert set(record["failed"]) == {"scenes/a/img1", "scenes/b/img2"}


def test_npy_prediction_is_preferred_over_png(dataset, capsys):
    gt_dir, pred_dir, errors = dataset
    for stem in IMAGES:  # PNGs pointing the other way: 180 degrees off wherever they were read
        pred = np.load(pred_dir / f"{stem}.npy")
        Image.fromarray(encode_png(-pred)).save(pred_dir / f"{stem}.png")
    code, out, _ = evaluate(capsys, "--pred", pred_dir, "--gt", gt_dir)
    assert code == 0
    assert abs(printed(out, "mean") - np.concatenate(list(errors.values())).mean()) < 0.006
    (pred_dir / "scenes/a/img0.npy").unlink()  # now img0's PNG is read: its pixels are ~180 degrees off
    _, out, _ = evaluate(capsys, "--pred", pred_dir, "--gt", gt_dir)
    assert printed(out, "mean") > 100


def test_png_prediction_equal_to_png_ground_truth_scores_zero(dataset, capsys, tmp_path):
    gt_dir, _, _ = dataset
    pred_dir = tmp_path / "copy"
    for path in gt_dir.rglob("*.*"):
        target = pred_dir / path.relative_to(gt_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    code, out, _ = evaluate(capsys, "--pred", pred_dir, "--gt", gt_dir)
    assert code == 0 and printed(out, "mean") == 0 and printed(out, "rmse") == 0 and "30° 100.0%" in out


def test_mask_dir_narrows_the_valid_pixels(dataset, capsys, tmp_path):
    gt_dir, pred_dir, _ = dataset
    rng = np.random.default_rng(9)
    kept = []
    for i, stem in enumerate(IMAGES):
        mask = rng.random((H, W)) < 0.5
        path = tmp_path / "masks" / stem
        path.parent.mkdir(parents=True, exist_ok=True)
        if i == 0:
            np.save(path.with_suffix(".npy"), mask.astype(np.float32))
        else:
            Image.fromarray(np.dstack([mask * 255] * 3 + [np.zeros((H, W))]).astype(np.uint8)).save(f"{path}.png")
        kind = IMAGES[stem][0]
        gt_valid = (np.asarray(Image.open(gt_dir / f"{stem}.png")).sum(-1) > 0 if kind == "png"
                    else np.linalg.norm(np.load(gt_dir / f"{stem}.npy"), axis=-1) > 0.5)
        pred = np.load(pred_dir / f"{stem}.npy").astype(np.float64)
        gt = (np.asarray(Image.open(gt_dir / f"{stem}.png")) / 255 * 2 - 1 if kind == "png"
              else np.load(gt_dir / f"{stem}.npy").astype(np.float64))
        keep = gt_valid & mask
        cos = (pred[keep] * gt[keep]).sum(-1) / np.linalg.norm(pred[keep], axis=-1) / np.linalg.norm(gt[keep], axis=-1)
        kept.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
    code, out, _ = evaluate(capsys, "--pred", pred_dir, "--gt", gt_dir, "--mask-dir", tmp_path / "masks")
    kept = np.concatenate(kept)
    assert code == 0 and printed(out, "pixels") == kept.size < 50
    assert abs(printed(out, "mean") - kept.mean()) < 0.006


def test_nothing_to_evaluate_is_an_error(dataset, capsys, tmp_path):
    gt_dir, pred_dir, _ = dataset
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a directory"):
        evaluate(capsys, "--pred", tmp_path / "nowhere", "--gt", gt_dir)
    with pytest.raises(ValueError, match="no .npy or .png"):
        evaluate(capsys, "--pred", pred_dir, "--gt", tmp_path / "empty")
    with pytest.raises(ValueError, match="none of the 3"):
        evaluate(capsys, "--pred", tmp_path / "empty", "--gt", gt_dir)
    assert capsys.readouterr().err.count("no prediction") == 3
