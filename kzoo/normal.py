"""``kzoo normal INPUT... -o OUT``: surface normals for images, folders, globs and videos.

Each input image gives ``OUT/<relative path>/<stem>.png``, the normals encoded
``round((n + 1) / 2 * 255)`` (R = x, G = y, B = z), mirroring the input tree under OUT: a folder's
files keep their paths below the folder, a glob's theirs below the glob's fixed prefix, a file its
name. ``--save-npy`` adds ``<stem>.npy``, float32 (H, W, 3). A video gives ``<stem>.mp4`` and its
frames as ``<stem>/NNNNNN.png``; every frame draws the same noise (the same seed), and with
``--from-previous`` the refiner starts from the previous frame's result instead of its estimate.
Files whose names differ only in their suffix keep it (``a.jpg`` -> ``a.jpg.png``), so no output
overwrites another; a file named twice runs once.

Bad inputs (a wrong path, an unreadable or truncated image, a video OpenCV cannot open) get one
line each on stderr naming the file; the rest still run and the exit code is 1 at the end. A
checkpoint of another family stops the command before any input, with one line (exit 2).
Nothing here touches the network: the bundled model ships with kzoo.
"""
from __future__ import annotations

import argparse
import glob
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from kzoo.data.normals import encode_normals
from kzoo.models.stablenormal import DEFAULT_STEPS, StableNormal
from kzoo.models.stablenormal.estimator import DEFAULT_FOV_DEGREES, assumed_intrinsics

ASSETS = Path(__file__).parent / "assets"
BUNDLED = ASSETS / "stablenormal_synthetic.safetensors"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
# Axis signs that turn kzoo's OpenGL camera-space normals into each convention.
CONVENTIONS = {
    "opengl": (1.0, 1.0, 1.0),  # +x right, +y up, +z toward the camera (kzoo, Marigold)
    "opencv": (1.0, -1.0, -1.0),  # +x right, +y down, +z away from the camera
    "dsine": (-1.0, 1.0, 1.0),  # +x left, +y up, +z toward the camera (DSINE, StableNormal)
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image or video files, folders (searched recursively) or globs (quote them: 'photos/**/*.jpg')")
    parser.add_argument("-o", "--out", required=True, help="output folder; mirrors the inputs' tree")
    parser.add_argument("--checkpoint", default=None,
                        help="a kzoo train normal checkpoint (YOSO: turbo only; SG-DRN: with its estimator) or a "
                             "pipeline file; a local path or hf-hub:ORG/REPO/FILE (default: the bundled model)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="refiner steps; 0 = turbo (YOSO alone)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="longer side the networks see (default: the model's training size)")
    parser.add_argument("--match-input-resolution", action=argparse.BooleanOptionalAction, default=True,
                        help="write normals at the input's height and width (else at the processing size)")
    parser.add_argument("--batch-size", type=int, default=8, help="images of equal size run together")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="the networks' precision")
    parser.add_argument("--seed", type=int, default=0, help="the refiner's noise; the same for every image and frame")
    parser.add_argument("--fov", type=float, default=DEFAULT_FOV_DEGREES,
                        help="assumed field of view across the longer side, in degrees")
    parser.add_argument("--intrinsics", type=float, nargs=4, default=None, metavar=("FX", "FY", "CX", "CY"),
                        help="the camera's focal lengths and principal point in the inputs' pixels (one camera "
                             "for every input), instead of an assumed field of view")
    parser.add_argument("--save-npy", action="store_true", help="also write float32 (H, W, 3) normals as <stem>.npy")
    parser.add_argument("--convention", choices=tuple(CONVENTIONS), default="opengl",
                        help="axes of the written normals: opengl (+x right, +y up, +z to camera; kzoo's), opencv "
                             "(+x right, +y down, +z forward), dsine (+x left, +y up, +z to camera; StableNormal's)")
    parser.add_argument("--mask-alpha", action="store_true",
                        help="an image's alpha channel is the object mask: pixels with alpha < 128 are written as "
                             "zero normals (black), and the image is composited on white first")
    parser.add_argument("--from-previous", action="store_true",
                        help="videos: start the refiner from the previous frame's normals (steadier)")


@dataclass
class Item:
    path: Path
    relative: Path  # where the output goes under OUT, without suffix


