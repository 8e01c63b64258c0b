"""How the bundled estimator's error depends on the resolution it is run at (``predict``'s
``resolution``, the longer side the networks see), on held-out scenes with their true intrinsics,
turbo only, results resized back to the scenes' own size (DSINE's pooled mean angle).

    python bench/normal_resolution.py --test data/normals/test
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kzoo.normal import BUNDLED
from kzoo.train.tasks.normal import load_pipeline
from normal_quality import errors_of, load_set, pooled, predict  # bench/, the script's own folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(BUNDLED))
    parser.add_argument("--test", required=True, help="held-out set (kzoo data normals --layout png)")
    parser.add_argument("--limit", type=int, default=None, help="first N images")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[96, 128, 160, 192, 256])
    args = parser.parse_args()
    test = load_set(Path(args.test), args.limit)
    pipeline = load_pipeline(args.checkpoint).float()
    print(f"{args.checkpoint} (native {pipeline.resolution} px), {len(test['images'])} images of {args.test}")
    for resolution in args.resolutions:
        normals = predict(pipeline, test["images"], test["intrinsics"], steps=0, resolution=resolution)
        print(f"  {resolution:4d} px  turbo mean {pooled(errors_of(normals, test), test)['mean']:6.2f}", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
