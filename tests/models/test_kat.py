import math

import pytest
import timm
import timm.optim
import torch
from safetensors.torch import save_file

import kzoo  # noqa: F401  (registers the KAT models)
from kzoo.kernels import use_backend
from kzoo.models.kat import KAT, from_vit
from kzoo.models.layers import KAN, rational_gain
from tests.conftest import TRITON_DEVICE

NAMES = [f"kat_{size}{suffix}" for size in ("tiny", "small", "base")
         for suffix in ("", "_patch16_224", "_swish_patch16_224", "_gelu_patch16_224")]
SMALL = dict(img_size=32, depth=2, embed_dim=64, num_heads=2)


def test_every_name_is_registered():
    assert sorted(timm.list_models("kat_*")) == sorted(NAMES)
    assert set(timm.list_models(module="kat")) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.1, **SMALL)
    assert model.act_init == ("gelu" if "gelu" in name else "swish")
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name,count", [("kat_tiny", 5_718_328), ("kat_small", 22_051_576), ("kat_base", 86_568_568)])
def test_official_parameter_counts(name, count):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count
    keys = set(model.state_dict())
    assert "blocks.11.mlp.act1.weight_numerator" in keys and "blocks.0.mlp.act2.weight_denominator" in keys
    assert model.state_dict()["blocks.3.mlp.act2.weight_numerator"].shape == (1, 6)
    assert model.state_dict()["blocks.3.mlp.act2.weight_denominator"].shape == (8, 4)


def test_pretrained_cfg():
    model = timm.create_model("kat_tiny", **SMALL)
    cfg = model.pretrained_cfg
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["first_conv"] == "patch_embed.proj" and cfg["classifier"] == "head"
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["interpolation"] == "bicubic"


def test_initialisation():
    torch.manual_seed(0)
    model = timm.create_model("kat_small_gelu_patch16_224", depth=2)
    mlp = model.blocks[0].mlp
    # Variance-preserving KAN init survives timm's init (the official code lost it).
    assert mlp.fc1.weight.std().item() == pytest.approx(1 / math.sqrt(384), rel=0.05)
    assert mlp.fc2.weight.std().item() == pytest.approx(math.sqrt(rational_gain("gelu") / 1536), rel=0.05)
    assert rational_gain("swish") == pytest.approx(2.81, abs=0.01)
    # Mimetic attention: Wq^T Wk is near 0.7 I + noise, Wo Wv near -0.4 I + noise.
    attn, dim = model.blocks[1].attn, 384
    qkv = attn.qkv.weight
    qk = qkv[:dim].T @ qkv[dim:2 * dim]
    vo = attn.proj.weight @ qkv[2 * dim:]
    assert torch.diagonal(qk).mean().item() == pytest.approx(0.7, abs=0.05)
    assert torch.diagonal(vo).mean().item() == pytest.approx(-0.4, abs=0.05)
    # Rational coefficients are left out of weight decay.
    groups = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        if name.endswith(("weight_numerator", "weight_denominator")):
            assert id(p) not in decayed, name
    assert id(mlp.fc1.weight) in decayed


def test_model_variants():
    model = timm.create_model("kat_tiny", in_chans=1, num_classes=0, img_size=48, global_pool="avg", class_token=False,
                              depth=2)
    assert model(torch.randn(2, 1, 48, 48)).shape == (2, 192)
    assert model.pos_embed.shape == (1, 9, 192)


def test_timm_feature_api():
    torch.manual_seed(0)
    model = timm.create_model("kat_tiny", img_size=32, depth=4).eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 5, 192) and model.num_features == model.head_hidden_size == 192
    assert model.forward_head(features, pre_logits=True).shape == (2, 192)
    assert model.get_classifier() is model.head
    final, intermediates = model.forward_intermediates(x, indices=2)
    torch.testing.assert_close(final, features)
    assert [t.shape for t in intermediates] == [(2, 192, 2, 2)] * 2
    matcher = model.group_matcher()
    assert "blocks" in matcher and "stem" in matcher
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    assert model.prune_intermediate_layers(indices=2) == [2, 3]
    assert len(model.blocks) == 4 and isinstance(model.head, torch.nn.Identity)

    features_only = timm.create_model("kat_tiny", img_size=32, depth=4, features_only=True, out_indices=(1, 3))
    outs = features_only(x)
    assert [o.shape for o in outs] == [(2, 192, 2, 2)] * 2
    assert features_only.feature_info.channels() == [192, 192]


