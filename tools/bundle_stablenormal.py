"""Bundle a trained estimator and refiner into one ``.safetensors`` pipeline file for ``kzoo/assets/``.

Both come from ``kzoo train normal`` checkpoints (their EMA weights when present); the file holds
``estimator.*`` and ``refiner.*`` with float tensors stored as float16, and both model configs, so
``load_pipeline`` rebuilds the pipeline from the file alone.

    python tools/bundle_stablenormal.py runs/normal_yoso/checkpoints/last runs/normal_sgdrn/checkpoints/last \\
        kzoo/assets/stablenormal_synthetic.safetensors
"""
import argparse
from pathlib import Path

import torch

from kzoo.train import checkpoint
from kzoo.train.tasks.normal import build_pipeline, save_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("estimator", help="a kzoo train normal --stage yoso checkpoint")
    parser.add_argument("refiner", help="a kzoo train normal --stage sgdrn checkpoint")
    parser.add_argument("target", help="the .safetensors to write")
    args = parser.parse_args()
    found = [checkpoint.read_kzoo_model(Path(path)) for path in (args.estimator, args.refiner)]
    for path, item in zip((args.estimator, args.refiner), found):
        if item is None:
            raise SystemExit(f"{path}: not a kzoo checkpoint")
    (estimator_weights, estimator_config), (refiner_weights, refiner_config) = found
    pipeline = build_pipeline(estimator_config, refiner_config)
    checkpoint.load_strict(pipeline.estimator, estimator_weights, Path(args.estimator))
    checkpoint.load_strict(pipeline.refiner, refiner_weights, Path(args.refiner))
    save_pipeline(pipeline, args.target, estimator_config, refiner_config, half=True)
    size = Path(args.target).stat().st_size
    print(f"{args.target}: {sum(p.numel() for p in pipeline.parameters()):,} parameters, {size / 2**20:.2f} MiB")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
