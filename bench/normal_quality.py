"""The StableNormal quality report: accuracy, the per-step trade-off, variance across seeds,
robustness and video stability, on held-out synthetic scenes.

    python bench/normal_quality.py --test data/normals/test --family data/normals/torus \\
        --out bench/results/normal-quality.json --panel docs/stablenormal_panel.png

``--test`` and ``--family`` are ``kzoo data normals --layout png`` sets (a seed never used in
training; a shape family held out of training). Every prediction uses the scene's true intrinsics
at the pipeline's own resolution, and errors are DSINE's: pooled over valid pixels.

- accuracy and time per image for turbo and for SG-DRN at 1, 2, 4 and 10 steps;
- where the error is: the mean angle on pixels next to a crease or an occlusion edge (a neighbour
  turned by more than 15 degrees, or invalid) and on the rest of the surfaces;
- variance (StableNormal's metric, stablenormal.md §3.1): each image's mean angular error under 5
  seeds, its variance over the seeds, averaged over images; for SG-DRN from the YOSO estimate
  (the method) and the same refiner from pure noise;
- robustness: the test images darkened (x0.25 exposure), burnt out (x3, clipped), blurred
  (Gaussian sigma 2 px) and JPEG-compressed (quality 10), against the clean error;
- video: a 24-frame camera pan (1 degree a frame) of held-out scenes; the mean frame-to-frame
  angle between the predictions at each pixel, next to the same for the ground truth, for fresh
  noise every frame, one noise for the whole video, and one noise plus the previous frame as the
  refiner's start.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from kzoo.data.normals import encode_normals, read_manifest
from kzoo.data.scenes import panned, render, sample_scene
from kzoo.models.stablenormal import DEFAULT_STEPS
from kzoo.models.stablenormal.metrics import angular_error, discontinuities, summarize
from kzoo.normal import BUNDLED
from kzoo.train.tasks.normal import load_pipeline

SEEDS = 5
STEP_COUNTS = (1, 2, 4, 10)
PAN_FRAMES, PAN_DEGREES = 24, 1.0


def load_set(root: Path, limit: int | None):
    manifest = read_manifest(root)
    stems = sorted(p.stem for p in (root / "images").glob("*.png"))[:limit]
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(root / "images" / f"{s}.png"))).permute(2, 0, 1)
                          for s in stems]).float() / 255
    normals = torch.stack([torch.from_numpy(np.load(root / "normals" / f"{s}.npy")) for s in stems])
    masks = normals.norm(dim=-1) > 0.5
    intrinsics = torch.stack([torch.tensor(json.loads((root / "intrinsics" / f"{s}.json").read_text())) for s in stems])
    return dict(manifest=manifest, images=images, normals=normals, masks=masks, intrinsics=intrinsics)


def predict(pipeline, images, intrinsics, batch: int = 16, **kwargs) -> torch.Tensor:
    return torch.cat([pipeline.predict(images[i:i + batch], intrinsics=intrinsics[i:i + batch], **kwargs)
                      for i in range(0, len(images), batch)]).permute(0, 2, 3, 1)


def errors_of(pred, data) -> torch.Tensor:
    return angular_error(pred, data["normals"])  # (N, H, W)


def pooled(errors, data) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in summarize(errors[data["masks"]]).items()}


def per_image_mean(errors, data) -> torch.Tensor:
    masks = data["masks"].double()
    return (errors * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp_min(1)


def degrade(images: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "dark":
        return (images ** 2.2 * 0.25) ** (1 / 2.2)
    if kind == "burnt":
        return ((images ** 2.2) * 3).clamp(0, 1) ** (1 / 2.2)
    out = []
    for image in images:
        pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        if kind == "blur":
            pil = pil.filter(ImageFilter.GaussianBlur(2))
        else:
            buffer = io.BytesIO()
            pil.save(buffer, format="JPEG", quality=10)
            pil = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        out.append(torch.from_numpy(np.asarray(pil)).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def pan_sequence(seed: int, index: int, size: int):
    scene = sample_scene(seed, index, (size, size), shapes=("sphere", "box", "cylinder", "superquadric"))
    frames = [render(panned(scene, PAN_DEGREES * i)) for i in range(PAN_FRAMES)]
    return (torch.stack([f.image.permute(2, 0, 1) for f in frames]), torch.stack([f.normal for f in frames]),
            torch.stack([f.mask for f in frames]), frames[0].intrinsics)


def flicker(normals: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean angle in degrees between consecutive frames at each pixel valid in both."""
    both = masks[1:] & masks[:-1]
    return angular_error(normals[1:], normals[:-1])[both].mean().item()


def video_stability(pipeline, seed: int, scenes: int, size: int) -> dict:
    results = {"ground_truth": [], "turbo": [], "fresh_noise": [], "same_noise": [], "same_noise_from_previous": [],
               "error_same_noise": []}
    for index in range(scenes):
        images, normals, masks, k = pan_sequence(seed, index, size)
        ks = k.expand(len(images), 3, 3)
        results["ground_truth"].append(flicker(normals, masks))
        results["turbo"].append(flicker(predict(pipeline, images, ks, steps=0), masks))
        fresh = torch.cat([pipeline.predict(images[i:i + 1], intrinsics=ks[:1], steps=DEFAULT_STEPS, seed=i)
                           for i in range(len(images))]).permute(0, 2, 3, 1)
        results["fresh_noise"].append(flicker(fresh, masks))
        same = predict(pipeline, images, ks, steps=DEFAULT_STEPS, seed=0)
        results["same_noise"].append(flicker(same, masks))
        results["error_same_noise"].append(angular_error(same, normals)[masks].mean().item())
        chained, previous = [], None
        for i in range(len(images)):
            out = pipeline.predict(images[i:i + 1], intrinsics=ks[:1], steps=DEFAULT_STEPS, seed=0, init=previous)
            chained.append(out)
            previous = out
        results["same_noise_from_previous"].append(flicker(torch.cat(chained).permute(0, 2, 3, 1), masks))
    return {name: round(statistics.mean(values), 3) for name, values in results.items()}


