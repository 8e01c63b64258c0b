"""Quality of class-conditional MNIST samples (docs/hmar.md): class consistency and diversity.

- consistency: the share of samples that a classifier trained on real MNIST (the bundled KAT by
  default) labels as their conditioning class;
- diversity: per class, the pixel-wise standard deviation over that class's samples, averaged over
  pixels, divided by the same on as many real images of the class (the validation split's first
  ones); the mean of those ratios over classes. Near 0 is collapse; about 1 matches the data.

    python bench/hmar_quality.py --samples runs/sample/samples.npz --data-dir data/mnist --out q.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import kzoo  # noqa: F401  (registers the KAT models with timm)
from kzoo.demo import BUNDLED_MODEL, import_cpp_extension_without_cuda_warning
from kzoo.train.tasks.classify import eval_transform, load_classifier


def classify(images: np.ndarray, checkpoint: str, batch: int = 256) -> np.ndarray:
    """Predicted classes of uint8 images (N, H, W, 1)."""
    _, model, data_config = load_classifier(checkpoint)
    transform = eval_transform(data_config)
    model.eval()
    predictions = []
    with torch.inference_mode():
        for first in range(0, len(images), batch):
            tensors = torch.stack([transform(Image.fromarray(image[..., 0], mode="L"))
                                   for image in images[first:first + batch]])
            predictions.append(model(tensors).argmax(-1).numpy())
    return np.concatenate(predictions)


def real_images(data_dir: Path, split: str, label: int, count: int) -> np.ndarray:
    files = sorted((data_dir / split / str(label)).glob("*.png"))[:count]
    if len(files) < count:
        raise ValueError(f"{data_dir / split / str(label)}: {len(files)} images, {count} needed")
    return np.stack([np.asarray(Image.open(f).convert("L"), dtype=np.float64) / 255 for f in files])


def diversity(images: np.ndarray) -> float:
    """Mean over pixels of the standard deviation over images, of (N, H, W) floats in [0, 1]."""
    return float(images.std(axis=0).mean())


def evaluate(samples: Path, data_dir: Path, checkpoint: str, split: str = "val") -> dict:
    with np.load(samples) as npz:
        images, labels = npz["images"], npz["labels"]
    predicted = classify(images, checkpoint)
    per_class = {}
    for label in sorted(set(labels.tolist())):
        chosen = images[labels == label][..., 0].astype(np.float64) / 255
        real = real_images(data_dir, split, label, len(chosen))
        per_class[label] = dict(count=len(chosen), consistency=float((predicted[labels == label] == label).mean()),
                                sample_std=diversity(chosen), real_std=diversity(real))
    return dict(samples=str(samples), classifier=str(checkpoint), count=int(len(labels)),
                consistency=float((predicted == labels).mean()),
                diversity_ratio=float(np.mean([c["sample_std"] / c["real_std"] for c in per_class.values()])),
                per_class=per_class)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, help="samples.npz written by kzoo sample")
    parser.add_argument("--data-dir", required=True, help="the real MNIST ImageFolder (kzoo data mnist)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--classifier", default=str(BUNDLED_MODEL), help="a kzoo classify checkpoint")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    import_cpp_extension_without_cuda_warning()
    result = evaluate(Path(args.samples), Path(args.data_dir), args.classifier, args.split)
    print(f"{result['count']} samples: {result['consistency']:.1%} labelled as their class, "
          f"within-class pixel std {result['diversity_ratio']:.2f}x the real data's")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
