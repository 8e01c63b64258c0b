"""Block-sparse attention kernels (FlashAttention-2 style, per-row key ranges).

Query i sees keys kv_start[i] <= j < kv_end[i]. A query tile walks only the key tiles between
the smallest start and the largest end of its rows; key tiles that every row of the tile covers
run without per-element masking. The backward computes delta = rowsum(dO * O) in a small pass,
dK/dV per key tile over only the query tiles that can see it, and dQ per query tile over the
forward's key tiles. Softmax runs in base 2 with fp32 statistics; rows with no keys give zeros and
zero gradients. What the kernels read about the ranges beyond each tile's own rows
(:func:`keys_seen`, :class:`Plan`) is worked out once per pair of range tensors.

Values no query may read (keys outside every range; q and dO rows of queries with no keys) never
reach a result, even NaN: the kernels do not load them (0 * NaN is NaN, so masking the
probabilities is not enough). The forward's unmasked tiles need no such mask.

Batch and head offsets are 64-bit: b * stride_qb passes 2^31 at HMAR's 1024 layout (L = 9451,
fused qkv at width 1920) from batch 40. Offsets inside one (batch, head) slice, up to
(L - 1) * stride_l, stay 32-bit: batch-first layouts keep them far below 2^31.

``TILE_COUNTS``/``COUNT_TILES`` is a debug hook: with the constexpr on, each program counts the
tiles it visits (see ``tile_counts`` of the launchers); off, as every launch but the tests', it
compiles to nothing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import POINTER_TYPES, ceil_div
from ..backend import launch_device, triton_interpreted
from ..reference import LOG2E


@triton.jit
def _count_tile(count, UNMASKED: tl.constexpr):
    """Debug count of one visited tile: slot 0 counts every tile, slot 1 the unmasked ones."""
    tl.store(count, tl.load(count) + 1)
    if UNMASKED:
        tl.store(count + 1, tl.load(count + 1) + 1)


@triton.jit
def _forward_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, seen_ptr, start, end, lo, hi, Lk,
                   qk_scale, offs_d, count, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
                   COUNT_TILES: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kl + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vl + offs_d[None, :]
        if MASKED:
            allowed = (offs_n[None, :] >= start[:, None]) & (offs_n[None, :] < end[:, None])
            # Keys no query sees may hold anything, NaN included, and p = 0 times NaN is NaN.
            seen = (tl.load(seen_ptr + offs_n, mask=offs_n < Lk, other=0) != 0)[:, None]
            k = tl.load(k_ptrs, mask=seen, other=0.0)
            v = tl.load(v_ptrs, mask=seen, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps max -inf; shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        if COUNT_TILES:
            _count_tile(count, not MASKED)
    return acc, l_i, m_i


@triton.jit
def _query_tile(start_ptr, end_ptr, pid_m, Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A query tile's rows and ranges, and the key tiles it visits: [lo, hi), of which
    [unmasked_lo, unmasked_hi) every row sees whole. lo is aligned to BLOCK_N; a tile whose rows
    have no keys gets an empty range."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Lq
    start = tl.load(start_ptr + offs_m, mask=row_ok, other=0)
    end = tl.load(end_ptr + offs_m, mask=row_ok, other=0)
    has_keys = start < end
    lo = (tl.min(tl.where(has_keys, start, Lk)) // BLOCK_N) * BLOCK_N
    hi = tl.max(tl.where(has_keys, end, 0))
    every_row_has_keys = tl.sum((row_ok & (start >= end)).to(tl.int32)) == 0
    unmasked_lo = tl.cdiv(tl.max(tl.where(row_ok, start, 0)), BLOCK_N) * BLOCK_N
    unmasked_hi = (tl.min(tl.where(row_ok, end, Lk)) // BLOCK_N) * BLOCK_N
    has_unmasked = every_row_has_keys & (unmasked_lo < unmasked_hi)
    unmasked_lo = tl.where(has_unmasked, unmasked_lo, hi)
    unmasked_hi = tl.where(has_unmasked, unmasked_hi, hi)
    return offs_m, row_ok, start, end, lo, hi, unmasked_lo, unmasked_hi


@triton.jit
def attention_forward_kernel(
    Q, K, V, O, LSE, START, END, KEY_SEEN, TILE_COUNTS,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol, range_stride, seen_stride,
    H, Lq, Lk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m, row_ok, start, end, lo, hi, unmasked_lo, unmasked_hi = _query_tile(
        START + b * range_stride, END + b * range_stride, pid_m, Lq, Lk, BLOCK_M, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    seen_ptr = KEY_SEEN + b * seen_stride
    count = TILE_COUNTS + (pid_m * tl.num_programs(1) + bh) * 2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _forward_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, seen_ptr, start, end, lo,
                                   unmasked_lo, Lk, qk_scale, offs_d, count, BLOCK_N, True, PRECISION, COUNT_TILES)
    acc, l_i, m_i = _forward_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, seen_ptr, start, end,
                                   unmasked_lo, unmasked_hi, Lk, qk_scale, offs_d, count, BLOCK_N, False, PRECISION,
                                   COUNT_TILES)
    acc, l_i, m_i = _forward_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, seen_ptr, start, end,
                                   unmasked_hi, hi, Lk, qk_scale, offs_d, count, BLOCK_N, True, PRECISION,
                                   COUNT_TILES)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ol + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)


@triton.jit
def attention_backward_delta_kernel(O, DO, DELTA, Lq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) for contiguous (B*H, Lq, D) O and dO."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    offsets = bh * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + offsets, mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + offsets, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh * Lq + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _probabilities_and_grad_scores(q, k, v, do, lse, delta, start, end, offs_n, qk_scale,
                                   PRECISION: tl.constexpr):
    """P and dS = P * (dP - delta) of one (query tile, key tile) pair; rows without keys give 0.

    The callers load no value that no query may read (they give 0 instead), so dP and delta are
    finite where P = 0.
    """
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    allowed = (offs_n[None, :] >= start[:, None]) & (offs_n[None, :] < end[:, None])
    p = tl.where(allowed, tl.exp2(s - tl.where(lse == float("-inf"), 0.0, lse)[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def attention_backward_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, START, END, QUERY_SPAN, KEY_SEEN, TILE_COUNTS,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, range_stride, span_stride, seen_stride,
    H, Lq, Lk, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr,
):
    """dK, dV of one key tile, from the query tiles in QUERY_SPAN (the queries that see it).

    DO, DK and DV are contiguous (B, H, L, D); Q, K and V may be strided.
    """
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < Lk
    # Keys no query sees, and q, dO and delta of queries that see nothing, may hold anything, NaN
    # included: they are not loaded, as P = 0 and dS = 0 times NaN would still be NaN.
    seen = (tl.load(KEY_SEEN + b * seen_stride + offs_n, mask=key_ok, other=0) != 0)[:, None]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :],
                mask=seen, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :],
                mask=seen, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    span = QUERY_SPAN + (b * span_stride + pid_n) * 2
    q_lo = tl.load(span)
    q_hi = tl.load(span + 1)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + bh.to(tl.int64) * Lq * HEAD_DIM
    stats = bh.to(tl.int64) * Lq
    count = TILE_COUNTS + (pid_n * tl.num_programs(1) + bh) * 2
    for m0 in range((q_lo // BLOCK_M) * BLOCK_M, q_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
        start = tl.load(START + b * range_stride + offs_m, mask=row_ok, other=0)
        end = tl.load(END + b * range_stride + offs_m, mask=row_ok, other=0)
        has_keys = start < end
        q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=has_keys[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=has_keys[:, None], other=0.0)
        lse = tl.load(LSE + stats + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + stats + offs_m, mask=has_keys, other=0.0)
        p, ds = _probabilities_and_grad_scores(q, k, v, do, lse, delta, start, end, offs_n, qk_scale, PRECISION)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        if COUNT_TILES:
            _count_tile(count, False)
    out = bh.to(tl.int64) * Lk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def attention_backward_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, START, END, KEY_SEEN, TILE_COUNTS,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, range_stride, seen_stride,
    H, Lq, Lk, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr,
):
    """dQ of one query tile, over the key tiles its rows can see."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m, row_ok, start, end, lo, hi, _, _ = _query_tile(
        START + b * range_stride, END + b * range_stride, pid_m, Lq, Lk, BLOCK_M, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    # As in dK/dV, neither dO and delta of queries that see nothing nor keys no query sees are loaded.
    has_keys = start < end
    rows = bh.to(tl.int64) * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    do = tl.load(DO + rows, mask=has_keys[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=has_keys, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    seen_ptr = KEY_SEEN + b * seen_stride
    count = TILE_COUNTS + (pid_m * tl.num_programs(1) + bh) * 2
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        seen = (tl.load(seen_ptr + offs_n, mask=offs_n < Lk, other=0) != 0)[:, None]
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=seen, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=seen, other=0.0)
        p, ds = _probabilities_and_grad_scores(q, k, v, do, lse, delta, start, end, offs_n, qk_scale, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if COUNT_TILES:
            _count_tile(count, False)
    tl.store(DQ + rows, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# --- launchers ---------------------------------------------------------------------------------

def tile_config(head_dim: int, dtype: torch.dtype) -> dict:
    """BLOCK_M, BLOCK_N, num_warps and num_stages of the backward kernels (and of the forward
    under the interpreter) for one head size and dtype.

    fp32 runs exact (non-tensor-core) products, which hold their tiles in registers: its tiles are
    the largest that compile for sm_80 and sm_90 without spilling.
    """
    if triton_interpreted():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        if head_dim <= 32:
            return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
        if head_dim == 64:
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if head_dim == 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


def forward_candidates(head_dim: int, dtype: torch.dtype) -> list[dict]:
    """The forward configs autotuned on a GPU (keyed on Lq, Lk and D); all compile without spills."""
    tiles = [tile_config(head_dim, dtype)]
    if dtype != torch.float32:
        tiles += [dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
                  dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)]
        if head_dim <= 64:
            tiles.append(dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3))
    unique = {tuple(sorted(t.items())): t for t in tiles}
    return list(unique.values())


def _prune_forward_configs(configs, named_args, **kwargs):
    allowed = forward_candidates(kwargs["HEAD_DIM"], named_args["Q"].dtype)
    keep = [c for c in configs if dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) in allowed]
    return keep or configs[:1]


