"""The sampler: greedy images against a plain float64 re-implementation of the official sampler
(hmar.md §7) that reads the official combined state dict only, with deliberate mistakes in that
reference to show the comparison can fail; guidance, seeds and batching; the top-k/top-p filter;
per-scale logits against the teacher-forced forward (VAR's KV cache, HMAR's own-scale attention and
mask branch); schedule and input checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from kzoo.models.hmar import (DEFAULT_MASK_SCHEDULE, KVCache, check_mask_schedule, default_mask_schedule,
                              filter_logits, hmar_mnist, sample, to_official_layout, vqvae_mnist)
from kzoo.models.hmar.vqvae import VAR_PATCH_NUMS

MNIST_PATCH_NUMS = (1, 2, 3, 4, 5, 7)
NO_MASKING = tuple((pn * pn,) for pn in MNIST_PATCH_NUMS)
# Schedules that re-predict whole scales through the mask branch (hmar.md §7, "Schedule semantics":
# only the lengths and the tail sums count), so no confidence ranking is involved.
ONE_MASK_STEP = ((1,), (0, 4), (0, 9), (16,), (25,), (49,))
# Two steps over all of 2x2; three over all of 3x3 and then a step that masks nothing; the last
# scale (no resampling) re-predicted once.
SEVERAL_MASK_STEPS = ((1,), (0, 0, 4), (0, 9, 0), (16,), (0, 25), (0, 49))


# --- models ------------------------------------------------------------------------------------

def _transformer(attention_mode: str = "markov", mask_branch_depth: int = 2, seed: int = 0):
    """The MNIST preset in float64 with weights that make every path matter: VAR's init leaves the
    blocks near-identities, the class embedding small and a fresh mask branch close to its twin."""
    torch.manual_seed(seed)
    model = hmar_mnist(attention_mode=attention_mode, mask_branch_depth=mask_branch_depth).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ada_lin" in name or name.endswith(("q_bias", "v_bias")):
                param.normal_(std=0.05)
            elif name.startswith("mask_blocks.") and param.ndim == 2:
                param.add_(torch.randn_like(param), alpha=0.05)
        model.class_emb.weight.normal_(std=1.0)
        if mask_branch_depth:
            model.mask_embed.weight.normal_(std=0.5)
    return model.double()


def _tokenizer(seed: int = 0):
    """vqvae_mnist in float64 with a codebook of the latent's magnitude and distinct Phi convs."""
    torch.manual_seed(seed)
    vqvae = vqvae_mnist().eval()
    with torch.no_grad():
        vqvae.quantize.embedding.weight.normal_(std=1.0)
        for phi in vqvae.quantize.quant_resi.qresi_ls:
            phi.weight.normal_(std=0.1)
            phi.bias.normal_(std=0.1)
    return vqvae.double()


@pytest.fixture(scope="module")
def hmar():
    return _transformer()


@pytest.fixture(scope="module")
def vqvae():
    return _tokenizer()


LABELS = torch.tensor([3, 7, 0])


# --- the official sampler, written out from hmar.md §7 -------------------------------------------

def _layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _modulation(w, prefix, cond, count):
    """SiLU -> Linear of the condition, viewed (B, 1, count, C) and split in order."""
    dim = w[prefix + "weight"].shape[0] // count
    return (F.silu(cond) @ w[prefix + "weight"].T + w[prefix + "bias"]).view(-1, 1, count, dim).unbind(2)


