"""``kzoo bench hmar``: HMAR against VAR mode, the same network and scale schedule.

- Training step: teacher-forced forward, cross-entropy on random tokens, backward and AdamW, with
  Markovian ranges (HMAR) against block-causal ranges (VAR) in ``block_sparse_attention``.
- Sampling: images/s of the sampler, HMAR (each scale attends to itself, no cache) against VAR
  (each scale attends to every earlier one through a KV cache), both without mask steps; and HMAR
  with the default mask schedule on the same network plus a mask branch of half its depth.
- Peak memory of each (GPU only: ``torch.cuda.max_memory_allocated``).

The two modes of one measurement are timed in alternation in one process, and ratios are medians of
per-round ratios. The tokenizer is VAR's architecture at width 32 (of 160), random, so the timings are the
transformer's; its decoder costs the same in both modes.
"""
from __future__ import annotations

import contextlib
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from kzoo.models.hmar import NextScaleTransformer, default_mask_schedule, sample, vqvae_f16_4096
from kzoo.models.hmar.vqvae import VAR_PATCH_NUMS

from .common import (bar_chart, device_name, environment, interleaved_times_ms, paired_speedup, write_results)

SCHEDULES = {"256": VAR_PATCH_NUMS, "512": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}
MODES = {"HMAR": "markov", "VAR": "block_causal"}


def _model(depth: int, patch_nums, attention_mode: str, device, mask_branch_depth: int = 0) -> NextScaleTransformer:
    torch.manual_seed(0)
    return NextScaleTransformer(depth=depth, embed_dim=64 * depth, num_heads=depth, patch_nums=patch_nums,
                                attention_mode=attention_mode, mask_branch_depth=mask_branch_depth,
                                drop_path_rate=0.0, device=device)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_step(model: NextScaleTransformer, batch: int, device: torch.device):
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    inputs = torch.randn(batch, model.num_tokens - 1, model.vae_channels, device=device)
    targets = torch.randint(0, model.vocab_size, (batch, model.num_tokens), device=device)

    def step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            logits = model(labels, inputs)
        F.cross_entropy(logits.float().transpose(1, 2), targets).backward()
        optimizer.step()

    return step


def _sample_step(model: NextScaleTransformer, vqvae, batch: int, device: torch.device, mask_schedule):
    labels = torch.arange(batch, device=device) % model.num_classes

    def step():
        with _autocast(device):
            sample(model.eval(), vqvae, labels, cfg=1.5, top_k=900, top_p=0.96, mask_schedule=mask_schedule)

    return step


