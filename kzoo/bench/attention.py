"""``kzoo bench attention``: block-sparse attention on HMAR (markov) and VAR (block_causal) layouts,
and a causal layout of the same length (a range per query).

Compared side by side in one run, on the same q, k, v (on CPU the methods' steps alternate):
* ``kzoo``: the op on its default path (Triton on GPU, per-run dense attention on CPU);
* ``sdpa_masked``: ``scaled_dot_product_attention`` with the dense boolean mask (what VAR trains with);
* ``sdpa_dense``: SDPA without a mask, the work of the full sequence (FlashAttention on GPU);
* ``flex`` (GPU only): ``flex_attention`` with a ``create_block_mask`` built from the same ranges.
On a GPU the kzoo forward is also replayed from a CUDA graph (``graph_forward_ms``): the kernels'
time without the op's Python.
TFLOP/s count only the allowed (query, key) pairs: 4 B H D pairs for the forward, 2.5 times that
again for the backward. Speedups over masked SDPA are, on CPU, the median over rounds of the two
methods' times in the same round (the machine's speed drifts between rounds).
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kzoo.kernels import block_sparse_attention, causal_ranges, reference, scale_ranges

from .common import (bar_chart, device_name, environment, graphed_median_ms, interleaved_times_ms, median_ms,
                     paired_speedup, write_results)

SCHEDULES = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
DEPTHS = {"d16": 16, "d30": 30}  # heads of HMAR/VAR-d16 and -d30, head dim 64
HEAD_DIM = 64
# Timed rounds per shape and pass on CPU, at least: over 15 rounds, the 256 markov forward's
# speedup came out anywhere from 2.40x to 2.85x from run to run on one code.
CPU_MIN_SECONDS = 2.0


def _layout(resolution: int, mode: str) -> tuple[Tensor, Tensor]:
    """Ranges over one schedule's tokens: its scale layout, or causal over the same length."""
    if mode == "causal":
        return causal_ranges(sum(p * p for p in SCHEDULES[resolution]))
    return scale_ranges(SCHEDULES[resolution], mode)


def _flex(start: Tensor, end: Tensor, length: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= start[q_idx]) & (kv_idx < end[q_idx])

    block_mask = create_block_mask(mask_mod, None, None, length, length, device=device)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _methods(start, end, length, device):
    mask = reference.range_mask(start, end, length)
    methods = {
        "kzoo": lambda q, k, v: block_sparse_attention(q, k, v, start, end),
        "sdpa_masked": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "sdpa_dense": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    }
    if device.type == "cuda":
        methods["flex"] = _flex(start, end, length, device)
    return methods


def _time_methods(methods: dict, q, k, v, grad_out, device: torch.device, repeats: int, min_seconds: float):
    """Forward and forward+backward step times (ms) per method: on CPU one per round, the methods'
    steps alternating, for at least ``repeats`` rounds and ``min_seconds``; on GPU one do_bench
    median each."""
    def forward_step(fn):
        def step():
            with torch.no_grad():
                fn(q, k, v)
        return step

    def both_step(fn):
        return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)

    if device.type == "cuda":
        return ({n: [median_ms(forward_step(fn), device, repeats)] for n, fn in methods.items()},
                {n: [median_ms(both_step(fn), device, repeats)] for n, fn in methods.items()})
    forward = interleaved_times_ms({n: forward_step(fn) for n, fn in methods.items()}, device, 2, repeats, min_seconds)
    both = interleaved_times_ms({n: both_step(fn) for n, fn in methods.items()}, device, 2, repeats, min_seconds)
    return forward, both


