import pytest
import torch
import torch.nn.functional as F

from kzoo.kernels import use_backend
from kzoo.models.layers import RATIONAL_INITS, RATIONAL_TARGETS, GroupRational
from tests.conftest import TRITON_DEVICE


def test_every_preset_has_a_target():
    assert set(RATIONAL_INITS) == set(RATIONAL_TARGETS)


@pytest.mark.parametrize("init", sorted(RATIONAL_TARGETS))
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_preset_matches_its_function_on_minus3_to_3(init, backend):
    x = torch.linspace(-3, 3, 6001, dtype=torch.float64)[:, None].expand(-1, 8)
    act = GroupRational(num_groups=8, init=init).double()
    with use_backend(backend), torch.no_grad():
        error = (act(x) - RATIONAL_TARGETS[init](x)).abs().max().item()
    assert error < 2e-2, f"{init}: max error {error:.3g}"


def test_official_gelu_preset_would_fail_under_version_a():
    # Guards the reason the gelu preset is refitted (reference/kat.md section 1.5).
    act = GroupRational(num_groups=1, init="gelu").double()
    with torch.no_grad():
        act.weight_numerator.copy_(torch.tensor([[-0.00153969, 0.51692871, 0.44075827, 0.0972553, -0.00884418, -0.00378675]]))
        act.weight_denominator.copy_(torch.tensor([[-0.14171056, -0.06481231, -0.0444695, 0.01283776]]))
        assert (act(torch.tensor([[3.0]], dtype=torch.float64)) - 3.0).abs().item() > 1.0


def test_parameters_follow_the_official_checkpoint_layout():
    act = GroupRational(num_groups=8, init="swish")
    shapes = {name: tuple(p.shape) for name, p in act.named_parameters()}
    assert shapes == {"weight_numerator": (1, 6), "weight_denominator": (8, 4)}
    assert torch.equal(act.weight_denominator[3], act.weight_denominator[0])
    per_group = GroupRational(num_groups=4, numerator_per_group=True)
    assert per_group.weight_numerator.shape == (4, 6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="'tanh'"):
        GroupRational(init="tanh")
    with pytest.raises(ValueError, match="num_groups=0"):
        GroupRational(num_groups=0)
    with pytest.raises(ValueError, match="12 channels"):
        GroupRational(num_groups=8)(torch.randn(2, 12))


@pytest.mark.parametrize("backend,device", [("auto", "cpu"), ("triton", TRITON_DEVICE)])
def test_channels_first_in_a_conv_net(backend, device):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), GroupRational(8, "gelu", channel_dim=1),
                              torch.nn.Conv2d(16, 4, 3)).to(device)
    x = torch.randn(2, 3, 9, 11, device=device)
    with use_backend(backend):
        y = net(x)
        y.sum().backward()
    with use_backend("reference"):
        expected = net[2](F.gelu(net[0](x)))
    assert y.shape == (2, 4, 7, 9)
    torch.testing.assert_close(y, expected, atol=2e-2, rtol=0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net[1].weight_denominator.grad.abs().sum() > 0


def test_torchscript():
    act = GroupRational(num_groups=4, init="swish")
    scripted = torch.jit.script(act)
    x = torch.randn(3, 8, requires_grad=True)
    scripted(x).sum().backward()
    torch.testing.assert_close(scripted(x), act(x))
    assert scripted.weight_numerator.grad is not None and x.grad is not None


def test_sparse_self_attention_matches_masked_attention_and_compiles():
    from kzoo.kernels import reference, scale_ranges
    from kzoo.models.layers import SparseSelfAttention

    torch.manual_seed(0)
    attn = SparseSelfAttention(64, num_heads=4, qk_norm=True)
    start, end = scale_ranges((1, 2, 3, 4), "markov")
    x = torch.randn(2, 30, 64)
    out = attn(x, start, end)
    q, k, v = attn.qkv(x).reshape(2, 30, 3, 4, 16).permute(2, 0, 3, 1, 4)
    expected = reference.block_sparse_attention(attn.q_norm(q), attn.k_norm(k), v, start, end)
    torch.testing.assert_close(out, attn.proj(expected.transpose(1, 2).reshape(2, 30, 64)), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(attn, fullgraph=True)
    y = compiled(x, start, end)
    torch.testing.assert_close(y, out, rtol=1e-5, atol=1e-5)
    with use_backend("reference"):  # the backend is chosen inside the op, so the graph serves every one
        torch.testing.assert_close(compiled(x, start, end), out, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in attn.parameters())
    with pytest.raises(ValueError, match="dim=30"):
        SparseSelfAttention(30, num_heads=4)
