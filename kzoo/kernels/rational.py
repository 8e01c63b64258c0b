"""``torch.ops.kzoo.group_rational``: registration, autograd, input checks and backend dispatch.

:func:`group_rational` runs the same implementation through a plain ``autograd.Function`` in eager
mode (:func:`backend.eager`: torch.library's dispatch costs more host time than the kernels take)
and through the registered op under ``torch.compile``, export, tracing and fake tensors.

Every backend sees x as a contiguous (rows, groups, span) tensor. For any dense x (contiguous,
channels-last, permuted) that view is taken in x's own memory order, so no copy is made and the
output has x's strides; other inputs are made contiguous once.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference
from .backend import eager, resolve
from .reference import DENOMINATOR_TERMS, NUMERATOR_TERMS

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(x: Tensor, numerator: Tensor, denominator: Tensor, channel_dim: int) -> int:
    """Raise a one-line error naming the offending numbers; return channel_dim as a positive index."""
    for name, t in (("x", x), ("numerator", numerator), ("denominator", denominator)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"group_rational: {name} has dtype {t.dtype}; expected a floating dtype")
    devices = {x.device, numerator.device, denominator.device}
    if len(devices) > 1:
        raise ValueError(
            f"group_rational: x is on {x.device}, numerator on {numerator.device}, "
            f"denominator on {denominator.device}; all must be on one device")
    if x.ndim == 0 or not -x.ndim <= channel_dim < x.ndim:
        raise ValueError(f"group_rational: channel_dim={channel_dim} is out of range for x of shape {tuple(x.shape)}")
    if denominator.ndim != 2 or denominator.shape[1] != DENOMINATOR_TERMS or denominator.shape[0] < 1:
        raise ValueError(
            f"group_rational: denominator has shape {tuple(denominator.shape)}; expected (G, {DENOMINATOR_TERMS})")
    groups = denominator.shape[0]
    if numerator.ndim != 2 or numerator.shape[1] != NUMERATOR_TERMS or numerator.shape[0] not in (1, groups):
        raise ValueError(
            f"group_rational: numerator has shape {tuple(numerator.shape)}; "
            f"expected (1, {NUMERATOR_TERMS}) or ({groups}, {NUMERATOR_TERMS})")
    channels = x.shape[channel_dim]
    if channels % groups != 0:
        raise ValueError(
            f"group_rational: {channels} channels (dim {channel_dim} of shape {tuple(x.shape)}) "
            f"do not split into {groups} groups")
    return channel_dim % x.ndim


def _memory_order(x: Tensor) -> list[int]:
    """A permutation under which x is contiguous; the identity when x is not dense."""
    if x.is_contiguous():  # the common case, without the permute below (this runs on every call)
        return list(range(x.ndim))
    order = sorted(range(x.ndim), key=lambda d: x.stride(d), reverse=True)
    return order if x.permute(order).is_contiguous() else list(range(x.ndim))


def _grouped(t: Tensor, order: list[int], channel_dim: int, groups: int) -> Tensor:
    """t as a contiguous (rows, groups, span) tensor, in the memory order ``order``."""
    physical = (t if order == list(range(t.ndim)) else t.permute(order)).contiguous()
    position = order.index(channel_dim)
    rows = math.prod(physical.shape[:position])
    return physical.view(rows, groups, -1) if physical.numel() else physical.new_empty(rows, groups, 0)


def _ungrouped(grouped: Tensor, like: Tensor, order: list[int]) -> Tensor:
    if order == list(range(like.ndim)):
        return grouped.view(like.shape)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return grouped.view([like.shape[d] for d in order]).permute(inverse)


def _forward(x: Tensor, numerator: Tensor, denominator: Tensor, channel_dim: int) -> Tensor:
    channel_dim = _check_inputs(x, numerator, denominator, channel_dim)
    order = _memory_order(x)
    xg = _grouped(x, order, channel_dim, denominator.shape[0])
    if xg.numel() == 0:
        return _ungrouped(torch.empty_like(xg), x, order)
    backend = resolve(x.device, x.dtype)
    if backend == "triton":
        from .triton.rational import group_rational_forward

        y = group_rational_forward(xg, numerator, denominator)
    elif backend == "cpu":
        from . import cpu

        y = cpu.group_rational(xg, numerator, denominator)
    else:
        y = reference.group_rational(xg, numerator, denominator, 1)
    return _ungrouped(y, x, order)


_group_rational_op = torch.library.custom_op("kzoo::group_rational", mutates_args=())(_forward)


@_group_rational_op.register_fake
def _empty_output(x: Tensor, numerator: Tensor, denominator: Tensor, channel_dim: int) -> Tensor:
    channel_dim = _check_inputs(x, numerator, denominator, channel_dim)
    order = _memory_order(x)
    return _ungrouped(torch.empty_like(_grouped(x, order, channel_dim, denominator.shape[0])), x, order)


def _backward(
    grad_out: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, channel_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    channel_dim = _check_inputs(x, numerator, denominator, channel_dim)
    groups = denominator.shape[0]
    order = _memory_order(x)
    xg = _grouped(x, order, channel_dim, groups)
    if xg.numel() == 0:
        return _ungrouped(torch.empty_like(xg), x, order), torch.zeros_like(numerator), torch.zeros_like(denominator)
    gg = _grouped(grad_out, order, channel_dim, groups)
    backend = resolve(x.device, x.dtype)
    if backend == "triton":
        from .triton.rational import group_rational_backward

        dx, dnum, dden = group_rational_backward(gg, xg, numerator, denominator)
    elif backend == "cpu":
        from . import cpu

        dx, dnum, dden = cpu.group_rational_backward(gg, xg, numerator, denominator)
    else:
        dx, dnum, dden = reference.group_rational_backward(gg, xg, numerator, denominator, 1)
    return _ungrouped(dx, x, order), dnum, dden


_group_rational_backward_op = torch.library.custom_op("kzoo::group_rational_backward", mutates_args=())(_backward)


@_group_rational_backward_op.register_fake
def _(grad_out: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, channel_dim: int):
    return _empty_output(x, numerator, denominator, channel_dim), torch.empty_like(numerator), torch.empty_like(denominator)


def _setup_context(ctx, inputs, output) -> None:
    x, numerator, denominator, channel_dim = inputs
    ctx.save_for_backward(x, numerator, denominator)
    ctx.channel_dim = channel_dim


def _op_backward(ctx, grad_out: Tensor, backward=torch.ops.kzoo.group_rational_backward):
    x, numerator, denominator = ctx.saved_tensors
    dx, dnum, dden = backward(grad_out, x, numerator, denominator, ctx.channel_dim)
    return dx, dnum, dden, None


_group_rational_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerGroupRational(torch.autograd.Function):
    """The registered op's autograd without its dispatch: the same ``_forward`` and ``_backward``."""

    @staticmethod
    def forward(ctx, x: Tensor, numerator: Tensor, denominator: Tensor, channel_dim: int) -> Tensor:
        # ctx in forward, not a setup_context: with one, apply binds its arguments through
        # inspect.signature on every call
        output = _forward(x, numerator, denominator, channel_dim)
        _setup_context(ctx, (x, numerator, denominator, channel_dim), output)
        return output

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # Under create_graph, the registered backward op, which refuses a second derivative.
        if torch.is_grad_enabled():
            return _op_backward(ctx, grad_out)
        return _op_backward(ctx, grad_out, _backward)


def group_rational(x: Tensor, numerator: Tensor, denominator: Tensor, *, channel_dim: int = -1) -> Tensor:
    """Group-rational activation of KAT (safe Padé, "version A"), see ``reference.group_rational``.

    x: float tensor with C channels on ``channel_dim`` (-1 for tokens, 1 for NCHW images);
    numerator: (1, 6) shared or (G, 6); denominator: (G, 4); C % G == 0.
    """
    if eager(x, numerator, denominator):
        return _EagerGroupRational.apply(x, numerator, denominator, channel_dim)
    return torch.ops.kzoo.group_rational(x, numerator, denominator, channel_dim)
