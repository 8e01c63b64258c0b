"""Where the refiner's steps help or hurt: SG-DRN under other timestep schedules than the heuristic
one, on held-out scenes with their true intrinsics (DSINE's pooled mean angle), beside turbo.

    python bench/normal_schedules.py --test data/normals/test --limit 100

Each schedule is (timesteps, how many of the first steps re-noise at their level instead of taking
a DDIM step); every row starts from the same noise.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kzoo.models.stablenormal import ray_directions
from kzoo.models.stablenormal.metrics import angular_error
from kzoo.normal import BUNDLED
from kzoo.train.tasks.normal import load_pipeline

SCHEDULES = {
    "default 10 steps": ([401] * 6 + [301, 201, 101, 1], 5),
    "6 x 401, then 1": ([401] * 6 + [1], 5),
    "6 x 401": ([401] * 6, 5),
    "default 4 steps": ([401] * 3 + [1], 2),
    "1 step": ([401], 0),
    "DDIM 401, 301, 201, 101, 1": ([401, 301, 201, 101, 1], 0),
    "3 x 401, then 301, 201, 101, 1": ([401] * 3 + [301, 201, 101, 1], 2),
}


def pooled_mean(normal: torch.Tensor, truth: torch.Tensor) -> float:
    valid = truth.norm(dim=-1) > 0.5
    return angular_error(normal.permute(0, 2, 3, 1).double(), truth.double())[valid].mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(BUNDLED))
    parser.add_argument("--test", required=True, help="held-out set (kzoo data normals --layout png)")
    parser.add_argument("--limit", type=int, default=100, help="first N images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(args.test)
    names = sorted(path.stem for path in (root / "images").glob("*.png"))[:args.limit]
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(root / "images" / f"{name}.png")).copy())
                          for name in names]).permute(0, 3, 1, 2).float() / 255
    truth = torch.stack([torch.from_numpy(np.load(root / "normals" / f"{name}.npy")) for name in names]).float()
    intrinsics = torch.tensor([json.loads((root / "intrinsics" / f"{name}.json").read_text()) for name in names])
    pipeline = load_pipeline(args.checkpoint).float()
    rays = ray_directions(intrinsics, *images.shape[-2:])
    coarse, semantic = pipeline.estimator(images, rays, return_semantic=True)
    print(f"{args.checkpoint}, {len(names)} images of {root}")
    print(f"  {'turbo':32s} {pooled_mean(coarse, truth):6.2f}")
    for name, schedule in SCHEDULES.items():
        generators = [torch.Generator().manual_seed(args.seed) for _ in names]
        refined = pipeline.refine(images, rays, coarse, semantic, len(schedule[0]), generators, schedule=schedule)
        print(f"  {name:32s} {pooled_mean(refined, truth):6.2f}", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
