"""Fast CPU paths, tested against ``reference.py``.

The group-rational op is the reference definition compiled by Inductor, which fuses the Horner
chains (and, in the backward, the coefficient reductions) into one vectorised loop. It is called on
the op's (rows, groups, span) view, so the coefficients are per-group scalars in the inner loop:
with dynamic shapes, Inductor's loop over the channel-last (tokens, C) layout is ten times slower.

Shapes are compiled dynamic and the numerator is always passed as (G, 6), so one graph per dtype
serves every layer; past dynamo's recompile limit the eager reference runs, still correct.

Block-sparse attention runs ATen's fused CPU attention once per run of queries that share a key
range, so no Lq x Lk mask is built for scale layouts, and its fused backward from the saved
log-sum-exp. How a layout is cut into calls (:class:`Plan`) is worked out once per pair of range
tensors: right after a large op, with the caches cold, the Python that reads the ranges cost about
a tenth of the op's time at the 256px HMAR layout.
"""
from __future__ import annotations

from dataclasses import dataclass

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


Run = tuple[int, int, int, int]  # (q_begin, q_end, k_begin, k_end)


def segmented(kv_start: Tensor, kv_end: Tensor) -> list[Run] | None:
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


def query_tiles(kv_start: Tensor, kv_end: Tensor) -> list[Run]:
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


@dataclass(frozen=True)
class Plan:
    """How the CPU path cuts one layout into calls of ATen's fused attention; it depends on the
    ranges' values only, so the op computes it once per pair of range tensors.

    ``blocks`` partition the queries in order, as (q_begin, q_end, k_begin, k_end): either runs of
    queries sharing one key range, each attended densely (``per_run``), or QUERY_TILE-query tiles
    attended with a mask over the keys their rows see. A block with k_begin == k_end sees no key.
    """
    blocks: list[Run]
    per_run: bool
    shape_groups: list[list[int]]  # per_run: the non-empty runs' indices, grouped by (queries, keys)
    empty_blocks: list[int]
    query_sizes: list[int]
    key_sizes: list[int] | None  # per_run, when the runs' key ranges tile the keys in order


def plan(kv_start: Tensor, kv_end: Tensor, num_keys: int) -> Plan:
    runs = segmented(kv_start, kv_end)
    blocks = runs if runs is not None else query_tiles(kv_start, kv_end)
    tiling = (runs is not None and runs[0][2] == 0 and runs[-1][3] == num_keys
              and all(r[3] == s[2] for r, s in zip(runs, runs[1:])))
    return Plan(blocks=blocks, per_run=runs is not None,
                shape_groups=_runs_by_shape(runs) if runs is not None else [],
                empty_blocks=[i for i, (_, _, c, d) in enumerate(blocks) if d <= c],
                query_sizes=[b - a for a, b, _, _ in blocks],
                key_sizes=[d - c for _, _, c, d in blocks] if tiling else None)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor, scale: float,
                           plan: Plan) -> tuple[Tensor, Tensor]:
    """(out, base-2 log-sum-exp per query, (B, H, Lq) float32, -inf for a query with no keys), block
    by block of ``plan``: runs of one shape batched together, so that no Lq x Lk mask exists for
    scale layouts."""
    outs: list[Tensor | None] = [None] * len(plan.blocks)  # per block, in query order
    lses: list[Tensor | None] = [None] * len(plan.blocks)
    if plan.per_run:
        rows = _query_rows(q, plan), _key_rows(k, plan), _key_rows(v, plan)
        for group in plan.shape_groups:
            out, lse = _flash_forward(*(_stacked(t_rows, group) for t_rows in rows), scale=scale)
            for i, run_out, run_lse in zip(group, _unstacked(out, group), _unstacked(lse, group)):
                outs[i], lses[i] = run_out, run_lse
    else:
        for i, (a, b, c, d) in enumerate(plan.blocks):
            if d > c:
                tile_q, tile_k, tile_v, bias, empty = _masked_tile(q, k, v, kv_start, kv_end, (a, b, c, d))
                out, lse = _flash_forward(tile_q, tile_k, tile_v, attn_mask=bias, scale=scale)
                if empty is not None:
                    out, lse = out.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, float("-inf"))
                outs[i], lses[i] = out, lse
    for i in plan.empty_blocks:
        outs[i] = q.new_zeros(*q.shape[:2], plan.query_sizes[i], q.shape[3])
        lses[i] = q.new_full((*q.shape[:2], plan.query_sizes[i]), float("-inf"), dtype=torch.float32)
    # The blocks partition the queries in order, so one concatenation assembles each result.
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2).mul_(LOG2E)


