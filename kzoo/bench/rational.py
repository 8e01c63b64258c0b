"""``kzoo bench rational``: the group-rational op against its reference and GELU, on KAT shapes.

Compared side by side in one run, on the same tensor:
* ``kzoo``: the op on its default path (Triton on GPU, the fused CPU path on CPU);
* ``reference``: the plain PyTorch definition, eager (the op with KZOO_BACKEND=reference);
* ``reference+compile``: the plain definition under ``torch.compile``, autograd through it;
* ``gelu``: ``torch.nn.functional.gelu``, the activation KAT replaces;
* ``copy`` (GPU only): ``x.clone()``, the bandwidth a memory-bound op can hope for;
* ``kzoo_one_tile`` (GPU only): the op with the backward of one 1024-element tile a program, one
  reduction per tile (the kernel before programs walked several tiles), as an ablation.

On a GPU, kzoo and GELU are also timed replayed from a CUDA graph (``graph_*`` fields): the GPU's
time alone, without the Python that launches the kernels, which bounds the small shapes.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from kzoo.kernels import group_rational, reference, use_backend

from .common import bar_chart, device_name, environment, graphed_median_ms, median_ms, write_results

KAT_SHAPES = ((128, 197, 768), (128, 197, 3072))
GROUPS = 8


@contextlib.contextmanager
def _one_tile_backward():
    import kzoo.kernels.triton.rational as triton_rational

    saved = triton_rational.BACKWARD_BLOCK, triton_rational.BACKWARD_TILES
    triton_rational.BACKWARD_BLOCK, triton_rational.BACKWARD_TILES = 1024, (1,)
    try:
        yield
    finally:
        triton_rational.BACKWARD_BLOCK, triton_rational.BACKWARD_TILES = saved


def _methods(numerator, denominator, device):
    compiled_reference = torch.compile(reference.group_rational)

    def kzoo(x):
        return group_rational(x, numerator, denominator)

    def eager_reference(x):
        with use_backend("reference"):
            return group_rational(x, numerator, denominator)

    methods = {
        "kzoo": kzoo,
        "reference": eager_reference,
        "reference+compile": lambda x: compiled_reference(x, numerator, denominator, -1),
        "gelu": torch.nn.functional.gelu,
    }
    if device.type == "cuda":
        methods["kzoo_one_tile"] = kzoo  # timed under _one_tile_backward
    return methods


def _graphed_timings(x, grad_out, numerator, denominator, repeats: int) -> dict:
    """kzoo's and GELU's kernels alone: the ops called directly (autograd's bookkeeping is host
    work), forward and forward+backward."""
    x, num, den = x.detach(), numerator.detach(), denominator.detach()

    def kzoo_both():
        torch.ops.kzoo.group_rational(x, num, den, -1)
        torch.ops.kzoo.group_rational_backward(grad_out, x, num, den, -1)

    def gelu_both():
        torch.nn.functional.gelu(x)
        torch.ops.aten.gelu_backward(grad_out, x)

    with _one_tile_backward():  # the graph keeps the launches captured under it
        one_tile_both = graphed_median_ms(kzoo_both, repeats)
    return {
        "kzoo": dict(graph_forward_ms=graphed_median_ms(lambda: torch.ops.kzoo.group_rational(x, num, den, -1), repeats),
                     graph_forward_backward_ms=graphed_median_ms(kzoo_both, repeats)),
        "kzoo_one_tile": dict(graph_forward_backward_ms=one_tile_both),
        "gelu": dict(graph_forward_ms=graphed_median_ms(lambda: torch.nn.functional.gelu(x), repeats),
                     graph_forward_backward_ms=graphed_median_ms(gelu_both, repeats)),
    }


def _forward_backward(fn, x, grad_out, params):
    def step():
        y = fn(x)
        grads = torch.autograd.grad(y, [x, *params], grad_out, allow_unused=True)
        return grads

    return step


def run(device: torch.device, batch: int | None = None, dtypes=None, repeats: int = 5,
        out_dir: Path = Path("bench/results")) -> dict:
    dtypes = dtypes or ([torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32])
    numerator = (0.3 * torch.randn(1, 6, device=device)).requires_grad_()
    denominator = (0.3 * torch.randn(GROUPS, 4, device=device)).requires_grad_()
    methods = _methods(numerator, denominator, device)
    rows = []
    for shape in KAT_SHAPES:
        shape = (batch or shape[0], *shape[1:])
        for dtype in dtypes:
            x = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
            grad_out = torch.randn_like(x)
            element_bytes = x.element_size() * x.numel()
            timings = {}
            for name, fn in methods.items():
                params = [] if name == "gelu" else [numerator, denominator]
                with _one_tile_backward() if name == "kzoo_one_tile" else contextlib.nullcontext():
                    with torch.no_grad():
                        forward = median_ms(lambda: fn(x), device, repeats)
                    both = median_ms(_forward_backward(fn, x, grad_out, params), device, repeats)
                timings[name] = dict(forward_ms=forward, forward_backward_ms=both)
            if device.type == "cuda":
                timings["copy"] = dict(forward_ms=median_ms(lambda: x.detach().clone(), device, repeats))
                for method, graphed in _graphed_timings(x, grad_out, numerator, denominator, repeats).items():
                    timings[method].update(graphed)
            row = dict(shape=list(shape), dtype=str(dtype).removeprefix("torch."), groups=GROUPS, timings=timings)
            # Bytes that must move: forward reads x and writes y; backward reads x and grad_out, writes dx.
            row["forward_bytes"], row["forward_backward_bytes"] = 2 * element_bytes, 5 * element_bytes
            gelu = timings["gelu"]
            for name, t in timings.items():
                t["forward_GBps"] = row["forward_bytes"] / t["forward_ms"] / 1e6
                if "forward_backward_ms" in t:
                    t["forward_backward_GBps"] = row["forward_backward_bytes"] / t["forward_backward_ms"] / 1e6
                    t["forward_vs_gelu"] = t["forward_ms"] / gelu["forward_ms"]
                    t["forward_backward_vs_gelu"] = t["forward_backward_ms"] / gelu["forward_backward_ms"]
            rows.append(row)
    name = f"rational-{device_name(device)}"
    payload = dict(benchmark="rational", environment=environment(device), repeats=repeats, rows=rows)
    json_path = write_results(out_dir, name, payload)
    labels = [f"{'x'.join(map(str, r['shape']))}\n{r['dtype']}" for r in rows]
    series = {}
    for method in methods:
        series[f"{method} fwd"] = [r["timings"][method]["forward_ms"] for r in rows]
        series[f"{method} fwd+bwd"] = [r["timings"][method]["forward_backward_ms"] for r in rows]
    plot = bar_chart(out_dir / f"{name}.png", f"group-rational, G={GROUPS}, {device_name(device)} (median ms)",
                     labels, series, "milliseconds (lower is better)")
    return dict(payload=payload, json=json_path, plot=plot)


def table(payload: dict) -> str:
    """The Markdown table recorded in docs/PERF.md."""
    lines = ["| shape | dtype | method | fwd ms | fwd+bwd ms | fwd / GELU | fwd+bwd / GELU | fwd GB/s | fwd+bwd GB/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in payload["rows"]:
        for method, t in row["timings"].items():
            fb = t.get("forward_backward_ms")
            lines.append(
                f"| {'x'.join(map(str, row['shape']))} | {row['dtype']} | {method} | {t['forward_ms']:.2f} | "
                f"{'' if fb is None else f'{fb:.2f}'} | {t.get('forward_vs_gelu', float('nan')):.2f} | "
                f"{t.get('forward_backward_vs_gelu', float('nan')):.2f} | {t['forward_GBps']:.1f} | "
                f"{t.get('forward_backward_GBps', float('nan')):.1f} |")
    return "\n".join(lines)
