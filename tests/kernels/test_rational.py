import pytest
import torch

from kzoo.kernels import group_rational, reference, use_backend
from tests.conftest import TRITON_DEVICE, relative_error
from tests.kernels import TRITON_DTYPES


def make_inputs(shape, channel_dim, groups, shared, dtype=torch.float32, device="cpu", seed=0):
    """Fresh random x and coefficients of mixed sign (b0..b3 include negatives, so |b| matters)."""
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=g)).to(dtype)
    numerator = 0.5 * torch.randn(1 if shared else groups, 6, generator=g)
    denominator = 0.5 * torch.randn(groups, 4, generator=g)
    coefficient_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return x.to(device), numerator.to(device, coefficient_dtype), denominator.to(device, coefficient_dtype)


def float64_reference(grad_out, x, numerator, denominator, channel_dim):
    args = [t.detach().cpu().double() for t in (x, numerator, denominator)]
    y = reference.group_rational(*args, channel_dim)
    grads = reference.group_rational_backward(grad_out.detach().cpu().double(), *args, channel_dim)
    return y, grads


def run_op(x, numerator, denominator, channel_dim, grad_out):
    x = x.detach().requires_grad_()  # not clone(): that would make a sliced x contiguous
    numerator = numerator.clone().requires_grad_()
    denominator = denominator.clone().requires_grad_()
    y = group_rational(x, numerator, denominator, channel_dim=channel_dim)
    y.backward(grad_out)
    return y, (x.grad, numerator.grad, denominator.grad)


def shape_for(rows, channels, channel_dim):
    return (rows, channels) if channel_dim == -1 else (2, channels, rows)


# --- reference vs float64 finite differences ---------------------------------------------------

@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("channel_dim,shape", [(-1, (3, 5, 8)), (1, (2, 8, 3, 2))])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_gradcheck(shared, channel_dim, shape, backend):
    x, numerator, denominator = make_inputs(shape, channel_dim, 4, shared, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, numerator, denominator))
    with use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x, n, d: group_rational(x, n, d, channel_dim=channel_dim), inputs)


def test_reference_matches_formula_pointwise():
    # Independent scalar evaluation of the DESIGN.md formula, per channel and group.
    x, numerator, denominator = make_inputs((5, 12), -1, 3, shared=False, dtype=torch.float64)
    y = reference.group_rational(x, numerator, denominator, -1)
    for i in range(5):
        for c in range(12):
            a, b, t = numerator[c // 4], denominator[c // 4], x[i, c].item()
            p = sum(a[k].item() * t ** k for k in range(6))
            q = 1 + sum(abs(b[k].item()) * abs(t) ** (k + 1) for k in range(4))
            assert abs(y[i, c].item() - p / q) <= 1e-12 * max(1.0, abs(p / q))


def test_reference_is_not_the_signed_power_cpu_fallback():
    # The official CPU fallback used 1 + sum |b_i| x^i with signed x; for x < 0 and odd powers it differs.
    x = torch.tensor([[-2.0]], dtype=torch.float64)
    numerator = torch.tensor([[1.0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    denominator = torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64)
    assert reference.group_rational(x, numerator, denominator, -1).item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), ("auto", "cpu"), ("triton", TRITON_DEVICE)])
def test_sign_of_zero_is_plus_one(backend, device):
    # Identity init has b = 0 exactly; with sign(0) = +1 the denominator still gets a gradient.
    x = torch.tensor([[0.0, 1.5, -2.0, 0.5]], device=device)
    numerator = torch.tensor([[0.0, 1.0, 0, 0, 0, 0]], device=device)
    denominator = torch.zeros(1, 4, device=device)
    with use_backend(backend):
        _, (dx, _, dden) = run_op(x, numerator, denominator, -1, torch.ones_like(x))
    expected = -torch.tensor([sum(v * abs(v) ** (k + 1) for v in (1.5, -2.0, 0.5)) for k in range(4)])
    torch.testing.assert_close(dden.cpu()[0], expected, rtol=1e-6, atol=1e-6)
    # dQ/dx at x = 0 is sign(0) * |b0| = 0 here; dx is R/Q = 1 everywhere for the identity.
    torch.testing.assert_close(dx.cpu(), torch.ones(1, 4))


# --- fast paths vs the float64 reference -------------------------------------------------------

TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-3)}


def check_against_reference(rows, channels, groups, channel_dim, dtype, shared, device, seed):
    x, numerator, denominator = make_inputs(shape_for(rows, channels, channel_dim), channel_dim, groups,
                                            shared, dtype, device, seed)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(device)
    y, (dx, dnum, dden) = run_op(x, numerator, denominator, channel_dim, grad_out)
    y_ref, (dx_ref, dnum_ref, dden_ref) = float64_reference(grad_out, x, numerator, denominator, channel_dim)
    tol_x, tol_coefficients = TOLERANCE[dtype]
    assert y.shape == x.shape and y.dtype == dtype and dx.dtype == dtype
    assert dnum.shape == numerator.shape and dden.shape == denominator.shape
    assert relative_error(y, y_ref) < tol_x
    assert relative_error(dx, dx_ref) < tol_x
    assert relative_error(dnum, dnum_ref) < tol_coefficients
    assert relative_error(dden, dden_ref) < tol_coefficients
    if x.numel() == 0:
        assert not dnum.any() and not dden.any()


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("channel_dim", [-1, 1])
@pytest.mark.parametrize("channels,groups", [(8, 1), (8, 4), (8, 8), (64, 1), (64, 4), (64, 8),
                                             (200, 1), (200, 4), (200, 8)])
