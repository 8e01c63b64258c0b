"""``kzoo bench models``: KAT against DeiT of the same size, as timm's benchmark.py measures them.

Inference (eval, inference_mode) and training steps (AdamW, cross-entropy on random targets) on
synthetic images; samples/s from the median step time. The KAT and DeiT steps of one size are
timed in alternation in one process, so their ratio is a side-by-side measurement.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import timm
import timm.optim
import torch

import kzoo  # noqa: F401  (registers the KAT models)

from .common import bar_chart, device_name, environment, interleaved_median_ms, write_results

PAIRS = {"tiny": ("kat_tiny_patch16_224", "deit_tiny_patch16_224"),
         "small": ("kat_small_patch16_224", "deit_small_patch16_224"),
         "base": ("kat_base_patch16_224", "deit_base_patch16_224")}


def _steps(name: str, device: torch.device, batch: int, amp_dtype):
    """(model, inference step, training step) on synthetic images, as timm's benchmark.py does."""
    torch.manual_seed(0)
    model = timm.create_model(name).to(device)
    images = torch.randn(batch, 3, 224, 224, device=device)
    targets = torch.randint(0, 1000, (batch,), device=device)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()

    def infer():
        model.eval()
        with torch.inference_mode(), autocast():
            model(images)

    def train():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model(images), targets)
        loss.backward()
        optimizer.step()

    return model, infer, train


def measure_pair(names: tuple[str, str], device: torch.device, batch: int, warmup: int, iters: int,
                 amp_dtype) -> list[dict]:
    built = {name: _steps(name, device, batch, amp_dtype) for name in names}
    infer = interleaved_median_ms({n: b[1] for n, b in built.items()}, device, warmup, iters)
    train = interleaved_median_ms({n: b[2] for n, b in built.items()}, device, warmup, iters)
    return [dict(model=name, param_count=sum(p.numel() for p in built[name][0].parameters()), batch_size=batch,
                 img_size=224, infer_step_time_ms=infer[name], infer_samples_per_sec=batch / infer[name] * 1e3,
                 train_step_time_ms=train[name], train_samples_per_sec=batch / train[name] * 1e3)
            for name in names]


def run(device: torch.device, sizes=None, batch: int | None = None, warmup: int | None = None,
        iters: int | None = None, out_dir: Path = Path("bench/results")) -> dict:
    on_gpu = device.type == "cuda"
    sizes = sizes or ("tiny", "small", "base")
    unknown = [size for size in sizes if size not in PAIRS]
    if unknown:
        raise ValueError(f"size {unknown[0]!r} is not one of {', '.join(PAIRS)}")
    batch = batch or (256 if on_gpu else 16)
    warmup = warmup or (10 if on_gpu else 3)
    iters = iters or (40 if on_gpu else 10)
    amp_dtype = torch.bfloat16 if on_gpu else None
    rows, ratios = [], {}
    for size in sizes:
        kat, deit = measure_pair(PAIRS[size], device, batch, warmup, iters, amp_dtype)
        rows += [kat, deit]
        ratios[size] = dict(infer=kat["infer_samples_per_sec"] / deit["infer_samples_per_sec"],
                            train=kat["train_samples_per_sec"] / deit["train_samples_per_sec"])
        print(f"{size}: KAT/DeiT throughput  inference {ratios[size]['infer']:.2f}x  training {ratios[size]['train']:.2f}x")
    name = f"models-{device_name(device)}"
    payload = dict(benchmark="models", environment=environment(device),
                   precision="amp_bfloat16" if amp_dtype else "float32", warmup=warmup, iters=iters,
                   rows=rows, kat_over_deit=ratios)
    json_path = write_results(out_dir, name, payload)
    labels = [f"{size}\n{mode}" for size in sizes for mode in ("inference", "training")]
    series = {family: [row[f"{mode}_samples_per_sec"] for size in sizes
                       for row in rows if row["model"] == PAIRS[size][index]
                       for mode in ("infer", "train")]
              for index, family in enumerate(("KAT", "DeiT"))}
    plot = bar_chart(out_dir / f"{name}.png", f"KAT vs DeiT, batch {batch}, {payload['precision']}, "
                     f"{device_name(device)}", labels, series, "samples / s (higher is better)")
    return dict(payload=payload, json=json_path, plot=plot)


def table(payload: dict) -> str:
    lines = ["| model | params | batch | infer samples/s | train samples/s |", "|---|---:|---:|---:|---:|"]
    for row in payload["rows"]:
        lines.append(f"| {row['model']} | {row['param_count']:,} | {row['batch_size']} | "
                     f"{row['infer_samples_per_sec']:.2f} | {row['train_samples_per_sec']:.2f} |")
    lines += ["", "| size | KAT/DeiT inference | KAT/DeiT training |", "|---|---:|---:|"]
    for size, r in payload["kat_over_deit"].items():
        lines.append(f"| {size} | {r['infer']:.2f} | {r['train']:.2f} |")
    return "\n".join(lines)
