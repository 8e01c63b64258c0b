"""The training loop shared by every kzoo family.

``train(task, config)`` builds a ``Trainer`` and runs it. The class reads top to bottom: set-up
(``__init__``), ``resume``, ``run`` over epochs, ``train_step`` and its ``_update``, the host-side
bookkeeping of finished steps (``_account``), ``end_epoch`` (evaluation, records, samples) and
``save``. Where the run is lives in one ``TrainState``, saved and restored in one place.

One process or ``torchrun``; DDP or FSDP2; AMP, gradient accumulation, clipping, EMA; timm's
optimizers and schedulers. Checkpoints hold everything needed to continue exactly where a run
stopped, including every rank's random streams and the position in the data.

The host does not wait for the GPU inside a step. A step's numbers (loss, non-finite flag, stop
request, gradient norm) stay on the device, are summed over ranks there, and are copied back
without blocking; on a GPU the host reads them one step later, once the next step is queued. A
step with a non-finite loss is skipped on the device by optimizers that can do that (torch's
fused Adam and AdamW, through the ``found_inf`` protocol GradScaler uses); with any other
optimizer, or with float16's gradient scaler, the flag is read on the host before the update: one
sync per step, as GradScaler itself needs for such optimizers.
"""
from __future__ import annotations

import collections
import hashlib
import inspect
import json
import math
import random
import resource
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import yaml
from timm.optim import create_optimizer_v2, get_optimizer_class
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.utils.data import DataLoader
from tqdm import tqdm

from kzoo.train import checkpoint, distributed
from kzoo.train.config import TrainConfig
from kzoo.train.records import RunRecords
from kzoo.train.sampler import SeededSamples, ShardedBatchSampler
from kzoo.train.task import Task, evaluating

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)

# Optimizers whose fused kernels skip a step cleanly when given ``found_inf``. Fused SGD is left
# out: skipping its first step leaves the momentum buffer uninitialised (torch 2.14, CPU).
_SKIP_ON_DEVICE = (torch.optim.Adam, torch.optim.AdamW)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses); the message says why."""


@dataclass
class TrainState:
    """Where a run is: saved in every checkpoint's ``state.pt`` and restored as one piece."""
    step: int = 0  # optimizer steps taken, skipped ones included
    epoch: int = 0
    update_in_epoch: int = 0  # optimizer steps into the current epoch: the position in the data
    bad_steps: int = 0  # consecutive steps with a non-finite loss
    loss_sum: float = 0.0  # this epoch's finite step losses, for the summary's train_loss
    loss_count: int = 0
    best: float | None = None  # the best evaluation metric so far
    wall_s: float = 0.0  # seconds trained up to the last save, over all processes of the run

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict, source: Path) -> None:
        missing = [f.name for f in fields(self) if f.name not in state]
        if missing:
            raise ValueError(f"{source}: not a kzoo training state (no {', '.join(missing)})")
        for f in fields(self):
            setattr(self, f.name, state[f.name])


def train(task: Task, config: TrainConfig) -> int:
    """Train ``task`` as ``config`` says; returns the process exit code."""
    context = distributed.setup(config.device)
    try:
        return Trainer(task, config, context).run()
    finally:
        distributed.teardown(context)


