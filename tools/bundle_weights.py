"""Copy a kzoo checkpoint's weights into ``kzoo/assets/`` with float tensors stored as float16.

The bundled models must stay small (the package ships them); float16 storage halves them, and the
models load them into their float32 parameters. The kzoo metadata (model name and config) is kept,
so the loaders rebuild the model from the file alone.

    python tools/bundle_weights.py runs/hmar_mnist_vqvae/checkpoints/last kzoo/assets/hmar_mnist_vqvae.safetensors
"""
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kzoo.train import checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a checkpoint folder or .safetensors")
    parser.add_argument("target", help="the .safetensors to write")
    parser.add_argument("--ema", action="store_true", help="take the folder's EMA weights")
    parser.add_argument("--drop-config", nargs="*", default=[],
                        help="model-config keys to leave out, e.g. the local path of a run's tokenizer")
    args = parser.parse_args()
    source = Path(args.source)
    weights, metadata = checkpoint.read_weights(source / checkpoint.EMA_FILE if args.ema else source)
    config = json.loads(metadata["config"])
    for key in args.drop_config:
        config.pop(key, None)
    metadata["config"] = json.dumps(config, sort_keys=True)
    half = {name: (t.half() if t.is_floating_point() else t).contiguous() for name, t in weights.items()}
    save_file(half, args.target, metadata=metadata)
    size = Path(args.target).stat().st_size
    print(f"{args.target}: {sum(t.numel() for t in half.values()):,} values, {size / 2**20:.2f} MiB, "
          f"{metadata['model']} {config}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
