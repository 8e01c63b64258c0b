"""Training the multi-scale VQ-VAE tokenizer of VAR and HMAR on an ImageFolder tree: ``kzoo train vqvae``.

VAR never released its tokenizer training (hmar.md §6), and users report codebook collapse with the
code they were pointed to. So besides the reconstruction and VQ losses the task restarts dead codes:
a code whose running usage falls below ``--dead-code-threshold`` is moved onto a latent vector of
the current batch, then left ``--restart-every`` steps to be picked before it can be moved again.

Every decision lives in checkpointed state (the quantizer's ``ema_vocab_hit_SV`` usage buffer and
the global random stream, which the loop seeds per rank and saves), so a resumed run restarts the
same codes onto the same vectors as an uninterrupted one. The check runs on the device at every
step, without waiting for the host.

Evaluation reports, per image, the training loss and the PSNR of the reconstruction (images in
[0, 1]). Codebook utilisation does not add up over batches, so it is not an evaluation sum: each
epoch's ``sample`` logs it from the training-time usage buffer to ``codebook.jsonl``, next to a grid
of originals over reconstructions in ``reconstructions/``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import create_transform
from torch import nn
from torchvision.utils import save_image

from kzoo.data.folder import image_folder
from kzoo.models.hmar import VQVAE, VQVAE_MODELS, MultiScaleQuantizer
from kzoo.train.task import Task, evaluating, picture_path

HELP = "the multi-scale VQ-VAE tokenizer of HMAR/VAR on an ImageFolder tree"

# The decay of MultiScaleQuantizer's usage buffer: each step keeps 0.99 of the running hit counts.
USAGE_DECAY = 0.99
# PSNR of a perfect reconstruction would be infinite and poison the mean; 1e-10 MSE caps it at 100 dB.
MIN_MSE = 1e-10
SAMPLE_IMAGES = 8
RECONSTRUCTION_LOSSES = ("l1", "l2", "l1+l2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and model")
    data.add_argument("--data-dir", default=None, help="ImageFolder root holding <train-split>/ and <val-split>/")
    data.add_argument("--train-split", default="train")
    data.add_argument("--val-split", default="val", help="'' for no validation")
    data.add_argument("--model", default="vqvae_mnist", help=f"one of {', '.join(VQVAE_MODELS)}")
    data.add_argument("--model-kwargs", type=json.loads, default={},
                      help='extra model arguments as JSON, e.g. \'{"ch": 32, "patch_nums": [1, 2, 4, 7]}\'')
    data.add_argument("--img-size", type=int, default=None,
                      help="images are resized to this side (default: the model's, patch_nums[-1] x downsample)")
    data.add_argument("--in-chans", type=int, default=None, help="1 reads images as grayscale (default: the model's)")

    loss = parser.add_argument_group("losses and codebook")
    loss.add_argument("--recon-loss", choices=RECONSTRUCTION_LOSSES, default="l1+l2",
                      help="pixel loss on images in [-1, 1]: L1 keeps edges sharp, L2 is what PSNR measures")
    loss.add_argument("--commitment-beta", type=float, default=0.25, help="weight of the commitment loss")
    loss.add_argument("--dead-code-threshold", type=float, default=1e-3,
                      help="a code is dead when its running hits per step, summed over scales, fall below this "
                           "(one pick adds 0.01 and decays by 0.99 a step); 0 turns restarts off")
    loss.add_argument("--restart-every", type=int, default=200,
                      help="steps a restarted code is given to be picked before it can be restarted again")


class VQVAETask(Task):
    eval_metric, higher_is_better = "psnr", True

    def __init__(self, args: argparse.Namespace):
        if not args.data_dir:
            raise ValueError("--data-dir is required (an ImageFolder root with train/ and val/)")
        if args.model not in VQVAE_MODELS:
            raise ValueError(f"unknown model {args.model!r} (known: {', '.join(VQVAE_MODELS)})")
        if args.restart_every < 1:
            raise ValueError(f"--restart-every must be at least 1, got {args.restart_every}")
        if args.dead_code_threshold > 0 and args.fsdp:
            # The codebook is a DTensor shard under FSDP; rows cannot be replaced in place.
            raise ValueError("dead-code restarts are not supported with --fsdp (pass --dead-code-threshold 0)")
        self.args = args
        self.model_kwargs = dict(args.model_kwargs, beta=args.commitment_beta)
        if args.in_chans is not None:
            self.model_kwargs["in_channels"] = args.in_chans
        # Built without memory, to check the name and arguments and learn the image size before any data is read.
        try:
            shape = VQVAE_MODELS[args.model](**self.model_kwargs, device="meta")
        except TypeError as error:
            raise ValueError(f"--model-kwargs do not fit {args.model}: {error}") from None
        self.img_size, self.in_chans = shape.img_size, shape.in_channels
        if args.img_size is not None and args.img_size != self.img_size:
            raise ValueError(f"--img-size {args.img_size} does not fit {args.model}: it takes {self.img_size}px images "
                             f"(last scale {shape.patch_nums[-1]} x downsample {shape.downsample}); "
                             "set patch_nums in --model-kwargs")
        # mean = std = 0.5 maps [0, 1] to [-1, 1], the range the decoder's output is read in.
        self.transform = create_transform((self.in_chans, self.img_size, self.img_size), is_training=False,
                                          interpolation="bicubic", crop_pct=1.0, mean=(0.5,) * self.in_chans,
                                          std=(0.5,) * self.in_chans)
        self.img_mode = "L" if self.in_chans == 1 else "RGB"
        self.train_set = self.val_set = None

    def model_config(self) -> dict:
        return {"model": self.args.model, **self.model_kwargs}

    def build_model(self) -> nn.Module:
        return VQVAE_MODELS[self.args.model](**self.model_kwargs)

    def train_dataset(self):
        self.train_set = image_folder(self.args.data_dir, self.args.train_split, transform=self.transform,
                                      input_img_mode=self.img_mode)
        return self.train_set

    def val_dataset(self):
        if not self.args.val_split:
            return None
        self.val_set = image_folder(self.args.data_dir, self.args.val_split, transform=self.transform,
                                    input_img_mode=self.img_mode)
        return self.val_set

    def sample_names(self, dataset):
        return dataset.dataset.filenames()

    def reconstruction_loss(self, reconstruction: torch.Tensor, images: torch.Tensor,
                            reduction: str = "mean") -> torch.Tensor:
        kind = self.args.recon_loss
        loss = 0.0
        if "l1" in kind:
            loss = loss + F.l1_loss(reconstruction, images, reduction=reduction)
        if "l2" in kind:
            loss = loss + F.mse_loss(reconstruction, images, reduction=reduction)
        return loss

    def train_loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, _ = batch
        vqvae: VQVAE = getattr(model, "module", model)  # past a DDP wrapper, for the quantizer's state only
        with _captured_output(vqvae.quant_conv) as latent:
            out = model(images)
        if self.args.dead_code_threshold > 0:
            with torch.no_grad():
                restart_dead_codes(vqvae.quantize, latent[0], self.args.dead_code_threshold, self.args.restart_every)
        return self.reconstruction_loss(out.reconstruction.float(), images) + out.codebook_loss + out.commitment_loss

    def eval_sums(self, model: nn.Module, batch) -> dict[str, float]:
        images, _ = batch
        out = model(images)
        batch_size = images.shape[0]
        per_image = self.reconstruction_loss(out.reconstruction.float(), images, reduction="none")
        vq_terms = (out.codebook_loss + out.commitment_loss) * batch_size  # batch means of equal-sized images
        return {"loss": (per_image.flatten(1).mean(1).sum() + vq_terms).item(),
                "psnr": psnr(out.reconstruction, images).sum().item(), "count": float(batch_size)}

    @torch.no_grad()
    def sample(self, model: nn.Module, out_dir: Path | None, epoch: int | None, step: int) -> None:
        """Originals over reconstructions of the first validation images, and, at epoch ends,
        codebook utilisation."""
        shown = self.val_set if self.val_set is not None else self.train_set
        count = min(SAMPLE_IMAGES, len(shown))
        images = torch.stack([shown[i][0] for i in range(count)]).to(next(model.parameters()).device)
        with evaluating(model):
            reconstruction = model(images).reconstruction.float().clamp(-1, 1)  # every rank: a collective under FSDP
        if out_dir is None:
            return
        save_image(torch.cat([images, reconstruction]).cpu(), picture_path(out_dir, "reconstructions", epoch, step),
                   nrow=count, normalize=True, value_range=(-1, 1))
        if epoch is None:
            return
        usage = utilisation(model.quantize, self.args.dead_code_threshold)
        print(f"codebook: {usage['used_fraction']:.1%} of codes alive, perplexity {usage['perplexity']:.1f}",
              file=sys.stderr)
        log = out_dir / "codebook.jsonl"
        # Lines of this epoch on are dropped: a resumed run redoes the epochs after its checkpoint.
        earlier = [line for line in (log.read_text().splitlines() if log.exists() else [])
                   if json.loads(line)["epoch"] < epoch]
        log.write_text("".join(line + "\n" for line in [*earlier, json.dumps(dict(epoch=epoch, **usage))]))


TASK = VQVAETask


@contextmanager
def _captured_output(module: nn.Module):
    """The output of ``module`` during the block (a one-element list), caught by a forward hook so
    the model runs through its wrapper's ``forward`` as usual."""
    caught: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, _inputs, output: caught.append(output))
    try:
        yield caught
    finally:
        handle.remove()


def psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, in float64, of [-1, 1] images mapped to [0, 1] (peak 1); the
    reconstruction is clamped to the image range first, as it would be displayed."""
    reconstruction = (reconstruction.double().clamp(-1, 1) + 1) / 2
    mse = (reconstruction - (images.double() + 1) / 2).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(MIN_MSE))


def restart_dead_codes(quantizer: MultiScaleQuantizer, latent: torch.Tensor, threshold: float,
                       grace_steps: int) -> torch.Tensor:
    """Move every dead code onto a latent vector of ``latent`` (B, Cvae, h, w) drawn from the global
    random stream, and give it ``grace_steps`` steps of usage credit. Returns the dead mask (V,).

    Under DDP rank 0's result is broadcast, so the codebooks and usage buffers stay identical (each
    rank drew from its own batch and stream). Nothing is read back to the host.
    """
    usage = quantizer.ema_vocab_hit_SV
    codebook = quantizer.embedding.weight
    dead = usage.sum(0) < threshold
    vectors = latent.detach().permute(0, 2, 3, 1).reshape(-1, latent.shape[1]).to(codebook.dtype)
    picks = torch.randint(vectors.shape[0], (codebook.shape[0],), device=vectors.device)
    codebook.copy_(torch.where(dead[:, None], vectors[picks], codebook))
    # Credit that decays to the threshold in grace_steps steps without a pick, spread over the scales.
    credit = threshold * USAGE_DECAY ** -grace_steps / usage.shape[0]
    usage.copy_(torch.where(dead[None, :], torch.full_like(usage, credit), usage))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(codebook, src=0)
        dist.broadcast(usage, src=0)
    return dead


def utilisation(quantizer: MultiScaleQuantizer, threshold: float) -> dict:
    """Codebook use from the training-time usage buffer: the fraction of codes alive (running hits
    summed over scales at least ``threshold``, as the restarts judge them; restarted codes count
    while in grace), the same per scale against an equal share of the threshold (early scales
    collapse first), and the perplexity of the running hits (V when every code is used equally)."""
    usage = quantizer.ema_vocab_hit_SV.double().cpu()
    floor = threshold if threshold > 0 else torch.finfo(torch.float64).tiny
    overall = usage.sum(0)
    probabilities = overall / overall.sum().clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -torch.special.xlogy(probabilities, probabilities).sum().item()
    return {"used_fraction": (overall >= floor).double().mean().item(),
            "used_fraction_per_scale": [(row >= floor / len(usage)).double().mean().item() for row in usage],
            "perplexity": math.exp(entropy)}
