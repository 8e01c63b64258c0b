"""Group-rational (GR-KAN) kernels.

One kernel body serves the forward and the backward (a constexpr switch). It sees x as a
contiguous (rows, groups, span) tensor: a row is one token (channel-last,
span = C/G) or one image (channels-first, span = C/G * H * W). Every program handles tiles of one
group, so the ten coefficients are scalars loaded once per program.

The backward sums the coefficient gradients over a program's tiles in float32 registers and writes
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
BACKWARD_BLOCK = 512
# Tiles one backward program may walk: the most that still leaves MIN_PROGRAMS programs, enough to
# fill every SM of a large GPU several times over.
BACKWARD_TILES = (1, 4, 16)
MIN_PROGRAMS = 2048
# The interpreter pays milliseconds per program, so it runs the same kernel on larger tiles, and
# walks several of them in a program whenever there are several (which is also how the tests
# reach the loop).
INTERPRETER_BLOCK = 16384
INTERPRETER_MIN_PROGRAMS = 2
NUM_WARPS = 4
PARTIALS = 10  # d a0..a5, d b0..b3


@triton.jit
def group_rational_kernel(
    x_ptr, y_ptr, grad_out_ptr, grad_x_ptr, partials_ptr, numerator_ptr, denominator_ptr,
    rows, span, numerator_row_stride,
    BACKWARD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_SPAN: tl.constexpr, TILES: tl.constexpr,
):
    """Forward (y = P/Q) or backward (dx and per-program coefficient partials) on TILES tiles of
    one group, one below the other.

    One body serves both directions so that the tiling and coefficient loads exist once; calls to
    nested ``@triton.jit`` helpers would cost milliseconds per program under the interpreter. The
    backward accumulates its ten partials element-wise over its tiles and reduces them once at the
    end: block-wide reductions, not bytes, bound a backward that reduces every tile.
    """
    span_blocks = tl.cdiv(span, BLOCK_SPAN)
    program = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    first_row = (program // span_blocks) * (BLOCK_ROWS * TILES)
    col = (program % span_blocks) * BLOCK_SPAN + tl.arange(0, BLOCK_SPAN)
    row_stride = tl.num_programs(1).to(tl.int64) * span

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

    # Sums of grad/Q * x^k (d a_k) and of -grad/Q * y * |x|^(k+1) (d b_k, before sign(b_k)).
    s0 = tl.zeros((BLOCK_ROWS, BLOCK_SPAN), tl.float32)
    s1 = tl.zeros((BLOCK_ROWS, BLOCK_SPAN), tl.float32)
    s2 = tl.zeros((BLOCK_ROWS, BLOCK_SPAN), tl.float32)
    s3 = tl.zeros((BLOCK_ROWS, BLOCK_SPAN), tl.float32)
    s4 = tl.zeros((BLOCK_ROWS, BLOCK_SPAN), tl.float32)
    s5 = tl.zeros((BLOCK_ROWS, BLOCK_SPAN), tl.float32)
    s6 = tl.zeros((BLOCK_ROWS, BLOCK_SPAN), tl.float32)
    s7 = tl.zeros((BLOCK_ROWS, BLOCK_SPAN), tl.float32)
    s8 = tl.zeros((BLOCK_ROWS, BLOCK_SPAN), tl.float32)
    s9 = tl.zeros((BLOCK_ROWS, BLOCK_SPAN), tl.float32)
    for tile in range(TILES):
        row = first_row + tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        offsets = row.to(tl.int64)[:, None] * row_stride + group * span + col[None, :]
        mask = (row < rows)[:, None] & (col < span)[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        p = tl.fma(tl.fma(tl.fma(tl.fma(tl.fma(a5, x, a4), x, a3), x, a2), x, a1), x, a0)
        q = tl.fma(tl.fma(tl.fma(tl.fma(c3, ax, c2), ax, c1), ax, c0), ax, 1.0)
        if not BACKWARD:
            tl.store(y_ptr + offsets, (p / q).to(y_ptr.dtype.element_ty), mask=mask)
        else:
            # Masked lanes read grad 0, so they add nothing to the sums.
            grad = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dp = tl.fma(tl.fma(tl.fma(tl.fma(5.0 * a5, x, 4.0 * a4), x, 3.0 * a3), x, 2.0 * a2), x, a1)
            dq = tl.fma(tl.fma(tl.fma(4.0 * c3, ax, 3.0 * c2), ax, 2.0 * c1), ax, c0)
            dq = tl.where(x < 0, -dq, dq)
            grad_over_q = grad / q
            y = p / q
            tl.store(grad_x_ptr + offsets, (grad_over_q * (dp - dq * y)).to(grad_x_ptr.dtype.element_ty),
                     mask=mask)
            t = grad_over_q
            s0 += t
            t = t * x
            s1 += t
            t = t * x
            s2 += t
            t = t * x
            s3 += t
            t = t * x
            s4 += t
            t = t * x
            s5 += t
            t = -grad_over_q * y * ax
            s6 += t
            t = t * ax
            s7 += t
            t = t * ax
            s8 += t
            t = t * ax
            s9 += t
    if BACKWARD:
        # A program's row of partials: d numerator (groups, 6), then d denominator (groups, 4), so
        # that their sums over programs are two contiguous blocks.
        groups = tl.num_programs(1)
        row = partials_ptr + program.to(tl.int64) * groups * 10
        out = row + group * 6
        tl.store(out + 0, tl.sum(tl.sum(s0, 1), 0))
        tl.store(out + 1, tl.sum(tl.sum(s1, 1), 0))
        tl.store(out + 2, tl.sum(tl.sum(s2, 1), 0))
        tl.store(out + 3, tl.sum(tl.sum(s3, 1), 0))
        tl.store(out + 4, tl.sum(tl.sum(s4, 1), 0))
        tl.store(out + 5, tl.sum(tl.sum(s5, 1), 0))
        # sign(b) with sign(0) = +1, as in the KAT kernels: a zero coefficient still gets a gradient.
        out = row + groups * 6 + group * 4
        tl.store(out + 0, tl.where(b0 < 0, -1.0, 1.0) * tl.sum(tl.sum(s6, 1), 0))
        tl.store(out + 1, tl.where(b1 < 0, -1.0, 1.0) * tl.sum(tl.sum(s7, 1), 0))
        tl.store(out + 2, tl.where(b2 < 0, -1.0, 1.0) * tl.sum(tl.sum(s8, 1), 0))
        tl.store(out + 3, tl.where(b3 < 0, -1.0, 1.0) * tl.sum(tl.sum(s9, 1), 0))


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


def _grid(rows: int, span: int, groups: int, block: int, tile_choices=(1,)) -> tuple[tuple[int, int], dict]:
    """The launch grid and constexprs: tiles of ``block`` elements, and the most tiles a program
    of ``tile_choices`` that leaves MIN_PROGRAMS programs."""
    if triton_interpreted():
        return _tiling(rows, span, groups, INTERPRETER_BLOCK, tile_choices, INTERPRETER_MIN_PROGRAMS)
    return _tiling(rows, span, groups, block, tile_choices, MIN_PROGRAMS)


@functools.lru_cache(maxsize=1024)
def _tiling(rows, span, groups, block, tile_choices, min_programs) -> tuple[tuple[int, int], dict]:
    block_rows, block_span = tile_shape(rows, span, block)
    row_tiles, span_tiles = ceil_div(rows, block_rows), ceil_div(span, block_span)
    tiles = max(t for t in tile_choices
                if t == 1 or (t <= row_tiles and ceil_div(row_tiles, t) * span_tiles * groups >= min_programs))
    grid = (ceil_div(row_tiles, tiles) * span_tiles, groups)
    return grid, dict(BLOCK_ROWS=block_rows, BLOCK_SPAN=block_span, TILES=tiles)


def _coefficients(numerator: Tensor, denominator: Tensor) -> tuple[Tensor, Tensor, int]:
    numerator_row_stride = 0 if numerator.shape[0] == 1 else 6
    return numerator.float().contiguous(), denominator.float().contiguous(), numerator_row_stride


def group_rational_forward(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """y for a contiguous (rows, groups, span) x with numel > 0."""
    rows, groups, span = x.shape
    y = torch.empty_like(x)
    num, den, num_stride = _coefficients(numerator, denominator)
    grid, tiling = _grid(rows, span, groups, FORWARD_BLOCK)
    with launch_device(x):
        group_rational_kernel[grid](
            x, y, x, y, y, num, den, rows, span, num_stride, BACKWARD=False, **tiling, num_warps=NUM_WARPS)
    return y


def group_rational_backward(
    grad_out: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, d numerator, d denominator) for contiguous (rows, groups, span) grad_out and x."""
    rows, groups, span = x.shape
    grad_x = torch.empty_like(x)
    num, den, num_stride = _coefficients(numerator, denominator)
    grid, tiling = _grid(rows, span, groups, BACKWARD_BLOCK, BACKWARD_TILES)
    partials = torch.empty(grid[0], groups * PARTIALS, device=x.device, dtype=torch.float32)
    with launch_device(x):
        group_rational_kernel[grid](
            x, x, grad_out, grad_x, partials, num, den, rows, span, num_stride, BACKWARD=True, **tiling,
            num_warps=NUM_WARPS)
    sums = partials.sum(0)  # one reduction, then contiguous views
    grad_denominator = sums[groups * 6:].view(groups, 4)
    if numerator.shape[0] == 1:
        grad_numerator = sums[:groups * 6].view(groups, 6).sum(0, keepdim=True)
    else:  # a copy: an op's outputs may not share memory
        grad_numerator = sums[:groups * 6].view(groups, 6).clone()
    return grad_x, grad_numerator.to(numerator.dtype), grad_denominator.to(denominator.dtype)