class Trainer:
    def __init__(self, task: Task, config: TrainConfig, context: distributed.Context):
        if config.fsdp and config.model_ema:
            raise ValueError("--model-ema with --fsdp is not supported (the EMA copy would need its own sharding)")
        if config.grad_accum_steps < 1:
            raise ValueError(f"--grad-accum-steps must be at least 1, got {config.grad_accum_steps}")
        self.task, self.config, self.context = task, config, context
        device, run_dir = context.device, config.run_dir
        self.records = RunRecords(run_dir)
        self.writer = checkpoint.CheckpointWriter(run_dir / "checkpoints", keep=config.checkpoint_hist)
        if context.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "args.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
            self.writer.recover()  # finish or undo a save that a kill interrupted
        distributed.barrier(context)
        task.setup(device)  # frozen parts, kept on the task: outside the optimizer, EMA, DDP and checkpoints

        # --- data: every rank reads the same datasets; the sampler gives each its share ------------
        train_set, val_set = task.train_dataset(), task.val_dataset()
        self.data_identity = _data_identity(task, train_set)
        self.train_sampler = ShardedBatchSampler(len(train_set), config.batch_size, rank=context.rank,
                                                 world_size=context.world_size, seed=config.seed)
        self.updates_per_epoch = len(self.train_sampler) // config.grad_accum_steps
        if self.updates_per_epoch == 0:
            raise ValueError(f"{len(train_set)} training samples make no full optimizer step of {config.batch_size} "
                             f"x {context.world_size} ranks x {config.grad_accum_steps} accumulation")
        self.train_loader = _loader(task, train_set, self.train_sampler, config, device)
        self.val_loader = None if val_set is None else _loader(task, val_set, ShardedBatchSampler(
            len(val_set), config.batch_size, rank=context.rank, world_size=context.world_size,
            shuffle=False, drop_last=False, pad=config.fsdp), config, device)

        # --- model: the same initial weights on every rank, then per-rank streams for dropout ------
        _seed_everything(config.seed)
        self.model = task.build_model().to(device)
        _seed_everything(config.seed + context.rank)
        self.model_config = task.model_config()
        if config.torchcompile:
            self.model.compile()  # in place, so parameter names and state-dict keys stay the same
        # Under FSDP2 ``wrapped`` is ``model`` itself (sharded in place); under DDP the training
        # forward goes through the wrapper, which syncs gradients, and everything else uses ``model``.
        self.wrapped = distributed.wrap(self.model, context, fsdp=config.fsdp)
        self.no_sync = getattr(self.wrapped, "no_sync", None)

        # --- optimisation and precision -------------------------------------------------------------
        self.optimizer = _optimizer(self.model, config)
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, sched=config.sched, num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
            warmup_lr=config.warmup_lr, min_lr=config.min_lr, step_on_epochs=not config.sched_on_updates,
            updates_per_epoch=self.updates_per_epoch)
        self.amp_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[config.amp_dtype]
        self.scaler = (torch.amp.GradScaler(device.type) if config.amp and self.amp_dtype == torch.float16
                       else None)
        self.ema = (ModelEmaV3(self.model, decay=config.model_ema_decay, use_warmup=config.model_ema_warmup)
                    if config.model_ema else None)
        self.skips_on_device = self.scaler is None and isinstance(self.optimizer, _SKIP_ON_DEVICE) \
            and getattr(self.optimizer, "_step_supports_amp_scaling", False)
        # On a GPU a step's numbers are read once the next step is queued; on a CPU nothing runs ahead.
        self.read_lag = 1 if device.type == "cuda" else 0

        self.state = TrainState()
        self._clock = time.perf_counter()
        self.samples_per_step = config.batch_size * context.world_size * config.grad_accum_steps
        self._progress: tqdm | None = None  # the current epoch's bar, and when and at which step it began
        self._epoch_began = (time.perf_counter(), 0)

    def autocast(self):
        return torch.autocast(self.context.device.type, dtype=self.amp_dtype) if self.config.amp else nullcontext()

    # --- resume ---------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Restore model, optimizer, schedule, scaler, EMA, train state and this rank's random streams."""
        path = self._resume_path()
        if not path:
            return
        saved = checkpoint.load(path)
        self._check_same_model(saved)
        self.state.load_state_dict(saved.state, saved.path / checkpoint.STATE_FILE)
        self._check_same_data(saved)
        rng = saved.rng(self.context.rank)  # read before anything is changed: a corrupt file stops here
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, saved.model, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, saved.state["optimizer"], options=options)
        if self.scheduler is not None and saved.state.get("scheduler") is not None:
            self.scheduler.load_state_dict(saved.state["scheduler"])
        if self.scaler is not None and saved.state.get("scaler"):
            self.scaler.load_state_dict(saved.state["scaler"])
        if self.ema is not None and saved.ema is not None:
            self.ema.module.load_state_dict(saved.ema)
        if rng is not None:
            checkpoint.set_rng_state(rng)
        if self.context.is_main:
            self.records.truncate(epochs_done=self.state.epoch, step=self.state.step)
            print(f"resumed from {saved.path} at epoch {self.state.epoch}, step {self.state.step}", file=sys.stderr)

    def _resume_path(self) -> str:
        if self.config.resume != "auto":
            return self.config.resume
        last = self.writer.root / "last"
        if last.is_symlink() and not last.exists():
            raise ValueError(f"{last}: points at {last.readlink()}, which is missing; not starting fresh over this "
                             f"run's checkpoints (pass --resume with a step folder, or remove the link)")
        if last.exists():
            return str(last)
        if self.context.is_main:
            print(f"--resume auto: no checkpoint in {self.writer.root}, starting fresh", file=sys.stderr)
        return ""

    def _check_same_model(self, saved: checkpoint.Checkpoint) -> None:
        name = self.model_config["model"]
        if saved.metadata.get("model") != name:
            raise ValueError(f"{saved.path}: a checkpoint of {saved.metadata.get('model')!r}, not of {name!r}")
        try:
            saved_config = json.loads(saved.metadata.get("config", "{}"))
        except json.JSONDecodeError:
            raise ValueError(f"{saved.path / checkpoint.MODEL_FILE}: unreadable model config in its metadata") from None
        differences = _differences(saved_config, json.loads(json.dumps(self.model_config)))
        if differences:
            raise ValueError(f"{saved.path}: saved with another model configuration ({'; '.join(differences)}); "
                             "resume with the saved settings, or start a new run")

    def _check_same_data(self, saved: checkpoint.Checkpoint) -> None:
        """Exact resume needs the same ranks and the same training list; say when it is lost."""
        changes = []
        if saved.state["world_size"] != self.context.world_size:
            changes.append(f"saved by {saved.state['world_size']} ranks, resumed on {self.context.world_size}")
        before, now = saved.state.get("data"), self.data_identity
        if before is not None and before["num_samples"] != now["num_samples"]:
            changes.append(f"the training set had {before['num_samples']} samples, now {now['num_samples']}")
        elif before is not None and before["fingerprint"] != now["fingerprint"]:
            changes.append("the training set's file list changed (same number of samples)")
        if not changes:
            return
        message = f"{saved.path}: exact resume is no longer possible: {'; '.join(changes)}"
        if self.config.strict_resume:
            raise ValueError(f"{message} (--strict-resume)")
        if self.context.is_main:
            print(f"{message}; continuing, with a data order that differs from an uninterrupted run", file=sys.stderr)

    # --- train ----------------------------------------------------------------------------------------

    def run(self) -> int:
        self.resume()
        self._clock = time.perf_counter() - self.state.wall_s
        if self.scheduler is not None:  # put the learning rate where the schedule is (timm's resume does the same)
            self.scheduler.step(self.state.epoch)
            if self.config.sched_on_updates:
                self.scheduler.step_update(self.state.step)
        with _StopRequest() as stop:
            while self.state.epoch < self.num_epochs:
                if self.train_epoch(stop):
                    self.save()
                    if self.context.is_main:
                        print(f"stopped by signal {stop.signal or 'on another rank'}; saved step {self.state.step} to "
                              f"{self.writer.root / 'last'} (continue with --resume auto)", file=sys.stderr)
                    return 0
                self.end_epoch()
        return 0

    def train_epoch(self, stop: _StopRequest) -> bool:
        """The rest of the current epoch. True when a stop was requested; every queued step is then
        finished and accounted for, ready to be saved."""
        state, config = self.state, self.config
        self.wrapped.train()
        self.train_sampler.set_epoch(state.epoch, start_batch=state.update_in_epoch * config.grad_accum_steps)
        self._progress = tqdm(total=self.updates_per_epoch, initial=state.update_in_epoch, desc=f"epoch {state.epoch}",
                              disable=not self.context.is_main, dynamic_ncols=True, leave=False)
        self._epoch_began = (time.perf_counter(), state.step)
        unread: collections.deque[_FinishedStep] = collections.deque()
        stop_requested = False
        with _batches(self.train_loader) as batches:
            while state.update_in_epoch < self.updates_per_epoch and not stop_requested:
                unread.append(self.train_step(batches, stop))
                self._progress.update(1)
                if self.scheduler is not None and config.sched_on_updates:
                    self.scheduler.step_update(state.step)
                while len(unread) > self.read_lag:
                    stop_requested |= self._account(unread.popleft())
                if config.sample_every and state.step % config.sample_every == 0:
                    self._sample(epoch=None)
                if (config.save_every_steps and state.step % config.save_every_steps == 0
                        and state.update_in_epoch < self.updates_per_epoch):
                    stop_requested |= self._account_all(unread)
                    if not stop_requested:
                        self.save()
        stop_requested |= self._account_all(unread)
        self._progress.close()
        return stop_requested

    def train_step(self, batches, stop: _StopRequest) -> _FinishedStep:
        """One optimizer step over --grad-accum-steps micro-batches, queued on the device; its numbers
        (summed over ranks there) come back with it, to be read when they are ready."""
        config = self.config
        micro_losses = []
        for micro in range(config.grad_accum_steps):
            batch = _to_device(next(batches), self.context.device)
            last_micro = micro == config.grad_accum_steps - 1
            with (self.no_sync() if self.no_sync and not last_micro else nullcontext()):
                with self.autocast():
                    loss = self.task.train_loss(self.wrapped, batch)
                scaled = loss / config.grad_accum_steps
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            micro_losses.append(loss.detach().float())
        loss = torch.stack(micro_losses).mean()
        finite = torch.isfinite(loss)
        numbers = torch.stack([torch.where(finite, loss, 0.0), (~finite).float(),
                               torch.zeros_like(loss) + float(stop.signal is not None)]).double()
        numbers = distributed.all_sum_(self.context, numbers)  # [loss sum, bad ranks, ranks asked to stop]
        grad_norm = self._update(skip=numbers[1] > 0)
        self.state.step += 1
        self.state.update_in_epoch += 1
        return _FinishedStep(self.state.step, self.state.epoch, self._learning_rate(),
                             _Readback(torch.cat([numbers, grad_norm.double().reshape(1)])))

    def _update(self, skip: Tensor) -> Tensor:
        """Clip, then step the optimizer, scaler and EMA unless ``skip`` (a device flag: a rank had a
        non-finite loss), so that none of their state ever sees the NaN. Returns the gradient norm."""
        if not self.skips_on_device and skip.item():  # the host sync such optimizers need
            self.optimizer.zero_grad(set_to_none=True)
            return skip.new_full((), math.nan, dtype=torch.float32)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad or math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
        if self.skips_on_device:
            self.optimizer.found_inf, self.optimizer.grad_scale = skip.float(), None
            self.optimizer.step()
            del self.optimizer.found_inf, self.optimizer.grad_scale
        elif self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            _update_ema(self.ema, self.model, self.state.step, skip if self.skips_on_device else None)
        return norm

    def _account(self, finished: _FinishedStep) -> bool:
        """The host's side of a finished step: counters, log line, progress bar and the guard against
        runs of non-finite losses. Returns whether a rank asked to stop."""
        state, config = self.state, self.config
        loss_sum, bad_ranks, stop_ranks, grad_norm = finished.numbers.values()
        loss = loss_sum / self.context.world_size
        if bad_ranks:
            state.bad_steps += 1
            if self.context.is_main:
                self.records.add_log(dict(step=finished.step, epoch=finished.epoch,
                                          event="non-finite loss, step skipped", consecutive=state.bad_steps))
                tqdm.write(f"step {finished.step}: non-finite loss on {bad_ranks:.0f} rank(s), skipped "
                           f"({state.bad_steps} in a row)", file=sys.stderr)
            if state.bad_steps >= config.max_bad_steps:
                raise TrainingStopped(
                    f"{state.bad_steps} consecutive steps had a non-finite loss (--max-bad-steps {config.max_bad_steps}); "
                    f"stopped at step {finished.step}. The last checkpoint in {self.writer.root} is from before them: "
                    "lower --lr or enable --clip-grad")
        else:
            state.bad_steps = 0
            state.loss_sum, state.loss_count = state.loss_sum + loss, state.loss_count + 1
        if self.context.is_main:
            began, first_step = self._epoch_began
            rate = (finished.step - first_step) * self.samples_per_step / max(time.perf_counter() - began, 1e-9)
            if not bad_ranks and self._progress is not None:
                self._progress.set_postfix(loss=f"{loss:.4f}", lr=f"{finished.lr:.2e}",
                                           samples_per_s=f"{rate:.0f}", refresh=False)
            if finished.step % config.log_interval == 0 and not bad_ranks:
                self.records.add_log(dict(step=finished.step, epoch=finished.epoch, loss=loss,
                                          lr=finished.lr, grad_norm=grad_norm, samples_per_sec=rate,
                                          max_memory_mb=_max_memory_mb(self.context.device)))
        return bool(stop_ranks)

    def _account_all(self, unread: collections.deque) -> bool:
        stop_requested = False
        while unread:
            stop_requested |= self._account(unread.popleft())
        return stop_requested

    # --- end of epoch: evaluate, record, sample, checkpoint ---------------------------------------------

    def end_epoch(self) -> None:
        state, task = self.state, self.task
        row = {"epoch": state.epoch, "train_loss": state.loss_sum / max(state.loss_count, 1)}
        if self.val_loader is not None:  # both the raw model and the EMA, as timm's summary has them
            row.update({f"eval_{k}": v for k, v in self._evaluate(self.model, "eval").items()})
            if self.ema is not None:
                row.update({f"eval_{k}_ema": v for k, v in self._evaluate(self.ema.module, "eval EMA").items()})
        row["lr"] = self._learning_rate()
        # The EMA's weights are the ones people keep, so they pick the best checkpoint.
        metric = row.get(f"eval_{task.eval_metric}{'_ema' if self.ema is not None else ''}", row["train_loss"])
        is_best = state.best is None or (metric > state.best if task.higher_is_better else metric < state.best)
        state.best = metric if is_best else state.best
        state.epoch, state.update_in_epoch, state.loss_sum, state.loss_count = state.epoch + 1, 0, 0.0, 0
        if self.scheduler is not None:
            self.scheduler.step(state.epoch)
        if self.context.is_main:
            self.records.add_summary(row)
            self.records.add_log(dict(step=state.step, **row, wall_s=round(self._wall_s(), 1)))
            self.records.plot()
            print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  file=sys.stderr)
        self._sample(epoch=row["epoch"])
        self.save(is_best)

    def _sample(self, epoch: int | None) -> None:
        # Every rank takes part: under FSDP each forward of the sharded model is a collective.
        self.task.sample(self.ema.module if self.ema is not None else self.model,
                         self.config.run_dir if self.context.is_main else None, epoch, self.state.step)

    def _evaluate(self, model: nn.Module, desc: str) -> dict[str, float]:
        return evaluate(self.task.eval_sums, model, self.val_loader, self.context, self.autocast, desc=desc)

    def save(self, is_best: bool = False) -> None:
        """Every rank: its random streams; rank 0: weights, EMA and state, then one atomic rename."""
        model_state = get_model_state_dict(self.model, options=FULL_STATE)  # collective under FSDP
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=FULL_STATE)
        step = self.state.step
        if self.context.is_main:
            self.writer.begin(step)
        distributed.barrier(self.context)
        self.writer.write_rng(self.writer.staging(step), self.context.rank)
        distributed.barrier(self.context)
        if self.context.is_main:
            self.state.wall_s = self._wall_s()
            state = dict(self.state.state_dict(), world_size=self.context.world_size, data=self.data_identity,
                         optimizer=optimizer_state,
                         scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
                         scaler=self.scaler.state_dict() if self.scaler is not None else None)
            self.writer.commit(step, model_state, self.ema.module.state_dict() if self.ema is not None else None,
                               state, checkpoint.metadata_for(self.model_config, step, self.state.epoch), is_best)
        distributed.barrier(self.context)

    def _wall_s(self) -> float:
        return time.perf_counter() - self._clock

    def _learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


