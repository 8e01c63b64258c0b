"""The training loop shared by every kzoo family. Read top to bottom: set up, resume, train, save.

One process or ``torchrun``; DDP or FSDP2; AMP, gradient accumulation, clipping, EMA; timm's
optimizers and schedulers. Checkpoints hold everything needed to continue exactly where a run
stopped, including every rank's random streams and the position in the data.
"""
from __future__ import annotations

import math
import random
import resource
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import numpy as np
import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.utils.data import DataLoader
from tqdm import tqdm

from kzoo.train import checkpoint, distributed
from kzoo.train.config import TrainConfig
from kzoo.train.records import RunRecords
from kzoo.train.sampler import SeededSamples, ShardedBatchSampler
from kzoo.train.task import Task

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses); the message says why."""


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
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    stoppable = hasattr(loader.batch_sampler, "stop")
    with (_batches(loader) if stoppable else nullcontext(iter(loader))) as batches:
        for batch in tqdm(batches, total=len(loader), desc=desc, disable=not context.is_main, leave=False,
                          dynamic_ncols=True):
            with autocast():
                for key, value in eval_sums(model, _to_device(batch, context.device)).items():
                    sums[key] = sums.get(key, 0.0) + float(value)
    model.train(was_training)
    keys = sorted(sums)
    totals = dict(zip(keys, distributed.all_sum(context, [sums[k] for k in keys])))
    count = totals.pop("count", 0.0)
    if not count:
        raise ValueError("the evaluation set gave no samples")
    return {key: totals[key] / count for key in sorted(totals, key=lambda k: (k != "loss", k))}


def train(task: Task, config: TrainConfig) -> int:
    """Train ``task`` as ``config`` says; returns the process exit code."""
    context = distributed.setup(config.device)
    try:
        return _train(task, config, context)
    finally:
        distributed.teardown(context)


def _train(task: Task, config: TrainConfig, context: distributed.Context) -> int:
    if config.fsdp and config.model_ema:
        raise ValueError("--model-ema with --fsdp is not supported (the EMA copy would need its own sharding)")
    if config.grad_accum_steps < 1:
        raise ValueError(f"--grad-accum-steps must be at least 1, got {config.grad_accum_steps}")
    device, run_dir = context.device, config.run_dir
    records = RunRecords(run_dir)
    writer = checkpoint.CheckpointWriter(run_dir / "checkpoints", keep=config.checkpoint_hist)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))

    # --- data: every rank reads the same datasets; the sampler gives each its share ---------------
    train_set, val_set = task.train_dataset(), task.val_dataset()
    train_sampler = ShardedBatchSampler(len(train_set), config.batch_size, rank=context.rank,
                                        world_size=context.world_size, seed=config.seed)
    updates_per_epoch = len(train_sampler) // config.grad_accum_steps
    if updates_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training samples make no full optimizer step of "
                         f"{config.batch_size} x {context.world_size} ranks x {config.grad_accum_steps} accumulation")
    train_loader = _loader(task, train_set, train_sampler, config, device)
    val_loader = None
    if val_set is not None:
        val_loader = _loader(task, val_set, ShardedBatchSampler(
            len(val_set), config.batch_size, rank=context.rank, world_size=context.world_size,
            shuffle=False, drop_last=False, pad=config.fsdp), config, device)

    # --- model: the same initial weights on every rank, then per-rank streams for dropout --------
    _seed_everything(config.seed)
    model = task.build_model().to(device)
    _seed_everything(config.seed + context.rank)
    model_config = task.model_config()
    if config.torchcompile:
        model.compile()  # in place, so parameter names and state-dict keys stay the same
    wrapped = distributed.wrap(model, context, fsdp=config.fsdp)
    optimizer_kwargs = dict(eps=config.opt_eps, betas=tuple(config.opt_betas) if config.opt_betas else None)
    optimizer = create_optimizer_v2(model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay,
                                    momentum=config.momentum,
                                    **{k: v for k, v in optimizer_kwargs.items() if v is not None})
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=config.sched, num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
        warmup_lr=config.warmup_lr, min_lr=config.min_lr, step_on_epochs=not config.sched_on_updates,
        updates_per_epoch=updates_per_epoch)
    amp_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[config.amp_dtype]
    scaler = torch.amp.GradScaler(device.type) if config.amp and amp_dtype == torch.float16 else None

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if config.amp else nullcontext()

    ema = ModelEmaV3(model, decay=config.model_ema_decay, use_warmup=config.model_ema_warmup) \
        if config.model_ema else None

    # --- resume -----------------------------------------------------------------------------------
    step, epoch, update_in_epoch, bad_steps = 0, 0, 0, 0
    loss_sum, loss_count, best = 0.0, 0, None
    wall_before = 0.0  # seconds trained by the processes this run was resumed from
    resume_from = config.resume
    if resume_from == "auto":
        resume_from = str(run_dir / "checkpoints" / "last") if (run_dir / "checkpoints" / "last").exists() else ""
        if not resume_from and context.is_main:
            print(f"--resume auto: no checkpoint in {run_dir / 'checkpoints'}, starting fresh", file=sys.stderr)
    if resume_from:
        saved = checkpoint.load(resume_from)
        if saved.metadata.get("model") != model_config["model"]:
            raise ValueError(f"{saved.path}: a checkpoint of {saved.metadata.get('model')!r}, "
                             f"not of {model_config['model']!r}")
        state = saved.state
        set_model_state_dict(model, saved.model, options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and saved.ema is not None:
            ema.module.load_state_dict(saved.ema)
        step, epoch, update_in_epoch = state["step"], state["epoch"], state["update_in_epoch"]
        bad_steps, loss_sum, loss_count, best = state["bad_steps"], state["loss_sum"], state["loss_count"], state["best"]
        wall_before = state["wall_s"]
        if state["world_size"] != context.world_size and context.is_main:
            print(f"{saved.path}: saved by {state['world_size']} ranks, resumed on {context.world_size}; "
                  "the data order from here differs from an uninterrupted run", file=sys.stderr)
        rng = saved.rng(context.rank)
        if rng is not None:
            checkpoint.set_rng_state(rng)
        if context.is_main:
            records.truncate(epochs_done=epoch, step=step)
            print(f"resumed from {saved.path} at epoch {epoch}, step {step}", file=sys.stderr)

    def save(is_best: bool = False) -> None:
        """Every rank: its RNG streams; rank 0: weights and state, then one atomic rename."""
        model_state = get_model_state_dict(model, options=FULL_STATE)  # collective under FSDP
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)
        if context.is_main:
            writer.begin(step)
        distributed.barrier(context)
        writer.write_rng(writer.staging(step), context.rank)
        distributed.barrier(context)
        if context.is_main:
            state = dict(step=step, epoch=epoch, update_in_epoch=update_in_epoch, bad_steps=bad_steps,
                         loss_sum=loss_sum, loss_count=loss_count, best=best, world_size=context.world_size,
                         wall_s=wall_s(),
                         optimizer=optimizer_state,
                         scheduler=scheduler.state_dict() if scheduler is not None else None,
                         scaler=scaler.state_dict() if scaler is not None else None)
            metadata = checkpoint.metadata_for(model_config, step, epoch)
            writer.commit(step, model_state, ema.module.state_dict() if ema is not None else None,
                          state, metadata, is_best)
        distributed.barrier(context)

    started = time.perf_counter()

    def wall_s() -> float:
        return wall_before + time.perf_counter() - started

    def learning_rate() -> float:
        return optimizer.param_groups[0]["lr"]

    if scheduler is not None:  # put the learning rate where the schedule is (timm's resume does the same)
        scheduler.step(epoch)
        if config.sched_on_updates:
            scheduler.step_update(step)

    # --- train ------------------------------------------------------------------------------------
    sync_free = getattr(wrapped, "no_sync", None)

    def train_step(batches, stop: _StopRequest) -> tuple[float, float, bool, bool]:
        """One optimizer step over --grad-accum-steps micro-batches, agreed on by every rank:
        (mean loss, gradient norm, skipped for a non-finite loss, stop requested)."""
        micro_losses = []
        for micro in range(config.grad_accum_steps):
            batch = _to_device(next(batches), device)
            last_micro = micro == config.grad_accum_steps - 1
            with (sync_free() if sync_free and not last_micro else nullcontext()):
                with autocast():
                    loss = task.train_loss(wrapped, batch)
                scaled = loss / config.grad_accum_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            micro_losses.append(loss.detach().float())
        local_loss = torch.stack(micro_losses).mean().item()
        finite = math.isfinite(local_loss)
        total_loss, bad_ranks, stop_ranks = distributed.all_sum(
            context, [local_loss if finite else 0.0, float(not finite), float(stop.signal is not None)])
        if bad_ranks:
            # Skip: no optimizer, scaler or EMA update, so none of their state sees the NaN.
            optimizer.zero_grad(set_to_none=True)
            return local_loss, float("nan"), True, bool(stop_ranks)
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad or math.inf)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model, step=step)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        return total_loss / context.world_size, grad_norm, False, bool(stop_ranks)

    with _StopRequest() as stop:
        while epoch < num_epochs:
            wrapped.train()
            train_sampler.set_epoch(epoch, start_batch=update_in_epoch * config.grad_accum_steps)
            progress = tqdm(total=updates_per_epoch, initial=update_in_epoch, desc=f"epoch {epoch}",
                            disable=not context.is_main, dynamic_ncols=True, leave=False)
            tic, samples = time.perf_counter(), 0
            with _batches(train_loader) as batches:
                while update_in_epoch < updates_per_epoch:
                    step_loss, grad_norm, skipped, stop_requested = train_step(batches, stop)
                    step, update_in_epoch = step + 1, update_in_epoch + 1
                    samples += config.batch_size * context.world_size * config.grad_accum_steps
                    if skipped:
                        bad_steps += 1
                        if context.is_main:
                            records.add_log(dict(step=step, epoch=epoch, event="non-finite loss, step skipped",
                                                 loss=str(step_loss), consecutive=bad_steps))
                            tqdm.write(f"step {step}: non-finite loss ({step_loss}), skipped "
                                       f"({bad_steps} in a row)", file=sys.stderr)
                        if bad_steps >= config.max_bad_steps:
                            raise TrainingStopped(
                                f"{bad_steps} consecutive steps had a non-finite loss (--max-bad-steps "
                                f"{config.max_bad_steps}); stopped at step {step}. The last checkpoint in "
                                f"{run_dir / 'checkpoints'} is from before them: lower --lr or enable --clip-grad")
                    else:
                        bad_steps = 0
                        loss_sum, loss_count = loss_sum + step_loss, loss_count + 1
                    if scheduler is not None and config.sched_on_updates:
                        scheduler.step_update(step)

                    if context.is_main:
                        rate = samples / max(time.perf_counter() - tic, 1e-9)
                        progress.update(1)
                        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{learning_rate():.2e}",
                                             samples_per_s=f"{rate:.0f}", refresh=False)
                        if step % config.log_interval == 0 and not skipped:
                            records.add_log(dict(step=step, epoch=epoch, loss=step_loss, lr=learning_rate(),
                                                 grad_norm=grad_norm, samples_per_sec=rate,
                                                 max_memory_mb=_max_memory_mb(device)))
                    if stop_requested:
                        save()
                        progress.close()
                        if context.is_main:
                            print(f"stopped by signal {stop.signal or 'on another rank'}; saved step {step} to "
                                  f"{run_dir / 'checkpoints' / 'last'} (continue with --resume auto)", file=sys.stderr)
                        return 0
                    if (config.save_every_steps and step % config.save_every_steps == 0
                            and update_in_epoch < updates_per_epoch):
                        save()
            progress.close()

            # --- end of epoch: evaluate, record, checkpoint ---------------------------------------
            row = {"epoch": epoch, "train_loss": loss_sum / max(loss_count, 1)}
            if val_loader is not None:
                metrics = evaluate(task.eval_sums, wrapped if config.fsdp else model, val_loader, context, autocast)
                if ema is not None:  # as in timm, the EMA's metrics are the ones summarised
                    metrics = evaluate(task.eval_sums, ema.module, val_loader, context, autocast, desc="eval EMA")
                row.update({f"eval_{k}": v for k, v in metrics.items()})
            row["lr"] = learning_rate()
            metric = row.get(f"eval_{task.eval_metric}", row["train_loss"])
            is_best = best is None or (metric > best if task.higher_is_better else metric < best)
            best = metric if is_best else best
            epoch, update_in_epoch, loss_sum, loss_count = epoch + 1, 0, 0.0, 0
            if scheduler is not None:
                scheduler.step(epoch)
            if context.is_main:
                records.add_summary(row)
                records.add_log(dict(step=step, **row, wall_s=round(wall_s(), 1)))
                records.plot()
                task.sample(ema.module if ema is not None else model, run_dir, row["epoch"])
                print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                      file=sys.stderr)
            save(is_best)
    return 0
