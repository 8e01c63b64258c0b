"""Where the CPU path's time goes at the 256px HMAR layout (markov, 680 tokens, 16 heads, D = 64).

    .venv/bin/python bench/attention_cpu_profile.py [--out bench/results]

Prints, and writes to attention-cpu-profile.json, median milliseconds of:
* each query run's fused-kernel call, back to back and right after a dense SDPA call;
* one forward built up layer by layer, all timed in one shuffled rotation with masked SDPA (and
  each layer's speedup over it, the median of same-round ratios): a bare loop of public SDPA calls
  per run, the ten kernel calls with the output concatenation, plus the log-sum-exp, the CPU path
  given its plan, the op's implementation (checks, remembered plan, backend choice) and the op;
* the six shortest runs as six calls against one masked call over their 91 tokens;
* the 169-token run with its queries padded to 192;
* the op's dispatch on a one-token input against its implementation called directly (microseconds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import timeit
from pathlib import Path

import torch
import torch.nn.functional as F

from kzoo.bench.common import interleaved_times_ms, paired_speedup
from kzoo.kernels import attention, cpu, reference, scale_ranges
from kzoo.kernels.reference import LOG2E

HEADS, HEAD_DIM, SCALE = 16, 64, 0.125
PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def median_ms(steps: dict, repeats: int, before=None) -> dict[str, float]:
    """Median ms of each step, the steps alternating; ``before`` runs untimed ahead of every step."""
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if before:
                before()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: round(1e3 * statistics.median(t), 3) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    start, end = scale_ranges(PATCH_NUMS, "markov")
    length = start.numel()
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM) for _ in range(3))
    other = [torch.randn_like(q) for _ in range(3)]
    dense = lambda: F.scaled_dot_product_attention(*other)  # noqa: E731  (the "other large op")
    mask = reference.range_mask(start, end, length)
    plan = cpu.plan(start, end, length)
    runs = plan.blocks  # the query runs: a scale layout

    def call(a, b, c, d):
        return lambda: cpu._flash_forward(q[..., a:b, :], k[..., c:d, :], v[..., c:d, :], scale=SCALE)

    def kernels():
        return [call(*run)() for run in runs]

    def sdpa_per_run():
        return torch.cat([F.scaled_dot_product_attention(q[..., a:b, :], k[..., c:d, :], v[..., c:d, :], scale=SCALE)
                          for a, b, c, d in runs], dim=2)

    def kernels_and_concatenation():
        return torch.cat([out for out, _ in kernels()], dim=2)

    def kernels_and_log_sum_exp():
        results = kernels()
        return torch.cat([out for out, _ in results], dim=2), torch.cat([lse for _, lse in results], dim=2) * LOG2E

    steps = {
        "sdpa_per_run": sdpa_per_run, "kernels+concatenation": kernels_and_concatenation,
        "kernels+log_sum_exp": kernels_and_log_sum_exp,
        "cpu_path": lambda: cpu.block_sparse_attention(q, k, v, start, end, SCALE, plan),
        "op_implementation": lambda: attention._attention_op._init_fn(q, k, v, start, end, SCALE),
        "op": lambda: torch.ops.kzoo.block_sparse_attention(q, k, v, start, end, SCALE),
        "masked_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)}

    tiny = [run for run in runs if run[1] - run[0] <= 36]
    packed_bias, _ = cpu._tile_bias(q, start, end, (0, tiny[-1][1], 0, tiny[-1][1]))
    q192 = torch.randn(1, HEADS, 192, HEAD_DIM)
    run169 = next(run for run in runs if run[1] - run[0] == 169)
    one = torch.randn(1, 2, 1, 16)
    zero, single = torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with torch.no_grad():
        kernels(), dense()  # warm-up
        times = interleaved_times_ms(steps, torch.device("cpu"), 3, 150)
        layers = {name: dict(ms=round(statistics.median(t), 3),
                             speedup_vs_masked_sdpa=round(paired_speedup(times["masked_sdpa"], t), 2))
                  for name, t in times.items()}
        result = dict(
            run_back_to_back={f"{b - a}": median_ms({"ms": call(a, b, c, d)}, 60)["ms"] for a, b, c, d in runs},
            run_after_dense={f"{b - a}": median_ms({"ms": call(a, b, c, d)}, 60, dense)["ms"] for a, b, c, d in runs},
            layers=layers,
            shortest_runs_after_dense=median_ms({
                "six_calls": lambda: [call(*run)() for run in tiny],
                "one_masked_call": lambda: cpu._flash_forward(
                    q[..., :tiny[-1][1], :], k[..., :tiny[-1][1], :], v[..., :tiny[-1][1], :],
                    attn_mask=packed_bias, scale=SCALE)}, 100, dense),
            run169_queries_padded=median_ms({
                "169": call(*run169),
                "192": lambda: cpu._flash_forward(q192, k[..., run169[2]:run169[3], :], v[..., run169[2]:run169[3], :],
                                                  scale=SCALE)}, 60),
            dispatch_us={name: round(1e6 * min(timeit.repeat(fn, number=500, repeat=5)) / 500, 1) for name, fn in {
                "implementation": lambda: attention._attention_op._init_fn(one, one, one, zero, single, 0.25),
                "op": lambda: torch.ops.kzoo.block_sparse_attention(one, one, one, zero, single, 0.25)}.items()},
        )
    result["run_back_to_back_total"] = round(sum(result["run_back_to_back"].values()), 3)
    result["run_after_dense_total"] = round(sum(result["run_after_dense"].values()), 3)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "attention-cpu-profile.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
