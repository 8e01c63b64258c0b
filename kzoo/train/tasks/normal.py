"""Training StableNormal's two stages on synthetic scenes: ``kzoo train normal --stage yoso|sgdrn``.

- ``--stage yoso`` trains the one-step estimator with the angular loss on valid pixels. With
  ``--shrinkage P`` (StableNormal's shrinkage regulariser, P = 0.4 in the paper) the noise input
  is zeros for a fraction P of the samples and Gaussian for the rest.
- ``--stage sgdrn`` trains the refiner, x0-prediction, on top of a frozen estimator
  (``--estimator``): the estimator's normals and 1/8 KAT features condition the refiner and are
  computed in the step without gradients; the estimator stays on the task, outside the
  optimizer, the EMA, DDP and the checkpoint's weights, and its path is recorded in the model
  config. Timesteps are drawn uniformly from [1, 401] (where the heuristic sampler runs) with
  probability 1 - ``--full-range``, else from [1, 999] (the pure-noise start); a fraction
  ``--from-estimate`` of the samples is instead the sampler's first step, the estimate noised to 401.

Data come from ``kzoo data normals`` (the npz layout): ``<data-dir>/<train-split>`` and
``<data-dir>/<val-split>``. Evaluation reports the DSINE metrics pooled over valid pixels
(``angle`` is the mean angular error; ``angle_sq`` its mean square; ``within_*`` the fractions
under each threshold), of the full pipeline at ``--val-steps`` for the refiner. Each epoch writes
a panel of image, ground truth, estimate (and refinement) to ``panels/``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from kzoo.data.normals import NormalScenes, encode_normals
from kzoo.models.hub import resolve_weights
from kzoo.models.stablenormal import ESTIMATORS, REFINERS, YOSO, StableNormal, ray_directions
from kzoo.models.stablenormal.metrics import angular_error, error_sums
from kzoo.models.stablenormal.sampling import START_TIMESTEP, TRAIN_TIMESTEPS, alphas_cumprod
from kzoo.train import checkpoint
from kzoo.train.task import Task, evaluating, picture_path

HELP = "StableNormal's YOSO estimator or SG-DRN refiner on kzoo data normals scenes"

STAGES = {"yoso": ("yoso_kat", ESTIMATORS), "sgdrn": ("sgdrn_small", REFINERS)}
PANEL_IMAGES = 4
# acos has an infinite slope at +-1; the loss clamps the cosine just inside.
MAX_COS = 1 - 1e-6
PIPELINE_MODEL = "stablenormal"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data and model")
    group.add_argument("--stage", choices=tuple(STAGES), default="yoso")
    group.add_argument("--data-dir", default=None, help="folder holding <train-split>/ and <val-split>/ npz sets")
    group.add_argument("--train-split", default="train")
    group.add_argument("--val-split", default="val", help="'' for no validation")
    group.add_argument("--val-images", type=int, default=256, help="validate on the first N images of the split")
    group.add_argument("--val-steps", type=int, default=10, help="sgdrn: refiner steps in validation")
    group.add_argument("--model", default=None,
                       help=f"yoso: one of {', '.join(ESTIMATORS)} (default yoso_kat); sgdrn: one of "
                            f"{', '.join(REFINERS)} (default sgdrn_small)")
    group.add_argument("--model-kwargs", type=json.loads, default={}, help="extra model arguments as JSON")
    group.add_argument("--estimator", default=None, help="sgdrn: the trained YOSO (a kzoo checkpoint), kept frozen")
    group.add_argument("--init-from", default=None,
                       help="start from the weights (EMA when present) of a checkpoint of the same model, or this "
                            "stage's network in a pipeline file such as the bundled one, with a fresh optimizer "
                            "and schedule: a finished run trained further (--resume continues one)")
    group.add_argument("--crop", type=int, default=96, help="random square crop of the training images (0: none)")
    group.add_argument("--no-flip", action="store_true", help="no random left-right mirroring")
    group.add_argument("--shrinkage", type=float, default=0.4,
                       help="yoso: fraction of samples whose noise input is zeros (StableNormal's shrinkage "
                            "regulariser; 1 = plain regression)")
    group.add_argument("--from-estimate", type=float, default=0.5,
                       help="sgdrn: fraction of samples noised from the estimate at t = 401 (the sampler's start) "
                            "instead of from the ground truth")
    group.add_argument("--estimate-at", choices=("start", "range"), default="start",
                       help="sgdrn: the --from-estimate samples' timestep: 401, the sampler's start, or any in "
                            "[1, 401], where the sampler's later steps feed the refiner its own answer")
    group.add_argument("--full-range", type=float, default=0.3,
                       help="sgdrn: fraction of timesteps drawn from the whole schedule instead of [1, 401]")


def angular_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean angle in radians between unit normals (B, 3, H, W) over the valid pixels."""
    cos = (pred.to(torch.promote_types(pred.dtype, torch.float32)) * gt).sum(1).clamp(-MAX_COS, MAX_COS)
    return torch.acos(cos)[mask].mean() if mask.any() else pred.sum() * 0


