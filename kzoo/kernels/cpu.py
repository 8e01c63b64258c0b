"""Fast CPU paths, tested against ``reference.py``.

The group-rational op is the reference definition compiled by Inductor, which fuses the Horner
chains (and, in the backward, the coefficient reductions) into one vectorised loop. It is called on
the op's (rows, groups, span) view, so the coefficients are per-group scalars in the inner loop:
with dynamic shapes, Inductor's loop over the channel-last (tokens, C) layout is ten times slower.

Shapes are compiled dynamic and the numerator is always passed as (G, 6), so one graph per dtype
serves every layer; past dynamo's recompile limit the eager reference runs, still correct.

Block-sparse attention runs ATen's fused CPU attention once per run of queries that share a key
range, so no Lq x Lk mask is built for scale layouts, and its fused backward from the saved
log-sum-exp.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import reference
from .reference import LOG2E

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


def segmented(kv_start: Tensor, kv_end: Tensor) -> list[tuple[int, int, int, int]] | None:
    """Runs of consecutive queries that share one key range, (q_begin, q_end, k_begin, k_end), when
    per-run dense attention pays (scale layouts: a few runs), else None.

    Per-sample (B, Lq) ranges, and layouts with a range per query (causal, windows), go to the
    masked query tiles instead.
    """
    if kv_start.ndim != 1 or kv_start.numel() == 0:
        return None
    # In numpy: a handful of torch calls on a few hundred elements cost more than a small run's attention.
    starts, stops = kv_start.numpy(), kv_end.numpy()
    changes = np.flatnonzero((starts[1:] != starts[:-1]) | (stops[1:] != stops[:-1])) + 1
    if len(changes) + 1 > max(32, len(starts) // 16):
        return None
    begins = [0, *changes.tolist()]
    ends = [*changes.tolist(), len(starts)]
    return [(b, e, int(starts[b]), int(stops[b])) for b, e in zip(begins, ends)]


QUERY_TILE = 128  # queries per masked call: causal layouts do ~1.8x less work than one full-width call


def query_tiles(kv_start: Tensor, kv_end: Tensor) -> list[tuple[int, int, int, int]]:
    """Tiles of QUERY_TILE queries and the keys any of their rows (in any sample) sees:
    (q_begin, q_end, k_begin, k_end), with k_begin == k_end when none sees a key."""
    starts, stops = kv_start.numpy().reshape(-1, kv_start.shape[-1]), kv_end.numpy().reshape(-1, kv_end.shape[-1])
    tiles = []
    for a in range(0, starts.shape[1], QUERY_TILE):
        tile_starts, tile_stops = starts[:, a:a + QUERY_TILE], stops[:, a:a + QUERY_TILE]
        seen = tile_starts < tile_stops
        span = (int(tile_starts[seen].min()), int(tile_stops[seen].max())) if seen.any() else (0, 0)
        tiles.append((a, a + tile_starts.shape[1], *span))
    return tiles


# ATen's fused CPU attention kernels, called directly rather than through SDPA: the forward returns
# the log-sum-exp that the fused backward takes, so the backward neither recomputes the forward nor
# builds the probabilities.
_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor,
                           scale: float) -> tuple[Tensor, Tensor]:
    """(out, base-2 log-sum-exp per query, (B, H, Lq) float32, -inf for a query with no keys).

    Scale layouts run dense attention per run of queries sharing a key range, runs of one shape
    batched together, so that no Lq x Lk mask exists; other layouts run masked attention per query
    tile over the keys its rows see.
    """
    parts: dict[int, tuple[Tensor, Tensor]] = {}  # query-block start -> its (out, natural lse) rows
    runs = segmented(kv_start, kv_end)
    if runs is not None:
        blocks = runs
        for group in _runs_by_shape(runs):
            out, lse = _flash_forward(*_stacked(group, q=q, k=k, v=v), scale=scale)
            for (a, _, _, _), run_out, run_lse in zip(group, _unstacked(out, len(group)), _unstacked(lse, len(group))):
                parts[a] = run_out, run_lse
    else:
        blocks = query_tiles(kv_start, kv_end)
        for a, b, c, d in blocks:
            if d > c:
                bias, empty = _tile_bias(q, kv_start, kv_end, (a, b, c, d))
                out, lse = _flash_forward(q[..., a:b, :], k[..., c:d, :], v[..., c:d, :], attn_mask=bias, scale=scale)
                if empty is not None:
                    out, lse = out.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, float("-inf"))
                parts[a] = out, lse
    for a, b, c, d in blocks:
        if d <= c:
            parts[a] = (q.new_zeros(*q.shape[:2], b - a, q.shape[3]),
                        q.new_full((*q.shape[:2], b - a), float("-inf"), dtype=torch.float32))
    # The blocks partition the queries in order, so one concatenation assembles each result.
    out = torch.cat([parts[a][0] for a, _, _, _ in blocks], dim=2)
    return out, torch.cat([parts[a][1] for a, _, _, _ in blocks], dim=2) * LOG2E


def block_sparse_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_start: Tensor, kv_end: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the forward's out and base-2 lse, by ATen's fused backward on the same blocks."""
    lse = lse / LOG2E  # the kernels' own, natural log-sum-exp
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    runs = segmented(kv_start, kv_end)
    if runs is not None:
        for group in _runs_by_shape(runs):
            grads = _flash_backward(*_stacked(group, grad_out=grad_out, q=q, k=k, v=v, out=out, lse=lse),
                                    0.0, False, scale=scale)
            for (a, b, c, d), dq_run, dk_run, dv_run in zip(group, *(_unstacked(g, len(group)) for g in grads)):
                dq[..., a:b, :] = dq_run
                dk[..., c:d, :] += dk_run
                dv[..., c:d, :] += dv_run
        return dq, dk, dv
    for a, b, c, d in query_tiles(kv_start, kv_end):
        if d <= c:
            continue
        bias, empty = _tile_bias(q, kv_start, kv_end, (a, b, c, d))
        tile_grad_out, tile_lse = grad_out[..., a:b, :], lse[..., a:b]
        if empty is not None:
            # The forward opened the empty rows to every key and zeroed them afterwards; zero output
            # gradient and probabilities of exp(s - inf) = 0 keep them out of every gradient.
            tile_grad_out = tile_grad_out.masked_fill(empty[..., None], 0.0)
            tile_lse = tile_lse.masked_fill(empty, float("inf"))
        grads = _flash_backward(tile_grad_out, q[..., a:b, :], k[..., c:d, :], v[..., c:d, :], out[..., a:b, :],
                                tile_lse, 0.0, False, attn_mask=bias, scale=scale)
        dq[..., a:b, :] = grads[0]
        dk[..., c:d, :] += grads[1]
        dv[..., c:d, :] += grads[2]
    return dq, dk, dv


