"""``kzoo sample``: class-conditional images from an HMAR or VAR model.

Without ``--checkpoint`` the MNIST models bundled with kzoo are used (``--mode`` picks HMAR or VAR
mode). ``--checkpoint`` takes a ``kzoo train hmar``/``hmar-mask`` checkpoint, whose tokenizer is the
one it was trained with unless ``--vae`` says otherwise, or an official ``hmar-d*.pth`` /
``var_d*.pth`` file with ``--vae`` (VAR's ``vae_ch160v4096z32.pth``).

Writes one PNG per sample (``<class>_<index>.png``), ``grid.png`` (a row per class) and
``samples.npz`` with ``images`` (N, H, W, C) uint8 and ``labels`` (N,).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid
from tqdm import tqdm

from kzoo.models.hmar import NextScaleTransformer, check_mask_schedule, sample
from kzoo.models.hub import resolve_weights
from kzoo.train.tasks.hmar import load_transformer, load_vqvae

ASSETS = Path(__file__).parent / "assets"
BUNDLED = {"hmar": ASSETS / "hmar_mnist.safetensors", "var": ASSETS / "var_mnist.safetensors"}
BUNDLED_VAE = ASSETS / "hmar_mnist_vqvae.safetensors"
MODES = {"hmar": "markov", "var": "block_causal"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="a kzoo train hmar/hmar-mask checkpoint (folder or .safetensors; its EMA weights when "
                             "it has them), or an official hmar-d*.pth / var_d*.pth (a path, hf-hub:ORG/REPO/FILE or "
                             "a name such as hmar-d16); default: the bundled MNIST model")
    parser.add_argument("--vae", default=None,
                        help="the tokenizer: a kzoo train vqvae checkpoint or VAR's vae_ch160v4096z32.pth "
                             "(default: the one the checkpoint was trained with)")
    parser.add_argument("--mode", choices=tuple(MODES), default=None,
                        help="hmar (Markovian, with the mask branch) or var (block-causal with a KV cache); picks the "
                             "bundled model, or the attention of an official VAR-layout file (default: the file's)")
    parser.add_argument("--classes", type=int, nargs="+", default=None,
                        help="class indices to sample (default: 0..9, or all classes if fewer)")
    parser.add_argument("--num-per-class", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=1.5,
                        help="classifier-free guidance at the last scale, ramped from 0 at the first")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off; 1: greedy)")
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="sample i draws from a generator seeded with seed + i")
    parser.add_argument("--mask-schedule", type=json.loads, default=None,
                        help="per-scale mask steps as JSON, e.g. '[[1],[1,3],[1,1,2,5],[16],[25],[49]]' "
                             "(default: the official one's entries for the 1x1..3x3 scales)")
    parser.add_argument("--mask-cfg", type=float, default=None,
                        help="guidance of the mask steps, ramped like --cfg (default: the scale's guidance; "
                             "0: the official sampler, which turns it off)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default="runs/sample", help="folder for the PNGs, grid.png and samples.npz")


def load_models(checkpoint: str | None, vae: str | None, mode: str | None):
    """(transformer, tokenizer) for the command's flags; one-line ValueErrors name the file."""
    if checkpoint is None:
        path = BUNDLED[mode or "hmar"]
        model, _ = load_transformer(path)
        return model, load_vqvae(vae or BUNDLED_VAE)
    path = resolve_weights(checkpoint)
    model, trained_with = load_transformer(path, attention_mode=MODES[mode] if mode else None)
    vae = vae or trained_with
    if vae is None:
        raise ValueError(f"{path}: an official file; pass its tokenizer with --vae (e.g. vae_ch160v4096z32)")
    if not Path(vae).exists() and trained_with is not None and vae == trained_with:
        raise ValueError(f"{path}: its tokenizer {vae} is not on this machine; pass one with --vae")
    return model, load_vqvae(vae)


def _labels(model: NextScaleTransformer, classes: list[int] | None, per_class: int) -> torch.Tensor:
    classes = list(range(min(10, model.num_classes))) if classes is None else classes
    bad = [c for c in classes if not 0 <= c < model.num_classes]
    if bad:
        raise ValueError(f"--classes {' '.join(map(str, bad))}: out of range for a model of {model.num_classes} "
                         f"classes (0..{model.num_classes - 1})")
    if per_class < 1:
        raise ValueError(f"--num-per-class must be at least 1, got {per_class}")
    return torch.tensor(classes).repeat_interleave(per_class)


def run(args: argparse.Namespace, device: torch.device) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    model, vqvae = load_models(args.checkpoint, args.vae, args.mode)
    labels = _labels(model, args.classes, args.num_per_class)
    if args.mask_schedule is not None:
        check_mask_schedule(args.mask_schedule, model.patch_nums)
    model.to(device)
    vqvae.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for first in tqdm(range(0, len(labels), args.batch_size), desc="batches", file=sys.stderr):
        batch = labels[first:first + args.batch_size].to(device)
        images.append(sample(model, vqvae, batch, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                             mask_schedule=args.mask_schedule, mask_cfg=args.mask_cfg, seed=args.seed,
                             first_index=first, progress=True).cpu())
    images = torch.cat(images)
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    counts: dict[int, int] = {}
    for picture, label in zip(pixels, labels.tolist()):
        index = counts[label] = counts.get(label, -1) + 1
        Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(out / f"{label}_{index:03d}.png")
    grid = make_grid(images, nrow=args.num_per_class, padding=2, pad_value=1.0)
    Image.fromarray((grid * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()).save(out / "grid.png")
    np.savez_compressed(out / "samples.npz", images=pixels, labels=labels.numpy())
    mode = "VAR" if model.attention_mode == "block_causal" else "HMAR"
    print(f"sampled {len(labels)} images ({mode}, cfg {args.cfg}, top-k {args.top_k}, top-p {args.top_p}, "
          f"seed {args.seed}) into {out}: {len(labels)} PNGs, grid.png, samples.npz")
    return 0