def block_sparse_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_start: Tensor, kv_end: Tensor,
    scale: float, plan: Plan,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the forward's out and base-2 lse, by ATen's fused backward on the same blocks."""
    lse = lse / LOG2E  # the kernels' own, natural log-sum-exp
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if plan.per_run:
        rows = (_query_rows(grad_out, plan), _query_rows(q, plan), _key_rows(k, plan), _key_rows(v, plan),
                _query_rows(out, plan), _query_rows(lse, plan))  # in the fused backward's argument order
        dq_rows, dk_rows, dv_rows = _query_rows(dq, plan), _key_rows(dk, plan), _key_rows(dv, plan)
        for group in plan.shape_groups:
            grads = _flash_backward(*(_stacked(t_rows, group) for t_rows in rows), 0.0, False, scale=scale)
            for i, dq_run, dk_run, dv_run in zip(group, *(_unstacked(g, group) for g in grads)):
                dq_rows[i].copy_(dq_run)
                dk_rows[i].add_(dk_run)
                dv_rows[i].add_(dv_run)
        return dq, dk, dv
    for a, b, c, d in plan.blocks:
        if d <= c:
            continue
        tile_q, tile_k, tile_v, bias, empty = _masked_tile(q, k, v, kv_start, kv_end, (a, b, c, d))
        tile_grad_out, tile_lse = grad_out[..., a:b, :], lse[..., a:b]
        if empty is not None:
            # The forward opened the empty rows to every key and zeroed them afterwards; zero output
            # gradient and probabilities of exp(s - inf) = 0 keep them out of every gradient.
            tile_grad_out = tile_grad_out.masked_fill(empty[..., None], 0.0)
            tile_lse = tile_lse.masked_fill(empty, float("inf"))
        grads = _flash_backward(tile_grad_out, tile_q, tile_k, tile_v, out[..., a:b, :],
                                tile_lse, 0.0, False, attn_mask=bias, scale=scale)
        dq[..., a:b, :] = grads[0]
        dk[..., c:d, :] += grads[1]
        dv[..., c:d, :] += grads[2]
    return dq, dk, dv


def _query_rows(t: Tensor, plan: Plan) -> tuple[Tensor, ...]:
    """Views of each block's query rows of a query-side tensor (dim 2, also of a (B, H, Lq) lse);
    the blocks partition the queries, so one split makes them all."""
    return t.split(plan.query_sizes, dim=2)


def _key_rows(t: Tensor, plan: Plan) -> tuple[Tensor, ...]:
    """Views of each run's key rows of k, v or their gradients: one split when the runs' key ranges
    tile the keys in order (markov, bidirectional), else one narrow per run."""
    if plan.key_sizes is not None:
        return t.split(plan.key_sizes, dim=2)
    return tuple(t.narrow(2, c, d - c) for _, _, c, d in plan.blocks)


def _runs_by_shape(runs: list[Run]) -> list[list[int]]:
    """Indices of the non-empty runs, grouped by (queries, keys)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (a, b, c, d) in enumerate(runs):
        if d > c:
            groups.setdefault((b - a, d - c), []).append(i)
    return list(groups.values())


def _stacked(rows: tuple[Tensor, ...], group: list[int]) -> Tensor:
    """The group's runs of one tensor stacked along the batch dim (the fused CPU kernels take 4-D
    input only)."""
    return rows[group[0]] if len(group) == 1 else torch.cat([rows[i] for i in group])


def _unstacked(t: Tensor, group: list[int]) -> tuple[Tensor, ...]:
    """The per-run parts of a result stacked by :func:`_stacked`."""
    return (t,) if len(group) == 1 else t.chunk(len(group))


def _masked_tile(q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor,
                 tile: Run) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """A query tile's q, its keys' k and v, their additive mask in q's dtype, broadcastable to
    (B, H, rows, keys), and the tile's (B or 1, 1, rows) empty rows, None when it has none.

    An empty row is opened to every key, so that the kernel never normalises over nothing (NaN); the
    callers zero its output and gradient. What no row may read (its q; the keys no row of the tile
    sees, in any sample) is zeroed: a NaN there would pass a -inf mask (NaN + -inf is NaN).
    """
    a, b, c, d = tile
    q, k, v = q[..., a:b, :], k[..., c:d, :], v[..., c:d, :]
    allowed = reference.range_mask(kv_start[..., a:b] - c, kv_end[..., a:b] - c, d - c)
    allowed = allowed[:, None] if allowed.ndim == 3 else allowed[None, None]
    unseen = ~allowed.any(-2)[..., None]
    if unseen.any():
        k, v = k.masked_fill(unseen, 0.0), v.masked_fill(unseen, 0.0)
    empty = ~allowed.any(-1)
    if empty.any():
        allowed |= empty[..., None]
        q = q.masked_fill(empty[..., None], 0.0)
    else:
        empty = None
    return q, k, v, torch.full(allowed.shape, float("-inf"), dtype=q.dtype).masked_fill_(allowed, 0.0), empty