def _runs_by_shape(runs: list[tuple[int, int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
    """The non-empty runs, grouped by (queries, keys)."""
    groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for a, b, c, d in runs:
        if d > c:
            groups.setdefault((b - a, d - c), []).append((a, b, c, d))
    return list(groups.values())


def _stacked(group: list[tuple[int, int, int, int]], **tensors: Tensor) -> list[Tensor]:
    """Each tensor's rows of every run in the group, stacked along the batch dim (the fused CPU
    kernels take 4-D input only). Query-side tensors take the query rows, k and v the key rows."""
    stacked = []
    for name, t in tensors.items():
        spans = [(c, d) if name in ("k", "v") else (a, b) for a, b, c, d in group]
        rows = [t[..., a:b, :] if t.ndim == 4 else t[..., a:b] for a, b in spans]
        stacked.append(rows[0] if len(rows) == 1 else torch.cat(rows))
    return stacked


def _unstacked(t: Tensor, runs: int) -> tuple[Tensor, ...]:
    """The per-run parts of a result stacked by :func:`_stacked`."""
    return (t,) if runs == 1 else t.chunk(runs)


def _tile_bias(q: Tensor, kv_start: Tensor, kv_end: Tensor,
               tile: tuple[int, int, int, int]) -> tuple[Tensor, Tensor | None]:
    """A query tile's additive mask over its keys, in q's dtype and broadcastable to (B, H, rows, keys),
    and its (B or 1, 1, rows) empty rows, None when it has none.

    An empty row is opened to every key, so that the kernel never normalises over nothing (NaN); the
    callers zero its output and gradient.
    """
    a, b, c, d = tile
    allowed = reference.range_mask(kv_start[..., a:b] - c, kv_end[..., a:b] - c, d - c)
    allowed = allowed[:, None] if allowed.ndim == 3 else allowed[None, None]
    empty = ~allowed.any(-1)
    if empty.any():
        allowed |= empty[..., None]
    else:
        empty = None
    return torch.full(allowed.shape, float("-inf"), dtype=q.dtype).masked_fill_(allowed, 0.0), empty