def panel(path: Path, data, turbo, refined, count: int = 4) -> None:
    rows = []
    for i in range(count):
        mask = data["masks"][i].numpy()
        rows.append(np.concatenate([(data["images"][i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
                                    encode_normals(data["normals"][i].numpy(), mask),
                                    encode_normals(turbo[i].numpy(), mask), encode_normals(refined[i].numpy(), mask)],
                                   axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).resize((4 * 256, count * 256), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(BUNDLED))
    parser.add_argument("--test", required=True, help="held-out set (png layout)")
    parser.add_argument("--family", default=None, help="held-out shape family (png layout)")
    parser.add_argument("--limit", type=int, default=None, help="first N images of each set")
    parser.add_argument("--variance-images", type=int, default=48)
    parser.add_argument("--pan-scenes", type=int, default=3)
    parser.add_argument("--out", default="bench/results/normal-quality.json")
    parser.add_argument("--panel", default=None, help="PNG: image | ground truth | turbo | refined")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipeline = load_pipeline(args.checkpoint)
    report: dict = {"checkpoint": args.checkpoint, "resolution": pipeline.resolution, "steps_default": DEFAULT_STEPS}

    def log(message):
        print(message, file=sys.stderr, flush=True)

    test = load_set(Path(args.test), args.limit)
    report["test"] = {"images": len(test["images"]), "seed": test["manifest"]["seed"]}
    predictions, errors = {}, {}
    for steps in (0, *STEP_COUNTS):
        start = time.perf_counter()
        predictions[steps] = predict(pipeline, test["images"], test["intrinsics"], steps=steps)
        seconds = (time.perf_counter() - start) / len(test["images"])
        errors[steps] = errors_of(predictions[steps], test)
        report.setdefault("steps", {})[str(steps)] = dict(pooled(errors[steps], test),
                                                          seconds_per_image=round(seconds, 4))
        log(f"steps {steps}: {report['steps'][str(steps)]}")
    if args.panel:
        panel(Path(args.panel), test, predictions[0], predictions[DEFAULT_STEPS])

    near = discontinuities(test["normals"], test["masks"])
    elsewhere = test["masks"] & ~near
    report["discontinuities"] = {"fraction_of_pixels": round(near.sum().item() / test["masks"].sum().item(), 4)}
    for steps in (0, DEFAULT_STEPS):
        report["discontinuities"][f"steps_{steps}"] = {"near": round(errors[steps][near].mean().item(), 3),
                                                       "elsewhere": round(errors[steps][elsewhere].mean().item(), 3)}
    log(f"discontinuities: {report['discontinuities']}")

    if args.family:
        family = load_set(Path(args.family), args.limit)
        report["held_out_family"] = {"shapes": family["manifest"]["shapes"], "images": len(family["images"])}
        for steps in (0, DEFAULT_STEPS):
            report["held_out_family"][f"steps_{steps}"] = pooled(
                errors_of(predict(pipeline, family["images"], family["intrinsics"], steps=steps), family), family)
        log(f"held-out family: {report['held_out_family']}")

    subset = {key: value[:args.variance_images] if torch.is_tensor(value) else value for key, value in test.items()}
    for start in ("estimate", "noise"):
        means = torch.stack([per_image_mean(errors_of(predict(pipeline, subset["images"], subset["intrinsics"],
                                                              steps=DEFAULT_STEPS, seed=seed, start=start), subset),
                                            subset) for seed in range(SEEDS)])
        report.setdefault("variance", {})[start] = {"variance": round(means.var(dim=0, unbiased=False).mean().item(), 4),
                                                    "mean_error": round(means.mean().item(), 3)}
    report["variance"]["images"], report["variance"]["seeds"] = len(subset["images"]), SEEDS
    log(f"variance: {report['variance']}")

    for kind in ("dark", "burnt", "blur", "jpeg"):
        degraded = degrade(test["images"], kind)
        report.setdefault("robustness", {})[kind] = {
            f"steps_{steps}": pooled(errors_of(predict(pipeline, degraded, test["intrinsics"], steps=steps), test),
                                     test)["mean"] for steps in (0, DEFAULT_STEPS)}
    report["robustness"]["clean"] = {f"steps_{s}": report["steps"][str(s)]["mean"] for s in (0, DEFAULT_STEPS)}
    log(f"robustness: {report['robustness']}")

    report["video"] = dict(video_stability(pipeline, test["manifest"]["seed"] + 1000, args.pan_scenes,
                                           test["images"].shape[-1]),
                           frames=PAN_FRAMES, degrees_per_frame=PAN_DEGREES, scenes=args.pan_scenes)
    log(f"video: {report['video']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
