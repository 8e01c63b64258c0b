"""Timing, result files and plots shared by every benchmark."""
from __future__ import annotations

import json
import platform
import random
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def device_name(device: torch.device) -> str:
    """A file-name-safe device label: ``cpu`` or the GPU's name, e.g. ``nvidia-h200``."""
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return "cpu"


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn in milliseconds (triton's do_bench on a GPU, over ``20 * repeats`` ms of
    calls: hundreds of samples for the sub-millisecond kernels, and a benchmark that fits a lent GPU's
    minutes)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25 * warmup, rep=20 * repeats, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def graphed_median_ms(fn: Callable[[], object], repeats: int) -> float | str:
    """Median ms of fn replayed from a CUDA graph: the GPU's time without the Python that launches
    its kernels. A step that cannot be captured gives its error's first line instead."""
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=20 * repeats, return_mode="median"))
    except Exception as error:  # a measurement that cannot be taken is reported, not fatal
        return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def interleaved_times_ms(steps: dict, device: torch.device, warmup: int, iters: int,
                         min_seconds: float = 0.0) -> dict[str, list[float]]:
    """Each callable's step times in ms, round by round: every round runs each step once, so that
    drift hits all of them alike. At least ``iters`` rounds, and more until the timed steps have
    taken ``min_seconds``: short steps get enough rounds for a stable median.

    The order is shuffled every round: in a fixed order each step would always run right after the
    same other one, and inherit the state that one leaves in the caches.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    order = random.Random(0)
    rounds, spent_ms = 0, 0.0
    while steps and (rounds < iters or spent_ms < 1e3 * min_seconds):
        rounds += 1
        for name in order.sample(list(steps), len(steps)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(1e3 * (time.perf_counter() - start))
            spent_ms += times[name][-1]
    return times


def interleaved_median_ms(steps: dict, device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median step time of each callable, timed by :func:`interleaved_times_ms`."""
    return {name: statistics.median(t) for name, t in interleaved_times_ms(steps, device, warmup, iters).items()}


def paired_speedup(baseline: list[float], times: list[float]) -> float:
    """Median over rounds of the baseline's time over the method's time in the same round, so that
    the machine's speed drifting from round to round cancels out of each ratio."""
    return statistics.median(b / t for b, t in zip(baseline, times, strict=True))


def environment(device: torch.device) -> dict:
    info = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                device=device_name(device), threads=torch.get_num_threads())
    if device.type == "cuda":
        import triton

        info.update(triton=triton.__version__, gpu=torch.cuda.get_device_name(device))
    return info


def write_results(out_dir: Path, name: str, payload: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def bar_chart(path: Path, title: str, groups: list[str], series: dict[str, list[float]], ylabel: str) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(len(series), 1) * 0.5), 4.2))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