def _reference_block(w, prefix, x, cond):
    batch, length, dim = x.shape
    heads = w[prefix + "attn.scale_mul_1H11"].shape[1]
    gamma1, gamma2, scale1, scale2, shift1, shift2 = _modulation(w, prefix + "ada_lin.1.", cond, 6)
    a = _layer_norm(x) * (1 + scale1) + shift1
    q_bias, v_bias = w[prefix + "attn.q_bias"], w[prefix + "attn.v_bias"]
    qkv = a @ w[prefix + "attn.mat_qkv.weight"].T + torch.cat((q_bias, torch.zeros_like(q_bias), v_bias))
    q, k, v = qkv.view(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    q = F.normalize(q, dim=-1) * w[prefix + "attn.scale_mul_1H11"].clamp(max=math.log(100)).exp()
    k = F.normalize(k, dim=-1)
    a = ((q @ k.transpose(-1, -2)).softmax(-1) @ v).transpose(1, 2).reshape(batch, length, dim)
    x = x + (a @ w[prefix + "attn.proj.weight"].T + w[prefix + "attn.proj.bias"]) * gamma1
    f = _layer_norm(x) * (1 + scale2) + shift2
    f = F.gelu(f @ w[prefix + "ffn.fc1.weight"].T + w[prefix + "ffn.fc1.bias"], approximate="tanh")
    return x + (f @ w[prefix + "ffn.fc2.weight"].T + w[prefix + "ffn.fc2.bias"]) * gamma2


def _count(w, prefix):
    return len({name[len(prefix):].split(".")[0] for name in w if name.startswith(prefix)})


def _reference_logits(w, x, cond, branch):
    """base_blocks, then ``branch`` ("ns" or "mask") blocks, then that branch's head."""
    for i in range(_count(w, "base_blocks.")):
        x = _reference_block(w, f"base_blocks.{i}.", x, cond)
    for i in range(_count(w, f"{branch}_blocks.")):
        x = _reference_block(w, f"{branch}_blocks.{i}.", x, cond)
    scale, shift = _modulation(w, f"{branch}_head_nm.ada_lin.1.", cond, 2)
    return (_layer_norm(x) * (1 + scale) + shift) @ w[f"{branch}_head.weight"].T + w[f"{branch}_head.bias"]


def _reference_sample(model, vqvae, labels, *, cfg, schedule, guided=True, mistake=None):
    """Greedy images of the official sampler (top_k=1, mask steps unguided), computed in float64
    from ``to_official_layout(model.state_dict())`` and the tokenizer's state dict; only the decoder
    is the tokenizer's own. Every mask step must re-predict a whole scale or nothing.

    ``guided=False`` runs the conditional rows alone. ``mistake`` plants one error: ``phi_always_first``,
    ``no_cfg_ramp``, ``guidance_in_mask_steps``, ``next_scale_branch_in_mask_steps``, ``mask_embed_ignored``.
    """
    w = {name: t.detach().double() for name, t in to_official_layout(model.state_dict()).items()}
    q = {name: t.detach().double() for name, t in vqvae.state_dict().items()}
    patch_nums, num_classes = model.patch_nums, w["class_emb.weight"].shape[0] - 1
    num_scales, side, batch = len(patch_nums), patch_nums[-1], labels.shape[0]
    codebook = q["quantize.embedding.weight"]
    ticks = torch.linspace(1 / 12, 11 / 12, 4, dtype=torch.float64)

    def phi(z, k):
        index = int((ticks - k / (num_scales - 1)).abs().argmin())
        if mistake == "phi_always_first":
            index = 0
        conv = F.conv2d(z, q[f"quantize.quant_resi.qresi_ls.{index}.weight"],
                        q[f"quantize.quant_resi.qresi_ls.{index}.bias"], padding=1)
        return z * 0.5 + 0.5 * conv

    def up_and_phi(h, k):
        if k < num_scales - 1:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        return phi(h, k)

    def area(z, pn):
        return F.interpolate(z, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)

    def word(tokens):
        return tokens @ w["word_embed.weight"].T

    def doubled(x):
        return torch.cat((x, x)) if guided else x

    def guide(logits, t):
        if not guided:
            return logits
        return (1 + t) * logits[:batch] - t * logits[batch:]

    rows = torch.cat((labels, torch.full_like(labels, num_classes))) if guided else labels
    cond = w["class_emb.weight"][rows]
    f_hat = torch.zeros(batch, codebook.shape[1], side, side, dtype=torch.float64)
    begin = 0
    for k, pn in enumerate(patch_nums):
        lvl_pos = w["lvl_embed.weight"][k] + w["pos_1LC"][0, begin:begin + pn * pn]
        begin += pn * pn
        t = cfg if mistake == "no_cfg_ramp" else cfg * k / (num_scales - 1)
        if k == 0:
            x = cond[:, None] + w["pos_start"] + lvl_pos
        else:
            x = doubled(word(area(f_hat, pn)) + w["word_embed_bias"] + lvl_pos)
        indices = guide(_reference_logits(w, x, cond, "ns"), t).argmax(-1)
        entry = schedule[k]
        # Mask steps run when the entry masks anything: first its sum(entry[1:]) least confident
        # positions, here all of them, so no ranking is needed.
        steps = range(1, len(entry)) if sum(entry[1:]) > 0 else range(0)
        assert sum(entry[1:]) in (0, pn * pn), "the reference re-predicts whole scales only"
        masked = torch.ones(batch, pn * pn, dtype=torch.bool)
        for step in steps:
            h = codebook[indices].view(batch, pn, pn, -1).permute(0, 3, 1, 2)
            own = word(area(up_and_phi(h, k), pn))
            if mistake != "mask_embed_ignored":
                own = torch.where(masked[..., None], w["mask_embed.weight"][0], own)
            x = doubled(word(area(f_hat, pn)) + own + w["word_embed_bias"] + lvl_pos)
            branch = "ns" if mistake == "next_scale_branch_in_mask_steps" else "mask"
            t_mask = t if mistake == "guidance_in_mask_steps" else 0.0
            redrawn = guide(_reference_logits(w, x, cond, branch), t_mask).argmax(-1)
            indices = torch.where(masked, redrawn, indices)
            if step + 1 < len(entry):
                # Keep the sum(entry[step + 1:]) least confident masked positions: all or none.
                keep = sum(entry[step + 1:])
                assert keep in (0, pn * pn), "the reference re-predicts whole scales only"
                masked = masked & (keep > 0)
        h = codebook[indices].view(batch, pn, pn, -1).permute(0, 3, 1, 2)
        f_hat = f_hat + up_and_phi(h, k)
    with torch.no_grad():
        image = vqvae.decoder(F.conv2d(f_hat, q["post_quant_conv.weight"], q["post_quant_conv.bias"], padding=1))
    return (image.clamp(-1, 1) + 1) / 2


def _greedy(model, vqvae, labels, **kwargs):
    return sample(model, vqvae, labels, top_k=1, top_p=0.0, **kwargs)


def _assert_differ(a, b):
    assert (a.double() - b.double()).abs().max() > 1e-3


# --- fidelity to the official sampler -----------------------------------------------------------

@pytest.mark.parametrize("schedule", [ONE_MASK_STEP, SEVERAL_MASK_STEPS], ids=["one_step", "several_steps"])
@pytest.mark.parametrize("cfg", [0.0, 2.5])
def test_greedy_images_match_the_official_sampler(hmar, vqvae, schedule, cfg):
    """Greedy decoding with mask_cfg=0 gives the official sampler's images to rounding: the
    guidance and its ramp, both branches, the mask input, the schedule, Phi_k and the decode."""
    images = _greedy(hmar, vqvae, LABELS, cfg=cfg, mask_schedule=schedule, mask_cfg=0.0)
    expected = _reference_sample(hmar, vqvae, LABELS, cfg=cfg, schedule=schedule)
    assert images.shape == (3, 1, 28, 28) and images.dtype == torch.float32
    torch.testing.assert_close(images.double(), expected, rtol=0, atol=1e-6)
    # Not a degenerate image: the decoded values spread, unclamped.
    assert expected.std() > 1e-2 and ((expected > 0) & (expected < 1)).float().mean() > 0.5


@pytest.fixture(scope="module")
def guided_images(hmar, vqvae):
    return _greedy(hmar, vqvae, LABELS, cfg=2.5, mask_schedule=SEVERAL_MASK_STEPS, mask_cfg=0.0)


@pytest.mark.parametrize("mistake", ["phi_always_first", "no_cfg_ramp", "guidance_in_mask_steps",
                                     "next_scale_branch_in_mask_steps", "mask_embed_ignored"])
def test_the_fidelity_comparison_catches_a_wrong_reference(hmar, vqvae, guided_images, mistake):
    """Each planted mistake in the reference changes the images well beyond the tolerance, so the
    comparison above sees the Phi selection, the ramp, unguided mask steps and the mask branch."""
    wrong = _reference_sample(hmar, vqvae, LABELS, cfg=2.5, schedule=SEVERAL_MASK_STEPS, mistake=mistake)
    _assert_differ(guided_images, wrong)


def test_the_fidelity_comparison_catches_skipped_mask_steps(hmar, vqvae, guided_images):
    """Without the schedule's mask steps the images differ: the mask branch's re-predictions count."""
    _assert_differ(guided_images, _reference_sample(hmar, vqvae, LABELS, cfg=2.5, schedule=NO_MASKING))


def test_default_mask_cfg_guides_the_mask_steps_with_the_scale_ramp(hmar, vqvae, guided_images):
    """mask_cfg=None (kzoo's default) guides the mask steps like the scale's next-scale pass;
    a mask_cfg of its own ramps the same way."""
    default = _greedy(hmar, vqvae, LABELS, cfg=2.5, mask_schedule=SEVERAL_MASK_STEPS)
    expected = _reference_sample(hmar, vqvae, LABELS, cfg=2.5, schedule=SEVERAL_MASK_STEPS,
                                 mistake="guidance_in_mask_steps")
    torch.testing.assert_close(default.double(), expected, rtol=0, atol=1e-6)
    _assert_differ(default, guided_images)
    explicit = _greedy(hmar, vqvae, LABELS, cfg=2.5, mask_schedule=SEVERAL_MASK_STEPS, mask_cfg=2.5)
    torch.testing.assert_close(explicit, default, rtol=0, atol=1e-6)


def test_cfg_zero_is_unguided(hmar, vqvae):
    """cfg=0 gives the images of the conditional rows alone (the null class has no say), and
    differs from a guided run."""
    unguided = _greedy(hmar, vqvae, LABELS, cfg=0.0, mask_schedule=SEVERAL_MASK_STEPS)
    expected = _reference_sample(hmar, vqvae, LABELS, cfg=0.0, schedule=SEVERAL_MASK_STEPS, guided=False)
    torch.testing.assert_close(unguided.double(), expected, rtol=0, atol=1e-6)
    _assert_differ(unguided, _greedy(hmar, vqvae, LABELS, cfg=3.0, mask_schedule=SEVERAL_MASK_STEPS))
    # Guidance in the mask steps alone doubles the batch and changes the images.
    _assert_differ(unguided, _greedy(hmar, vqvae, LABELS, cfg=0.0, mask_schedule=SEVERAL_MASK_STEPS, mask_cfg=3.0))


# --- randomness and batching ----------------------------------------------------------------------

def test_samples_depend_on_the_seed_and_their_index_only(hmar, vqvae):
    """Same seed, same images; another seed, other images; two samples of one class in a batch
    differ; a batch split with first_index gives each sample's images unchanged."""
    labels = torch.tensor([3, 3, 5, 1])
    kwargs = dict(cfg=1.5, top_k=0, top_p=0.0, seed=11)
    images = sample(hmar, vqvae, labels, **kwargs)
    torch.testing.assert_close(sample(hmar, vqvae, labels, **kwargs), images, rtol=0, atol=0)
    _assert_differ(images, sample(hmar, vqvae, labels, **dict(kwargs, seed=12)))
    _assert_differ(images[0], images[1])
    head = sample(hmar, vqvae, labels[:1], **kwargs)
    tail = sample(hmar, vqvae, labels[1:], first_index=1, **kwargs)
    torch.testing.assert_close(torch.cat((head, tail)), images, rtol=0, atol=1e-6)


def test_default_schedule_refines_the_small_scales(hmar, vqvae):
    """A model with a mask branch samples with the default schedule (ranked mask steps) unless
    told otherwise, and that changes the images against no masking."""
    kwargs = dict(cfg=1.5, top_k=0, seed=2)
    images = sample(hmar, vqvae, LABELS, **kwargs)
    assert images.shape == (3, 1, 28, 28) and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    explicit = sample(hmar, vqvae, LABELS, mask_schedule=default_mask_schedule(MNIST_PATCH_NUMS), **kwargs)
    torch.testing.assert_close(explicit, images, rtol=0, atol=0)
    _assert_differ(images, sample(hmar, vqvae, LABELS, mask_schedule=NO_MASKING, **kwargs))


# --- the top-k / top-p filter -------------------------------------------------------------------

def _filtered_by_hand(row: list[float], top_k: int, top_p: float) -> list[float]:
    """VAR's sample_with_top_k_top_p_ for one row: top-k keeps the values >= the k-th largest;
    top-p drops, in ascending order, the tokens whose cumulative softmax is <= 1 - top_p, never the
    most likely one."""
    row = list(row)
    if top_k > 0:
        kth = sorted(row, reverse=True)[min(top_k, len(row)) - 1]
        row = [v if v >= kth else -math.inf for v in row]
    if top_p > 0:
        order = sorted(range(len(row)), key=lambda i: row[i])
        top = max(row)
        weights = [math.exp(row[i] - top) if row[i] > -math.inf else 0.0 for i in order]
        total, cumulative = sum(weights), 0.0
        for position, (i, weight) in enumerate(zip(order, weights)):
            cumulative += weight / total
            if cumulative <= 1 - top_p and position < len(order) - 1:
                row[i] = -math.inf
    return row


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (1, 0.0), (5, 0.0), (40, 0.0), (60, 0.0), (0, 0.5),
                                         (0, 0.9), (0, 1e-4), (7, 0.8), (40, 0.99)])
