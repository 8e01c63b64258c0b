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


class Float32LayerNorm(torch.nn.LayerNorm):
    """What CUDA autocast makes of every LayerNorm: float32 out, whatever comes in."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


def test_sparse_self_attention_takes_norms_that_upcast():
    """Under CUDA autocast q and k leave their norms in fp32 while v leaves the linear in bf16: the
    layer hands the op one dtype (here the same split made on the CPU by an fp32 norm)."""
    from kzoo.kernels import reference, scale_ranges
    from kzoo.models.layers import SparseSelfAttention

    torch.manual_seed(1)
    attn = SparseSelfAttention(64, num_heads=4, qk_norm=True, norm_layer=Float32LayerNorm, dtype=torch.bfloat16)
    start, end = scale_ranges((1, 2, 3, 4), "markov")
    x = torch.randn(2, 30, 64, dtype=torch.bfloat16, requires_grad=True)
    out = attn(x, start, end)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.isfinite().all()

    qkv = F.linear(x.detach().double(), attn.qkv.weight.double(), attn.qkv.bias.double())
    q, k, v = qkv.reshape(2, 30, 3, 4, 16).permute(2, 0, 3, 1, 4)
    q, k = (F.layer_norm(t, (16,), norm.weight.double(), norm.bias.double(), norm.eps)
            for t, norm in ((q, attn.q_norm), (k, attn.k_norm)))
    expected = reference.block_sparse_attention(q, k, v, start, end).transpose(1, 2).reshape(2, 30, 64)
    expected = F.linear(expected, attn.proj.weight.double(), attn.proj.bias.double())
    assert (out.double() - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast's fp32 norms exist only on CUDA")
def test_attention_layers_under_cuda_autocast():
    """SparseSelfAttention (qk norm) and HMAR's ScaleSelfAttention (L2 norm, KV cache) forward and
    backward under bf16 autocast, against the same layers in fp32."""
    from kzoo.kernels import scale_ranges
    from kzoo.models.hmar.hmar import KVCache, ScaleSelfAttention
    from kzoo.models.layers import SparseSelfAttention

    torch.manual_seed(2)
    start, end = (t.cuda() for t in scale_ranges((1, 2, 3, 4, 5), "markov"))
    x = torch.randn(3, 55, 128, device="cuda")
    for layer in (SparseSelfAttention(128, num_heads=2, qk_norm=True), ScaleSelfAttention(128, num_heads=2)):
        layer.cuda()
        expected = layer(x, start, end)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x, start, end)
        assert out.dtype == torch.bfloat16
        assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()
        out.float().sum().backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in layer.parameters())
    # cached sampling: the second scale's queries attend to the first scale's cached keys
    cache, layer = KVCache(), ScaleSelfAttention(128, num_heads=2).cuda()
    first, second = x[:, :1], x[:, 1:5]
    ranges = [(torch.zeros(n, dtype=torch.int32, device="cuda"), torch.full((n,), keys, dtype=torch.int32,
               device="cuda")) for n, keys in ((1, 1), (4, 5))]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        layer(first, *ranges[0], cache)
        cached = layer(second, *ranges[1], cache)
    full = layer(x[:, :5], torch.zeros(5, dtype=torch.int32, device="cuda"),
                 torch.tensor([1, 5, 5, 5, 5], dtype=torch.int32, device="cuda"))
    assert (cached.float() - full[:, 1:5]).abs().max() < 0.05 * full.abs().max()
