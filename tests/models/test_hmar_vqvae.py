"""The multi-scale residual VQ-VAE: quantization structure against plain float64 re-computations,
the teacher-forcing input by hand, losses, gradients, input checks and the official key layout."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kzoo.models.hmar import VQVAE, load_official, phi_index, vqvae_f16_4096, vqvae_mnist

# The VQ-VAE entry of shared/reference/hmar_official_keys.json: built from the official classes.
KEYS_JSON = Path(__file__).resolve().parent / "data" / "vqvae_official_keys.json"
MNIST_PHIS = [0, 0, 1, 2, 3, 3]  # ticks (1, 4, 7, 10)/12 against k/5 for k = 0..5


def _official_entries() -> dict:
    table = json.loads(KEYS_JSON.read_text())
    return next(value for key, value in table.items() if key.startswith("vae_ch160v4096z32"))


def _mnist_model(seed: int = 0, **kwargs) -> VQVAE:
    torch.manual_seed(seed)
    model = vqvae_mnist(**kwargs).eval()
    # Codes of the latent's magnitude, so every scale picks varied codes and the checks see them.
    torch.nn.init.normal_(model.quantize.embedding.weight, std=0.5)
    return model


def _images(batch: int, side: int = 28, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 1, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _upsampled_codes_f64(model: VQVAE, indices, phis) -> list[torch.Tensor]:
    """Each scale's contribution to f_hat, recomputed plainly in float64."""
    codebook = model.quantize.embedding.weight.detach().double()
    side = model.patch_nums[-1]
    contributions = []
    for k, (idx, pn) in enumerate(zip(indices, model.patch_nums)):
        h = codebook[idx].reshape(idx.shape[0], pn, pn, -1).permute(0, 3, 1, 2)
        if pn != side:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        conv = model.quantize.quant_resi.qresi_ls[phis[k]]
        h = 0.5 * h + 0.5 * F.conv2d(h, conv.weight.detach().double(), conv.bias.detach().double(), padding=1)
        contributions.append(h)
    return contributions


def test_phi_selection_follows_nearest_tick():
    # hmar.md §7: ticks linspace(1/12, 11/12, 4), nearest to k/(K-1).
    assert [phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(k, 6, 4) for k in range(6)] == MNIST_PHIS
    model = _mnist_model()
    assert [model.quantize.phi(k) for k in range(6)] == [model.quantize.quant_resi.qresi_ls[i] for i in MNIST_PHIS]


@pytest.mark.parametrize("batch", [1, 3])
def test_tokens_decode_to_forward_reconstruction(batch):
    model = _mnist_model()
    x = _images(batch)
    with torch.no_grad():
        out = model(x)
        indices = model.img_to_idx(x)
        image = model.idx_to_img(indices)
    assert [tuple(i.shape) for i in indices] == [(batch, pn * pn) for pn in model.patch_nums]
    assert all(i.dtype == torch.long for i in indices)
    assert all(torch.equal(a, b) for a, b in zip(indices, out.indices))
    assert image.shape == x.shape and image.abs().max() <= 1
    torch.testing.assert_close(image, out.reconstruction.clamp(-1, 1), atol=1e-4, rtol=0)


def test_residual_structure_against_float64():
    model = _mnist_model()
    x = _images(2)
    with torch.no_grad():
        f = model.encode(x)
        f_hat, indices, _, _ = model.quantize(f)
    contributions = _upsampled_codes_f64(model, indices, MNIST_PHIS)
    torch.testing.assert_close(f_hat.double(), sum(contributions), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.idx_to_fhat(indices).double(), sum(contributions), atol=1e-5, rtol=1e-5)
    # Each scale picks the code nearest to the area-downsampled residual of the earlier scales.
    codebook = model.quantize.embedding.weight.detach().double()
    residual = f.double()
    for k, pn in enumerate(model.patch_nums):
        rest = F.adaptive_avg_pool2d(residual, pn).permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
        distance = torch.cdist(rest, codebook).square()
        chosen = distance.gather(1, indices[k].reshape(-1, 1)).squeeze(1)
        assert torch.all(chosen <= distance.min(1).values + 1e-4), f"scale {k} did not pick its nearest code"
        residual = residual - contributions[k]
    assert len(set(torch.cat(indices, 1).flatten().tolist())) > 5