def _read_checkpoint(spec: str | Path) -> tuple[Path, dict, str, dict]:
    """(path, weights, model name, the rest of the model config) of a kzoo checkpoint, EMA weights when present."""
    path = resolve_weights(spec)
    found = checkpoint.read_kzoo_model(path)
    if found is None:
        raise ValueError(f"{path}: not a kzoo checkpoint")
    weights, config = found
    return path, weights, config.pop("model"), config


def _pipeline_part(path: Path, weights: dict, config: dict, part: str) -> tuple[str, dict, dict]:
    """(model name, float32 weights, config) of a pipeline file's estimator or refiner, so that a
    fresh checkout can train the bundled networks further (the file stores them as float16)."""
    if part not in config:
        raise ValueError(f"{path}: a pipeline without a {part}")
    config = dict(config[part])
    prefix = part + "."
    weights = {key[len(prefix):]: value.float() if value.is_floating_point() else value
               for key, value in weights.items() if key.startswith(prefix)}
    return config.pop("model"), weights, config


def load_estimator(spec: str | Path) -> tuple[YOSO, Path]:
    """A YOSO in eval mode from a ``kzoo train normal --stage yoso`` checkpoint (EMA weights when present)."""
    path, weights, name, config = _read_checkpoint(spec)
    if name not in ESTIMATORS:
        raise ValueError(f"{path}: a checkpoint of {name}, not of a YOSO estimator ({', '.join(ESTIMATORS)})")
    return checkpoint.load_strict(ESTIMATORS[name](**config), weights, path).eval(), path


def load_pipeline(spec: str | Path) -> StableNormal:
    """The pipeline of a bundled-style file (estimator and refiner in one), a YOSO checkpoint
    (turbo only), or an SG-DRN checkpoint (with the estimator it was trained on). One-line errors."""
    path, weights, name, config = _read_checkpoint(spec)
    if name in ESTIMATORS:
        return StableNormal(load_estimator(path)[0]).eval()
    if name in REFINERS:
        estimator_path = config.pop("estimator")
        estimator = load_estimator(estimator_path)[0]
        refiner = checkpoint.load_strict(REFINERS[name](**config), weights, path)
        return StableNormal(estimator, refiner).eval()
    if name == PIPELINE_MODEL:
        pipeline = build_pipeline(config["estimator"], config.get("refiner"), config.get("resolution"))
        return checkpoint.load_strict(pipeline, weights, path).eval()
    raise ValueError(f"{path}: a checkpoint of {name}, not of a StableNormal model "
                     f"({', '.join([*ESTIMATORS, *REFINERS])})")


def build_pipeline(estimator_config: dict, refiner_config: dict | None = None,
                   resolution: int | None = None) -> StableNormal:
    """An untrained pipeline from model configs ({"model": name, **kwargs}, as checkpoints record them)."""
    def build(config: dict, models: dict):
        kwargs = {key: value for key, value in config.items() if key not in ("model", "estimator")}
        if config["model"] not in models:
            raise ValueError(f"unknown model {config['model']!r} (known: {', '.join(models)})")
        return models[config["model"]](**kwargs)

    refiner = build(refiner_config, REFINERS) if refiner_config else None
    return StableNormal(build(estimator_config, ESTIMATORS), refiner, resolution=resolution)


