"""Training HMAR's transformer on an ImageFolder tree: ``kzoo train hmar`` (stage 1, Markovian
next-scale prediction, or VAR mode) and ``kzoo train hmar-mask`` (stage 2, masked prediction).

The tokenizer is frozen and lives on the task (``--vae``: a ``kzoo train vqvae`` checkpoint or VAR's
official file), outside the optimizer, EMA, DDP and the checkpoint's weights; its path is recorded
in ``model_config()``. Each batch is tokenized on the device under ``no_grad``.

Stage 1 (hmar.md §1.3): teacher-forced cross-entropy over every token, each scale weighted by
HMAR's log-normal weights (or VAR's uniform per-token weights), labels dropped to the null class
with probability 0.1 inside the model.

Stage 2 (hmar.md §1.4): the model gains a mask branch, a copy of its last ``--mask-branch-depth``
blocks and head plus a mask embedding; only those train. Each step draws gamma ~ U(0, 1) and hides
ceil(gamma n_k) tokens of every scale but the first; the loss is the cross-entropy of the hidden
tokens, averaged over them. The official code hides the same positions in every image of a batch
(hmar.md §8); here each image draws its own.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms
from torchvision.utils import save_image

from kzoo.data.folder import image_folder
from kzoo.models.hmar import TRANSFORMER_MODELS, VQVAE, VQVAE_MODELS, NextScaleTransformer
from kzoo.models.hmar import sample as sample_images
from kzoo.models.hmar.hmar import load_official as load_official_transformer
from kzoo.models.hmar.vqvae import load_official as load_official_vqvae
from kzoo.models.hub import resolve_weights
from kzoo.train import checkpoint
from kzoo.train.task import Task, evaluating, picture_path

HELP = "HMAR's next-scale transformer (stage 1; --mode var for VAR) on a frozen VQ-VAE's tokens"
LOSS_WEIGHTS = ("lognorm", "uniform")
# Classes and samples per class in the grid written to the run folder.
GRID_CLASSES, GRID_PER_CLASS = 10, 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and model")
    data.add_argument("--data-dir", default=None, help="ImageFolder root holding <train-split>/ and <val-split>/")
    data.add_argument("--train-split", default="train")
    data.add_argument("--val-split", default="val", help="'' for no validation")
    data.add_argument("--vae", default=None,
                      help="the frozen tokenizer: a kzoo train vqvae checkpoint (folder or .safetensors), or "
                           "VAR's vae_ch160v4096z32.pth (a path, hf-hub:ORG/REPO/FILE or its name)")
    data.add_argument("--model", default="hmar_mnist", help=f"one of {', '.join(TRANSFORMER_MODELS)}")
    data.add_argument("--model-kwargs", type=json.loads, default={},
                      help='extra model arguments as JSON, e.g. \'{"depth": 6, "embed_dim": 192}\'')
    data.add_argument("--mode", choices=("hmar", "var"), default="hmar",
                      help="hmar: Markovian attention (a scale sees its own tokens); var: block-causal (VAR)")
    data.add_argument("--train-resize", type=float, default=1.0,
                      help="resize the shorter side to this many times the image size (Lanczos), then crop: "
                           "randomly in training, centrally in evaluation (VAR's ImageNet recipe: 1.125)")
    data.add_argument("--loss-weights", choices=LOSS_WEIGHTS, default="lognorm",
                      help="per-scale loss weights: HMAR's log-normal ones, or VAR's uniform weight per token")
    grid = parser.add_argument_group("sample grids (the run folder's samples/)")
    grid.add_argument("--sample-cfg", type=float, default=1.5, help="guidance of the sample grids")
    grid.add_argument("--sample-top-k", type=int, default=0, help="top-k of the sample grids (0: off)")


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    stage = parser.add_argument_group("masked-prediction stage")
    stage.add_argument("--init", default=None,
                       help="the stage-1 model to start from: a kzoo train hmar checkpoint (folder, whose EMA "
                            "weights are taken when it has them, or .safetensors) or an official HMAR stage-1 file")
    stage.add_argument("--mask-branch-depth", type=int, default=None,
                       help="blocks in the mask branch, copied from the last ones (default: 8, as the official "
                            "models, or half the depth if that is less)")


def lognorm_scale_weights(patch_nums: tuple[int, ...]) -> torch.Tensor:
    """HMAR's per-scale loss weights (``loss_reweight_type: lognorm``), summing to 1.

    The official code takes the normal pdf of the z-scored scale sides (unbiased std) and assigns
    it to the scales in reverse order, so the weight of scale k is pdf(z[K-1-k]). That is what makes
    the 256px weights peak at the 4x4/5x5 scales and give the finest scale 7% (hmar.md §1.3's
    table), so it is reproduced as is.
    """
    sides = torch.tensor(patch_nums, dtype=torch.float64)
    if len(sides) == 1:
        return torch.ones(1, dtype=torch.float64)
    z = (sides - sides.mean()) / sides.std()
    density = torch.exp(-z.square() / 2)
    return (density / density.sum()).flip(0)


def token_weights(patch_nums: tuple[int, ...], kind: str) -> torch.Tensor:
    """(L,) loss weights summing to 1: a scale's weight split evenly over its tokens ("lognorm"),
    or 1/L for every token ("uniform", VAR)."""
    sizes = torch.tensor([pn * pn for pn in patch_nums])
    if kind == "uniform":
        return torch.full((int(sizes.sum()),), 1 / float(sizes.sum()), dtype=torch.float64)
    return torch.repeat_interleave(lognorm_scale_weights(patch_nums) / sizes, sizes)


def image_transforms(channels: int, side: int, resize: float) -> tuple[transforms.Compose, transforms.Compose]:
    """(train, eval) transforms to [-1, 1] images of ``side`` pixels: the shorter side resized to
    ``resize * side`` with Lanczos, then a random (train) or central (eval) crop, as VAR's data."""
    resized = round(side * resize)
    to_tensor = [transforms.ToTensor(), transforms.Normalize((0.5,) * channels, (0.5,) * channels)]
    resize_step = transforms.Resize(resized, interpolation=transforms.InterpolationMode.LANCZOS)
    return (transforms.Compose([resize_step, transforms.RandomCrop(side), *to_tensor]),
            transforms.Compose([resize_step, transforms.CenterCrop(side), *to_tensor]))


