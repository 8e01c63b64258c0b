"""Group-rational (GR-KAN) kernels.

One kernel body serves the forward and the backward (a constexpr switch). It sees x as a
contiguous (rows, groups, span) tensor: a row is one token (channel-last,
span = C/G) or one image (channels-first, span = C/G * H * W). Every program handles a tile of one
group, so the ten coefficients are scalars loaded once per program.

The backward reduces the coefficient gradients inside each program in float32 registers and writes
one partial sum per program; the partials are summed by ``torch.sum``. There are no atomics, so the
coefficient gradients are bitwise reproducible (the per-element global atomics of the original
kernels are what made KAT train two orders of magnitude slower than ViT).

Every offset from a base pointer is 64-bit: row * row stride passes 2^31 in large activations.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import POINTER_TYPES, ceil_div
from ..backend import launch_device, triton_interpreted

FORWARD_BLOCK = 2048
BACKWARD_BLOCK = 1024
# The interpreter pays milliseconds per program, so it runs the same kernel on larger tiles.
INTERPRETER_BLOCK = 16384
NUM_WARPS = 4
PARTIALS = 10  # d a0..a5, d b0..b3


@triton.jit
def group_rational_kernel(
    x_ptr, y_ptr, grad_out_ptr, grad_x_ptr, partials_ptr, numerator_ptr, denominator_ptr,
    rows, span, numerator_row_stride,
    BACKWARD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_SPAN: tl.constexpr,
):
    """Forward (y = P/Q) or backward (dx and per-program coefficient partials) on one tile.

    One body serves both directions so that the tiling and coefficient loads exist once; calls to
    nested ``@triton.jit`` helpers would cost milliseconds per program under the interpreter.
    """
    span_blocks = tl.cdiv(span, BLOCK_SPAN)
    tile = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    row = (tile // span_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = (tile % span_blocks) * BLOCK_SPAN + tl.arange(0, BLOCK_SPAN)
    row_stride = tl.num_programs(1).to(tl.int64) * span
    offsets = row.to(tl.int64)[:, None] * row_stride + group * span + col[None, :]
    mask = (row < rows)[:, None] & (col < span)[None, :]

    num = numerator_ptr + group * numerator_row_stride
    a0 = tl.load(num + 0)
    a1 = tl.load(num + 1)
    a2 = tl.load(num + 2)
    a3 = tl.load(num + 3)
    a4 = tl.load(num + 4)
    a5 = tl.load(num + 5)
    b0 = tl.load(denominator_ptr + group * 4 + 0)
    b1 = tl.load(denominator_ptr + group * 4 + 1)
    b2 = tl.load(denominator_ptr + group * 4 + 2)
    b3 = tl.load(denominator_ptr + group * 4 + 3)
    c0 = tl.abs(b0)
    c1 = tl.abs(b1)
    c2 = tl.abs(b2)
    c3 = tl.abs(b3)

    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    p = tl.fma(tl.fma(tl.fma(tl.fma(tl.fma(a5, x, a4), x, a3), x, a2), x, a1), x, a0)
    q = tl.fma(tl.fma(tl.fma(tl.fma(c3, ax, c2), ax, c1), ax, c0), ax, 1.0)
    if not BACKWARD:
        tl.store(y_ptr + offsets, (p / q).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Masked lanes read grad 0, so they add nothing to the coefficient sums below.
        grad = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dp = tl.fma(tl.fma(tl.fma(tl.fma(5.0 * a5, x, 4.0 * a4), x, 3.0 * a3), x, 2.0 * a2), x, a1)
        dq = tl.fma(tl.fma(tl.fma(4.0 * c3, ax, 3.0 * c2), ax, 2.0 * c1), ax, c0)
        dq = tl.where(x < 0, -dq, dq)
        grad_over_q = grad / q
        y = p / q
        tl.store(grad_x_ptr + offsets, (grad_over_q * (dp - dq * y)).to(grad_x_ptr.dtype.element_ty), mask=mask)

        out = partials_ptr + (tile.to(tl.int64) * tl.num_programs(1) + group) * 10  # PARTIALS per (tile, group)
        t = grad_over_q
        tl.store(out + 0, tl.sum(tl.sum(t, 1), 0))
        t = t * x
        tl.store(out + 1, tl.sum(tl.sum(t, 1), 0))
        t = t * x
        tl.store(out + 2, tl.sum(tl.sum(t, 1), 0))
        t = t * x
        tl.store(out + 3, tl.sum(tl.sum(t, 1), 0))
        t = t * x
        tl.store(out + 4, tl.sum(tl.sum(t, 1), 0))
        t = t * x
        tl.store(out + 5, tl.sum(tl.sum(t, 1), 0))
        # sign(b) with sign(0) = +1, as in the KAT kernels: a zero coefficient still gets a gradient.
        t = -grad_over_q * y * ax
        tl.store(out + 6, tl.where(b0 < 0, -1.0, 1.0) * tl.sum(tl.sum(t, 1), 0))
        t = t * ax
        tl.store(out + 7, tl.where(b1 < 0, -1.0, 1.0) * tl.sum(tl.sum(t, 1), 0))
        t = t * ax
        tl.store(out + 8, tl.where(b2 < 0, -1.0, 1.0) * tl.sum(tl.sum(t, 1), 0))
        t = t * ax
        tl.store(out + 9, tl.where(b3 < 0, -1.0, 1.0) * tl.sum(tl.sum(t, 1), 0))


@functools.lru_cache(maxsize=1024)  # every launch asks; a training run asks for a few shapes
def tile_shape(rows: int, span: int, block: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_SPAN) with BLOCK_ROWS * BLOCK_SPAN = block: the fewest padded lanes,
    then the fewest programs, then the widest contiguous rows."""
    def cost(block_span):
        block_rows = block // block_span
        row_tiles, span_tiles = ceil_div(rows, block_rows), ceil_div(span, block_span)
        return row_tiles * block_rows * span_tiles * block_span, row_tiles * span_tiles, -block_span

    block_span = min(span_blocks(block), key=cost)
    return block // block_span, block_span


