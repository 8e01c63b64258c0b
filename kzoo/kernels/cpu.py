"""Fast CPU paths, tested against ``reference.py``.

The group-rational op is the reference definition compiled by Inductor, which fuses the Horner
chains (and, in the backward, the coefficient reductions) into one vectorised loop. It is called on
the op's (rows, groups, span) view, so the coefficients are per-group scalars in the inner loop:
with dynamic shapes, Inductor's loop over the channel-last (tokens, C) layout is ten times slower.

Shapes are compiled dynamic and the numerator is always passed as (G, 6), so one graph per dtype
serves every layer; past dynamo's recompile limit the eager reference runs, still correct.
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
