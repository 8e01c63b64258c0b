"""Plain PyTorch definitions of kzoo's ops: the CPU fallback and the tests' ground truth.

Everything here is written for clarity, runs in float64 as well as float32, and makes no
assumption about memory layout. The fast paths (``cpu.py``, ``triton/``) must agree with it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOG2E = math.log2(math.e)
NUMERATOR_TERMS = 6  # a0..a5: P(x) = sum_i a_i x^i
DENOMINATOR_TERMS = 4  # b0..b3: Q(x) = 1 + sum_i |b_i| |x|^(i+1)


def compute_dtype(x: Tensor) -> torch.dtype:
    """Rational arithmetic runs in float32, or float64 when x is float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_coefficients(
    coefficients: Tensor, channels: int, groups: int, channel_dim: int, ndim: int, dtype: torch.dtype
) -> list[Tensor]:
    """One tensor per term, holding each channel's coefficient, shaped to broadcast against x."""
    per_group = coefficients.to(dtype).expand(groups, coefficients.shape[1])
    per_channel = per_group.repeat_interleave(channels // groups, dim=0)
    shape = [1] * ndim
    shape[channel_dim] = channels
    return [per_channel[:, i].reshape(shape) for i in range(coefficients.shape[1])]


def _rational_terms(x: Tensor, numerator: Tensor, denominator: Tensor, channel_dim: int):
    """x in compute dtype, per-channel a_i, per-channel |b_i|, P(x), Q(x)."""
    dtype = compute_dtype(x)
    channels, groups = x.shape[channel_dim], denominator.shape[0]
    a = _channel_coefficients(numerator, channels, groups, channel_dim, x.ndim, dtype)
    b_abs = _channel_coefficients(denominator.abs(), channels, groups, channel_dim, x.ndim, dtype)
    xf = x.to(dtype)
    x_abs = xf.abs()
    p = a[5]
    for a_i in reversed(a[:5]):
        p = p * xf + a_i
    q = b_abs[3]
    for b_i in reversed(b_abs[:3]):
        q = q * x_abs + b_i
    q = q * x_abs + 1.0
    return xf, x_abs, a, b_abs, p, q


def group_rational(x: Tensor, numerator: Tensor, denominator: Tensor, channel_dim: int = -1) -> Tensor:
    """Safe Padé "version A": P(x) / (1 + sum_i |b_i| |x|^(i+1)), coefficients chosen per channel group."""
    *_, p, q = _rational_terms(x, numerator, denominator, channel_dim)
    return (p / q).to(x.dtype)


def _sum_per_group(per_element: Tensor, channel_dim: int, groups: int) -> Tensor:
    other_dims = [d for d in range(per_element.ndim) if d != channel_dim % per_element.ndim]
    per_channel = per_element.sum(other_dims) if other_dims else per_element
    return per_channel.reshape(groups, -1).sum(1)


def group_rational_backward(
    grad_out: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, channel_dim: int = -1
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`group_rational` for x, numerator and denominator, written out by hand.

    Autograd through ``abs`` would give d|t|/dt = 0 at t = 0; the KAT kernels use sign(0) = +1,
    which is what lets an identity-initialised denominator (all b_i = 0) start to learn.
    """
    xf, x_abs, a, b_abs, p, q = _rational_terms(x, numerator, denominator, channel_dim)
    go = grad_out.to(xf.dtype)
    x_sign = torch.where(xf < 0, -1.0, 1.0).to(xf.dtype)

    dp_dx = 5.0 * a[5]
    for i in (4, 3, 2, 1):
        dp_dx = dp_dx * xf + i * a[i]
    dq_dx = 4.0 * b_abs[3]
    for i in (2, 1, 0):
        dq_dx = dq_dx * x_abs + (i + 1) * b_abs[i]
    dq_dx = dq_dx * x_sign

    y = p / q
    grad_over_q = go / q
    grad_x = grad_over_q * (dp_dx - dq_dx * y)

    groups = denominator.shape[0]
    grad_a, power = [], grad_over_q
    for _ in range(6):
        grad_a.append(_sum_per_group(power, channel_dim, groups))
        power = power * xf
    grad_b, power = [], -grad_over_q * y * x_abs
    for _ in range(4):
        grad_b.append(_sum_per_group(power, channel_dim, groups))
        power = power * x_abs

    grad_numerator = torch.stack(grad_a, dim=1)
    if numerator.shape[0] == 1:
        grad_numerator = grad_numerator.sum(0, keepdim=True)
    denominator_sign = torch.where(denominator < 0, -1.0, 1.0).to(xf.dtype)
    grad_denominator = torch.stack(grad_b, dim=1) * denominator_sign
    return grad_x.to(x.dtype), grad_numerator.to(numerator.dtype), grad_denominator.to(denominator.dtype)


def range_mask(kv_start: Tensor, kv_end: Tensor, num_keys: int) -> Tensor:
    """Boolean (..., Lq, Lk) mask: query i sees key j iff kv_start[..., i] <= j < kv_end[..., i]."""
    keys = torch.arange(num_keys, device=kv_start.device)
    return (keys >= kv_start[..., None]) & (keys < kv_end[..., None])


def _masked_scores(q: Tensor, k: Tensor, kv_start: Tensor, kv_end: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(scaled scores in compute dtype, -inf outside each query's range; the mask)."""
    dtype = compute_dtype(q)
    mask = range_mask(kv_start, kv_end, k.shape[-2])
    if mask.ndim == 3:  # per-sample ranges (B, Lq, Lk) broadcast over heads
        mask = mask[:, None]
    scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale
    return scores.masked_fill(~mask, float("-inf")), mask


def _attention_probabilities(q: Tensor, k: Tensor, kv_start: Tensor, kv_end: Tensor, scale: float) -> Tensor:
    """Softmax over each query's allowed keys in compute dtype; rows with no keys are all zero."""
    scores, mask = _masked_scores(q, k, kv_start, kv_end, scale)
    empty = ~mask.any(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def attention_log_sum_exp(q: Tensor, k: Tensor, kv_start: Tensor, kv_end: Tensor, scale: float) -> Tensor:
    """log2(sum_j exp(scale * q_i . k_j)) over each query's allowed keys j, float32 (B, H, Lq), -inf
    for a query with no keys: the statistic every backend's forward keeps for its backward."""
    scores, _ = _masked_scores(q, k, kv_start, kv_end, scale)
    return (torch.logsumexp(scores, dim=-1) * LOG2E).float()


def _unread_zeroed(kv_start: Tensor, kv_end: Tensor, q: Tensor, k: Tensor, v: Tensor,
                   grad_out: Tensor | None = None) -> tuple[Tensor, ...]:
    """q, k, v (and grad_out) with what no query may read set to 0: the keys outside every range,
    and the rows of queries with no keys. They cannot change the result, but the dense products
    below would carry a NaN from there into it (a zero probability times NaN is NaN)."""
    mask = range_mask(kv_start, kv_end, k.shape[-2])
    if mask.ndim == 3:
        mask = mask[:, None]
    silent_rows, unseen_keys = ~mask.any(-1)[..., None], ~mask.any(-2)[..., None]
    zeroed = q.masked_fill(silent_rows, 0), k.masked_fill(unseen_keys, 0), v.masked_fill(unseen_keys, 0)
    return zeroed if grad_out is None else (*zeroed, grad_out.masked_fill(silent_rows, 0))


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor, scale: float | None = None
) -> Tensor:
    """softmax(q k^T * scale, over keys kv_start[i] <= j < kv_end[i]) v; a query with no keys gives 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = _unread_zeroed(kv_start, kv_end, q, k, v)
    probabilities = _attention_probabilities(q, k, kv_start, kv_end, scale)
    return (probabilities @ v.to(probabilities.dtype)).to(q.dtype)


def block_sparse_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, kv_start: Tensor, kv_end: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of :func:`block_sparse_attention`, written out: dS = P * (dP - rowsum(dP * P))."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, grad_out = _unread_zeroed(kv_start, kv_end, q, k, v, grad_out)
    p = _attention_probabilities(q, k, kv_start, kv_end, scale)
    dtype = p.dtype
    do = grad_out.to(dtype)
    dv = p.transpose(-2, -1) @ do
    dp = do @ v.to(dtype).transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = (ds @ k.to(dtype)) * scale
    dk = (ds.transpose(-2, -1) @ q.to(dtype)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