# --- loading the parts -----------------------------------------------------------------------------

def load_vqvae(spec: str | Path, prefer_ema: bool = True) -> VQVAE:
    """A tokenizer in eval mode from a ``kzoo train vqvae`` checkpoint (its EMA weights when it has
    them and ``prefer_ema``) or from VAR's official file. One-line errors name the file."""
    path = resolve_weights(spec)
    found = checkpoint.read_kzoo_model(path, prefer_ema)
    if found is None:
        return load_official_vqvae(path).eval()
    weights, config = found
    name = config.pop("model")
    if name not in VQVAE_MODELS:
        raise ValueError(f"{path}: a checkpoint of {name}, not of a VQ-VAE tokenizer ({', '.join(VQVAE_MODELS)})")
    return checkpoint.load_strict(VQVAE_MODELS[name](**config), weights, path).eval()


def load_transformer(spec: str | Path, prefer_ema: bool = True,
                     attention_mode: str | None = None) -> tuple[NextScaleTransformer, str | None]:
    """(model in eval mode, the tokenizer its checkpoint was trained with or None) from a kzoo
    ``train hmar``/``hmar-mask`` checkpoint or an official HMAR/VAR file. ``attention_mode``
    overrides an official file's (an HMAR stage-1 file has VAR's layout); a kzoo checkpoint must
    have been trained with it."""
    path = resolve_weights(spec)
    found = checkpoint.read_kzoo_model(path, prefer_ema)
    if found is None:
        mode = {} if attention_mode is None else {"attention_mode": attention_mode}
        return load_official_transformer(path, **mode).eval(), None
    weights, config = found
    name = config.pop("model")
    if name not in TRANSFORMER_MODELS:
        raise ValueError(f"{path}: a checkpoint of {name}, not of an HMAR/VAR transformer "
                         f"({', '.join(TRANSFORMER_MODELS)})")
    vae = config.pop("vae", None)
    config.pop("init", None)
    if attention_mode is not None and config.get("attention_mode", "markov") != attention_mode:
        raise ValueError(f"{path}: trained with {config.get('attention_mode')} attention, not {attention_mode}")
    return checkpoint.load_strict(TRANSFORMER_MODELS[name](**config), weights, path).eval(), vae


# --- the tasks --------------------------------------------------------------------------------------