@functools.lru_cache(maxsize=None)
def _autotuned_forward():
    candidates = {tuple(sorted(t.items())): t for d in (16, 32, 64, 128)
                  for dtype in POINTER_TYPES for t in forward_candidates(d, dtype)}
    configs = [triton.Config(dict(BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"]), num_warps=t["num_warps"],
                             num_stages=t["num_stages"]) for t in candidates.values()]
    return triton.autotune(configs, key=["Lq", "Lk", "HEAD_DIM"],
                           prune_configs_by=dict(early_config_prune=_prune_forward_configs))(attention_forward_kernel)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products; fp16/bf16 use the tensor cores as they are.
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _ranges(kv_start: Tensor, kv_end: Tensor) -> tuple[Tensor, Tensor, int]:
    """Ranges as contiguous int32 with a batch stride: 0 when shared by the batch."""
    return kv_start.contiguous(), kv_end.contiguous(), (kv_start.shape[-1] if kv_start.ndim == 2 else 0)


def _tile_counter(tile_counts: dict | None, name: str, programs: int, batch_heads: int, fallback: Tensor):
    """(TILE_COUNTS, COUNT_TILES) of one launch: a zeroed (programs, B*H, 2) int32 buffer stored in
    ``tile_counts[name]`` when counting, else an unused pointer."""
    if tile_counts is None:
        return fallback, False
    tile_counts[name] = torch.zeros(programs, batch_heads, 2, device=fallback.device, dtype=torch.int32)
    return tile_counts[name], True


def query_span_per_key_tile(kv_start: Tensor, kv_end: Tensor, num_keys: int, block_n: int) -> Tensor:
    """(R, key tiles, 2) int32 on the ranges' device, R = 1 for (Lq,) ranges and B for (B, Lq):
    the first and one-past-last query that sees any key of each key tile; (Lq, 0) for a tile no
    query sees.

    Query i sees key tiles [start_i // block_n, (end_i - 1) // block_n]. Each such interval is cut
    into the nodes of a segment tree over the tiles (at most two nodes per level), each node keeps
    the first and last query that covers it, and a tile's answer is the min/max over its ancestors:
    O((Lq + tiles) log tiles) time in O(Lq + tiles) memory, where a (query, tile) table would take
    gigabytes at HMAR's 1024 layout.
    """
    lq = kv_start.shape[-1]
    start, end = kv_start.reshape(-1, lq).long(), kv_end.reshape(-1, lq).long()
    tiles = ceil_div(num_keys, block_n)
    leaves = 1 << (tiles - 1).bit_length()  # node 1 is the root, leaves sit at leaves..2*leaves-1
    has_keys = start < end
    lo = torch.where(has_keys, start // block_n, 0) + leaves  # half-open [lo, hi) of nodes at each level
    hi = torch.where(has_keys, (end - 1) // block_n + 1, 0) + leaves
    query = torch.arange(lq, device=start.device).expand_as(start)
    first = torch.full((start.shape[0], 2 * leaves), lq, device=start.device)  # node 0 takes the no-ops
    last = torch.zeros_like(first)

    def cover(node, take):
        node = torch.where(take, node, 0)
        first.scatter_reduce_(1, node, torch.where(take, query, lq), "amin")
        last.scatter_reduce_(1, node, torch.where(take, query + 1, 0), "amax")

    for _ in range(leaves.bit_length()):
        take = (lo & 1).bool() & (lo < hi)  # lo is a right child: it is covered, its parent is not
        cover(lo, take)
        lo = lo + take.long()
        take = (hi & 1).bool() & (lo < hi)  # likewise hi - 1, a left child
        hi = hi - take.long()
        cover(hi, take)
        lo, hi = lo >> 1, hi >> 1
    node = torch.arange(tiles, device=start.device) + leaves
    tile_first, tile_last = first[:, node], last[:, node]
    for _ in range(leaves.bit_length() - 1):
        node = node >> 1
        tile_first = torch.minimum(tile_first, first[:, node])
        tile_last = torch.maximum(tile_last, last[:, node])
    return torch.stack([tile_first, tile_last], -1).to(torch.int32)


def keys_seen(kv_start: Tensor, kv_end: Tensor, num_keys: int) -> Tensor:
    """(R, Lk) int8 on the ranges' device: 1 where some query (of that sample) sees the key."""
    lq = kv_start.shape[-1]
    start, end = kv_start.reshape(-1, lq).long(), kv_end.reshape(-1, lq).long()
    has_keys = (start < end).int()
    covering = torch.zeros(start.shape[0], num_keys + 1, dtype=torch.int32, device=start.device)
    covering.scatter_add_(1, start, has_keys).scatter_add_(1, end, -has_keys)
    return (covering[:, :num_keys].cumsum(1) > 0).to(torch.int8)


@dataclass(frozen=True)
class Plan:
    """What the backward kernels read about one pair of range tensors; the op works it out once per
    pair (and the forward's :func:`keys_seen` alone)."""
    keys_seen: Tensor  # (R, Lk) int8, see keys_seen
    query_spans: Tensor  # (R, key tiles, 2) int32 for the backward's BLOCK_N, see query_span_per_key_tile


def backward_plan(kv_start: Tensor, kv_end: Tensor, num_keys: int, head_dim: int, dtype: torch.dtype) -> Plan:
    block_n = tile_config(head_dim, dtype)["BLOCK_N"]
    return Plan(keys_seen(kv_start, kv_end, num_keys), query_span_per_key_tile(kv_start, kv_end, num_keys, block_n))


def _batch_stride(t: Tensor, kv_start: Tensor) -> int:
    """The batch stride of a per-range-row tensor: 0 when the ranges are shared by the batch."""
    return t.shape[1] if kv_start.ndim == 2 else 0


def attention_forward(q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor, scale: float,
                      seen: Tensor, tile_counts: dict | None = None) -> tuple[Tensor, Tensor]:
    """(out, base-2 log-sum-exp per row) for (B, H, L, D) q, k, v with Lq, Lk > 0; ``seen`` is
    :func:`keys_seen` of the ranges.

    Debug: given a dict, ``tile_counts["forward"]`` gets each program's (key tiles visited,
    unmasked ones), run with :func:`tile_config`'s tiles rather than autotuned ones.
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    start, end, range_stride = _ranges(kv_start, kv_end)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads, lq, device=q.device, dtype=torch.float32)
    config = tile_config(head_dim, q.dtype)
    counts, count_tiles = _tile_counter(tile_counts, "forward", ceil_div(lq, config["BLOCK_M"]), batch * heads,
                                        start)
    args = (q, k, v, out, lse, start, end, seen, counts,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), range_stride,
            _batch_stride(seen, kv_start), heads, lq, lk, scale * LOG2E)
    with launch_device(q):
        if q.is_cuda and not count_tiles:
            def grid(meta):
                return ceil_div(lq, meta["BLOCK_M"]), batch * heads

            _autotuned_forward()[grid](*args, HEAD_DIM=head_dim, PRECISION=_precision(q.dtype), COUNT_TILES=False)
        else:
            grid = (ceil_div(lq, config["BLOCK_M"]), batch * heads)
            attention_forward_kernel[grid](*args, HEAD_DIM=head_dim, PRECISION=_precision(q.dtype),
                                           COUNT_TILES=count_tiles, **config)
    return out, lse


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       kv_start: Tensor, kv_end: Tensor, scale: float, plan: Plan,
                       tile_counts: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); grad_out and out contiguous (B, H, Lq, D); ``plan`` is :func:`backward_plan`.

    Debug: given a dict, ``tile_counts["dkdv"]`` gets the query tiles each key tile's program
    visits, ``tile_counts["dq"]`` the key tiles each query tile's program visits (slot 0 of each;
    slot 1, unmasked tiles, stays 0: all of theirs are masked).
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    grad_out, out = grad_out.contiguous(), out.contiguous()
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    start, end, range_stride = _ranges(kv_start, kv_end)
    config = tile_config(head_dim, q.dtype)
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    precision = _precision(q.dtype)
    delta = torch.empty(batch, heads, lq, device=q.device, dtype=torch.float32)
    dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    key_tiles, query_tiles = ceil_div(lk, block_n), ceil_div(lq, block_m)
    dkdv_counts, count_tiles = _tile_counter(tile_counts, "dkdv", key_tiles, batch * heads, start)
    dq_counts, _ = _tile_counter(tile_counts, "dq", query_tiles, batch * heads, start)
    with launch_device(q):
        attention_backward_delta_kernel[(query_tiles, batch * heads)](
            out, grad_out, delta, lq, HEAD_DIM=head_dim, BLOCK_M=block_m)
        attention_backward_dkdv_kernel[(key_tiles, batch * heads)](
            q, k, v, grad_out, dk, dv, lse, delta, start, end, plan.query_spans, plan.keys_seen, dkdv_counts,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), range_stride, _batch_stride(plan.query_spans, kv_start),
            _batch_stride(plan.keys_seen, kv_start),
            heads, lq, lk, scale * LOG2E, scale, HEAD_DIM=head_dim, PRECISION=precision, COUNT_TILES=count_tiles,
            **config)
        attention_backward_dq_kernel[(query_tiles, batch * heads)](
            q, k, v, grad_out, dq, lse, delta, start, end, plan.keys_seen, dq_counts,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), range_stride, _batch_stride(plan.keys_seen, kv_start),
            heads, lq, lk, scale * LOG2E, scale, HEAD_DIM=head_dim, PRECISION=precision, COUNT_TILES=count_tiles,
            **config)
    return dq, dk, dv


_INDEX_POINTERS = ("START", "END", "QUERY_SPAN", "TILE_COUNTS")
_STAT_POINTERS = ("LSE", "DELTA")
_TENSOR_POINTERS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")


def launch_configs() -> list[dict]:
    """Every variant the launchers compile on a GPU (all forward autotune candidates included);
    the debug tile counts stay off."""
    configs = []
    for head_dim in (16, 32, 64, 128):
        for dtype, pointer in POINTER_TYPES.items():
            backward = tile_config(head_dim, dtype)
            variants = [(attention_forward_kernel, tiles) for tiles in forward_candidates(head_dim, dtype)]
            variants += [(kernel, backward) for kernel in (attention_backward_delta_kernel,
                                                          attention_backward_dkdv_kernel, attention_backward_dq_kernel)]
            for kernel, tiles in variants:
                constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=tiles["BLOCK_M"])
                if kernel is not attention_backward_delta_kernel:
                    constexprs.update(BLOCK_N=tiles["BLOCK_N"], PRECISION=_precision(dtype), COUNT_TILES=False)
                signature = {}
                for name in kernel.arg_names:
                    if name in constexprs:
                        continue
                    if name in _INDEX_POINTERS:
                        signature[name] = "*i32"
                    elif name == "KEY_SEEN":
                        signature[name] = "*i8"
                    elif name in _STAT_POINTERS:
                        signature[name] = "*fp32"
                    elif name in _TENSOR_POINTERS:
                        signature[name] = pointer
                    elif name in ("qk_scale", "scale"):
                        signature[name] = "fp32"
                    else:
                        signature[name] = "i32"
                configs.append(dict(
                    kernel=kernel, signature=signature, constexprs=constexprs,
                    num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
                    divisible_by_16=[n for n, t in signature.items() if t.startswith("*") or n.startswith("stride_")],
                ))
    return configs
