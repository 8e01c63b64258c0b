"""``torch.ops.kzoo.block_sparse_attention``: range helpers, checks, registration and autograd.

Query i attends key j iff ``kv_start[i] <= j < kv_end[i]``. The op returns the output and, for
the backward, each query's log-sum-exp (base 2), the same statistic on every backend.
:func:`block_sparse_attention` runs the same implementation through a plain ``autograd.Function``
in eager mode (:func:`backend.eager`) and through the registered op otherwise.
"""
from __future__ import annotations

import itertools
from typing import Callable, TypeVar

import torch
from torch import Tensor

from . import reference
from .backend import eager, resolve

HEAD_DIMS = (16, 32, 64, 128)
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- range helpers -----------------------------------------------------------------------------

def scale_ranges(patch_nums, mode: str) -> tuple[Tensor, Tensor]:
    """Key ranges for multi-scale token sequences (scale by scale, row-major inside a scale).

    markov / bidirectional: each token sees its own scale (HMAR); block_causal: its own and all
    earlier scales (VAR); dense: every token.
    """
    sizes = [int(p) ** 2 for p in patch_nums]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"scale_ranges: patch_nums {tuple(patch_nums)} must be positive")
    ends = list(itertools.accumulate(sizes))
    begins = [e - s for e, s in zip(ends, sizes)]
    total = ends[-1]
    if mode in ("markov", "bidirectional"):
        start = [b for b, s in zip(begins, sizes) for _ in range(s)]
    elif mode in ("block_causal", "dense"):
        start = [0] * total
    else:
        raise ValueError(f"scale_ranges: mode {mode!r} is not one of markov, block_causal, dense, bidirectional")
    end = [total] * total if mode == "dense" else [e for e, s in zip(ends, sizes) for _ in range(s)]
    return torch.tensor(start, dtype=torch.int32), torch.tensor(end, dtype=torch.int32)


def causal_ranges(length: int) -> tuple[Tensor, Tensor]:
    """Token i sees keys 0..i."""
    return torch.zeros(length, dtype=torch.int32), torch.arange(1, length + 1, dtype=torch.int32)


def window_ranges(length: int, left: int, right: int) -> tuple[Tensor, Tensor]:
    """Token i sees keys i-left..i+right, clipped to the sequence."""
    if left < 0 or right < 0:
        raise ValueError(f"window_ranges: left={left} and right={right} must be non-negative")
    i = torch.arange(length, dtype=torch.int32)
    return (i - left).clamp_min(0), (i + right + 1).clamp_max(length)


# --- checks ------------------------------------------------------------------------------------