@pytest.mark.parametrize("rows", [0, 1, 7, 1000, 4099])
def test_triton_matches_reference(rows, channels, groups, channel_dim, dtype, poison):
    with use_backend("triton"):
        check_against_reference(rows, channels, groups, channel_dim, dtype, shared=groups % 2 == 0,
                                device=TRITON_DEVICE, seed=rows * 7 + channels + groups)


@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_float64_runs_the_reference_on_the_triton_path(channel_dim, poison):
    """The kernel computes in float32; float64 input gets float64 arithmetic, not a float32 result."""
    x, numerator, denominator = make_inputs(shape_for(37, 16, channel_dim), channel_dim, 4, False, torch.float64,
                                            TRITON_DEVICE, seed=3)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(x.device)
    with use_backend("triton"):
        y, grads = run_op(x, numerator, denominator, channel_dim, grad_out)
    y_ref, grads_ref = float64_reference(grad_out, x, numerator, denominator, channel_dim)
    assert y.dtype == torch.float64 and relative_error(y, y_ref) < 1e-12
    for grad, grad_ref in zip(grads, grads_ref):
        assert grad.dtype == torch.float64 and relative_error(grad, grad_ref) < 1e-12


def test_backward_writes_one_partial_row_per_program_and_no_atomics(monkeypatch):
    """The coefficient gradients are per-program float32 partials summed afterwards (see
    kzoo/kernels/triton/rational.py): a (programs along rows, groups * 10) buffer, no atomics."""
    import inspect

    from kzoo.kernels.triton import rational as kernels

    assert "tl.atomic_" not in inspect.getsource(kernels)
    launches = []
    real = kernels.group_rational_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, args, kwargs))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernels, "group_rational_kernel", Recorder())
    x, numerator, denominator = make_inputs((3, 5000, 64), -1, 8, True, device=TRITON_DEVICE)
    with use_backend("triton"):
        _, (_, dnum, dden) = run_op(x, numerator, denominator, -1, torch.ones_like(x))
    (grid, args, kwargs), = [launch for launch in launches if launch[2]["BACKWARD"]]
    partials = args[4]
    assert grid[0] > 1 and partials.shape == (grid[0], grid[1] * kernels.PARTIALS)
    if not x.is_cuda:  # the interpreter's tiles: 15000 rows in tiles of 1024 rows, 4 a program
        assert kwargs["BLOCK_ROWS"] == 1024 and kwargs["TILES"] == 4 and grid[0] == 4
    assert partials.dtype == torch.float32
    groups = grid[1]  # a program's row: d numerator (groups, 6), then d denominator (groups, 4)
    torch.testing.assert_close(dden, partials[:, groups * 6:].sum(0).view(groups, 4))
    torch.testing.assert_close(dnum, partials[:, :groups * 6].sum(0).view(groups, 6).sum(0, keepdim=True))


@pytest.mark.parametrize("rows,span,groups", [(128 * 197, 96, 8), (128 * 197, 384, 8), (8 * 197, 96, 8),
                                             (7, 8, 1), (100_003, 16, 1), (64 * 56 * 56, 12, 8)])
