"""Host-side cost of one ``group_rational`` forward+backward on the Triton path, the kernel launch
itself stubbed out, against GELU's forward+backward on the same small tensor: the CPU time a call
takes before the GPU sees its work. On a GPU a step whose kernels finish sooner than this waits
on it (KAT-T makes 24 such calls a training step). Runs on any machine: the Triton path is taken
under ``TRITON_INTERPRET=1`` with CPU tensors, and nothing is launched.

    python bench/rational_host_overhead.py
"""
from __future__ import annotations

import os

os.environ.update(TRITON_INTERPRET="1", KZOO_BACKEND="triton")  # before triton is imported

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kzoo.kernels.triton.rational as triton_rational  # noqa: E402
from kzoo.bench.common import environment, write_results  # noqa: E402
from kzoo.kernels import group_rational  # noqa: E402


class _NoLaunch:
    """Stands in for the kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=500, help="calls per round and method")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    triton_rational.group_rational_kernel = _NoLaunch()
    x = torch.randn(64, 8 * 16, requires_grad=True)  # small: the launch, not the work, is measured
    grad_out = torch.randn_like(x)
    numerator, denominator = torch.randn(1, 6, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    steps = {
        "group_rational": lambda: torch.autograd.grad(group_rational(x, numerator, denominator),
                                                      [x, numerator, denominator], grad_out),
        "gelu": lambda: torch.autograd.grad(F.gelu(x), [x], grad_out),
    }
    for step in steps.values():
        for _ in range(200):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):  # alternating rounds: drift hits both alike
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                step()
            times[name].append((time.perf_counter() - start) / args.calls * 1e6)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times["group_rational"], times["gelu"]))
    print(f"forward+backward host time: group_rational {medians['group_rational']:.0f} us, "
          f"GELU {medians['gelu']:.0f} us ({ratio:.2f}x), medians of {args.rounds} rounds of {args.calls} calls")
    write_results(args.out, "rational-host-overhead-cpu", dict(
        benchmark="rational_host_overhead", environment=environment(torch.device("cpu")),
        rounds=args.rounds, calls=args.calls, median_us=medians, ratio_to_gelu=ratio, times_us=times))


if __name__ == "__main__":
    main()