def launch_configs() -> list[dict]:
    """Every variant the launchers compile: kernel, argument types, constexprs and num_warps.

    The JIT also specialises ``span`` on divisibility by 16 (it decides whether loads vectorise),
    so both cases are listed.
    """
    configs = []
    for backward, block, tile_choices in ((False, FORWARD_BLOCK, (1,)), (True, BACKWARD_BLOCK, BACKWARD_TILES)):
        for pointer in POINTER_TYPES.values():
            signature = {name: (pointer if name in ("x_ptr", "y_ptr", "grad_out_ptr", "grad_x_ptr") else "*fp32")
                         for name in group_rational_kernel.arg_names if name.endswith("_ptr")}
            signature.update(rows="i32", span="i32", numerator_row_stride="i32")
            for block_span in span_blocks(block):
                for tiles in tile_choices:
                    for span_divisible_by_16 in (True, False):
                        configs.append(dict(
                            kernel=group_rational_kernel, signature=signature, num_warps=NUM_WARPS,
                            constexprs=dict(BACKWARD=backward, BLOCK_ROWS=block // block_span,
                                            BLOCK_SPAN=block_span, TILES=tiles),
                            divisible_by_16=[n for n in signature
                                             if n.endswith("_ptr") or (n == "span" and span_divisible_by_16)],
                        ))
    return configs