def save_pipeline(pipeline: StableNormal, path: str | Path, estimator_config: dict, refiner_config: dict | None,
                  half: bool = False) -> None:
    """One ``.safetensors`` holding the estimator and refiner (``estimator.*``, ``refiner.*``) and both
    configs, which ``load_pipeline`` reads back; ``half`` stores float tensors as float16."""
    weights = {name: (t.half() if half and t.is_floating_point() else t).detach().contiguous()
               for name, t in pipeline.state_dict().items()}
    config = {"model": PIPELINE_MODEL, "estimator": estimator_config, "resolution": pipeline.resolution}
    if refiner_config:
        config["refiner"] = {key: value for key, value in refiner_config.items() if key != "estimator"}
    save_file(weights, str(path), metadata=checkpoint.metadata_for(config, step=0, epoch=0))


class NormalTask(Task):
    eval_metric, higher_is_better = "angle", False

    def __init__(self, args: argparse.Namespace):
        if not args.data_dir:
            raise ValueError("--data-dir is required (a folder with train/ and val/ sets from kzoo data normals)")
        default_model, models = STAGES[args.stage]
        self.model_name = args.model or default_model
        if self.model_name not in models:
            raise ValueError(f"--stage {args.stage} trains one of {', '.join(models)}, not {self.model_name!r}")
        if args.stage == "sgdrn" and not args.estimator:
            raise ValueError("--stage sgdrn needs --estimator (a kzoo train normal --stage yoso checkpoint)")
        for flag in ("shrinkage", "full_range", "from_estimate"):
            if not 0 <= getattr(args, flag) <= 1:
                raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must lie in [0, 1]")
        self.args = args
        self.model_kwargs = dict(args.model_kwargs)
        self.estimator: YOSO | None = None
        self.estimator_path: Path | None = None
        self.val_set = None

    def setup(self, device: torch.device) -> None:
        if self.args.stage == "sgdrn":
            estimator, path = load_estimator(self.args.estimator)
            # Recorded absolute, and through moving links (checkpoints/last, best), so the refiner's
            # checkpoint names the estimator it was trained on from any working directory; a file's own
            # link (the Hub cache's blob) is kept, since its name says it is a .safetensors.
            self.estimator_path = path.resolve() if path.is_dir() else path.parent.resolve() / path.name
            self.estimator = estimator.to(device).requires_grad_(False)
            self.model_kwargs.setdefault("semantic_channels", self.estimator.semantic_channels)
        self.alphas_cumprod = alphas_cumprod(device).float()

    def model_config(self) -> dict:
        config = {"model": self.model_name, **self.model_kwargs}
        if self.estimator_path is not None:
            config["estimator"] = str(self.estimator_path)
        return config

    def build_model(self) -> nn.Module:
        models = STAGES[self.args.stage][1]
        weights = None
        if self.args.init_from:
            path, weights, name, config = _read_checkpoint(self.args.init_from)
            if name == PIPELINE_MODEL:
                name, weights, config = _pipeline_part(path, weights, config, "estimator" if self.args.stage == "yoso"
                                                       else "refiner")
            if name != self.model_name:
                raise ValueError(f"--init-from {path}: a checkpoint of {name}, not of {self.model_name}")
            config.pop("estimator", None)
            # The checkpoint's architecture, unless --model-kwargs says otherwise (then loading names the misfit).
            self.model_kwargs = {**config, **self.model_kwargs}
        try:
            model = models[self.model_name](**self.model_kwargs)
        except TypeError as error:
            raise ValueError(f"--model-kwargs do not fit {self.model_name}: {error}") from None
        if weights is None:
            return model
        # A bilinear estimator grows convex upsampling (--model-kwargs '{"upsample": "convex"}') with its output kept.
        grown = model.grown_keys() if isinstance(model, YOSO) else set()
        return checkpoint.load_strict(model, weights, Path(self.args.init_from), may_miss=grown)

    def train_dataset(self):
        crop = self.args.crop or None
        return NormalScenes(Path(self.args.data_dir) / self.args.train_split, flip=not self.args.no_flip, crop=crop)

    def val_dataset(self):
        if not self.args.val_split:
            return None
        self.val_set = NormalScenes(Path(self.args.data_dir) / self.args.val_split, limit=self.args.val_images)
        return self.val_set

    def sample_names(self, dataset):
        return dataset.names()

    def _inputs(self, batch):
        image, normal, mask, intrinsics = batch
        return image, normal, mask, ray_directions(intrinsics, *image.shape[-2:])

    def train_loss(self, model: nn.Module, batch) -> torch.Tensor:
        image, gt, mask, rays = self._inputs(batch)
        if self.args.stage == "yoso":
            noise = torch.randn(image.shape[0], 3, *image.shape[-2:], device=image.device)
            keep = (torch.rand(image.shape[0], 1, 1, 1, device=image.device) >= self.args.shrinkage).float()
            return angular_loss(model(image, rays, noise * keep), gt, mask)
        with torch.no_grad():
            coarse, semantic = self.estimator(image, rays, return_semantic=True)
        batch_size = image.shape[0]
        full = torch.rand(batch_size, device=image.device) < self.args.full_range
        top = torch.where(full, TRAIN_TIMESTEPS - 1, START_TIMESTEP)
        timesteps = 1 + (torch.rand(batch_size, device=image.device) * top).long()
        # The sampler's first step noises the estimate, not the truth, to 401: a fraction of the
        # batch is drawn that way, so the refiner learns to correct the estimate rather than to
        # trust x_t, which only carries the truth in training.
        from_estimate = torch.rand(batch_size, device=image.device) < self.args.from_estimate
        estimate_timesteps = (START_TIMESTEP if self.args.estimate_at == "start"
                              else 1 + (torch.rand(batch_size, device=image.device) * START_TIMESTEP).long())
        timesteps = torch.where(from_estimate, estimate_timesteps, timesteps)
        a = self.alphas_cumprod[timesteps][:, None, None, None]
        start = torch.where(from_estimate[:, None, None, None], coarse, gt)
        x_t = a.sqrt() * start + (1 - a).sqrt() * torch.randn_like(gt)
        return angular_loss(model(x_t, timesteps, image, rays, coarse, semantic), gt, mask)

    def _predict(self, model: nn.Module, image: torch.Tensor, intrinsics: torch.Tensor, steps: int) -> torch.Tensor:
        if self.args.stage == "yoso":
            return StableNormal(getattr(model, "module", model)).predict(image, steps=0, intrinsics=intrinsics)
        pipeline = StableNormal(self.estimator, getattr(model, "module", model))
        return pipeline.predict(image, steps=steps, intrinsics=intrinsics)

    def eval_sums(self, model: nn.Module, batch) -> dict[str, float]:
        image, gt, mask, intrinsics = batch
        pred = self._predict(model, image, intrinsics, self.args.val_steps)
        errors = angular_error(pred.permute(0, 2, 3, 1), gt.permute(0, 2, 3, 1))[mask]
        return error_sums(errors)

    @torch.no_grad()
    def sample(self, model: nn.Module, out_dir: Path | None, epoch: int | None, step: int) -> None:
        """Rows of image | ground truth | prediction | error (white = 45 degrees or more)."""
        if self.val_set is None:
            return
        device = next(model.parameters()).device
        samples = [self.val_set[i] for i in range(min(PANEL_IMAGES, len(self.val_set)))]
        image, gt, mask, intrinsics = (torch.stack(parts).to(device) for parts in zip(*samples))
        with evaluating(model):
            pred = self._predict(model, image, intrinsics, self.args.val_steps)
        if out_dir is None:
            return
        error = angular_error(pred.permute(0, 2, 3, 1), gt.permute(0, 2, 3, 1)).float()
        rows = []
        for i in range(len(samples)):
            valid = mask[i].cpu().numpy()
            error_map = np.where(valid, np.clip(error[i].cpu().numpy() / 45, 0, 1) * 255, 0).astype(np.uint8)
            rows.append(np.concatenate([
                (image[i].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8),
                encode_normals(gt[i].permute(1, 2, 0).cpu().numpy(), valid),
                encode_normals(pred[i].permute(1, 2, 0).cpu().numpy()),
                np.repeat(error_map[..., None], 3, axis=-1)], axis=1))
        Image.fromarray(np.concatenate(rows, axis=0)).save(picture_path(out_dir, "panels", epoch, step))


TASK = NormalTask