def test_grad_checkpointing_gives_the_same_output():
    torch.manual_seed(0)
    model = timm.create_model("kat_tiny", **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_torchscript_and_fx():
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    with timm.layers.set_layer_config(scriptable=True):
        model = timm.create_model("kat_tiny", **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    torch.testing.assert_close(torch.jit.script(model)(x), expected)
    extractor = create_feature_extractor(model, {"head": "out"})
    torch.testing.assert_close(extractor(x)["out"], expected)


def official_state_dict(model: KAT) -> dict:
    """The state dict in the official checkpoint layout, written key by key (reference/kat.md 3.4)."""
    dim, sd = model.embed_dim, model.state_dict()
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        keys += [b + k for k in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                                 "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.act1.weight_numerator",
                                 "mlp.act1.weight_denominator", "mlp.fc1.weight", "mlp.fc1.bias",
                                 "mlp.act2.weight_numerator", "mlp.act2.weight_denominator", "mlp.fc2.weight",
                                 "mlp.fc2.bias")]
    keys += ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert set(keys) == set(sd), set(keys) ^ set(sd)
    assert sd["blocks.0.mlp.act1.weight_numerator"].shape == (1, 6)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (4 * dim, dim)
    return {k: sd[k].clone() for k in keys}


@pytest.mark.parametrize("wrapper", ["pth-model", "pth-state_dict-ddp", "pth-ema", "safetensors"])
def test_official_checkpoint_round_trip(tmp_path, wrapper):
    torch.manual_seed(0)
    source = timm.create_model("kat_tiny_patch16_224", depth=3).eval()
    with torch.no_grad():  # trained-looking rationals, not the init values
        for name, p in source.named_parameters():
            if name.endswith(("weight_numerator", "weight_denominator")):
                p.add_(0.05 * torch.randn_like(p))
    state = official_state_dict(source)
    if wrapper == "safetensors":
        path = tmp_path / "kat_tiny.safetensors"
        save_file(state, str(path))
    elif wrapper == "pth-model":
        path = tmp_path / "kat_tiny.pth"
        torch.save({"model": state, "epoch": 299}, path)
    elif wrapper == "pth-ema":  # a training checkpoint: the EMA weights are the ones to evaluate
        path = tmp_path / "kat_tiny.pth"
        torch.save({"state_dict": {k: v + 1 for k, v in state.items()}, "state_dict_ema": state}, path)
    else:
        path = tmp_path / "kat_tiny.pth"
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    loaded = timm.create_model("kat_tiny_patch16_224", depth=3, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)

    resized = timm.create_model("kat_tiny_patch16_224", depth=3, img_size=96, num_classes=10, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path)))
    assert resized.pos_embed.shape == (1, 37, 192) and resized(torch.randn(1, 3, 96, 96)).shape == (1, 10)
    torch.testing.assert_close(resized.blocks[2].mlp.act2.weight_denominator, source.blocks[2].mlp.act2.weight_denominator)


def test_bad_checkpoints_name_the_file_and_keys(tmp_path):
    small = timm.create_model("kat_small", depth=1)
    path = tmp_path / "small.safetensors"
    save_file(small.state_dict(), str(path))
    with pytest.raises(ValueError, match=r"small\.safetensors.*shape mismatch \(17\): blocks\.0\.attn\.proj\.bias \(384,\) vs \(192,\)"):
        timm.create_model("kat_tiny", depth=1, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(ValueError, match=r"small\.safetensors.*missing \(16\): blocks\.1\."):
        timm.create_model("kat_small", depth=2, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"corrupt\.pth: cannot read checkpoint"):
        timm.create_model("kat_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(corrupt)))
    with pytest.raises(ValueError, match=r"nowhere\.pth: no such checkpoint file"):
        timm.create_model("kat_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "nowhere.pth")))


def randomise(model: torch.nn.Module) -> None:
    """Weights at the scale of a trained network (unit-variance pre-activations), not timm's 0.02."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 1 / math.sqrt(module.in_features))
                module.bias.normal_(0, 0.1)


def test_from_vit_gelu_computes_the_vit_function():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=6).eval()
    randomise(vit)
    kat = from_vit(vit.state_dict(), act_init="gelu").eval()
    assert kat.blocks[0].mlp.act1.init == "identity" and kat.blocks[5].mlp.act2.init == "gelu"
    x = torch.randn(512, 3, 64, 64)
    with torch.no_grad():
        expected, actual = vit(x), kat(x)
    relative = ((actual - expected).norm() / expected.norm()).item()
    agreement = (actual.argmax(1) == expected.argmax(1)).float().mean().item()
    assert relative < 5e-2 and agreement >= 0.99, (relative, agreement)
    official = from_vit(vit.state_dict(), act_init="swish").eval()
    with torch.no_grad():
        assert ((official(x[:64]) - expected[:64]).norm() / expected[:64].norm()).item() > relative


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = timm.create_model("kat_tiny", img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_triton_path_equals_reference_path():
    torch.manual_seed(0)
    model = timm.create_model("kat_tiny", img_size=32, depth=2, embed_dim=64, num_heads=2).to(TRITON_DEVICE)
    x = torch.randn(2, 3, 32, 32, device=TRITON_DEVICE)
    with use_backend("reference"):
        expected = model(x)
        expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with use_backend("triton"):
        out = model(x)
        out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for p, g in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5)


def test_kan_is_a_timm_mlp_layer():
    kan = KAN(32, 64, act_layer=torch.nn.GELU, drop=0.0, act_init="gelu", num_groups=4)
    assert kan(torch.randn(3, 5, 32)).shape == (3, 5, 32)