def run(device: torch.device, resolutions=None, depths=None, batch: int | None = None, repeats: int = 5,
        out_dir: Path = Path("bench/results"), min_seconds: float = CPU_MIN_SECONDS) -> dict:
    on_gpu = device.type == "cuda"
    resolutions = resolutions or ((256, 512, 1024) if on_gpu else (256, 512))
    unknown = [r for r in resolutions if str(r) not in map(str, SCHEDULES)]
    if unknown:
        schedules = ", ".join(map(str, SCHEDULES))
        raise ValueError(f"resolution {unknown[0]!r} is not one of the HMAR schedules' {schedules}")
    resolutions = [int(r) for r in resolutions]
    depths = depths or tuple(DEPTHS)
    batch = batch or (4 if on_gpu else 1)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    rows = []
    name = f"attention-{device_name(device)}"
    payload = dict(benchmark="attention", environment=environment(device), repeats=repeats, rows=rows)
    for resolution in resolutions:
        for mode in ("markov", "block_causal", "causal"):
            start, end = (t.to(device) for t in _layout(resolution, mode))
            length = start.numel()
            pairs = int((end - start).sum())
            methods = _methods(start, end, length, device)
            for depth in depths:
                heads = DEPTHS[depth]
                q, k, v = (torch.randn(batch, heads, length, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
                           for _ in range(3))
                grad_out = torch.randn_like(q)
                flops = 4 * batch * heads * HEAD_DIM * pairs
                forward, both = _time_methods(methods, q, k, v, grad_out, device, repeats, min_seconds)
                timings = {}
                for method in methods:
                    work = flops if method != "sdpa_dense" else 4 * batch * heads * HEAD_DIM * length * length
                    forward_ms, both_ms = statistics.median(forward[method]), statistics.median(both[method])
                    timings[method] = dict(
                        forward_ms=forward_ms, forward_backward_ms=both_ms,
                        forward_TFLOPs_allowed=flops / forward_ms / 1e9,
                        forward_backward_TFLOPs_allowed=3.5 * flops / both_ms / 1e9,
                        forward_TFLOPs_executed=work / forward_ms / 1e9,
                        forward_speedup_vs_sdpa_masked=paired_speedup(forward["sdpa_masked"], forward[method]),
                        forward_backward_speedup_vs_sdpa_masked=paired_speedup(both["sdpa_masked"], both[method]))
                if on_gpu:
                    def kzoo_forward():
                        with torch.no_grad():
                            methods["kzoo"](q, k, v)
                    timings["kzoo"]["graph_forward_ms"] = graphed_median_ms(kzoo_forward, repeats)
                rows.append(dict(resolution=resolution, mode=mode, depth=depth, batch=batch, heads=heads,
                                 head_dim=HEAD_DIM, length=length, allowed_pairs=pairs,
                                 dtype=str(dtype).removeprefix("torch."), timings=timings))
                if not on_gpu:
                    rows[-1]["rounds"] = dict(forward=len(forward["kzoo"]), forward_backward=len(both["kzoo"]))
                print(f"{resolution} {mode:12s} {depth}: kzoo {timings['kzoo']['forward_ms']:.2f} ms fwd, "
                      f"{timings['kzoo']['forward_speedup_vs_sdpa_masked']:.2f}x masked SDPA")
                # after every row: a run stopped at a time limit keeps what it measured
                json_path = write_results(out_dir, name, payload)
    labels = [f"{r['resolution']} {r['mode']}\n{r['depth']}" for r in rows]
    series = {f"{m} fwd+bwd": [r["timings"][m]["forward_backward_ms"] for r in rows] for m in rows[0]["timings"]}
    plot = bar_chart(out_dir / f"{name}.png", f"block-sparse attention, {device_name(device)} (median ms)",
                     labels, series, "milliseconds, forward+backward (lower is better)")
    return dict(payload=payload, json=json_path, plot=plot)


def table(payload: dict) -> str:
    lines = ["| layout | L | model | method | fwd ms | fwd+bwd ms | fwd vs masked SDPA | fwd+bwd vs masked SDPA "
             "| fwd TFLOP/s (allowed pairs) |", "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in payload["rows"]:
        for method, t in row["timings"].items():
            lines.append(
                f"| {row['resolution']} {row['mode']} | {row['length']} | {row['depth']} | {method} | "
                f"{t['forward_ms']:.2f} | {t['forward_backward_ms']:.2f} | {t['forward_speedup_vs_sdpa_masked']:.2f} | "
                f"{t['forward_backward_speedup_vs_sdpa_masked']:.2f} | {t['forward_TFLOPs_allowed']:.3f} |")
    return "\n".join(lines)
