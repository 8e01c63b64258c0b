"""Surface-normal metrics: angular error and the DSINE evaluation protocol.

Normals are camera-space unit vectors in the OpenGL convention (+x right, +y up, +z toward the
camera). DSINE pools the angular errors of every valid pixel of a dataset and reports their mean,
median and RMSE in degrees and the percentage under 11.25, 22.5 and 30 degrees.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

THRESHOLDS = (11.25, 22.5, 30.0)


def _within(threshold: float) -> str:
    return f"within_{threshold:g}"


def angular_error(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-pixel angle in degrees between channel-last normals (..., 3), in float64.

    Both are normalised first (a zero vector stays zero and so scores 90 degrees against any
    normal). The angle is ``2 atan2(|a - b|, |a + b|)`` rather than ``acos(a . b)``: equal for unit
    vectors, but acos loses about 1e-6 degree near 0 and 180 degrees, where its slope is infinite.
    """
    a = F.normalize(pred.double(), dim=-1, eps=1e-12)
    b = F.normalize(gt.double(), dim=-1, eps=1e-12)
    return torch.rad2deg(2 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1)))


def error_sums(errors: torch.Tensor) -> dict[str, float]:
    """Sums over a flat tensor of angular errors (valid pixels only) that add up across batches and
    ranks; dividing by ``count`` gives the mean error, the RMSE's square and the fractions within
    each threshold. The median cannot be summed up this way; :func:`summarize` has it."""
    errors = errors.double()
    sums = {"angle": errors.sum().item(), "angle_sq": errors.square().sum().item()}
    sums.update({_within(t): (errors < t).sum().item() for t in THRESHOLDS})
    sums["count"] = errors.numel()
    return sums


def summarize(errors: torch.Tensor) -> dict[str, float]:
    """The DSINE summary of one flat tensor holding the errors of every valid pixel of a dataset:
    pooled over pixels, so large images weigh more than small ones. The median of an even count is
    the mean of the two middle errors, as numpy's. Raises ValueError when there are no errors."""
    if errors.numel() == 0:
        raise ValueError("no valid pixels to evaluate")
    ordered = errors.double().flatten().sort().values
    n = ordered.numel()
    summary = {"mean": ordered.mean().item(), "median": ((ordered[(n - 1) // 2] + ordered[n // 2]) / 2).item(),
               "rmse": ordered.square().mean().sqrt().item()}
    summary.update({_within(t): 100.0 * (ordered < t).sum().item() / n for t in THRESHOLDS})
    summary["pixels"] = n
    return summary


def discontinuities(normals: torch.Tensor, valid: torch.Tensor, degrees: float = 15.0) -> torch.Tensor:
    """Valid pixels next to a crease, an occlusion edge or an invalid pixel: those with a neighbour
    (of 8; the image border repeats itself) whose normal turns by more than ``degrees`` or that is
    invalid. ``normals`` (N, H, W, 3) unit, ``valid`` (N, H, W) bool. Separates the error a coarse
    prediction makes at edges from its error on the surfaces themselves."""
    if normals.shape[:-1] != valid.shape or normals.shape[-1] != 3:
        raise ValueError(f"normals {tuple(normals.shape)} and valid {tuple(valid.shape)} do not match as (N, H, W, 3)")
    height, width = valid.shape[-2:]
    unit = torch.where(valid[..., None], normals.double(), 0).permute(0, 3, 1, 2)
    padded = F.pad(unit, (1, 1, 1, 1), mode="replicate")
    cos_limit = math.cos(math.radians(degrees))
    near = torch.zeros_like(valid)
    for dy in range(3):
        for dx in range(3):
            near |= (unit * padded[:, :, dy:dy + height, dx:dx + width]).sum(1) < cos_limit
    return near & valid


def _png_normals(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with Image.open(path) as image:
        if image.format != "PNG":
            raise ValueError(f"a {image.format} image, not a PNG")
        if image.mode not in ("RGB", "RGBA"):
            raise ValueError(f"mode {image.mode} PNG, expected 8-bit RGB")
        with open(path, "rb") as file:  # Pillow reads 16-bit RGB as 8-bit RGB without a word: check IHDR
            if file.read(25)[24] != 8:
                raise ValueError("16-bit PNG, expected 8-bit RGB")
        rgb = np.asarray(image.convert("RGB"))
    normals = rgb.astype(np.float32) / 255 * 2 - 1
    return normals, rgb.astype(np.int32).sum(axis=-1) > 0


def _npy_normals(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as file:  # else np.load opens a zip as .npz and calls the rest pickled data
        if file.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
            raise ValueError("not an .npy file")
    normals = np.load(path, allow_pickle=False)
    if not np.issubdtype(normals.dtype, np.floating):
        raise ValueError(f"dtype {normals.dtype}, expected float normals")
    if normals.ndim != 3 or normals.shape[-1] != 3:
        raise ValueError(f"shape {normals.shape}, expected (H, W, 3)")
    normals = normals.astype(np.float32)
    finite = np.isfinite(normals).all(axis=-1)
    normals[~finite] = 0
    norm = np.linalg.norm(normals, axis=-1)
    return normals, finite & (norm > 0.5) & (norm < 1.5)


def read_normals(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A normal map and its validity: ``(normals float32 (H, W, 3), valid bool (H, W))``.

    ``.npy``: float (H, W, 3), valid where finite with a norm in (0.5, 1.5); non-finite pixels
    read as zero vectors. ``.png``: 8-bit RGB (alpha ignored) decoded as ``rgb / 255 * 2 - 1``,
    valid where any channel is nonzero, since datasets (DSINE's) mark invalid pixels black.
    A missing, unreadable or malformed file raises a one-line ``ValueError`` naming ``path``.
    """
    path = Path(path)
    if path.suffix.lower() not in (".npy", ".png"):
        raise ValueError(f"{path}: not a .npy or .png file")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    read = _npy_normals if path.suffix.lower() == ".npy" else _png_normals
    try:
        normals, valid = read(path)
    except (ValueError, OSError, EOFError) as error:  # numpy's and Pillow's (UnidentifiedImageError is an OSError)
        raise ValueError(f"{path}: {(str(error).splitlines() or [type(error).__name__])[0]}") from None
    if normals.shape[0] == 0 or normals.shape[1] == 0:
        raise ValueError(f"{path}: empty image of shape {normals.shape}")
    return normals, valid
