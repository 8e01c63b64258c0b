"""The loop's settings, with timm train.py's flag names, and ``--config`` YAML files of the same keys."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    output: str = "runs/train"
    experiment: str = ""
    resume: str = ""
    strict_resume: bool = False
    device: str | None = None
    seed: int = 42
    epochs: int = 300
    batch_size: int = 128
    workers: int = 4
    # optimisation
    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    opt_eps: float | None = None
    opt_betas: list[float] | None = None
    sched: str = "cosine"
    sched_on_updates: bool = False
    warmup_epochs: float = 5
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    grad_accum_steps: int = 1
    clip_grad: float | None = None
    amp: bool = False
    amp_dtype: str = "float16"
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    torchcompile: bool = False
    fsdp: bool = False
    # checkpoints and records
    checkpoint_hist: int = 3
    save_every_steps: int = 0
    sample_every: int = 0
    log_interval: int = 50
    max_bad_steps: int = 10
    extra: dict = field(default_factory=dict)  # the task's own arguments, recorded in args.yaml

    @property
    def run_dir(self) -> Path:
        return Path(self.output) / self.experiment if self.experiment else Path(self.output)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        values = vars(args)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in values.items() if k not in names and k not in ("run", "command", "config", "leaf_parser")}
        return cls(**{k: values[k] for k in names if k in values}, extra=extra)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The loop's flags (every task shares them)."""
    d = TrainConfig()
    run = parser.add_argument_group("run control")
    run.add_argument("-c", "--config", default=None,
                     help="YAML file of flag values (keys as the flags, with _ for -); flags given on the "
                          "command line win")
    run.add_argument("--output", default=d.output, help="folder of the run (checkpoints, summary.csv, log.jsonl)")
    run.add_argument("--experiment", default=d.experiment, help="sub-folder of --output for this run")
    run.add_argument("--resume", default=d.resume,
                     help="checkpoint folder to continue from, or 'auto' for the run folder's last checkpoint")
    run.add_argument("--strict-resume", action="store_true", default=d.strict_resume,
                     help="refuse to resume when the run cannot continue exactly (another number of ranks, or "
                          "a training set that changed since the save) instead of warning and going on")
    run.add_argument("--device", default=d.device, help="cpu or cuda (default: cuda when available)")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--epochs", type=int, default=d.epochs)
    run.add_argument("-b", "--batch-size", type=int, default=d.batch_size, help="batch size per process")
    run.add_argument("-j", "--workers", type=int, default=d.workers, help="data-loading processes per rank")
    run.add_argument("--checkpoint-hist", type=int, default=d.checkpoint_hist,
                     help="step checkpoints kept besides last and best")
    run.add_argument("--save-every-steps", type=int, default=d.save_every_steps,
                     help="also checkpoint every N optimizer steps (0: at epoch ends only)")
    run.add_argument("--sample-every", type=int, default=d.sample_every,
                     help="also call the task's sample (e.g. a sample grid in the run folder) every N optimizer "
                          "steps (0: at epoch ends only)")
    run.add_argument("--log-interval", type=int, default=d.log_interval, help="steps between log.jsonl lines")
    run.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps,
                     help="stop after this many consecutive steps with a non-finite loss")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--opt", default=d.opt, help="timm optimizer name (adamw, sgd, lamb, ...)")
    optim.add_argument("--lr", type=float, default=d.lr)
    optim.add_argument("--weight-decay", type=float, default=d.weight_decay,
                       help="not applied to biases, norms, rational coefficients and embeddings")
    optim.add_argument("--momentum", type=float, default=d.momentum)
    optim.add_argument("--opt-eps", type=float, default=d.opt_eps)
    optim.add_argument("--opt-betas", type=float, nargs="+", default=d.opt_betas)
    optim.add_argument("--sched", default=d.sched, help="timm scheduler name (cosine, step, ..., none)")
    optim.add_argument("--sched-on-updates", action="store_true", default=d.sched_on_updates,
                       help="update the learning rate every optimizer step rather than every epoch")
    optim.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    optim.add_argument("--warmup-lr", type=float, default=d.warmup_lr)
    optim.add_argument("--min-lr", type=float, default=d.min_lr)
    optim.add_argument("--grad-accum-steps", type=int, default=d.grad_accum_steps)
    optim.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max global gradient norm")
    optim.add_argument("--amp", action="store_true", default=d.amp, help="mixed precision (autocast)")
    optim.add_argument("--amp-dtype", choices=["float16", "bfloat16"], default=d.amp_dtype,
                       help="float16 adds a gradient scaler")
    optim.add_argument("--model-ema", action="store_true", default=d.model_ema, help="keep an EMA of the weights")
    optim.add_argument("--model-ema-decay", type=float, default=d.model_ema_decay)
    optim.add_argument("--model-ema-warmup", action="store_true", default=d.model_ema_warmup)
    optim.add_argument("--torchcompile", action="store_true", default=d.torchcompile,
                       help="compile the model with torch.compile")
    optim.add_argument("--fsdp", action="store_true", default=d.fsdp,
                       help="shard parameters, gradients and optimizer state with FSDP2 (torchrun only)")


def apply_config_file(parser: argparse.ArgumentParser, path: str | Path) -> None:
    """Make a YAML file's values the parser's defaults, so flags on the command line still win
    (timm's ``--config`` convention). Unknown keys are an error, not silently ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - {action.dest for action in parser._actions})
    if unknown:
        raise ValueError(f"{path}: unknown keys {', '.join(unknown)}")
    parser.set_defaults(**values)