def expand_inputs(inputs: list[str]) -> tuple[list[Item], list[str]]:
    """(items in command-line order, one error line per input that names nothing usable)."""
    items, errors = [], []
    suffixes = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    for spec in inputs:
        path = Path(spec)
        if any(ch in spec for ch in "*?[") and not path.exists():
            root = _glob_root(spec)
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            if not matches:
                errors.append(f"{spec}: no files match")
            items += [Item(m, m.relative_to(root).with_suffix("")) for m in matches]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                errors.append(f"{spec}: no images or videos in this folder")
            items += [Item(p, p.relative_to(path).with_suffix("")) for p in found]
        elif path.is_file():
            items.append(Item(path, Path(path.stem)))
        else:
            errors.append(f"{spec}: no such file or folder")
    return _distinct_outputs(items, errors)


def _distinct_outputs(items: list[Item], errors: list[str]) -> tuple[list[Item], list[str]]:
    """Each file once, and no output written twice: files that share an output name and differ only in
    their suffix (``a.jpg``, ``a.png``) keep it in theirs (``a.jpg.png``); a name still taken (same-named
    files from two folders given one by one) is an error for the later file, which is skipped."""
    once: dict[Path, Item] = {}
    for item in items:
        once.setdefault(item.path.resolve(), item)
    items = list(once.values())
    suffixes: dict[Path, set[str]] = {}
    for item in items:
        suffixes.setdefault(item.relative, set()).add(item.path.suffix)
    taken: dict[Path, Path] = {}
    distinct = []
    for item in items:
        if len(suffixes[item.relative]) > 1:
            item = Item(item.path, item.relative.with_name(item.path.name))
        if item.relative in taken:
            errors.append(f"{item.path}: its output name is {taken[item.relative]}'s; give their folder instead")
            continue
        taken[item.relative] = item.path
        distinct.append(item)
    return distinct, errors


def _glob_root(pattern: str) -> Path:
    """The fixed folder a glob's matches are below: its parts before the first wildcard."""
    fixed = []
    for part in Path(pattern).parts[:-1]:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def read_image(path: Path, mask_alpha: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB uint8 (H, W, 3), alpha mask or None); ValueError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()
            has_alpha = image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)
            if mask_alpha and has_alpha:
                rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
                alpha = rgba[..., 3:] / 255
                rgb = rgba[..., :3] * alpha + 255 * (1 - alpha)
                return np.rint(rgb).astype(np.uint8), rgba[..., 3] >= 128
            return np.asarray(image.convert("RGB")), None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path}: unreadable image ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None


def to_convention(normal: np.ndarray, convention: str) -> np.ndarray:
    """(H, W, 3) kzoo normals in ``convention``'s axes."""
    return normal * np.asarray(CONVENTIONS[convention], dtype=normal.dtype)


class Writer:
    def __init__(self, out: Path, convention: str, save_npy: bool):
        self.out, self.convention, self.save_npy = out, convention, save_npy

    def write(self, relative: Path, normal: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Write ``OUT/relative.png`` (and ``.npy``); returns the PNG's pixels."""
        normal = to_convention(normal, self.convention).astype(np.float32)
        if mask is not None:
            normal = normal * mask[..., None]
        target = self.out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        encoded = encode_normals(normal, mask)
        Image.fromarray(encoded).save(_suffixed(target, ".png"))
        if self.save_npy:
            np.save(_suffixed(target, ".npy"), normal)
        return encoded


def _suffixed(path: Path, suffix: str) -> Path:
    """``path`` with ``suffix`` appended (``relative`` has no suffix, but its stem may have dots)."""
    return path.with_name(path.name + suffix)


def _predict(pipeline: StableNormal, images: list[np.ndarray], args, device, init=None) -> np.ndarray:
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).to(device)
    height, width = batch.shape[-2:]
    if args.intrinsics:
        fx, fy, cx, cy = args.intrinsics
        intrinsics = torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], device=device).expand(len(images), 3, 3)
    else:
        intrinsics = assumed_intrinsics(height, width, len(images), args.fov, device)
    normal = pipeline.predict(batch, steps=args.steps, resolution=args.resolution,
                              match_input_resolution=args.match_input_resolution, seed=args.seed,
                              intrinsics=intrinsics, init=init)
    return normal.permute(0, 2, 3, 1).cpu().numpy()