def test_filter_logits_follows_var_semantics_in_place(top_k, top_p):
    """The filtered logits equal a plain per-row re-computation, ties at the k-th value included
    (top-k alone: under top-p, which of tied tokens goes first is the sort's choice), and the
    filter works in place."""
    generator = torch.Generator().manual_seed(top_k + int(1000 * top_p))
    logits = torch.randn(2, 3, 40, generator=generator, dtype=torch.float64) * 3
    if top_p == 0:
        logits[0, 0, :6] = logits[0, 0, :6].max()  # ties, at the top and at the k-th value
    expected = torch.tensor([_filtered_by_hand(row, top_k, top_p) for row in logits.reshape(-1, 40).tolist()],
                            dtype=torch.float64).view_as(logits)
    result = filter_logits(logits, top_k, top_p)
    assert result is logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert torch.isfinite(logits).any(-1).all()
    if top_k == 0 and top_p == 0:
        assert torch.isfinite(logits).all()


# --- per-scale logits against the teacher-forced forward -----------------------------------------

def _random_tokens(vqvae, batch=2, seed=4):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    indices = [torch.randint(0, vqvae.vocab_size, (batch, pn * pn), generator=generator) for pn in MNIST_PATCH_NUMS]
    return labels, indices


def _scale_input(x, model, k):
    """Scale k's rows of a (B, L - 1, Cvae) teacher-forcing input."""
    begin, end = model.scale_spans[k]
    return x[:, begin - 1:end - 1]