def span_blocks(block: int) -> list[int]:
    """Tile widths from 16 up to the whole block (block is a power of two)."""
    return [1 << k for k in range(4, block.bit_length())]


def _grid(rows: int, span: int, groups: int, block: int) -> tuple[tuple[int, int], int, int]:
    if triton_interpreted():
        block = INTERPRETER_BLOCK
    block_rows, block_span = tile_shape(rows, span, block)
    return (ceil_div(rows, block_rows) * ceil_div(span, block_span), groups), block_rows, block_span


def _coefficients(numerator: Tensor, denominator: Tensor) -> tuple[Tensor, Tensor, int]:
    numerator_row_stride = 0 if numerator.shape[0] == 1 else 6
    return numerator.float().contiguous(), denominator.float().contiguous(), numerator_row_stride


def group_rational_forward(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """y for a contiguous (rows, groups, span) x with numel > 0."""
    rows, groups, span = x.shape
    y = torch.empty_like(x)
    num, den, num_stride = _coefficients(numerator, denominator)
    grid, block_rows, block_span = _grid(rows, span, groups, FORWARD_BLOCK)
    with launch_device(x):
        group_rational_kernel[grid](
            x, y, x, y, y, num, den, rows, span, num_stride,
            BACKWARD=False, BLOCK_ROWS=block_rows, BLOCK_SPAN=block_span, num_warps=NUM_WARPS)
    return y


def group_rational_backward(
    grad_out: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, d numerator, d denominator) for contiguous (rows, groups, span) grad_out and x."""
    rows, groups, span = x.shape
    grad_x = torch.empty_like(x)
    num, den, num_stride = _coefficients(numerator, denominator)
    grid, block_rows, block_span = _grid(rows, span, groups, BACKWARD_BLOCK)
    partials = torch.empty(grid[0], groups, PARTIALS, device=x.device, dtype=torch.float32)
    with launch_device(x):
        group_rational_kernel[grid](
            x, x, grad_out, grad_x, partials, num, den, rows, span, num_stride,
            BACKWARD=True, BLOCK_ROWS=block_rows, BLOCK_SPAN=block_span, num_warps=NUM_WARPS)
    grad_numerator = partials[:, :, :6].sum(0)
    if numerator.shape[0] == 1:
        grad_numerator = grad_numerator.sum(0, keepdim=True)
    grad_denominator = partials[:, :, 6:].sum(0)
    return grad_x, grad_numerator.to(numerator.dtype), grad_denominator.to(denominator.dtype)



def launch_configs() -> list[dict]:
    """Every variant the launchers compile: kernel, argument types, constexprs and num_warps.

    The JIT also specialises ``span`` on divisibility by 16 (it decides whether loads vectorise),
    so both cases are listed.
    """
    configs = []
    for backward, block in ((False, FORWARD_BLOCK), (True, BACKWARD_BLOCK)):
        for pointer in POINTER_TYPES.values():
            signature = {name: (pointer if name in ("x_ptr", "y_ptr", "grad_out_ptr", "grad_x_ptr") else "*fp32")
                         for name in group_rational_kernel.arg_names if name.endswith("_ptr")}
            signature.update(rows="i32", span="i32", numerator_row_stride="i32")
            for block_span in span_blocks(block):
                for span_divisible_by_16 in (True, False):
                    configs.append(dict(
                        kernel=group_rational_kernel, signature=signature, num_warps=NUM_WARPS,
                        constexprs=dict(BACKWARD=backward, BLOCK_ROWS=block // block_span,
                                        BLOCK_SPAN=block_span),
                        divisible_by_16=[n for n in signature if n.endswith("_ptr") or (n == "span" and span_divisible_by_16)],
                    ))
    return configs