def run_images(pipeline: StableNormal, items: list[Item], args, device, writer: Writer, bar) -> list[str]:
    """Batches of consecutive equal-size images; returns error lines."""
    errors = []
    pending: list[tuple[Item, np.ndarray, np.ndarray | None]] = []

    def flush():
        if not pending:
            return
        normals = _predict(pipeline, [image for _, image, _ in pending], args, device)
        for (item, _, mask), normal in zip(pending, normals):
            if mask is not None and normal.shape[:2] != mask.shape:
                mask = np.asarray(Image.fromarray(mask).resize(normal.shape[1::-1], Image.NEAREST))
            writer.write(item.relative, normal, mask)
        bar.update(len(pending))
        pending.clear()

    for item in items:
        try:
            image, mask = read_image(item.path, args.mask_alpha)
        except ValueError as error:
            errors.append(str(error))
            bar.update(1)
            continue
        if pending and (pending[0][1].shape != image.shape or len(pending) == args.batch_size):
            flush()
        pending.append((item, image, mask))
    flush()
    return errors


def run_video(pipeline: StableNormal, item: Item, args, device, writer: Writer) -> str | None:
    """Normals of every frame, as ``<stem>.mp4`` and ``<stem>/NNNNNN.png``; an error line or None."""
    import cv2

    capture = cv2.VideoCapture(str(item.path))
    if not capture.isOpened():
        return f"{item.path}: unreadable video (OpenCV cannot open it)"
    fps = capture.get(cv2.CAP_PROP_FPS) or 24.0
    video = None
    previous = None
    frames = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            init = previous if args.from_previous and args.steps > 0 else None
            normal = _predict(pipeline, [rgb], args, device,
                              init=None if init is None else torch.from_numpy(init).permute(2, 0, 1)[None])[0]
            if args.from_previous:
                previous = normal
            encoded = writer.write(item.relative / f"{frames:06d}", normal)
            if video is None:
                target = _suffixed(writer.out / item.relative, ".mp4")
                target.parent.mkdir(parents=True, exist_ok=True)
                video = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, encoded.shape[1::-1])
            video.write(cv2.cvtColor(encoded, cv2.COLOR_RGB2BGR))
            frames += 1
    finally:
        capture.release()
        if video is not None:
            video.release()
    return None if frames else f"{item.path}: no frames could be read"


def run(args: argparse.Namespace, device: torch.device, progress: bool = True) -> int:
    from kzoo.train.tasks.normal import load_pipeline

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.intrinsics and min(args.intrinsics[:2]) <= 0:
        raise ValueError(f"--intrinsics: focal lengths must be positive, got fx={args.intrinsics[0]:g} "
                         f"fy={args.intrinsics[1]:g}")
    if args.resolution is not None and args.resolution < 16:
        raise ValueError(f"--resolution must be at least 16, got {args.resolution}")
    pipeline = load_pipeline(args.checkpoint or BUNDLED).to(device=device, dtype=DTYPES[args.dtype])
    if args.steps > 0 and pipeline.refiner is None:
        raise ValueError(f"{args.checkpoint}: a YOSO checkpoint has no refiner; use --steps 0 (turbo)")
    items, input_errors = expand_inputs(args.inputs)
    errors: list[str] = []
    writer = Writer(Path(args.out), args.convention, args.save_npy)
    videos = [item for item in items if item.path.suffix.lower() in VIDEO_SUFFIXES]
    images = [item for item in items if item.path.suffix.lower() not in VIDEO_SUFFIXES]
    with tqdm(total=len(items), desc="normals", unit="file", file=sys.stderr, disable=not progress) as bar:
        errors += run_images(pipeline, images, args, device, writer, bar)
        for item in videos:
            error = run_video(pipeline, item, args, device, writer)
            if error:
                errors.append(error)
            bar.update(1)
    for line in input_errors + errors:
        print(f"kzoo normal: {line}", file=sys.stderr)
    print(f"wrote normals of {len(items) - len(errors)} of {len(items)} files under {args.out}" +
          (f"; {len(input_errors) + len(errors)} failed" if input_errors or errors else ""))
    return 1 if input_errors or errors else 0