def _peak_mb(step, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def measure(schedule: str, depth: int, train_batch: int, sample_batch: int, device: torch.device, warmup: int,
            iters: int) -> dict:
    patch_nums = SCHEDULES[schedule]
    vqvae = vqvae_f16_4096(ch=32, patch_nums=patch_nums).to(device).eval()
    models = {name: _model(depth, patch_nums, mode, device) for name, mode in MODES.items()}
    train = {name: _train_step(model, train_batch, device) for name, model in models.items()}
    train_peak = {name: _peak_mb(step, device) for name, step in train.items()}
    train_times = interleaved_times_ms(train, device, warmup, iters)
    del train

    masked = _model(depth, patch_nums, "markov", device, mask_branch_depth=max(depth // 2, 1))
    no_masks = tuple((pn * pn,) for pn in patch_nums)
    samplers = {"HMAR": _sample_step(models["HMAR"], vqvae, sample_batch, device, no_masks),
                "VAR": _sample_step(models["VAR"], vqvae, sample_batch, device, no_masks),
                "HMAR+mask": _sample_step(masked, vqvae, sample_batch, device, default_mask_schedule(patch_nums))}
    sample_peak = {name: _peak_mb(step, device) for name, step in samplers.items()}
    sample_times = interleaved_times_ms(samplers, device, max(1, warmup // 2), max(3, iters // 2))
    return dict(
        schedule=schedule, patch_nums=list(patch_nums), tokens=models["HMAR"].num_tokens, depth=depth,
        params=sum(p.numel() for p in models["HMAR"].parameters()), train_batch=train_batch,
        sample_batch=sample_batch,
        train_step_ms={name: statistics.median(t) for name, t in train_times.items()},
        sample_images_per_s={name: sample_batch / statistics.median(t) * 1e3 for name, t in sample_times.items()},
        train_peak_mb=train_peak, sample_peak_mb=sample_peak,
        hmar_over_var=dict(train_speedup=paired_speedup(train_times["VAR"], train_times["HMAR"]),
                           sample_speedup=paired_speedup(sample_times["VAR"], sample_times["HMAR"]),
                           sample_speedup_with_masks=paired_speedup(sample_times["VAR"], sample_times["HMAR+mask"]),
                           sample_memory_ratio=(sample_peak["VAR"] / sample_peak["HMAR"]
                                                if device.type == "cuda" else None)))


def run(device: torch.device, schedules=None, depth: int | None = None, batch: int | None = None,
        warmup: int | None = None, iters: int | None = None, out_dir: Path = Path("bench/results")) -> dict:
    on_gpu = device.type == "cuda"
    schedules = schedules or (("256", "512") if on_gpu else ("256",))
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown:
        raise ValueError(f"schedule {unknown[0]!r} is not one of {', '.join(SCHEDULES)}")
    depth = depth or (16 if on_gpu else 2)
    warmup = warmup or (3 if on_gpu else 1)
    iters = iters or (10 if on_gpu else 4)
    rows = []
    for schedule in schedules:
        train_batch = batch or ((32 if schedule == "256" else 8) if on_gpu else 2)
        sample_batch = batch or (32 if on_gpu else 2)
        row = measure(schedule, depth, train_batch, sample_batch, device, warmup, iters)
        rows.append(row)
        r = row["hmar_over_var"]
        print(f"{schedule}px d{depth}: HMAR/VAR training {r['train_speedup']:.2f}x faster, sampling "
              f"{r['sample_speedup']:.2f}x ({r['sample_speedup_with_masks']:.2f}x with mask steps)")
    name = f"hmar-{device_name(device)}"
    payload = dict(benchmark="hmar", environment=environment(device),
                   precision="amp_bfloat16" if on_gpu else "float32", warmup=warmup, iters=iters, rows=rows)
    json_path = write_results(out_dir, name, payload)
    groups = [f"{row['schedule']}px d{row['depth']}\n{what}" for row in rows for what in ("train", "sample")]
    series = {"HMAR over VAR": [v for row in rows for v in (row["hmar_over_var"]["train_speedup"],
                                                             row["hmar_over_var"]["sample_speedup"])],
              "HMAR+mask over VAR": [v for row in rows for v in (float("nan"),
                                                                 row["hmar_over_var"]["sample_speedup_with_masks"])]}
    plot = bar_chart(out_dir / f"{name}.png", f"HMAR vs VAR mode, {payload['precision']}, {device_name(device)}",
                     groups, series, "speed-up (higher is better)")
    return dict(payload=payload, json=json_path, plot=plot)


def table(payload: dict) -> str:
    lines = ["| schedule | depth | tokens | train ms HMAR / VAR | speed-up | sample img/s HMAR / VAR / HMAR+mask "
             "| speed-up | sample peak MB HMAR / VAR |", "|---|---:|---:|---|---:|---|---:|---|"]
    for row in payload["rows"]:
        t, s, m, r = row["train_step_ms"], row["sample_images_per_s"], row["sample_peak_mb"], row["hmar_over_var"]
        memory = "n/a" if m["HMAR"] is None else f"{m['HMAR']:.0f} / {m['VAR']:.0f}"
        lines.append(f"| {row['schedule']}px | {row['depth']} | {row['tokens']} | {t['HMAR']:.1f} / {t['VAR']:.1f} | "
                     f"{r['train_speedup']:.2f}x | {s['HMAR']:.2f} / {s['VAR']:.2f} / {s['HMAR+mask']:.2f} | "
                     f"{r['sample_speedup']:.2f}x | {memory} |")
    return "\n".join(lines)
