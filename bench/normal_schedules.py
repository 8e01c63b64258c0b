"""Where the refiner's steps help or hurt: SG-DRN under other timestep schedules than the heuristic
one, on held-out scenes with their true intrinsics (DSINE's pooled mean angle), beside turbo.

    python bench/normal_schedules.py --test data/normals/test --limit 100

Each schedule is (timesteps, how many of the first steps re-noise at their level instead of taking
a DDIM step); every row starts from the same noise.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kzoo.models.stablenormal import ray_directions
from kzoo.normal import BUNDLED
from kzoo.train.tasks.normal import load_pipeline
from normal_quality import errors_of, load_set, pooled  # bench/, the script's own folder

SCHEDULES = {
    "default 10 steps": ([401] * 6 + [301, 201, 101, 1], 5),
    "6 x 401, then 1": ([401] * 6 + [1], 5),
    "6 x 401": ([401] * 6, 5),
    "default 4 steps": ([401] * 3 + [1], 2),
    "1 step": ([401], 0),
    "DDIM 401, 301, 201, 101, 1": ([401, 301, 201, 101, 1], 0),
    "3 x 401, then 301, 201, 101, 1": ([401] * 3 + [301, 201, 101, 1], 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(BUNDLED))
    parser.add_argument("--test", required=True, help="held-out set (kzoo data normals --layout png)")
    parser.add_argument("--limit", type=int, default=100, help="first N images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    test = load_set(Path(args.test), args.limit)
    images = test["images"]
    pipeline = load_pipeline(args.checkpoint).float()
    rays = ray_directions(test["intrinsics"], *images.shape[-2:])
    coarse, semantic = pipeline.estimator(images, rays, return_semantic=True)

    def mean_error(normal: torch.Tensor) -> float:
        return pooled(errors_of(normal.permute(0, 2, 3, 1), test), test)["mean"]

    print(f"{args.checkpoint}, {len(images)} images of {args.test}")
    print(f"  {'turbo':32s} {mean_error(coarse):6.2f}")
    for name, schedule in SCHEDULES.items():
        generators = [torch.Generator().manual_seed(args.seed) for _ in range(len(images))]
        refined = pipeline.refine(images, rays, coarse, semantic, len(schedule[0]), generators, schedule=schedule)
        print(f"  {name:32s} {mean_error(refined):6.2f}", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