def test_losses_by_hand():
    model = _mnist_model()
    x = _images(3)
    with torch.no_grad():
        out = model(x)
        f = model.encode(x).double()
    partial_sums = torch.cumsum(torch.stack(_upsampled_codes_f64(model, out.indices, MNIST_PHIS)), dim=0)
    per_scale = [((f_hat_k - f) ** 2).mean() for f_hat_k in partial_sums]
    expected = sum(per_scale) / len(per_scale)
    torch.testing.assert_close(out.codebook_loss.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.commitment_loss.double(), 0.25 * expected, atol=1e-6, rtol=1e-5)


def test_straight_through_gradients():
    model = _mnist_model().train()
    out = model(_images(3))
    out.reconstruction.square().mean().backward()
    # The reconstruction reaches the encoder through the estimator, but never the codebook.
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None
    model.zero_grad(set_to_none=True)
    out = model(_images(3))
    (out.codebook_loss + out.commitment_loss).backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert all(phi.weight.grad.abs().sum() > 0 for phi in model.quantize.quant_resi.qresi_ls)
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.decoder.conv_in.weight.grad is None
    # The usage buffer counts the codes picked in training.
    assert model.quantize.ema_vocab_hit_SV.sum() > 0


def test_teacher_forcing_input_by_hand():
    # Toy: 3 scales (1, 2, 3) on a 3x3 latent, 12x12 images; scales use Phis 0, 2, 3.
    model = _mnist_model(patch_nums=(1, 2, 3))
    generator = torch.Generator().manual_seed(3)
    indices = [torch.randint(0, model.vocab_size, (2, pn * pn), generator=generator) for pn in (1, 2, 3)]
    with torch.no_grad():
        var_input = model.idx_to_var_input(indices)
    assert var_input.shape == (2, 4 + 9, model.z_channels)
    first, second, _ = _upsampled_codes_f64(model, indices, [0, 2, 3])
    # Scale 1's four tokens: f_hat after scale 0 averaged over 3x3 -> 2x2 area windows [0:2] and [1:3].
    expected_scale1 = torch.stack([first[:, :, r:r + 2, c:c + 2].mean((2, 3)) for r in (0, 1) for c in (0, 1)], 1)
    torch.testing.assert_close(var_input[:, :4].double(), expected_scale1, atol=1e-5, rtol=1e-5)
    # Scale 2 is at the latent size: its tokens are f_hat after scales 0 and 1, row-major.
    expected_scale2 = (first + second).flatten(2).transpose(1, 2)
    torch.testing.assert_close(var_input[:, 4:].double(), expected_scale2, atol=1e-5, rtol=1e-5)


def test_add_scale_steps_match_teacher_forcing():
    model = _mnist_model()
    indices = model.img_to_idx(_images(3))
    with torch.no_grad():
        var_input = model.idx_to_var_input(indices)
        f_hat = model.new_fhat(3)
        inputs = []
        for k, pn in enumerate(model.patch_nums):
            h = model.quantize.code_map(indices[k], k)
            f_hat, next_input = model.add_scale(f_hat, k, h)
            if k < len(model.patch_nums) - 1:
                assert next_input.shape == (3, model.z_channels, model.patch_nums[k + 1], model.patch_nums[k + 1])
                inputs.append(next_input.flatten(2).transpose(1, 2))
        assert next_input is f_hat
        torch.testing.assert_close(torch.cat(inputs, 1), var_input)
        torch.testing.assert_close(f_hat, model.idx_to_fhat(indices))


