"""Group-rational (GR-KAN) kernels.

Both kernels see x as a contiguous (rows, groups, span) tensor: a row is one token (channel-last,
span = C/G) or one image (channels-first, span = C/G * H * W). Every program handles a tile of one
group, so the ten coefficients are scalars loaded once per program.

The backward reduces the coefficient gradients inside each program in float32 registers and writes
one partial sum per program; the partials are summed by ``torch.sum``. There are no atomics, so the
coefficient gradients are bitwise reproducible (the per-element global atomics of the original
kernels are what made KAT train two orders of magnitude slower than ViT).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

FORWARD_BLOCK = 2048
BACKWARD_BLOCK = 1024
NUM_WARPS = 4
SPAN_BLOCKS = (16, 32, 64, 128, 256, 512, 1024)
PARTIALS = 10  # d a0..a5, d b0..b3


@triton.jit
def _load_coefficients(numerator_ptr, denominator_ptr, group, numerator_row_stride):
    num = numerator_ptr + group * numerator_row_stride
    den = denominator_ptr + group * 4
    a0 = tl.load(num + 0)
    a1 = tl.load(num + 1)
    a2 = tl.load(num + 2)
    a3 = tl.load(num + 3)
    a4 = tl.load(num + 4)
    a5 = tl.load(num + 5)
    b0 = tl.load(den + 0)
    b1 = tl.load(den + 1)
    b2 = tl.load(den + 2)
    b3 = tl.load(den + 3)
    return a0, a1, a2, a3, a4, a5, b0, b1, b2, b3


@triton.jit
def _tile_offsets(rows, span, BLOCK_ROWS: tl.constexpr, BLOCK_SPAN: tl.constexpr):
    span_blocks = tl.cdiv(span, BLOCK_SPAN)
    tile = tl.program_id(0)
    group = tl.program_id(1)
    row = (tile // span_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = (tile % span_blocks) * BLOCK_SPAN + tl.arange(0, BLOCK_SPAN)
    row_stride = tl.num_programs(1).to(tl.int64) * span
    offsets = row.to(tl.int64)[:, None] * row_stride + group * span + col[None, :]
    mask = (row < rows)[:, None] & (col < span)[None, :]
    return offsets, mask, tile, group


@triton.jit
def group_rational_forward_kernel(
    x_ptr, y_ptr, numerator_ptr, denominator_ptr,
    rows, span, numerator_row_stride,
    BLOCK_ROWS: tl.constexpr, BLOCK_SPAN: tl.constexpr,
):
    offsets, mask, tile, group = _tile_offsets(rows, span, BLOCK_ROWS, BLOCK_SPAN)
    a0, a1, a2, a3, a4, a5, b0, b1, b2, b3 = _load_coefficients(
        numerator_ptr, denominator_ptr, group, numerator_row_stride)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    p = tl.fma(tl.fma(tl.fma(tl.fma(tl.fma(a5, x, a4), x, a3), x, a2), x, a1), x, a0)
    ax = tl.abs(x)
    q = tl.fma(tl.fma(tl.fma(tl.fma(tl.abs(b3), ax, tl.abs(b2)), ax, tl.abs(b1)), ax, tl.abs(b0)), ax, 1.0)
    tl.store(y_ptr + offsets, (p / q).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def group_rational_backward_kernel(
    grad_out_ptr, x_ptr, grad_x_ptr, partials_ptr, numerator_ptr, denominator_ptr,
    rows, span, numerator_row_stride,
    BLOCK_ROWS: tl.constexpr, BLOCK_SPAN: tl.constexpr,
):
    offsets, mask, tile, group = _tile_offsets(rows, span, BLOCK_ROWS, BLOCK_SPAN)
    a0, a1, a2, a3, a4, a5, b0, b1, b2, b3 = _load_coefficients(
        numerator_ptr, denominator_ptr, group, numerator_row_stride)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # Masked lanes read grad 0, so they add nothing to the coefficient sums below.
    grad = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    c0 = tl.abs(b0)
    c1 = tl.abs(b1)
    c2 = tl.abs(b2)
    c3 = tl.abs(b3)
    ax = tl.abs(x)
    p = tl.fma(tl.fma(tl.fma(tl.fma(tl.fma(a5, x, a4), x, a3), x, a2), x, a1), x, a0)
    q = tl.fma(tl.fma(tl.fma(tl.fma(c3, ax, c2), ax, c1), ax, c0), ax, 1.0)
    dp = tl.fma(tl.fma(tl.fma(tl.fma(5.0 * a5, x, 4.0 * a4), x, 3.0 * a3), x, 2.0 * a2), x, a1)
    dq = tl.fma(tl.fma(tl.fma(4.0 * c3, ax, 3.0 * c2), ax, 2.0 * c1), ax, c0)
    dq = tl.where(x < 0, -dq, dq)

    grad_over_q = grad / q
    y = p / q
    tl.store(grad_x_ptr + offsets, (grad_over_q * (dp - dq * y)).to(grad_x_ptr.dtype.element_ty), mask=mask)

    out = partials_ptr + (tile * tl.num_programs(1) + group) * 10
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


def span_block(span: int) -> int:
    """The tile width along span: the power of two in SPAN_BLOCKS that wastes the fewest lanes."""
    return min(SPAN_BLOCKS, key=lambda b: (triton.cdiv(span, b) * b - span, -b))


def _grid(rows: int, span: int, groups: int, block: int) -> tuple[tuple[int, int], int, int]:
    block_span = span_block(span)
    block_rows = max(block // block_span, 1)
    return (triton.cdiv(rows, block_rows) * triton.cdiv(span, block_span), groups), block_rows, block_span


def _coefficients(numerator: Tensor, denominator: Tensor) -> tuple[Tensor, Tensor, int]:
    numerator_row_stride = 0 if numerator.shape[0] == 1 else 6
    return numerator.float().contiguous(), denominator.float().contiguous(), numerator_row_stride


def _on_device(x: Tensor):
    # Launch on x's GPU, not the current one (the original kernels failed on cuda:1, kat#28).
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def group_rational_forward(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """y for a contiguous (rows, groups, span) x with numel > 0."""
    rows, groups, span = x.shape
    y = torch.empty_like(x)
    num, den, num_stride = _coefficients(numerator, denominator)
    grid, block_rows, block_span = _grid(rows, span, groups, FORWARD_BLOCK)
    with _on_device(x):
        group_rational_forward_kernel[grid](
            x, y, num, den, rows, span, num_stride,
            BLOCK_ROWS=block_rows, BLOCK_SPAN=block_span, num_warps=NUM_WARPS)
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
    with _on_device(x):
        group_rational_backward_kernel[grid](
            grad_out, x, grad_x, partials, num, den, rows, span, num_stride,
            BLOCK_ROWS=block_rows, BLOCK_SPAN=block_span, num_warps=NUM_WARPS)
    grad_numerator = partials[:, :, :6].sum(0)
    if numerator.shape[0] == 1:
        grad_numerator = grad_numerator.sum(0, keepdim=True)
    grad_denominator = partials[:, :, 6:].sum(0)
    return grad_x, grad_numerator.to(numerator.dtype), grad_denominator.to(denominator.dtype)


def launch_configs() -> list[dict]:
    """Every distinct compiled variant the launchers can produce, for ahead-of-time compile tests."""
    configs = []
    for kernel, block in ((group_rational_forward_kernel, FORWARD_BLOCK), (group_rational_backward_kernel, BACKWARD_BLOCK)):
        for block_span in SPAN_BLOCKS:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                configs.append(dict(kernel=kernel, dtype=dtype, num_warps=NUM_WARPS,
                                    constexprs=dict(BLOCK_ROWS=max(block // block_span, 1), BLOCK_SPAN=block_span)))
    return configs
