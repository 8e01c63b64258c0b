"""Fast CPU paths, tested against ``reference.py``.

The group-rational op is the reference definition compiled by Inductor, which fuses the Horner
chains (and, in the backward, the coefficient reductions) into one vectorised loop. It is called on
the op's (rows, groups, span) view, so the coefficients are per-group scalars in the inner loop:
with dynamic shapes, Inductor's loop over the channel-last (tokens, C) layout is ten times slower.

Shapes are compiled dynamic and the numerator is always passed as (G, 6), so one graph per dtype
serves every layer; past dynamo's recompile limit the eager reference runs, still correct.

Block-sparse attention runs one fused SDPA per run of queries that share a key range, so no
Lq x Lk mask is built for scale layouts.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference

_forward = torch.compile(reference.group_rational, dynamic=True)
_backward = torch.compile(reference.group_rational_backward, dynamic=True)


def group_rational(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """y for a contiguous (rows, groups, span) x."""
    return _forward(x, numerator.expand(denominator.shape[0], -1), denominator, 1)


def group_rational_backward(
    grad_out: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, d numerator, d denominator) for contiguous (rows, groups, span) grad_out and x."""
    grad_x, grad_numerator, grad_denominator = _backward(
        grad_out, x, numerator.expand(denominator.shape[0], -1), denominator, 1)
    if numerator.shape[0] == 1:
        grad_numerator = grad_numerator.sum(0, keepdim=True)
    return grad_x, grad_numerator, grad_denominator


def query_runs(kv_start: Tensor, kv_end: Tensor) -> list[tuple[int, int, int, int]]:
    """Runs of consecutive queries that share one key range: (q_begin, q_end, k_begin, k_end)."""
    changes = torch.ones(kv_start.shape[-1], dtype=torch.bool)
    changes[1:] = (kv_start[1:] != kv_start[:-1]) | (kv_end[1:] != kv_end[:-1])
    begins = torch.nonzero(changes).flatten().tolist()
    ends = begins[1:] + [kv_start.shape[-1]]
    starts, stops = kv_start.tolist(), kv_end.tolist()
    return [(b, e, starts[b], stops[b]) for b, e in zip(begins, ends)]


def segmented(kv_start: Tensor, kv_end: Tensor) -> list[tuple[int, int, int, int]] | None:
    """The query runs when per-run dense attention pays (scale layouts: a few runs), else None.

    Per-sample (B, Lq) ranges, and layouts with a range per query (causal, windows), go to the
    masked path instead.
    """
    if kv_start.ndim != 1 or kv_start.numel() == 0:
        return None
    runs = query_runs(kv_start, kv_end)
    return runs if len(runs) <= max(32, kv_start.numel() // 16) else None


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor, scale: float) -> Tensor:
    """Dense attention per run of queries sharing a key range, with runs of one shape batched
    together, so that no Lq x Lk mask exists; masked SDPA for other layouts."""
    runs = segmented(kv_start, kv_end)
    if runs is None:
        mask = reference.range_mask(kv_start, kv_end, k.shape[-2])
        mask = mask[:, None] if mask.ndim == 3 else mask
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # SDPA gives NaN for empty rows
    parts: dict[int, Tensor] = {}  # query-run start -> its output rows
    by_shape: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for a, b, c, d in runs:
        if d > c:
            by_shape.setdefault((b - a, d - c), []).append((a, b, c, d))
        else:
            parts[a] = q.new_zeros(*q.shape[:2], b - a, q.shape[3])
    for group in by_shape.values():
        # Runs of one shape are stacked along the batch dim: SDPA's fused CPU kernel takes 4-D input
        # only (5-D input falls back to the unfused math path, twice as slow).
        qs = _concat_rows(q, [(a, b) for a, b, _, _ in group])
        ks = _concat_rows(k, [(c, d) for _, _, c, d in group])
        vs = _concat_rows(v, [(c, d) for _, _, c, d in group])
        result = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        parts.update(zip((a for a, _, _, _ in group), result.split(q.shape[0])))
    # The runs partition the queries in order, so one concatenation assembles the output.
    return torch.cat([parts[a] for a, _, _, _ in runs], dim=2)


def _concat_rows(t: Tensor, spans: list[tuple[int, int]]) -> Tensor:
    return t[..., spans[0][0]:spans[0][1], :] if len(spans) == 1 else torch.cat([t[..., a:b, :] for a, b in spans])


def block_sparse_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference backward, run per run of queries when the layout is segmented."""
    runs = segmented(kv_start, kv_end)
    if runs is None:
        return reference.block_sparse_attention_backward(grad_out, q, k, v, kv_start, kv_end, scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for a, b, c, d in runs:
        if d <= c:
            continue
        start = torch.zeros(b - a, dtype=torch.int32)
        stop = torch.full((b - a,), d - c, dtype=torch.int32)
        part = reference.block_sparse_attention_backward(
            grad_out[..., a:b, :], q[..., a:b, :], k[..., c:d, :], v[..., c:d, :], start, stop, scale)
        dq[..., a:b, :] = part[0]
        dk[..., c:d, :] += part[1]
        dv[..., c:d, :] += part[2]
    return dq, dk, dv