# --- a finished step's numbers, read back without stalling the device ------------------------------------

class _Readback:
    """A device tensor's values, copied to pinned host memory as soon as they are computed and read
    later: reading waits only for the work queued before the copy, not for everything queued since."""

    def __init__(self, tensor: Tensor):
        self._ready = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tensor

    def values(self) -> list[float]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


@dataclass
class _FinishedStep:
    step: int
    epoch: int
    lr: float  # the learning rate the step used
    numbers: _Readback  # loss sum over ranks, ranks with a non-finite loss, ranks asked to stop, grad norm


# --- set-up helpers ----------------------------------------------------------------------------------------

def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    kwargs = {k: v for k, v in dict(eps=config.opt_eps, betas=tuple(config.opt_betas) if config.opt_betas else None)
              .items() if v is not None}
    optimizer_class = get_optimizer_class(config.opt, bind_defaults=False)
    if isinstance(optimizer_class, type) and issubclass(optimizer_class, _SKIP_ON_DEVICE) \
            and "fused" in inspect.signature(optimizer_class).parameters:
        kwargs["fused"] = True  # fused kernels can skip a step on the device (see the module docstring)
    return create_optimizer_v2(model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay,
                               momentum=config.momentum, **kwargs)


def _update_ema(ema: ModelEmaV3, model: nn.Module, step: int, skip: Tensor | None) -> None:
    """``ema.update(model, step)``, or, given a device flag, an update that leaves the EMA as it is
    when the flag is set without reading it on the host. timm's update takes a Python decay, so the
    gated form spells out the same lerp of floating entries and copy of the rest."""
    if skip is None:
        ema.update(model, step=step)
        return
    weight = (1.0 - ema.get_decay(step)) * (~skip).float()
    pairs = list(zip(ema.module.state_dict().values(), model.state_dict().values()))
    lerped = [(e, m) for e, m in pairs if e.is_floating_point()]
    if lerped:
        torch._foreach_lerp_([e for e, _ in lerped], [m.to(e.dtype) for e, m in lerped],
                             [weight.to(e.device, e.dtype) for e, _ in lerped])
    for ema_value, model_value in pairs:
        if not ema_value.is_floating_point():
            ema_value.copy_(model_value)