def test_backward_programs_walk_tiles_yet_fill_the_gpu(rows, span, groups):
    """Each backward program walks the most tiles (of BACKWARD_TILES) that still leave MIN_PROGRAMS
    programs, and the programs cover every row tile exactly once (GPU sizes, no launch)."""
    from kzoo.kernels.triton import rational as kernels

    (grid_rows, grid_groups), tiling = kernels._tiling(rows, span, groups, kernels.BACKWARD_BLOCK,
                                                       kernels.BACKWARD_TILES, kernels.MIN_PROGRAMS)
    tiles, block_rows, block_span = tiling["TILES"], tiling["BLOCK_ROWS"], tiling["BLOCK_SPAN"]
    assert block_rows * block_span == kernels.BACKWARD_BLOCK and grid_groups == groups
    span_tiles, row_tiles = -(-span // block_span), -(-rows // block_rows)
    programs_down = grid_rows // span_tiles
    assert grid_rows == programs_down * span_tiles
    assert (programs_down - 1) * tiles < row_tiles <= programs_down * tiles
    if tiles > 1:
        assert grid_rows * groups >= kernels.MIN_PROGRAMS
    bigger = [t for t in kernels.BACKWARD_TILES if t > tiles]
    if bigger:  # the next choice would leave too few programs, or walk past every row tile
        assert bigger[0] > row_tiles or -(-row_tiles // bigger[0]) * span_tiles * groups < kernels.MIN_PROGRAMS


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("channel_dim", [-1, 1])
@pytest.mark.parametrize("rows,channels,groups", [(0, 8, 8), (1, 8, 1), (7, 64, 4), (1000, 200, 8), (4099, 64, 8)])
def test_cpu_path_matches_reference(rows, channels, groups, channel_dim, dtype, shared, poison):
    with use_backend("auto"):
        check_against_reference(rows, channels, groups, channel_dim, dtype, shared, "cpu", seed=rows + channels)


@pytest.mark.parametrize("backend,device", [("auto", "cpu"), ("triton", TRITON_DEVICE)])
def test_memory_layouts(backend, device, poison):
    """Channels-last NCHW, transposed and sliced inputs give the reference result; a dense x's
    output has x's strides, any other x's output is contiguous."""
    # Views of a tensor already on the device: copying a strided view to CUDA makes it dense.
    base = torch.randn(3, 16, 5, 7).to(device)
    numerator, denominator = torch.randn(1, 6).to(device), torch.randn(4, 4).to(device)
    cases = [  # (x, channel_dim, x is dense)
        (base.to(memory_format=torch.channels_last), 1, True),
        (base.transpose(1, 3).contiguous().transpose(1, 3), 1, True),
        (base[:, :, 1:4, ::2], 1, False),
        (base.permute(0, 2, 3, 1)[:, :, 2:], -1, False),
        (base.flatten(2).transpose(1, 2), -1, True),
    ]
    for x, channel_dim, dense in cases:
        grad_out = torch.randn(x.shape).to(device)
        with use_backend(backend):
            y, grads = run_op(x, numerator, denominator, channel_dim, grad_out)
        y_ref, grads_ref = float64_reference(grad_out, x, numerator, denominator, channel_dim)
        assert y.stride() == (x.stride() if dense else torch.empty(x.shape).stride())
        assert relative_error(y, y_ref) < 1e-5
        for grad, grad_ref in zip(grads, grads_ref):
            assert relative_error(grad, grad_ref) < 1e-4


@pytest.mark.parametrize("backend,device", [("auto", "cpu"), ("triton", TRITON_DEVICE)])
def test_coefficient_gradients_are_bitwise_deterministic(backend, device):
    x, numerator, denominator = make_inputs((333, 64), -1, 8, True, device=device)
    grad_out = torch.randn(x.shape).to(device)
    with use_backend(backend):
        _, first = run_op(x, numerator, denominator, -1, grad_out)
        _, second = run_op(x, numerator, denominator, -1, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# --- torch.compile -----------------------------------------------------------------------------

class SmallKan(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.numerator = torch.nn.Parameter(torch.randn(1, 6) * 0.3)
        self.denominator = torch.nn.Parameter(torch.randn(8, 4) * 0.3)
        self.fc2 = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(group_rational(self.fc1(x), self.numerator, self.denominator))


@pytest.mark.parametrize("backend,device", [("auto", "cpu"), ("triton", TRITON_DEVICE)])
def test_torch_compile_fullgraph_matches_eager(backend, device):
    torch.manual_seed(0)
    model = SmallKan().to(device)
    x = torch.randn(4, 9, 16, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with use_backend(backend):
        eager = model(x)
        eager.square().sum().backward()
        eager_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        out = compiled(x)
        out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_fake_tensor_shapes_and_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 16, 4, 4).to(memory_format=torch.channels_last)
        y = torch.ops.kzoo.group_rational(x, torch.empty(1, 6), torch.empty(8, 4), 1)
        assert y.shape == x.shape and y.stride() == x.stride()
        dx, dn, dd = torch.ops.kzoo.group_rational_backward(y, x, torch.empty(8, 6), torch.empty(8, 4), 1)
        assert dx.stride() == x.stride() and dn.shape == (8, 6) and dd.shape == (8, 4)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("x,numerator,denominator,channel_dim,error,message", [
    (torch.randn(2, 10), torch.randn(1, 6), torch.randn(4, 4), -1, ValueError, "10 channels"),
    (torch.randn(2, 8), torch.randn(1, 5), torch.randn(4, 4), -1, ValueError, r"\(1, 5\)"),
    (torch.randn(2, 8), torch.randn(2, 6), torch.randn(4, 4), -1, ValueError, r"\(2, 6\)"),
    (torch.randn(2, 8), torch.randn(1, 6), torch.randn(4, 3), -1, ValueError, r"\(4, 3\)"),
    (torch.randn(2, 8), torch.randn(1, 6), torch.randn(4), -1, ValueError, r"\(4,\)"),
    (torch.ones(2, 8, dtype=torch.int64), torch.randn(1, 6), torch.randn(4, 4), -1, TypeError, "torch.int64"),
    (torch.randn(2, 8), torch.randn(1, 6), torch.randn(4, 4), 2, ValueError, "channel_dim=2"),
    (torch.randn(2, 8), torch.randn(1, 6, device="meta"), torch.randn(4, 4), -1, ValueError, "meta"),
])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_input(x, numerator, denominator, channel_dim, error, message, backend):
    with use_backend(backend), pytest.raises(error, match=message):
        group_rational(x, numerator, denominator, channel_dim=channel_dim)
