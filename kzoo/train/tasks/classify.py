"""Image classification (KAT, or any timm model) on an ImageFolder tree: the task and ``kzoo validate``.

Data, augmentation, mixup and losses are timm's own (``create_dataset``, ``create_transform``,
``Mixup``, ``SoftTargetCrossEntropy``), configured with timm train.py's flag names.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_pretrained_cfg
from torch import nn

from kzoo.data.folder import image_folder
from kzoo.models.hub import resolve_weights
from kzoo.models.kat import load_checkpoint_file
from kzoo.train import checkpoint, distributed
from kzoo.train.engine import evaluate
from kzoo.train.task import Task


HELP = "image classification on an ImageFolder tree (KAT or any timm model)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and model")
    data.add_argument("--data-dir", default=None, help="ImageFolder root holding <train-split>/ and <val-split>/")
    data.add_argument("--train-split", default="train")
    data.add_argument("--val-split", default="val", help="'' for no validation")
    data.add_argument("--model", default="kat_tiny_swish_patch16_224", help="timm model name")
    data.add_argument("--pretrained-path", default=None, help="weights to start from: a .pth/.safetensors file or hf-hub:ORG/REPO/FILE")
    data.add_argument("--num-classes", type=int, default=None, help="default: the number of class folders")
    data.add_argument("--img-size", type=int, default=None)
    data.add_argument("--in-chans", type=int, default=None, help="1 reads images as grayscale")
    data.add_argument("--model-kwargs", type=json.loads, default={},
                      help='extra model arguments as JSON, e.g. \'{"patch_size": 4, "depth": 6}\'')
    data.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    data.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    data.add_argument("--mean", type=float, nargs="+", default=None)
    data.add_argument("--std", type=float, nargs="+", default=None)
    data.add_argument("--crop-pct", type=float, default=None)
    data.add_argument("--interpolation", default="", help="eval resize interpolation (default: the model's)")

    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    aug.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    aug.add_argument("--mixup-prob", type=float, default=1.0)
    aug.add_argument("--mixup-switch-prob", type=float, default=0.5)
    aug.add_argument("--mixup-mode", default="batch")
    aug.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    aug.add_argument("--aa", default=None, help="RandAugment/AutoAugment policy, e.g. rand-m9-mstd0.5-inc1")
    aug.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    aug.add_argument("--remode", default="pixel")
    aug.add_argument("--recount", type=int, default=1)
    aug.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], help="random-resized-crop area range")
    aug.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], help="random-resized-crop aspect range")
    aug.add_argument("--hflip", type=float, default=0.5)
    aug.add_argument("--vflip", type=float, default=0.0)
    aug.add_argument("--color-jitter", type=float, default=0.4, help="0 turns it off")
    aug.add_argument("--train-interpolation", default="random")


def _model_kwargs(num_classes: int | None, in_chans: int | None, img_size: int | None,
                  extra: dict) -> dict:
    kwargs = dict(extra)
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans), ("img_size", img_size)):
        if value is not None:
            kwargs[key] = value
    return kwargs


def _data_config(model_name: str, values: dict) -> dict:
    """timm's resolved preprocessing (input size, mean, std, crop, interpolation) before the model exists."""
    cfg = get_pretrained_cfg(model_name)
    return resolve_data_config({k: v for k, v in values.items() if v not in (None, "")},
                               pretrained_cfg=cfg.to_dict() if cfg else {})


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r} (see timm.list_models('kat*'))")