@pytest.mark.parametrize("shape, message", [
    ((2, 3, 28, 28), "expected images"),
    ((2, 1, 30, 30), "image size"),
    ((2, 1, 28), "expected images"),
])
def test_bad_images_raise_one_line(shape, message):
    model = _mnist_model()
    with pytest.raises(ValueError, match=message) as error:
        model.img_to_idx(torch.zeros(shape))
    assert "\n" not in str(error.value)


def test_bad_indices_raise_one_line():
    model = _mnist_model()
    indices = model.img_to_idx(_images(2))
    for bad in (indices[:-1], indices[:2] + [indices[2][:, :4]] + indices[3:], [i.float() for i in indices]):
        with pytest.raises(ValueError) as error:
            model.idx_to_img(bad)
        assert "\n" not in str(error.value)


def test_mnist_entry_point_takes_32px_scales():
    model = vqvae_mnist(patch_nums=(1, 2, 3, 4, 6, 8))
    assert model.img_size == 32 and model.num_tokens == 1 + 4 + 9 + 16 + 36 + 64
    assert [i.shape[1] for i in model.img_to_idx(_images(1, side=32))] == [1, 4, 9, 16, 36, 64]


def test_official_layout_keys_and_round_trip(tmp_path):
    entries = _official_entries()
    model = vqvae_f16_4096()
    state = model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == {k: v["shape"] for k, v in entries.items()}
    buffers = {name for name, _ in model.named_buffers()}
    assert buffers == {k for k, v in entries.items() if v["kind"] == "buffer"}
    # A file with exactly the JSON's keys and shapes (the buffer left out, as a release may) loads back.
    generator = torch.Generator().manual_seed(0)
    saved = {k: torch.randn(v["shape"], generator=generator) for k, v in entries.items() if v["kind"] == "param"}
    path = tmp_path / "vae_ch160v4096z32.pth"
    torch.save(saved, path)
    del model, state
    loaded = load_official(path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())


def test_loader_accepts_buffers_and_rejects_misfits_in_one_line(tmp_path):
    source = _mnist_model(seed=5)
    path = tmp_path / "full.pth"
    torch.save(source.state_dict(), path)
    target = _mnist_model(seed=6).load_official(path)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))

    bad = source.state_dict()
    bad["quant_conv.weight"] = bad["quant_conv.weight"][:, :-1]
    bad["unused.weight"] = torch.zeros(1)
    del bad["decoder.conv_out.bias"]
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError) as error:
        _mnist_model().load_official(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    for part in ("quant_conv.weight", "unused.weight", "decoder.conv_out.bias"):
        assert part in message
    with pytest.raises(ValueError, match="no such"):
        _mnist_model().load_official(tmp_path / "absent.pth")
    for name in ("junk.pth", "junk.safetensors"):
        (tmp_path / name).write_bytes(b"junk")
        with pytest.raises(ValueError, match="cannot read checkpoint") as error:
            _mnist_model().load_official(tmp_path / name)
        assert "\n" not in str(error.value)


@torch.no_grad()
def test_the_bundled_tokenizer_reconstructs_digits_better_with_every_scale():
    """The bundled MNIST tokenizer on the bundled test digits: the reconstruction from the first k
    scales gains PSNR with every scale added, and all six reach the PSNR of a trained tokenizer."""
    from kzoo.sample import BUNDLED_VAE
    from kzoo.train.tasks.hmar import load_vqvae
    from kzoo.train.tasks.vqvae import psnr

    model = load_vqvae(BUNDLED_VAE)
    files = sorted((BUNDLED_VAE.parent / "mnist_digits").glob("*.png"))
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 127.5 - 1)[None]
                          for f in files])
    indices = model.img_to_idx(images)
    quality = [psnr(model.fhat_to_img(model.quantize.idx_to_fhat(indices[:k])), images).mean().item()
               for k in range(1, len(model.patch_nums) + 1)]
    assert all(later > earlier for earlier, later in zip(quality, quality[1:])), quality
    assert quality[-1] > 22, quality