@torch.no_grad()
def test_var_mode_per_scale_logits_with_kv_caches_match_the_forward(vqvae):
    """VAR mode: scale by scale, with one KVCache per block, gives the teacher-forced logits;
    without the caches (each scale alone) the later scales' logits differ."""
    model = _transformer("block_causal", mask_branch_depth=0)
    labels, indices = _random_tokens(vqvae)
    x = vqvae.idx_to_var_input(indices)
    full = model(labels, x)
    cond = model.class_emb(labels)
    caches = [KVCache() for _ in model.blocks]
    for k in range(len(MNIST_PATCH_NUMS)):
        begin, end = model.scale_spans[k]
        scale_x = model.embed_scale(k, cond, None if k == 0 else _scale_input(x, model, k))
        torch.testing.assert_close(model.scale_logits(scale_x, cond, "next", caches), full[:, begin:end],
                                   rtol=1e-9, atol=1e-9)
        if k > 0:
            _assert_differ(model.scale_logits(scale_x, cond, "next"), full[:, begin:end])
    assert caches[0].keys.shape[2] == model.num_tokens


@torch.no_grad()
def test_markov_per_scale_logits_match_the_forward_for_both_branches(hmar, vqvae):
    """HMAR: a scale's own tokens alone give the forward's logits of that scale, through the
    next-scale branch and, with the scale's own tokens and masked positions, the mask branch."""
    labels, indices = _random_tokens(vqvae)
    x = vqvae.idx_to_var_input(indices)
    own = vqvae.idx_to_mask_input(indices)
    masked = torch.rand(2, hmar.num_tokens, generator=torch.Generator().manual_seed(5)) < 0.5
    masked[:, 0] = False
    full_next, full_mask = hmar(labels, x), hmar(labels, x, own, masked)
    cond = hmar.class_emb(labels)
    for k in range(len(MNIST_PATCH_NUMS)):
        begin, end = hmar.scale_spans[k]
        if k == 0:
            scale_x = scale_mask_x = hmar.embed_scale(0, cond)
        else:
            scale_x = hmar.embed_scale(k, cond, _scale_input(x, hmar, k))
            scale_mask_x = hmar.embed_scale(k, cond, _scale_input(x, hmar, k), _scale_input(own, hmar, k),
                                            masked[:, begin:end])
        torch.testing.assert_close(hmar.scale_logits(scale_x, cond, "next"), full_next[:, begin:end],
                                   rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(hmar.scale_logits(scale_mask_x, cond, "mask"), full_mask[:, begin:end],
                                   rtol=1e-9, atol=1e-9)
    _assert_differ(full_next, full_mask)


# --- schedules and input checks -----------------------------------------------------------------

def test_default_mask_schedule_values():
    """The official default's 2x2 and 3x3 entries, one pass elsewhere."""
    assert default_mask_schedule(MNIST_PATCH_NUMS) == ((1,), (1, 3), (1, 1, 2, 5), (16,), (25,), (49,))
    assert default_mask_schedule(VAR_PATCH_NUMS) == DEFAULT_MASK_SCHEDULE
    assert check_mask_schedule([[1], [0, 4], [9], [16], [25], [49]], MNIST_PATCH_NUMS) == (
        (1,), (0, 4), (9,), (16,), (25,), (49,))


@pytest.mark.parametrize("schedule,message", [
    (NO_MASKING[:-1], "one entry per scale"),
    ("16", "one entry per scale"),
    (((1, 1),) + NO_MASKING[1:], "entry 0"),
    (((1,), (0, 5)) + NO_MASKING[2:], "masks 5 tokens of a 2x2"),
    (((1,), (1, -1)) + NO_MASKING[2:], "entry 1"),
    (((1,), (1, 2.0)) + NO_MASKING[2:], "entry 1"),
    (((1,), (True, 1)) + NO_MASKING[2:], "entry 1"),
    (((1,), ()) + NO_MASKING[2:], "entry 1"),
    (((1,), 4) + NO_MASKING[2:], "entry 1"),
])
def test_check_mask_schedule_rejects_bad_schedules_in_one_line(schedule, message):
    with pytest.raises(ValueError, match=message) as error:
        check_mask_schedule(schedule, MNIST_PATCH_NUMS)
    assert "\n" not in str(error.value)


def test_sample_rejects_bad_inputs_in_one_line(hmar, vqvae):
    """Labels outside [0, num_classes) (the null class included), a masking schedule for a model
    without a mask branch, a bad schedule and a tokenizer that does not fit."""
    bad_labels = [torch.tensor([10]), torch.tensor([-1]), torch.tensor([1.0]), torch.tensor([[1]])]
    for labels in bad_labels:
        with pytest.raises(ValueError, match="labels") as error:
            sample(hmar, vqvae, labels)
        assert "\n" not in str(error.value)
    plain = _transformer(mask_branch_depth=0)
    with pytest.raises(ValueError, match="no mask branch") as error:
        sample(plain, vqvae, LABELS[:1], mask_schedule=ONE_MASK_STEP)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="one entry per scale"):
        sample(hmar, vqvae, LABELS[:1], mask_schedule=NO_MASKING[:3])
    with pytest.raises(ValueError, match="does not fit") as error:
        sample(hmar, vqvae_mnist(patch_nums=(1, 2, 3, 4, 6, 8)), LABELS[:1])
    assert "\n" not in str(error.value)