class ClassifyTask(Task):
    eval_metric, higher_is_better = "top1", True

    def __init__(self, args: argparse.Namespace):
        if not args.data_dir:
            raise ValueError("--data-dir is required (an ImageFolder root with train/ and val/)")
        check_model_name(args.model)
        # Resolved (downloaded, if need be) before any data is read, so a missing file stops the run at once.
        self.pretrained_file = resolve_weights(args.pretrained_path) if args.pretrained_path else None
        self.args = args
        self.num_classes = args.num_classes
        self.data_config = _data_config(args.model, dict(
            in_chans=args.in_chans, img_size=args.img_size, mean=args.mean, std=args.std,
            crop_pct=args.crop_pct, interpolation=args.interpolation))
        self.img_mode = "L" if self.data_config["input_size"][0] == 1 else "RGB"
        mixing = args.mixup > 0 or args.cutmix > 0
        if mixing and args.batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even batch size, got -b {args.batch_size}")
        self.mixup = None
        self.train_criterion: nn.Module = (SoftTargetCrossEntropy() if mixing else
                                           LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing
                                           else nn.CrossEntropyLoss())

    def train_dataset(self):
        a, dc = self.args, self.data_config
        transform = create_transform(
            dc["input_size"], is_training=True, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
            vflip=a.vflip, color_jitter=a.color_jitter or None, auto_augment=a.aa,
            interpolation=a.train_interpolation, mean=dc["mean"], std=dc["std"],
            re_prob=a.reprob, re_mode=a.remode, re_count=a.recount)
        dataset = image_folder(a.data_dir, a.train_split, transform=transform, input_img_mode=self.img_mode)
        found = len(dataset.dataset.reader.class_to_idx)
        if self.num_classes is None:
            self.num_classes = found
        elif self.num_classes < found:
            raise ValueError(f"{Path(a.data_dir) / a.train_split}: {found} classes, but --num-classes {self.num_classes}")
        if a.mixup > 0 or a.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                               switch_prob=a.mixup_switch_prob, mode=a.mixup_mode,
                               label_smoothing=a.smoothing, num_classes=self.num_classes)
        return dataset

    def val_dataset(self):
        if not self.args.val_split:
            return None
        return image_folder(self.args.data_dir, self.args.val_split, transform=eval_transform(self.data_config),
                            input_img_mode=self.img_mode)

    def sample_names(self, dataset):
        return dataset.dataset.filenames()  # relative paths, class folder included

    def model_config(self) -> dict:
        a = self.args
        return dict(model=a.model, data_config=self.data_config,
                    **_model_kwargs(self.num_classes, self.data_config["input_size"][0],
                                    a.img_size, a.model_kwargs))

    def build_model(self) -> nn.Module:
        a = self.args
        config = self.model_config()
        kwargs = {k: v for k, v in config.items() if k not in ("model", "data_config")}
        kwargs.update(drop_rate=a.drop, **({"drop_path_rate": a.drop_path} if a.drop_path is not None else {}))
        if self.pretrained_file:
            overlay = dict(file=str(self.pretrained_file))
            classes = _classes_in(self.pretrained_file, a.model)
            if classes is not None:
                overlay["num_classes"] = classes
            return timm.create_model(a.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return timm.create_model(a.model, **kwargs)

    def train_loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return self.train_criterion(model(images), targets)

    def eval_sums(self, model: nn.Module, batch) -> dict[str, float]:
        return classification_sums(model, batch)


TASK = ClassifyTask


def _classes_in(path: str | Path, model_name: str) -> int | None:
    """Rows of the classifier in a weights file, so timm keeps that head when they match
    --num-classes (fine-tuning on the same classes) and drops it otherwise."""
    state_dict = load_checkpoint_file(path)
    cfg = get_pretrained_cfg(model_name)
    head = state_dict.get(f"{cfg.classifier}.weight") if cfg and isinstance(cfg.classifier, str) else None
    return None if head is None else head.shape[0]


def classification_sums(model: nn.Module, batch) -> dict[str, float]:
    """Summed cross-entropy and top-1/top-5 hits (in percent units) of one (images, targets) batch."""
    images, targets = batch
    logits = model(images).float()
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = top == targets[:, None]
    return {"loss": F.cross_entropy(logits, targets, reduction="sum").item(),
            "top1": 100.0 * hits[:, 0].sum().item(), "top5": 100.0 * hits.any(dim=-1).sum().item(),
            "count": float(targets.numel())}


def eval_transform(data_config: dict):
    return create_transform(data_config["input_size"], is_training=False, interpolation=data_config["interpolation"],
                            mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"],
                            crop_mode=data_config.get("crop_mode", "center"))


# --- kzoo validate ---------------------------------------------------------------------------------

def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, help="ImageFolder root")
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", default=None, help="timm model name (default: the checkpoint's)")
    parser.add_argument("--checkpoint", required=True,
                        help="a kzoo checkpoint folder or .safetensors, or other weights (.pth) for --model; "
                             "a local path or hf-hub:ORG/REPO/FILE")
    parser.add_argument("--use-ema", action="store_true", help="the checkpoint's EMA weights")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--in-chans", type=int, default=None)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--crop-pct", type=float, default=None)
    parser.add_argument("--interpolation", default="")
    parser.add_argument("-b", "--batch-size", type=int, default=256)
    parser.add_argument("-j", "--workers", type=int, default=4)
    parser.add_argument("--device", default=None)
    parser.add_argument("--results-file", default="", help="append the CSV row here (header when new)")


