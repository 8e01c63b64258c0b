"""StableNormal's models and pipeline: shapes, the hemisphere, the sampler's arithmetic, determinism,
and the Triton kernels against the CPU path."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kzoo.kernels import use_backend
from kzoo.models.stablenormal import (SGDRN, YOSO, StableNormal, alphas_cumprod, assumed_intrinsics,
                                      heuristic_timesteps, noise_timesteps, ray_directions, visible_hemisphere)
from kzoo.models.stablenormal.estimator import MIN_VIEW_COS, ConvexUpsample2x
from kzoo.train import checkpoint
from kzoo.train.tasks.normal import build_pipeline
from tests.conftest import relative_error

ESTIMATOR = {"model": "yoso_kat", "embed_dim": 32, "depth": 1, "num_heads": 2, "stem_widths": [8, 16],
             "out_widths": [16, 16], "native_size": 32}
REFINER = {"model": "sgdrn_small", "semantic_channels": 16, "widths": [8, 16], "dim": 32, "depth": 1, "num_heads": 2,
           "cond_dim": 32}


def tiny_pipeline(seed: int = 0, live_head: bool = True) -> StableNormal:
    """A random pipeline whose refiner output depends on its input (its last layer starts at zero)."""
    torch.manual_seed(seed)
    pipeline = build_pipeline(ESTIMATOR, REFINER)
    if live_head:
        nn.init.normal_(pipeline.refiner.head.weight, std=0.3)
    return pipeline.eval()


def test_rays_follow_the_opengl_camera():
    k = assumed_intrinsics(5, 7)
    rays = ray_directions(k, 5, 7)[0]
    torch.testing.assert_close(rays[:, 2, 3], torch.tensor([0.0, 0.0, -1.0]))
    assert rays[0, 2, 0] < 0 and rays[1, 0, 3] > 0  # left column looks left, top row looks up
    torch.testing.assert_close(rays.norm(dim=0), torch.ones(5, 7))
    # 60 degrees across the longer side: the edge rays are 30 degrees off axis.
    edge = torch.rad2deg(torch.atan2(-rays[0, 2, 0] * 3.5 / 3, -rays[2, 2, 0]))  # at the border, not the pixel centre
    assert abs(edge.item() - 30.0) < 0.1


def test_visible_hemisphere_moves_only_back_facing_normals():
    torch.manual_seed(1)
    rays = ray_directions(assumed_intrinsics(6, 6, 2), 6, 6)
    normal = F.normalize(torch.randn(2, 3, 6, 6), dim=1)
    out = visible_hemisphere(normal, rays)
    cos = (out * -rays).sum(1)
    assert (cos >= MIN_VIEW_COS - 1e-6).all()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 6, 6))
    fine = (normal * -rays).sum(1) >= MIN_VIEW_COS
    assert fine.any() and (~fine).any()
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[fine], normal.permute(0, 2, 3, 1)[fine])


def test_visible_hemisphere_matches_a_float64_reference_with_its_gradient():
    """Non-unit inputs of any length, near-zero ones included, against F.normalize in float64."""
    torch.manual_seed(2)
    rays = ray_directions(assumed_intrinsics(5, 7, 3), 5, 7)
    normal = torch.randn(3, 3, 5, 7) * torch.rand(3, 1, 5, 7) * 4
    normal[0, :, 0, 0] = 1e-8
    weights = torch.randn(3, 3, 5, 7)

    def reference(n, r):
        n = F.normalize(n, dim=1, eps=1e-6)
        shortfall = (MIN_VIEW_COS + (n * r).sum(1, keepdim=True)).clamp_min(0)
        return F.normalize(n - shortfall * r, dim=1, eps=1e-6)

    ours = normal.clone().requires_grad_(True)
    ref = normal.double().requires_grad_(True)
    out, expected = visible_hemisphere(ours, rays), reference(ref, rays.double())
    (out * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    assert relative_error(out.double(), expected) < 1e-6
    assert relative_error(ours.grad.double(), ref.grad) < 1e-5


def test_heuristic_schedule_is_the_original_for_ten_steps():
    assert heuristic_timesteps(10) == [401] * 6 + [301, 201, 101, 1]
    assert heuristic_timesteps(1) == [401]
    assert heuristic_timesteps(2) == [401, 401]
    assert heuristic_timesteps(4) == [401, 401, 401, 1]
    assert noise_timesteps(3) == [999, 500, 1]
    with pytest.raises(ValueError):
        heuristic_timesteps(0)
    a = alphas_cumprod()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert a[0].item() == pytest.approx(1 - 0.00085) and a[-1].item() == pytest.approx(torch.prod(1 - betas).item())


class _StubRefiner(nn.Module):
    """A deterministic stand-in that records its calls: x0 = normalise(coarse + 0.5 x_t + t/1000)."""

    stride = 8

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_t, timesteps, image, rays, coarse, semantic):
        self.calls.append(timesteps[0].item())
        return F.normalize(coarse + 0.5 * x_t + timesteps[:, None, None, None] / 1000, dim=1)


@pytest.mark.parametrize("steps, schedule", [(1, None), (4, None), (10, None), (7, ([401] * 6 + [1], 5)),
                                            (5, ([401, 301, 201, 101, 1], 0))])
def test_refine_is_the_heuristic_ddim_loop(steps, schedule):
    """The sampler against the loop written out in float64 from stablenormal.md 1.4, with the
    heuristic schedule or an explicit (timesteps, re-noised steps) one."""
    torch.manual_seed(0)
    pipeline = StableNormal(build_pipeline(ESTIMATOR).estimator, _StubRefiner())
    coarse = F.normalize(torch.randn(2, 3, 8, 8), dim=1)
    image, rays, semantic = torch.rand(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 16, 1, 1)
    out = pipeline.refine(image, rays, coarse, semantic, steps, [torch.Generator().manual_seed(s) for s in (5, 6)],
                          schedule=schedule)

    a = alphas_cumprod()
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]

    def noise():
        return torch.stack([torch.randn(3, 8, 8, generator=g) for g in generators]).double()

    def stub(x, t):
        return F.normalize(coarse.double() + 0.5 * x + t / 1000, dim=1)

    timesteps, renoise = schedule or (heuristic_timesteps(steps), steps // 2)
    x = a[401].sqrt() * coarse.double() + (1 - a[401]).sqrt() * noise()
    for i, t in enumerate(timesteps):
        x0 = stub(x, t)
        if i == len(timesteps) - 1:
            break
        if i < renoise:
            x = a[t].sqrt() * x0 + (1 - a[t]).sqrt() * noise()
        else:
            eps = (x - a[t].sqrt() * x0) / (1 - a[t]).sqrt()
            x = a[timesteps[i + 1]].sqrt() * x0 + (1 - a[timesteps[i + 1]]).sqrt() * eps
    assert pipeline.refiner.calls == timesteps
    torch.testing.assert_close(out.double(), x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(21, 37), (50, 17), (32, 32)])
def test_predict_keeps_any_size_and_aspect(size):
    pipeline = tiny_pipeline()
    images = torch.rand(2, 3, *size)
    out = pipeline.predict(images, steps=2, resolution=32)
    assert out.shape == (2, 3, *size) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, *size), atol=1e-5, rtol=0)
    assert (((out * -ray_directions(assumed_intrinsics(*size, 2), *size)).sum(1)) > 0).all()
    native = pipeline.predict(images, steps=0, resolution=32, match_input_resolution=False)
    scale = 32 / max(size)
    assert native.shape[-2:] == (round(size[0] * scale), round(size[1] * scale))


def test_refinement_starts_as_the_estimate_and_then_changes_it():
    images = torch.rand(1, 3, 24, 40)
    untrained = tiny_pipeline(live_head=False)
    turbo = untrained.predict(images, steps=0, resolution=32)
    torch.testing.assert_close(untrained.predict(images, steps=3, resolution=32), turbo, atol=1e-6, rtol=0)
    live = tiny_pipeline(live_head=True)
    changed = (live.predict(images, steps=3, resolution=32) - live.predict(images, steps=0, resolution=32)).abs()
    assert changed.max() > 1e-2


def test_predict_is_deterministic_per_seed_and_independent_of_the_batch():
    pipeline = tiny_pipeline()
    images = torch.rand(3, 3, 20, 28)
    batch = pipeline.predict(images, steps=3, resolution=32, seed=7)
    torch.testing.assert_close(pipeline.predict(images, steps=3, resolution=32, seed=7), batch, atol=0, rtol=0)
    alone = torch.cat([pipeline.predict(images[i:i + 1], steps=3, resolution=32, seed=7) for i in range(3)])
    torch.testing.assert_close(alone, batch, atol=1e-4, rtol=0)  # float32 kernels round by batch shape
    other = pipeline.predict(images, steps=3, resolution=32, seed=8)
    assert (other - batch).abs().max() > 1e-4
    per_image = pipeline.predict(images, steps=3, resolution=32, seed=[7, 8, 7])
    torch.testing.assert_close(per_image[1], other[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(per_image[2], batch[2], atol=1e-6, rtol=0)


def test_predict_refuses_bad_input():
    pipeline = tiny_pipeline()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        pipeline.predict(torch.rand(3, 20, 20))
    with pytest.raises(ValueError, match="2 seeds for 1 images"):
        pipeline.predict(torch.rand(1, 3, 20, 20), seed=[1, 2])
    with pytest.raises(ValueError, match="no refiner"):
        StableNormal(pipeline.estimator).predict(torch.rand(1, 3, 20, 20), steps=2)
    assert pipeline.predict(torch.rand(0, 3, 20, 20)).shape == (0, 3, 20, 20)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        pipeline.estimator(torch.rand(1, 3, 20, 20), torch.rand(1, 3, 20, 20))


@pytest.mark.parametrize("encoder, upsample", [("kat", "bilinear"), ("kat", "convex"), ("conv", "bilinear")])
def test_every_parameter_gets_a_gradient(encoder, upsample):
    torch.manual_seed(0)
    kwargs = (dict(embed_dim=32, depth=1, num_heads=2, stem_widths=(8, 16), out_widths=(16, 16), native_size=32)
              if encoder == "kat" else dict(widths=(8, 16, 16, 16)))
    estimator = YOSO(encoder=encoder, upsample=upsample, **kwargs)
    refiner = SGDRN(semantic_channels=16, widths=(8, 16), dim=32, depth=1, num_heads=2, cond_dim=32)
    image = torch.rand(2, 3, 32, 48)
    rays = ray_directions(assumed_intrinsics(32, 48, 2), 32, 48)
    coarse, semantic = estimator(image, rays, torch.randn(2, 3, 32, 48), return_semantic=True)
    coarse.sum().backward()
    assert [n for n, p in estimator.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    nn.init.normal_(refiner.head.weight, std=0.1)
    nn.init.normal_(refiner.semantic_proj.weight, std=0.1)
    for block in refiner.blocks:
        nn.init.normal_(block.modulation.weight, std=0.1)
    out = refiner(torch.randn(2, 3, 32, 48), torch.tensor([3, 400]), image, rays, coarse.detach(), semantic.detach())
    (out * torch.randn_like(out)).sum().backward()
    assert [n for n, p in refiner.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_triton_kernels_give_the_cpu_paths_result():
    """The refiner's window attention and every group-rational activation, through the Triton
    kernels (the interpreter here) against the CPU paths, forward and backward."""
    pipeline = tiny_pipeline()
    image = torch.rand(1, 3, 32, 32)
    rays = ray_directions(assumed_intrinsics(32, 32), 32, 32)
    x_t = torch.randn(1, 3, 32, 32)

    def run():
        pipeline.zero_grad()
        coarse, semantic = pipeline.estimator(image, rays, return_semantic=True)
        out = pipeline.refiner(x_t, torch.tensor([401]), image, rays, coarse, semantic)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in pipeline.named_parameters() if p.grad is not None}

    with use_backend("auto"):
        expected, expected_grads = run()
    with use_backend("triton"):
        actual, actual_grads = run()
    assert relative_error(actual, expected) < 1e-4
    assert actual_grads.keys() == expected_grads.keys() and len(actual_grads) > 20
    for name, expected_grad in expected_grads.items():
        # Some gradients are zero in exact arithmetic (a key bias shifts every logit of a row alike):
        # those are compared with an absolute floor instead.
        difference = (actual_grads[name] - expected_grad).abs().max().item()
        assert difference <= 1e-4 * expected_grad.abs().max().item() + 1e-5, (name, difference)


def test_refiner_start_from_a_given_map_at_either_size():
    """``init`` (a video's previous frame) at the input's size is resized to the processing size
    first; given at that size directly it gives the same result, and it changes the refinement."""
    pipeline = tiny_pipeline()
    images = torch.rand(1, 3, 40, 24)
    init = F.normalize(torch.randn(1, 3, 40, 24), dim=1)
    processed = F.normalize(F.interpolate(init, size=(32, 19), mode="bilinear", align_corners=False), dim=1)
    from_input = pipeline.predict(images, steps=3, resolution=32, init=init)
    from_processed = pipeline.predict(images, steps=3, resolution=32, init=processed)
    torch.testing.assert_close(from_input, from_processed, atol=1e-6, rtol=0)
    assert (from_input - pipeline.predict(images, steps=3, resolution=32)).abs().max() > 1e-3


# --- convex upsampling ------------------------------------------------------------------------------

def convex_upsample_reference(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Pixel by pixel in float64: output (2y + i, 2x + j) mixes x's 3x3 neighbours of (y, x), indices
    clamped at the border, with softmax weights from channels ((ky * 3 + kx) * 2 + i) * 2 + j."""
    batch, channels, height, width = x.shape
    out = torch.empty(batch, channels, 2 * height, 2 * width, dtype=torch.float64)
    for y in range(height):
        for x_ in range(width):
            for i in range(2):
                for j in range(2):
                    weights = logits[:, [((k * 2) + i) * 2 + j for k in range(9)], y, x_].double().softmax(1)
                    value = 0
                    for k in range(9):
                        ny = min(max(y + k // 3 - 1, 0), height - 1)
                        nx = min(max(x_ + k % 3 - 1, 0), width - 1)
                        value = value + weights[:, k, None] * x[:, :, ny, nx].double()
                    out[:, :, 2 * y + i, 2 * x_ + j] = value
    return out


def test_convex_upsampling_matches_a_float64_reference_with_its_gradients():
    torch.manual_seed(0)
    upsample = ConvexUpsample2x(5)
    nn.init.normal_(upsample.weights.weight, std=0.5)
    x = torch.randn(2, 3, 5, 7)
    features = torch.randn(2, 5, 5, 7)
    expected = convex_upsample_reference(x, upsample.weights(features).detach())
    actual = upsample(x, features)
    assert actual.shape == (2, 3, 10, 14) and relative_error(actual, expected) < 1e-6
    upsample = upsample.double()
    assert torch.autograd.gradcheck(upsample, (torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True),
                                               torch.randn(1, 5, 3, 4, dtype=torch.float64, requires_grad=True)))


def test_convex_upsampling_starts_as_bilinear():
    """Untrained, it is F.interpolate's bilinear 2x up to the leak to the five unused neighbours
    (exp(-10) each, against weights summing to one): what lets a trained bilinear estimator grow it."""
    torch.manual_seed(1)
    upsample = ConvexUpsample2x(4).double()
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    leak = 5 * torch.exp(torch.tensor(-10.0)).item()
    difference = (upsample(x, torch.randn(2, 4, 7, 9, dtype=torch.float64)) - bilinear).abs().max().item()
    assert 0 < difference <= leak * 2 * x.abs().max().item()


def test_an_estimator_grows_convex_upsampling_and_keeps_its_output():
    torch.manual_seed(2)
    kwargs = {key: value for key, value in ESTIMATOR.items() if key != "model"}
    bilinear = YOSO(**kwargs).eval()
    convex = YOSO(upsample="convex", **kwargs).eval()
    weights = bilinear.state_dict()
    with pytest.raises(ValueError, match=r"grown: does not fit .*decoder\.upsample\.weights"):
        checkpoint.load_strict(convex, weights, "grown")
    checkpoint.load_strict(convex, weights, "grown", may_miss=convex.grown_keys())
    assert convex.grown_keys() == {"decoder.upsample.weights.weight", "decoder.upsample.weights.bias"}
    assert bilinear.grown_keys() == set()
    image = torch.rand(2, 3, 32, 48)
    rays = ray_directions(assumed_intrinsics(32, 48, 2), 32, 48)
    with torch.no_grad():
        before, after = bilinear(image, rays), convex(image, rays)
    # An untrained network's decoder output is short before normalisation, which magnifies the leak
    # at a few pixels; a mix of the 3x3 neighbours with uniform weights turns normals by up to 178 degrees here.
    angle = torch.rad2deg(torch.acos((before * after).sum(1).clamp(-1, 1)))
    assert angle.max() < 0.5 and angle.mean() < 0.02
    with pytest.raises(ValueError, match="upsample='nearest'"):
        YOSO(upsample="nearest", **kwargs)