class HMARTask(Task):
    """Stage 1: next-scale prediction over all tokens."""

    eval_metric, higher_is_better = "loss", False

    def __init__(self, args: argparse.Namespace):
        if not args.data_dir:
            raise ValueError("--data-dir is required (an ImageFolder root with train/ and val/)")
        if not args.vae:
            raise ValueError("--vae is required: the tokenizer's checkpoint (kzoo train vqvae) or official file")
        if args.model not in TRANSFORMER_MODELS:
            raise ValueError(f"unknown model {args.model!r} (known: {', '.join(TRANSFORMER_MODELS)})")
        self.args = args
        self.vae_path = str(resolve_weights(args.vae))
        self.vqvae = load_vqvae(self.vae_path).requires_grad_(False)
        self.model_kwargs = dict(args.model_kwargs, attention_mode="markov" if args.mode == "hmar" else "block_causal",
                                 patch_nums=self.vqvae.patch_nums, vocab_size=self.vqvae.vocab_size,
                                 vae_channels=self.vqvae.z_channels)
        try:  # built without memory, to check the name and arguments before any data is read
            shape = TRANSFORMER_MODELS[args.model](**self.model_kwargs, device="meta")
        except (TypeError, ValueError) as error:
            raise ValueError(f"--model-kwargs do not fit {args.model}: {error}") from None
        self.model_kwargs["patch_nums"] = list(shape.patch_nums)  # plain values for the checkpoint's JSON
        self.num_classes = shape.num_classes
        self.weights = token_weights(shape.patch_nums, args.loss_weights).float()
        if args.train_resize < 1.0:
            raise ValueError(f"--train-resize must be at least 1, got {args.train_resize}")
        self.train_transform, self.eval_transform = image_transforms(self.vqvae.in_channels, self.vqvae.img_size,
                                                                     args.train_resize)
        self.img_mode = "L" if self.vqvae.in_channels == 1 else "RGB"
        self.train_set = None

    def setup(self, device: torch.device) -> None:
        self.vqvae.to(device)
        self.weights = self.weights.to(device)

    def model_config(self) -> dict:
        return {"model": self.args.model, **self.model_kwargs, "vae": self.vae_path}

    def build_model(self) -> nn.Module:
        return TRANSFORMER_MODELS[self.args.model](**self.model_kwargs)

    def _dataset(self, split: str, transform):
        dataset = image_folder(self.args.data_dir, split, transform=transform, input_img_mode=self.img_mode)
        classes = len(dataset.dataset.reader.class_to_idx)
        if classes > self.num_classes:
            raise ValueError(f"{Path(self.args.data_dir) / split}: {classes} classes, but {self.args.model} has "
                             f"{self.num_classes} (set num_classes in --model-kwargs)")
        return dataset

    def train_dataset(self):
        self.train_set = self._dataset(self.args.train_split, self.train_transform)
        return self.train_set

    def val_dataset(self):
        return self._dataset(self.args.val_split, self.eval_transform) if self.args.val_split else None

    def sample_names(self, dataset):
        return dataset.dataset.filenames()

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(per-scale indices, the next-scale teacher-forcing input) of a batch of images."""
        indices = self.vqvae.img_to_idx(images.float())
        return indices, self.vqvae.idx_to_var_input(indices)

    def train_loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        indices, next_input = self.tokens(images)
        logits = model(labels, next_input)
        per_token = F.cross_entropy(logits.float().transpose(1, 2), torch.cat(indices, dim=1), reduction="none")
        return (per_token * self.weights).sum(1).mean()

    def eval_sums(self, model: nn.Module, batch) -> dict[str, float]:
        images, labels = batch
        indices, next_input = self.tokens(images)
        logits = model(labels, next_input).float()
        targets = torch.cat(indices, dim=1)
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        sums = {"loss": (per_token * self.weights).sum().item(),
                "token_acc": (logits.argmax(-1) == targets).float().mean(1).sum().item() * 100,
                "count": float(labels.shape[0])}
        model_ = getattr(model, "module", model)
        for k, (begin, end) in enumerate(model_.scale_spans):  # per-scale mean CE per image, summed
            sums[f"ce_scale{k}"] = per_token[:, begin:end].mean(1).sum().item()
        return sums

    @torch.no_grad()
    def sample(self, model: nn.Module, out_dir: Path | None, epoch: int | None, step: int) -> None:
        """A grid of classes (rows) by samples (columns) in ``samples/``."""
        if any(type(p).__name__ == "DTensor" for p in model.parameters()):
            return  # sharded by FSDP: the sampler calls submodules, which do not gather parameters
        device = next(model.parameters()).device
        classes = torch.arange(min(GRID_CLASSES, self.num_classes), device=device)
        labels = classes.repeat_interleave(GRID_PER_CLASS)
        with evaluating(model):
            images = sample_images(model, self.vqvae, labels, cfg=self.args.sample_cfg,
                                   top_k=self.args.sample_top_k, seed=0)
        if out_dir is not None:
            save_image(images.cpu(), picture_path(out_dir, "samples", epoch, step), nrow=GRID_PER_CLASS, padding=1)


class HMARMaskTask(HMARTask):
    """Stage 2: the mask branch learns to re-predict hidden tokens; everything else is frozen."""

    def __init__(self, args: argparse.Namespace):
        if not args.init:
            raise ValueError("--init is required: the stage-1 checkpoint (kzoo train hmar) to start from")
        if args.mode != "hmar":
            raise ValueError("the masked-prediction stage is HMAR's: --mode must be hmar")
        super().__init__(args)
        self.init_path = str(resolve_weights(args.init))
        stage1, _ = load_transformer(self.init_path)
        if stage1.mask_branch_depth:
            raise ValueError(f"{self.init_path}: already has a mask branch; --init takes a stage-1 model")
        depth = self.model_kwargs.get("depth", stage1.depth)
        branch = args.mask_branch_depth if args.mask_branch_depth is not None else min(8, depth // 2)
        if not 1 <= branch <= depth:
            raise ValueError(f"--mask-branch-depth must lie in [1, {depth}], got {branch}")
        self.model_kwargs["mask_branch_depth"] = branch
        self.stage1_weights = stage1.state_dict()

    def model_config(self) -> dict:
        return {**super().model_config(), "init": self.init_path}

    def build_model(self) -> nn.Module:
        model = super().build_model()
        missing, unexpected = model.load_state_dict(self.stage1_weights, strict=False)
        branch_names = {name for name in model.state_dict() if name.startswith("mask_")}
        if unexpected or set(missing) - branch_names:
            raise ValueError(f"{self.init_path}: does not fit {self.args.model} with {self.args.model_kwargs} "
                             f"(missing {sorted(set(missing) - branch_names)[:2]}, unexpected {unexpected[:2]})")
        model.init_mask_branch()
        model.requires_grad_(False)
        for param in model.mask_branch_parameters():
            param.requires_grad_(True)
        return model

    def masked_positions(self, batch: int, device: torch.device, gamma: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L) bool: ceil(gamma n_k) positions of every scale k >= 1 per image, drawn uniformly;
        ``gamma`` is a 0-d tensor on ``device``, so nothing waits for the host."""
        columns = [torch.zeros(batch, self.vqvae.patch_nums[0] ** 2, dtype=torch.bool, device=device)]
        for pn in self.vqvae.patch_nums[1:]:
            count = pn * pn
            rank = torch.rand(batch, count, device=device, generator=generator).argsort(dim=1).argsort(dim=1)
            columns.append(rank < torch.ceil(gamma * count))
        return torch.cat(columns, dim=1)

    def _masked_forward(self, model: nn.Module, batch, gamma: torch.Tensor, generator=None):
        """(logits (B, L, V), targets (B, L), masked (B, L)) of the mask branch on hidden tokens."""
        images, labels = batch
        indices, next_input = self.tokens(images)
        mask_input = self.vqvae.idx_to_mask_input(indices)
        masked = self.masked_positions(labels.shape[0], labels.device, gamma, generator)
        return model(labels, next_input, mask_input, masked).float(), torch.cat(indices, dim=1), masked

    def train_loss(self, model: nn.Module, batch) -> torch.Tensor:
        # The global stream: per rank, and restored on resume. gamma > 0 hides at least one token a scale.
        gamma = torch.rand((), device=batch[1].device).clamp_min(1e-6)
        logits, targets, masked = self._masked_forward(model, batch, gamma)
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return (per_token * masked).sum() / masked.sum()  # a flat mean over hidden tokens, as the official one

    def eval_sums(self, model: nn.Module, batch) -> dict[str, float]:
        """Cross-entropy and accuracy of hidden tokens at gamma = 0.5, positions from a fixed seed."""
        generator = torch.Generator(device=batch[1].device).manual_seed(0)
        logits, targets, masked = self._masked_forward(model, batch, torch.tensor(0.5, device=batch[1].device),
                                                       generator)
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        hits = (logits.argmax(-1) == targets) & masked
        return {"loss": (per_token * masked).sum().item(), "token_acc": hits.sum().item() * 100,
                "count": float(masked.sum().item())}


TASK = HMARTask