def create_with_weights(name: str, path: str | Path, **kwargs) -> nn.Module:
    """timm model ``name`` with third-party weights from a local file (e.g. the official KAT .pth),
    through timm's pretrained loading, so that the family's checkpoint filter adapts the keys. The
    file is read once, weights only; a file that does not fit is a ValueError naming it."""
    check_model_name(name)
    state_dict = load_checkpoint_file(path)
    overlay = dict(file=str(path), state_dict=state_dict)
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as error:
        # torch's load_state_dict on keys or shapes that do not fit: the file's fault. Any other
        # RuntimeError is not, and keeps its traceback.
        if not str(error).startswith("Error(s) in loading state_dict"):
            raise
        detail = " ".join(str(error).split())
        raise ValueError(f"{path}: does not fit {name} ({detail[:300]}{'...' if len(detail) > 300 else ''})") from None


def load_classifier(path: str | Path, model_name: str | None = None, *, use_ema: bool = False,
                    **model_kwargs) -> tuple[str, nn.Module, dict]:
    """(name, model, data config) of a kzoo checkpoint (a folder or .safetensors: the model is rebuilt
    from the ``model_config()`` in its metadata), or of third-party weights for ``model_name``, which
    is then built with ``model_kwargs`` and timm's data config. ``path`` may also be
    ``hf-hub:ORG/REPO/FILE`` (see ``kzoo.models.hub``)."""
    path = resolve_weights(path)
    if use_ema and path.is_dir() and not (path / checkpoint.EMA_FILE).exists():
        raise FileNotFoundError(f"{path / checkpoint.EMA_FILE}: no such checkpoint file (trained without --model-ema)")
    found = checkpoint.read_kzoo_model(path, prefer_ema=use_ema)
    if found is not None:
        weights, config = found
        name = config.pop("model")
        if model_name and model_name != name:
            raise ValueError(f"{path}: a checkpoint of {name}, not of {model_name}")
        data_config = config.pop("data_config")
        return name, checkpoint.load_strict(timm.create_model(name, **config), weights, path), data_config
    if not model_name:
        raise ValueError(f"{path}: not a kzoo checkpoint, so --model is required")
    model = create_with_weights(model_name, path, **model_kwargs)
    return model_name, model, _data_config(model_name, dict(in_chans=model_kwargs.get("in_chans"),
                                                            img_size=model_kwargs.get("img_size")))


def validate(args: argparse.Namespace) -> int:
    """Top-1/top-5 of a checkpoint on an ImageFolder split; prints and appends timm validate.py's row."""
    name, model, data_config = load_classifier(
        args.checkpoint, args.model, use_ema=args.use_ema,
        **_model_kwargs(args.num_classes, args.in_chans, args.img_size, {}))
    data_config.update({k: v for k, v in (("crop_pct", args.crop_pct), ("interpolation", args.interpolation)) if v})
    context = distributed.setup(args.device)
    dataset = image_folder(args.data_dir, args.split, transform=eval_transform(data_config),
                           input_img_mode="L" if data_config["input_size"][0] == 1 else "RGB")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    metrics = evaluate(classification_sums, model.to(context.device), loader, context, desc=f"validate {name}")
    top1, top5 = metrics["top1"], metrics["top5"]
    row = dict(model=name, top1=round(top1, 3), top1_err=round(100 - top1, 3), top5=round(top5, 3),
               top5_err=round(100 - top5, 3), param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
               img_size=data_config["input_size"][-1], crop_pct=data_config["crop_pct"],
               interpolation=data_config["interpolation"])
    writer = csv.DictWriter(sys.stdout, fieldnames=list(row))
    writer.writeheader()
    writer.writerow(row)
    if args.results_file:
        results = Path(args.results_file)
        new = not results.exists() or results.stat().st_size == 0
        with open(results, "a", newline="") as f:
            out = csv.DictWriter(f, fieldnames=list(row))
            if new:
                out.writeheader()
            out.writerow(row)
    return 0