def _check_inputs(q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _ATTENTION_DTYPES:
            raise TypeError(f"block_sparse_attention: {name} has dtype {t.dtype}; "
                            "expected float16, bfloat16, float32 or float64")
        if t.ndim != 4:
            raise ValueError(f"block_sparse_attention: {name} has shape {tuple(t.shape)}; expected (B, H, L, D)")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"block_sparse_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"block_sparse_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not match as (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D)")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"block_sparse_attention: head dim D={q.shape[3]} is not one of {HEAD_DIMS}")
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if t.dtype != torch.int32:
            raise TypeError(f"block_sparse_attention: {name} has dtype {t.dtype}; expected torch.int32")
        if t.shape not in ((q.shape[2],), (q.shape[0], q.shape[2])):
            raise ValueError(f"block_sparse_attention: {name} has shape {tuple(t.shape)}; "
                             f"expected ({q.shape[2]},) or ({q.shape[0]}, {q.shape[2]})")
    devices = {t.device for t in (q, k, v, kv_start, kv_end)}
    if len(devices) > 1:
        raise ValueError(f"block_sparse_attention: inputs are on several devices: {sorted(map(str, devices))}")


def _check_ranges(kv_start: Tensor, kv_end: Tensor, num_keys: int) -> None:
    """Value checks (they read the ranges, so they run outside tracing); one reduction when valid."""
    # numpy for CPU ranges: the same test as torch calls costs as much as a small scale's attention.
    start, end = (kv_start.numpy(), kv_end.numpy()) if kv_start.device.type == "cpu" else (kv_start, kv_end)
    bad = (start < 0) | (end > num_keys) | (start > end)
    if not bad.any():
        return
    index = tuple(torch.nonzero(torch.as_tensor(bad))[0].tolist())
    first, last = int(kv_start[index]), int(kv_end[index])
    if first > last:
        raise ValueError(f"block_sparse_attention: kv_start[{index}]={first} > kv_end[{index}]={last}")
    raise ValueError(f"block_sparse_attention: range [{first}, {last}) of query {index} is outside [0, {num_keys}]")


# --- facts about range tensors, read once ------------------------------------------------------

_Fact = TypeVar("_Fact")
_MEMO_SIZE = 16  # pairs of range tensors: a model uses a few
_memo: dict[tuple, tuple] = {}


def _remembered(compute: Callable[..., _Fact], kv_start: Tensor, kv_end: Tensor, *args) -> _Fact:
    """``compute(kv_start, kv_end, *args)``, a fact about the ranges' values, remembered for this
    pair of tensors until either is modified in place.

    A model passes the same range buffers to every layer at every step, so their values are read
    (on GPU: synchronised to the host) once, not per call. An in-place change moves a tensor's
    version counter, which is how autograd checks its saved tensors; as for autograd, a change
    through ``.data`` or a NumPy view goes unseen. Entries hold their tensors, so that no other
    tensor can take their ids while remembered. Inference tensors have no version counter: their
    facts are computed every call.
    """
    if kv_start.is_inference() or kv_end.is_inference():
        return compute(kv_start, kv_end, *args)
    key = (compute, id(kv_start), id(kv_end), *args)
    versions = kv_start._version, kv_end._version
    entry = _memo.get(key)
    if entry is not None and entry[2] == versions:
        return entry[3]
    fact = compute(kv_start, kv_end, *args)  # raises on bad ranges: those are never remembered
    if len(_memo) >= _MEMO_SIZE:
        _memo.clear()
    _memo[key] = (kv_start, kv_end, versions, fact)
    return fact


# --- the op ------------------------------------------------------------------------------------

def _forward(q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor,
             scale: float) -> tuple[Tensor, Tensor]:
    """(out, stats): stats is :func:`reference.attention_log_sum_exp` on every backend (base 2,
    (B, H, Lq) float32), which the backward starts from."""
    _check_inputs(q, k, v, kv_start, kv_end)
    _remembered(_check_ranges, kv_start, kv_end, k.shape[2])
    backend = resolve(q.device, q.dtype)
    if q.numel() == 0 or k.shape[2] == 0:
        return q.new_zeros(q.shape), q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
    if backend == "triton":
        from .triton import attention as kernels

        seen = _remembered(kernels.keys_seen, kv_start, kv_end, k.shape[2])
        return kernels.attention_forward(q, k, v, kv_start, kv_end, scale, seen)
    if backend == "cpu":
        from . import cpu

        plan = _remembered(cpu.plan, kv_start, kv_end, k.shape[2])
        out, lse = cpu.block_sparse_attention(q, k, v, kv_start, kv_end, scale, plan)
        return out.contiguous(), lse.contiguous()
    out = reference.block_sparse_attention(q, k, v, kv_start, kv_end, scale)
    return out.contiguous(), reference.attention_log_sum_exp(q, k, kv_start, kv_end, scale)


_attention_op = torch.library.custom_op("kzoo::block_sparse_attention", mutates_args=())(_forward)


@_attention_op.register_fake
def _(q, k, v, kv_start, kv_end, scale):
    _check_inputs(q, k, v, kv_start, kv_end)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor,
              kv_start: Tensor, kv_end: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    if q.numel() == 0 or k.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    backend = resolve(q.device, q.dtype)
    if backend == "triton":
        from .triton import attention as kernels

        plan = _remembered(kernels.backward_plan, kv_start, kv_end, k.shape[2], q.shape[3], q.dtype)
        return kernels.attention_backward(grad_out, q, k, v, out, stats, kv_start, kv_end, scale, plan)
    if backend == "cpu":
        from . import cpu

        plan = _remembered(cpu.plan, kv_start, kv_end, k.shape[2])
        grads = cpu.block_sparse_attention_backward(grad_out, q, k, v, out, stats, kv_start, kv_end, scale, plan)
    else:
        grads = reference.block_sparse_attention_backward(grad_out, q, k, v, kv_start, kv_end, scale)
    return tuple(g.contiguous() for g in grads)


_attention_backward_op = torch.library.custom_op("kzoo::block_sparse_attention_backward", mutates_args=())(_backward)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, stats, kv_start, kv_end, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_start, kv_end, scale = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, kv_start, kv_end)
    ctx.scale = scale
    ctx.mark_non_differentiable(stats)


def _op_backward(ctx, grad_out: Tensor, grad_stats, backward=torch.ops.kzoo.block_sparse_attention_backward):
    q, k, v, out, stats, kv_start, kv_end = ctx.saved_tensors
    dq, dk, dv = backward(grad_out.contiguous(), q, k, v, out, stats, kv_start, kv_end, ctx.scale)
    return dq, dk, dv, None, None, None


_attention_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The registered op's autograd without its dispatch: the same ``_forward`` and ``_backward``."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor, scale: float):
        # ctx in forward, not a setup_context: with one, apply binds its arguments through
        # inspect.signature on every call
        output = _forward(q, k, v, kv_start, kv_end, scale)
        _setup_context(ctx, (q, k, v, kv_start, kv_end, scale), output)
        return output

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_stats):
        # Under create_graph, the registered backward op, which refuses a second derivative.
        if torch.is_grad_enabled():
            return _op_backward(ctx, grad_out, grad_stats)
        return _op_backward(ctx, grad_out, grad_stats, _backward)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor, *,
                           scale: float | None = None) -> Tensor:
    """Attention where query i sees keys ``kv_start[i] <= j < kv_end[i]`` (see ``scale_ranges``).

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); D in (16, 32, 64, 128); ranges int32 (Lq,) or (B, Lq).
    A query with an empty range outputs zeros and gets zero gradients. Values no query may read (keys
    outside every range; q and the output gradient of queries with empty ranges) never reach a result,
    not even as NaN.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if eager(q, k, v, kv_start, kv_end):
        return _EagerAttention.apply(q, k, v, kv_start, kv_end, scale)[0]
    return torch.ops.kzoo.block_sparse_attention(q, k, v, kv_start, kv_end, scale)[0]