def _data_identity(task: Task, dataset) -> dict:
    """The training set's size and a hash of its samples' names, as the checkpoint records them."""
    names = task.sample_names(dataset)
    if names is None:
        return {"num_samples": len(dataset), "fingerprint": None}
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update(b"\0")
    return {"num_samples": len(dataset), "fingerprint": digest.hexdigest()[:32]}


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``key saved -> current`` for every key whose value differs, nested keys joined by dots."""
    out = []
    for key in sorted(set(saved) | set(current)):
        before, now = saved.get(key, "(unset)"), current.get(key, "(unset)")
        if isinstance(before, dict) and isinstance(now, dict):
            out += _differences(before, now, f"{prefix}{key}.")
        elif before != now:
            out.append(f"{prefix}{key} {before} -> {now}")
    return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait for the step to end
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process: schedulers and Ctrl-C signal the
    whole process group, and a worker that died of it would break the batch the save waits for.
    Such workers must then always be shut down through their loader (``_batches``), because
    multiprocessing's exit-time SIGTERM would not end them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def _batches(loader: DataLoader):
    """``iter(loader)`` that always ends with its workers shut down, however the loop is left: the
    sampler stops handing out batches and the few already requested are drained."""
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        loader.batch_sampler.stop()
        for _ in iterator:
            pass


def _loader(task: Task, dataset, sampler: ShardedBatchSampler, config: TrainConfig, device: torch.device):
    # The loader gets its own generator so that creating an iterator never draws from the global
    # torch stream that dropout and mixup use; the samples are seeded by the sampler anyway.
    return DataLoader(SeededSamples(dataset), batch_sampler=sampler, num_workers=config.workers,
                      collate_fn=task.collate, pin_memory=device.type == "cuda",
                      worker_init_fn=_ignore_stop_signals,
                      generator=torch.Generator().manual_seed(config.seed))


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _max_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.no_grad()
def evaluate(eval_sums, model: torch.nn.Module, loader, context: distributed.Context, autocast=nullcontext,
             desc: str = "eval") -> dict[str, float]:
    """Metric means over a whole evaluation set: ``eval_sums(model, batch)`` (a Task's) summed exactly
    over batches and ranks, then divided by the summed ``count``."""
    sums: dict[str, float] = {}
    stoppable = hasattr(loader.batch_sampler, "stop")
    with evaluating(model), (_batches(loader) if stoppable else nullcontext(iter(loader))) as batches:
        for batch in tqdm(batches, total=len(loader), desc=desc, disable=not context.is_main, leave=False,
                          dynamic_ncols=True):
            with autocast():
                for key, value in eval_sums(model, _to_device(batch, context.device)).items():
                    sums[key] = sums.get(key, 0.0) + float(value)
    keys = sorted(sums)
    totals = dict(zip(keys, distributed.all_sum(context, [sums[k] for k in keys])))
    count = totals.pop("count", 0.0)
    if not count:
        raise ValueError("the evaluation set gave no samples")
    return {key: totals[key] / count for key in sorted(totals, key=lambda k: (k != "loss", k))}
