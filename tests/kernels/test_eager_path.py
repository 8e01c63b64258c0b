"""Eager calls of the ops run their implementation under a plain autograd.Function (see
``kernels.backend.eager``); everything else goes through the registered torch.library op. Both
paths run the same implementation, so they must agree bitwise."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kzoo.kernels import block_sparse_attention, group_rational, scale_ranges, use_backend
from tests.conftest import TRITON_DEVICE


def rational_inputs(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 16, generator=g).to(device).requires_grad_()
    numerator = (0.5 * torch.randn(1, 6, generator=g)).to(device).requires_grad_()
    denominator = (0.5 * torch.randn(4, 4, generator=g)).to(device).requires_grad_()
    return x, numerator, denominator


def attention_inputs(device):
    g = torch.Generator().manual_seed(1)
    start, end = scale_ranges((1, 2, 3), "markov")
    q, k, v = (torch.randn(2, 2, 14, 16, generator=g).to(device).requires_grad_() for _ in range(3))
    return q, k, v, start.to(device), end.to(device)


CALLS = {
    "group_rational": (rational_inputs, lambda x, n, d: group_rational(x, n, d),
                       lambda x, n, d: torch.ops.kzoo.group_rational(x, n, d, -1), "_EagerGroupRationalBackward"),
    "block_sparse_attention": (attention_inputs, lambda q, k, v, s, e: block_sparse_attention(q, k, v, s, e),
                               lambda q, k, v, s, e: torch.ops.kzoo.block_sparse_attention(q, k, v, s, e, 0.25)[0],
                               "_EagerAttentionBackward"),
}


@pytest.mark.parametrize("backend,device", [("auto", "cpu"), ("triton", TRITON_DEVICE)])
@pytest.mark.parametrize("op", CALLS)
def test_eager_path_equals_the_registered_op_bitwise(op, backend, device):
    make_inputs, eager_call, op_call, grad_fn_name = CALLS[op]
    inputs = make_inputs(device)
    differentiable = [t for t in inputs if t.requires_grad]
    with use_backend(backend):
        eager_out = eager_call(*inputs)
        op_out = op_call(*inputs)
        grad_out = torch.randn(eager_out.shape, generator=torch.Generator().manual_seed(2)).to(device)
        eager_grads = torch.autograd.grad(eager_out, differentiable, grad_out)
        op_grads = torch.autograd.grad(op_out, differentiable, grad_out)
    assert type(eager_out.grad_fn).__name__ == grad_fn_name  # the eager call skipped the dispatcher
    assert type(op_out.grad_fn).__name__ != grad_fn_name
    assert torch.equal(eager_out, op_out)
    for eager_grad, op_grad in zip(eager_grads, op_grads, strict=True):
        assert torch.equal(eager_grad, op_grad)


@pytest.mark.parametrize("op", CALLS)
def test_fake_tensors_take_the_registered_op(op):
    make_inputs, eager_call, _, grad_fn_name = CALLS[op]
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        inputs = [mode.from_tensor(t) for t in make_inputs("cpu")]
        out = eager_call(*inputs)
    assert type(out).__name__ == "FakeTensor" and out.shape == inputs[0].shape
    assert type(out.grad_fn).__name__ != grad_fn_name


@pytest.mark.parametrize("op", CALLS)
def test_a_second_derivative_is_refused_on_both_paths(op):
    make_inputs, eager_call, op_call, _ = CALLS[op]
    inputs = make_inputs("cpu")
    for call in (eager_call, op_call):
        first = torch.autograd.grad(call(*inputs).square().sum(), inputs[0], create_graph=True)[0]
        with pytest.raises(RuntimeError, match="no autograd formula was registered"):
            torch.autograd.grad(first.sum(), inputs[0])


def test_tracing_records_the_registered_op():
    from kzoo.models.layers import GroupRational

    layer = GroupRational(num_groups=4)
    x = torch.randn(3, 5, 16)
    traced = torch.jit.trace(layer, x)
    assert "kzoo::group_rational" in str(traced.graph)
    torch.testing.assert_close(traced(x), layer(x))
