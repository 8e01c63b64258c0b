"""Where the host time of one forward+backward goes, on a GPU: cProfile over many steps of
``group_rational`` (64x197x192, small: the launches, not the work, are measured) and of
``block_sparse_attention`` (the 256 markov layout, d16), each against its step's wall time with
and without a CUDA synchronise. Prints the functions that take the most time of their own.

    python3 bench/host_profile.py [--steps 300] [--out DIR]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kzoo.bench.common import device_name, environment, write_results
from kzoo.kernels import block_sparse_attention, group_rational, scale_ranges


def _steps(device: torch.device) -> dict:
    x = torch.randn(64, 197, 192, device=device, requires_grad=True)
    numerator = torch.randn(1, 6, device=device, requires_grad=True)
    denominator = torch.randn(8, 4, device=device, requires_grad=True)
    gx = torch.randn_like(x)
    start, end = (t.to(device) for t in scale_ranges((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), "markov"))
    q, k, v = (torch.randn(1, 16, start.numel(), 64, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    gq = torch.randn_like(q)
    return {
        "group_rational": lambda: torch.autograd.grad(group_rational(x, numerator, denominator),
                                                      [x, numerator, denominator], gx),
        "gelu": lambda: torch.autograd.grad(F.gelu(x), [x], gx),
        "block_sparse_attention": lambda: torch.autograd.grad(block_sparse_attention(q, k, v, start, end),
                                                              [q, k, v], gq),
        "sdpa": lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), [q, k, v], gq),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {}
    for name, step in _steps(device).items():
        for _ in range(20):
            step()
        synchronize()
        began = time.perf_counter()
        for _ in range(args.steps):
            step()
        host_us = (time.perf_counter() - began) / args.steps * 1e6  # queued, the GPU not waited for
        synchronize()
        wall_us = (time.perf_counter() - began) / args.steps * 1e6
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            step()
        profiler.disable()
        synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        results[name] = dict(host_us_per_step=host_us, wall_us_per_step=wall_us, profile=text.getvalue())
        print(f"== {name}: host {host_us:.1f} us a step, wall {wall_us:.1f} us")
        print(text.getvalue())
    print(write_results(args.out, f"host-profile-{device_name(device)}",
                        dict(benchmark="host_profile", environment=environment(device), steps=args.steps,
                             results=results)))


if __name__ == "__main__":
    main()
