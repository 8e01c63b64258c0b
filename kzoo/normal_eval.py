"""``kzoo eval normal``: predicted surface normals against ground truth, by the DSINE protocol.

Every ground-truth map under ``--gt`` (``.npy`` or ``.png``, in any subfolder) is paired with the
prediction under ``--pred`` of the same relative path stem, ``.npy`` before ``.png`` since 8-bit
quantisation alone adds up to ~0.4 degree (the same preference settles a stem that ``--gt`` or
``--mask-dir`` holds twice). A prediction must have its ground truth's size; it is normalised as it
is, so one with no direction (a zero or non-finite vector) at a valid pixel scores 90 degrees.

The angular errors of the valid ground-truth pixels (and, with ``--mask-dir``, of the mask's nonzero
pixels too) are pooled over the dataset: one mean, median, RMSE and percentage within 11.25, 22.5
and 30 degrees, weighing each pixel alike rather than each image.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from kzoo.models.stablenormal.metrics import THRESHOLDS, angular_error, read_normals, summarize

SUFFIXES = (".npy", ".png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, metavar="DIR",
                        help="predicted normal maps: .npy float (H, W, 3) or 8-bit RGB .png, OpenGL camera space")
    parser.add_argument("--gt", required=True, metavar="DIR",
                        help="ground-truth normal maps, paired with --pred by relative path stem; invalid pixels "
                             "are black in a .png and zero (norm outside 0.5..1.5) in a .npy")
    parser.add_argument("--mask-dir", default=None, metavar="DIR",
                        help="masks (.png or .npy, same relative stems as --gt): only nonzero pixels count, on top "
                             "of the ground truth's own validity")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the summary, each image's mean error and the failures as JSON")


def _by_stem(root: Path) -> dict[str, Path]:
    """The .npy and .png files under root by relative path stem, a .npy winning over a .png."""
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix in SUFFIXES and path.is_file():
            stem = path.relative_to(root).with_suffix("").as_posix()
            if stem not in files or path.suffix == ".npy":
                files[stem] = path
    return files


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


def _read_mask(path: Path) -> np.ndarray:
    """A mask as bool (H, W): nonzero in any channel, a PNG's alpha aside."""
    try:
        if path.suffix == ".npy":
            mask = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as image:
                mask = np.asarray(image.convert(image.mode.rstrip("A")))
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path}: {(str(error).splitlines() or [type(error).__name__])[0]}") from None
    if not isinstance(mask, np.ndarray) or not (mask.ndim == 2 or (mask.ndim == 3 and mask.shape[-1] <= 4)):
        raise ValueError(f"{path}: expected a (H, W) or (H, W, C) mask")
    mask = mask != 0
    return mask.any(axis=-1) if mask.ndim == 3 else mask


def _image_errors(stem: str, gt_path: Path, preds: dict[str, Path], masks: dict[str, Path] | None,
                  args: argparse.Namespace) -> torch.Tensor:
    """The angular errors (float64) of one image's valid pixels; ValueError naming a file when it fails."""
    if stem not in preds:
        raise ValueError(f"{gt_path}: no prediction {stem}.npy or {stem}.png under {args.pred}")
    gt, valid = read_normals(gt_path)
    pred, _ = read_normals(preds[stem])  # scored wherever the ground truth is valid, whatever its own norm
    if pred.shape != gt.shape:
        raise ValueError(f"{gt_path}: ground truth is {_size(gt)} but prediction {preds[stem]} is {_size(pred)}")
    if masks is not None:
        if stem not in masks:
            raise ValueError(f"{gt_path}: no mask {stem}.npy or {stem}.png under {args.mask_dir}")
        mask = _read_mask(masks[stem])
        if mask.shape != valid.shape:
            raise ValueError(f"{gt_path}: ground truth is {_size(gt)} but mask {masks[stem]} is {_size(mask)}")
        valid &= mask
    valid = torch.from_numpy(valid)
    return angular_error(torch.from_numpy(pred)[valid], torch.from_numpy(gt)[valid])


def run(args: argparse.Namespace) -> int:
    """Evaluate, print a one-line summary; 0 when every map was evaluated, 1 when some failed (one line
    each on stderr). ValueError when a folder is missing or nothing could be evaluated."""
    folders = {"--pred": args.pred, "--gt": args.gt, "--mask-dir": args.mask_dir}
    for flag, folder in folders.items():
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"{flag} {folder}: not a directory")
    gts = _by_stem(Path(args.gt))
    if not gts:
        raise ValueError(f"--gt {args.gt}: no .npy or .png normal maps")
    preds = _by_stem(Path(args.pred))
    masks = _by_stem(Path(args.mask_dir)) if args.mask_dir is not None else None

    # float32 until pooled, 4 bytes a pixel: the median needs every error of the dataset at once
    errors: list[torch.Tensor] = []
    per_image: dict[str, float | None] = {}
    failed: dict[str, str] = {}
    for stem, gt_path in tqdm(gts.items(), desc="images", unit="image", file=sys.stderr, disable=None):
        try:
            image_errors = _image_errors(stem, gt_path, preds, masks, args)
        except ValueError as error:
            failed[stem] = str(error)
            tqdm.write(f"kzoo eval normal: {error}", file=sys.stderr)
            continue
        errors.append(image_errors.float())
        per_image[stem] = image_errors.mean().item() if image_errors.numel() else None
    if not per_image:
        raise ValueError(f"none of the {len(gts)} ground-truth maps under {args.gt} could be evaluated")
    pooled = torch.cat(errors)
    if pooled.numel() == 0:
        raise ValueError(f"no valid ground-truth pixels in the {len(per_image)} maps evaluated")
    summary = summarize(pooled)

    within = "  ".join(f"{t:g}° {summary[f'within_{t:g}']:.1f}%" for t in THRESHOLDS)
    print(f"images {len(per_image)}  pixels {summary['pixels']}  mean {summary['mean']:.2f}  "
          f"median {summary['median']:.2f}  rmse {summary['rmse']:.2f}  {within}")
    if args.json is not None:
        record = {"pred": str(args.pred), "gt": str(args.gt), "mask_dir": args.mask_dir, "images": len(per_image),
                  **summary, "per_image_mean": per_image, "failed": failed}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    return 1 if failed else 0
