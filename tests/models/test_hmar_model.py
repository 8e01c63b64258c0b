"""The next-scale transformer: the official key layout, loading, which scales each scale's logits
depend on (HMAR against VAR), a float64 re-computation with dense masked attention, gradients,
label dropout and input checks."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kzoo.kernels import scale_ranges, use_backend
from kzoo.models.hmar.hmar import (NextScaleTransformer, from_official_layout, hmar_d16, hmar_mnist,
                                   is_combined_layout, load_official, to_official_layout, var_d16)
from tests.conftest import TRITON_DEVICE

# The var_d16 and hmar_d16 entries of shared/reference/hmar_official_keys.json: built from the
# official classes.
KEYS_JSON = Path(__file__).resolve().parent / "data" / "var_d16_official_keys.json"
MNIST_PATCH_NUMS = (1, 2, 3, 4, 5, 7)
# Kept by the official model as a buffer; kzoo's mask is the range tensors.
OFFICIAL_MASK_KEY = "attn_bias_for_masking"


def _official_entries(layout: str = "var_d16") -> dict:
    table = json.loads(KEYS_JSON.read_text())
    return next(value for key, value in table.items() if key.startswith(layout))


def _tiny_model(attention_mode: str = "markov", seed: int = 0, **kwargs) -> NextScaleTransformer:
    """The MNIST preset with weights large enough that every path matters to the logits (VAR's
    init makes the blocks near-identities)."""
    torch.manual_seed(seed)
    model = hmar_mnist(attention_mode=attention_mode, **kwargs).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("ada_lin.1.weight") or name.endswith("_bias"):
                param.normal_(std=0.05)
    return model


def _inputs(model: NextScaleTransformer, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, model.num_classes, (batch,), generator=generator)
    x = torch.randn(batch, model.num_tokens - 1, model.vae_channels, generator=generator)
    return labels, x


def _scale_slices(patch_nums) -> list[slice]:
    ends = torch.tensor([pn * pn for pn in patch_nums]).cumsum(0).tolist()
    return [slice(end - pn * pn, end) for end, pn in zip(ends, patch_nums)]


def _reference_logits(model: NextScaleTransformer, labels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The decoder written out plainly in float64 from hmar.md sections 1.2 and 7, with torch's
    dense attention under a boolean mask made from the ranges."""
    p = {name: t.detach().double() for name, t in model.state_dict().items()}
    dim, heads = model.embed_dim, len(p["blocks.0.attn.scale_mul_1H11"][0])
    kv_start, kv_end = scale_ranges(model.patch_nums, model.attention_mode)
    keys = torch.arange(model.num_tokens)
    allowed = (keys[None, :] >= kv_start[:, None]) & (keys[None, :] < kv_end[:, None])

    def modulation(cond, weight, bias, count):
        return (F.silu(cond) @ weight.T + bias).view(-1, 1, count, dim).unbind(2)

    def layer_norm(h):
        return F.layer_norm(h, (dim,), eps=1e-6)

    cond = p["class_emb.weight"][labels]
    start = cond[:, None] + p["pos_start"]
    words = x.double() @ p["word_embed.weight"].T + p["word_embed.bias"]
    levels = torch.cat([torch.full((pn * pn,), k) for k, pn in enumerate(model.patch_nums)])
    h = torch.cat((start, words), 1) + p["lvl_embed.weight"][levels] + p["pos_1LC"]
    batch, length = h.shape[:2]
    for i in range(model.depth):
        b = f"blocks.{i}."
        g1, g2, s1, s2, t1, t2 = modulation(cond, p[b + "ada_lin.1.weight"], p[b + "ada_lin.1.bias"], 6)
        a = layer_norm(h) * (1 + s1) + t1
        qkv_bias = torch.cat((p[b + "attn.q_bias"], torch.zeros(dim, dtype=torch.float64), p[b + "attn.v_bias"]))
        qkv = (a @ p[b + "attn.mat_qkv.weight"].T + qkv_bias).view(batch, length, 3, heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        gain = p[b + "attn.scale_mul_1H11"].clamp_max(math.log(100)).exp()
        q, k = F.normalize(q, dim=-1) * gain, F.normalize(k, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0)
        a = a.transpose(1, 2).reshape(batch, length, dim) @ p[b + "attn.proj.weight"].T + p[b + "attn.proj.bias"]
        h = h + a * g1
        f = layer_norm(h) * (1 + s2) + t2
        f = F.gelu(f @ p[b + "ffn.fc1.weight"].T + p[b + "ffn.fc1.bias"], approximate="tanh")
        h = h + (f @ p[b + "ffn.fc2.weight"].T + p[b + "ffn.fc2.bias"]) * g2
    scale, shift = modulation(cond, p["head_nm.ada_lin.1.weight"], p["head_nm.ada_lin.1.bias"], 2)
    return (layer_norm(h) * (1 + scale) + shift) @ p["head.weight"].T + p["head.bias"]


# --- layout and loading ------------------------------------------------------------------------

@pytest.mark.parametrize("entry_point", [var_d16, hmar_d16])
def test_d16_state_dict_matches_the_official_keys_and_shapes(entry_point):
    with torch.device("meta"):
        model = entry_point()
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    official = {name: entry["shape"] for name, entry in _official_entries().items()}
    assert set(official) - set(ours) == {OFFICIAL_MASK_KEY}
    assert ours == {name: shape for name, shape in official.items() if name != OFFICIAL_MASK_KEY}
    official_params = {name for name, entry in _official_entries().items() if entry["kind"] == "param"}
    assert {name for name, _ in model.named_parameters()} == official_params
    assert sum(p.numel() for p in model.parameters()) == 310_283_520


def test_combined_d16_model_matches_the_official_hmar_keys_and_shapes():
    """hmar_d16 with an 8-block mask branch is the official combined module, key for key, once
    renamed; and the renaming round-trips."""
    official = _official_entries("hmar_d16")
    with torch.device("meta"):
        model = hmar_d16(mask_branch_depth=8)
    exported = to_official_layout(model.state_dict())
    assert {name: list(t.shape) for name, t in exported.items()} == {
        name: entry["shape"] for name, entry in official.items() if name != OFFICIAL_MASK_KEY}
    assert sum(p.numel() for p in model.parameters()) == 467_691_904
    combined = {name: torch.empty(entry["shape"], device="meta") for name, entry in official.items()}
    assert is_combined_layout(combined)
    ours = from_official_layout(combined)
    assert ours["blocks.8.attn.mat_qkv.weight"] is combined["ns_blocks.0.attn.mat_qkv.weight"]
    assert ours["head.weight"] is combined["ns_head.weight"]
    assert ours["word_embed.bias"] is combined["word_embed_bias"]
    assert ours["mask_blocks.3.ffn.fc1.weight"] is combined["mask_blocks.3.ffn.fc1.weight"]
    assert to_official_layout({k: v for k, v in ours.items() if k != OFFICIAL_MASK_KEY}).keys() == \
        {k for k in combined if k != OFFICIAL_MASK_KEY}


def _write_random_checkpoint(model: NextScaleTransformer, path: Path, with_buffers: bool) -> dict:
    torch.manual_seed(5)
    state_dict = {name: torch.randn(t.shape).to(t.dtype) if t.is_floating_point() else t.clone()
                  for name, t in model.state_dict().items()}
    buffers = {name for name, _ in model.named_buffers()}
    if with_buffers:
        state_dict[OFFICIAL_MASK_KEY] = torch.zeros(1, 1, model.num_tokens, model.num_tokens)
    else:
        state_dict = {name: t for name, t in state_dict.items() if name not in buffers}
    torch.save(state_dict, path)
    return state_dict


@pytest.mark.parametrize("with_buffers", [True, False])
def test_load_official_round_trips_a_file_of_the_official_layout(tmp_path, with_buffers):
    source = hmar_mnist()
    path = tmp_path / "var_tiny.pth"
    written = _write_random_checkpoint(source, path, with_buffers)
    model = load_official(path, patch_nums=MNIST_PATCH_NUMS)
    assert (model.depth, model.embed_dim, model.num_classes, model.vocab_size, model.vae_channels) == (
        source.depth, source.embed_dim, source.num_classes, source.vocab_size, source.vae_channels)
    assert model.attention_mode == "block_causal"
    loaded = model.state_dict()
    for name, tensor in written.items():
        if name != OFFICIAL_MASK_KEY:
            assert torch.equal(loaded[name], tensor), name
    markov = load_official(str(path), patch_nums=MNIST_PATCH_NUMS, attention_mode="markov")
    assert markov.attention_mode == "markov" and torch.equal(markov.head.weight, written["head.weight"])


@torch.no_grad()
def test_load_official_loads_a_combined_file_with_both_branches(tmp_path):
    """A combined file made from a model, its last two blocks as ns_blocks and a random mask branch,
    loads back: the same next-scale logits, the mask branch's weights, and the same file again
    when written back in the official layout."""
    source = _tiny_model("markov")
    num_base = source.depth - 2
    combined = {"word_embed_bias": source.word_embed.bias, "mask_embed.weight": torch.randn(1, source.embed_dim)}
    for name, tensor in source.state_dict().items():
        if name.startswith("blocks."):
            index, rest = name.removeprefix("blocks.").split(".", 1)
            branch = "base_blocks" if int(index) < num_base else "ns_blocks"
            number = int(index) if int(index) < num_base else int(index) - num_base
            combined[f"{branch}.{number}.{rest}"] = tensor
            if branch == "ns_blocks":
                combined[f"mask_blocks.{number}.{rest}"] = torch.randn_like(tensor.float()).to(tensor.dtype)
        elif name.startswith("head"):
            combined["ns_" + name] = tensor
            combined["mask_" + name] = torch.randn_like(tensor)
        elif name != "word_embed.bias":
            combined[name] = tensor
    path = tmp_path / "hmar-tiny.pth"
    torch.save(combined, path)
    model = load_official(path, patch_nums=MNIST_PATCH_NUMS).eval()
    assert model.attention_mode == "markov" and model.mask_branch_depth == 2
    labels, x = _inputs(model)
    torch.testing.assert_close(model(labels, x), source(labels, x), rtol=0, atol=0)
    exported = to_official_layout(model.state_dict())
    assert exported.keys() == combined.keys()
    for name, tensor in combined.items():
        assert torch.equal(exported[name], tensor), name


def test_load_official_rejects_misfits_in_one_line(tmp_path):
    source = hmar_mnist()
    path = tmp_path / "broken.pth"
    state_dict = _write_random_checkpoint(source, path, with_buffers=False)
    del state_dict["blocks.1.ffn.fc1.bias"]
    state_dict["blocks.0.attn.proj.weight"] = torch.zeros(3, 3)
    torch.save(state_dict, path)
    with pytest.raises(ValueError) as error:
        load_official(path, patch_nums=MNIST_PATCH_NUMS)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "blocks.1.ffn.fc1.bias" in message and "blocks.0.attn.proj.weight" in message

    foreign = tmp_path / "vae.pth"
    torch.save({"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)}, foreign)
    with pytest.raises(ValueError, match="not a VAR/HMAR next-scale checkpoint") as error:
        load_official(foreign)
    assert "\n" not in str(error.value) and str(foreign) in str(error.value)
    with pytest.raises(ValueError, match="no such weights file"):
        load_official(tmp_path / "missing.pth")


# --- attention layout --------------------------------------------------------------------------

def _perturbed(x: torch.Tensor, patch_nums, scales) -> torch.Tensor:
    """x with the teacher-forcing inputs of ``scales`` (all > 0) replaced by other values."""
    x = x.clone()
    for k in scales:
        span = _scale_slices(patch_nums)[k]
        x[:, span.start - 1:span.stop - 1] = torch.randn_like(x[:, span.start - 1:span.stop - 1])
    return x


@torch.no_grad()
def test_markov_logits_of_a_scale_depend_on_its_own_input_only():
    model = _tiny_model("markov")
    labels, x = _inputs(model)
    logits = model(labels, x)
    slices = _scale_slices(MNIST_PATCH_NUMS)
    for k, span in enumerate(slices):
        others = [j for j in range(1, len(slices)) if j != k]
        changed = model(labels, _perturbed(x, MNIST_PATCH_NUMS, others))
        torch.testing.assert_close(changed[:, span], logits[:, span], rtol=0, atol=1e-6)
        if k > 0:
            assert not torch.allclose(model(labels, _perturbed(x, MNIST_PATCH_NUMS, [k]))[:, span], logits[:, span])


@torch.no_grad()
def test_block_causal_logits_depend_on_earlier_scales_and_not_later():
    model = _tiny_model("block_causal")
    labels, x = _inputs(model)
    logits = model(labels, x)
    slices = _scale_slices(MNIST_PATCH_NUMS)
    for k, span in enumerate(slices):
        later = list(range(k + 1, len(slices)))
        if later:
            changed = model(labels, _perturbed(x, MNIST_PATCH_NUMS, later))
            torch.testing.assert_close(changed[:, span], logits[:, span], rtol=0, atol=1e-6)
        if k > 1:
            changed = model(labels, _perturbed(x, MNIST_PATCH_NUMS, [1]))
            assert not torch.allclose(changed[:, span], logits[:, span])


@pytest.mark.parametrize("attention_mode", ["markov", "block_causal"])
@torch.no_grad()
def test_forward_matches_a_float64_recomputation_with_dense_masked_attention(attention_mode):
    model = _tiny_model(attention_mode).double()
    labels, x = _inputs(model, batch=3)
    torch.testing.assert_close(model(labels, x.double()), _reference_logits(model, labels, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("attention_mode", ["markov", "block_causal"])
def test_triton_and_cpu_paths_give_the_same_logits_and_gradients(attention_mode):
    """The Triton kernels (the interpreter here, the GPU where there is one) and the CPU path run the
    same one-block model: logits and the gradients of every parameter agree, in float32."""
    results = {}
    for backend, device in (("auto", "cpu"), ("triton", TRITON_DEVICE)):
        model = _tiny_model(attention_mode, depth=1).to(device)
        labels, x = (t.to(device) for t in _inputs(model, batch=1))
        with use_backend(backend):
            logits = model(labels, x)
            logits.square().mean().backward()
        results[backend] = (logits.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()})
    (cpu_logits, cpu_grads), (triton_logits, triton_grads) = results["auto"], results["triton"]
    torch.testing.assert_close(triton_logits, cpu_logits, rtol=1e-4, atol=1e-5)
    for name, grad in cpu_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(triton_grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)


# --- training behaviour ------------------------------------------------------------------------

def test_gradients_reach_every_parameter():
    model = _tiny_model("markov").train()
    labels, x = _inputs(model)
    logits = model(labels, x)
    targets = torch.randint(0, model.vocab_size, logits.shape[:2])
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent


@torch.no_grad()
def test_label_dropout_uses_the_null_class_and_the_global_generator():
    model = _tiny_model("markov", cond_drop_rate=1.0).train()
    labels, x = _inputs(model)
    torch.testing.assert_close(model(labels, x), model((labels + 1) % model.num_classes, x), rtol=0, atol=0)

    model.cond_drop_rate = 0.5
    labels, x = _inputs(model, batch=8)
    torch.manual_seed(3)
    logits = model(labels, x)
    torch.manual_seed(3)
    dropped = torch.rand(8) < 0.5
    assert 0 < int(dropped.sum()) < 8
    expected = model.eval()(torch.where(dropped, model.num_classes, labels), x)
    torch.testing.assert_close(logits, expected)


def test_bad_inputs_get_one_line_errors():
    model = _tiny_model("markov")
    labels, x = _inputs(model)
    bad_calls = [
        (labels, x[:, :-1]),  # wrong L
        (labels, x[..., :-1]),  # wrong Cvae
        (labels[:1], x),  # batch sizes differ
        (labels.float(), x),  # labels not integers
    ]
    for bad_labels, bad_x in bad_calls:
        with pytest.raises(ValueError) as error:
            model(bad_labels, bad_x)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="attention_mode"):
        hmar_mnist(attention_mode="causal")
