"""StableNormal inference: the heuristic DDIM sampler and the ``StableNormal`` pipeline.

The refiner is run as the original runs SG-DRN (stablenormal.md §1.4): the YOSO estimate is
noised to ``START_TIMESTEP`` (401) under Stable Diffusion's scaled-linear schedule; the first
``steps // 2`` steps predict x0 and re-noise it with fresh noise at that same level; the rest are
deterministic DDIM steps down to t = 1; the result is the last predicted x0. For 10 steps the
timesteps are the original's, [401 x 6, 301, 201, 101, 1]. For other counts the original's rule
degenerates (2 steps give [1, 1]), so kzoo keeps its shape instead: ``steps // 2 + 1`` steps at
401, then the rest evenly down to 1.

``StableNormal.predict`` handles any image size and aspect ratio: resize so the longer side is
``resolution``, pad right and bottom (replicating edge pixels, which leaves the principal point
where it is) to the networks' stride, run, crop the padding off, and resize back to the input's
size when ``match_input_resolution``. The original squashes its semantic branch's input to a
672 px square.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .estimator import YOSO, assumed_intrinsics, ray_directions, visible_hemisphere
from .refiner import SGDRN

__all__ = ["StableNormal", "alphas_cumprod", "heuristic_timesteps", "noise_timesteps", "DEFAULT_STEPS",
           "START_TIMESTEP", "TRAIN_TIMESTEPS"]

TRAIN_TIMESTEPS = 1000
START_TIMESTEP = 401
DEFAULT_STEPS = 10
BETA_START, BETA_END = 0.00085, 0.012


def alphas_cumprod(device=None) -> Tensor:
    """Stable Diffusion's scaled-linear schedule: cumulative products of 1 - beta_t, t = 0..999 (float64)."""
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(device)


def heuristic_timesteps(steps: int, start: int = START_TIMESTEP) -> list[int]:
    """The refiner's timesteps: ``steps // 2 + 1`` at ``start``, then the rest evenly down to 1."""
    if steps < 1:
        raise ValueError(f"refinement needs at least one step, got {steps}")
    held = min(steps, steps // 2 + 1)
    rest = steps - held
    descent = [round(start - (start - 1) * (i + 1) / rest) for i in range(rest)] if rest else []
    return [start] * held + descent


def noise_timesteps(steps: int) -> list[int]:
    """Plain DDIM from pure noise, evenly from 999 down to 1: the baseline the YOSO start is compared with."""
    if steps < 1:
        raise ValueError(f"refinement needs at least one step, got {steps}")
    return [round(TRAIN_TIMESTEPS - 1 - (TRAIN_TIMESTEPS - 2) * i / max(steps - 1, 1)) for i in range(steps)]


class StableNormal(nn.Module):
    """YOSO plus an optional SG-DRN refiner; ``predict`` is the whole image-to-normal pipeline."""

    def __init__(self, estimator: YOSO, refiner: SGDRN | None = None, resolution: int | None = None):
        super().__init__()
        self.estimator = estimator
        self.refiner = refiner
        self.resolution = resolution or estimator.native_size

    @property
    def stride(self) -> int:
        return self.estimator.stride if self.refiner is None else math.lcm(self.estimator.stride, self.refiner.stride)

    def _noise(self, generators: list[torch.Generator], shape, device) -> Tensor:
        return torch.stack([torch.randn(shape, generator=g, device="cpu") for g in generators]).to(device)

    @torch.no_grad()
    def refine(self, image: Tensor, rays: Tensor, coarse: Tensor, semantic: Tensor, steps: int,
               generators: list[torch.Generator], start: str = "estimate", init: Tensor | None = None,
               schedule: tuple[list[int], int] | None = None) -> Tensor:
        """SG-DRN from the YOSO estimate (``start="estimate"``; ``init`` replaces the estimate as the
        starting point, e.g. the previous video frame's result) or from pure noise (``"noise"``).
        ``schedule`` = (timesteps, how many of the first steps re-noise instead of stepping DDIM)
        replaces the heuristic one for ``steps``, to study other schedules."""
        shape = tuple(coarse.shape[1:])
        # The schedule's arithmetic stays in float32 whatever the networks' dtype: in bfloat16,
        # 1 - alpha_bar near t = 1 would round to zero.
        a = alphas_cumprod(coarse.device).float()
        coarse_32 = coarse.float()
        if start == "estimate":
            timesteps, renoise = schedule or (heuristic_timesteps(steps), steps // 2)
            x0 = coarse_32 if init is None else init.float()
            t0 = timesteps[0]
            x = a[t0].sqrt() * x0 + (1 - a[t0]).sqrt() * self._noise(generators, shape, coarse.device)
        elif start == "noise":
            timesteps = noise_timesteps(steps)
            renoise = 0
            x = self._noise(generators, shape, coarse.device)
        else:
            raise ValueError(f"start={start!r} is not 'estimate' or 'noise'")
        for index, t in enumerate(timesteps):
            batch_t = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            x0 = self.refiner(x.to(coarse.dtype), batch_t, image, rays, coarse, semantic).float()
            if index == len(timesteps) - 1:
                break
            if index < renoise:  # predict, then re-noise with fresh noise at the same level
                x = a[t].sqrt() * x0 + (1 - a[t]).sqrt() * self._noise(generators, shape, x.device)
            else:  # deterministic DDIM to the next timestep
                t_next = timesteps[index + 1]
                eps = (x - a[t].sqrt() * x0) / (1 - a[t]).sqrt()
                x = a[t_next].sqrt() * x0 + (1 - a[t_next]).sqrt() * eps
        return x0

    @torch.no_grad()
    def predict(self, images: Tensor, steps: int = DEFAULT_STEPS, resolution: int | None = None,
                match_input_resolution: bool = True, seed: int | list[int] = 0, intrinsics: Tensor | None = None,
                start: str = "estimate", init: Tensor | None = None) -> Tensor:
        """Unit normals (B, 3, H, W) in float32 for ``images`` (B, 3, H, W) in [0, 1].

        Args:
            steps: refiner steps; 0 is turbo (YOSO alone).
            resolution: the longer side the networks see (default: the pipeline's).
            match_input_resolution: resize the result back to the input's size (else it keeps the
                processing size, padding cropped off).
            seed: one seed for every image (a video: the same noise for every frame), or one per image.
                Each image draws its noise from its own generator, so the batch size never changes a result.
            intrinsics: (B, 3, 3) pixel-space K of the input images; default a 60 degree field of view.
            start: "estimate" (SG-DRN) or "noise" (the same refiner from pure noise, for comparison).
            init: (B, 3, h, w) normals to start the refiner from instead of the estimate (the
                previous frame of a video), at the input's or the processing size.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"predict: images must be (B, 3, H, W), got {tuple(images.shape)}")
        if steps < 0:
            raise ValueError(f"predict: steps must be >= 0, got {steps}")
        if steps > 0 and self.refiner is None:
            raise ValueError("predict: this pipeline has no refiner; use steps=0 (turbo)")
        batch, _, height, width = images.shape
        if batch == 0:
            return images.new_zeros(0, 3, height, width, dtype=torch.float32)
        seeds = [seed] * batch if isinstance(seed, int) else list(seed)
        if len(seeds) != batch:
            raise ValueError(f"predict: {len(seeds)} seeds for {batch} images")
        device = next(self.estimator.parameters()).device
        dtype = next(self.estimator.parameters()).dtype
        images = images.to(device=device, dtype=torch.float32)
        if intrinsics is None:
            intrinsics = assumed_intrinsics(height, width, batch, device=device)
        intrinsics = intrinsics.to(device=device, dtype=torch.float32).expand(batch, 3, 3)

        resolution = resolution or self.resolution
        scale = resolution / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        work = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False) \
            if size != (height, width) else images
        k = intrinsics.clone()
        k[:, 0] *= size[1] / width
        k[:, 1] *= size[0] / height
        stride = self.stride
        padded = (math.ceil(size[0] / stride) * stride, math.ceil(size[1] / stride) * stride)
        work = F.pad(work, (0, padded[1] - size[1], 0, padded[0] - size[0]), mode="replicate")
        rays = ray_directions(k, *padded)

        generators = [torch.Generator().manual_seed(s) for s in seeds]
        work_t, rays_t = work.to(dtype), rays.to(dtype)
        coarse, semantic = self.estimator(work_t, rays_t, return_semantic=True)
        normal = coarse
        if steps > 0:
            if init is not None:
                init = init.to(device=device, dtype=torch.float32)
                if tuple(init.shape[-2:]) != size:
                    init = F.normalize(F.interpolate(init, size=size, mode="bilinear", align_corners=False), dim=1)
                init = F.pad(init, (0, padded[1] - size[1], 0, padded[0] - size[0]), mode="replicate")
            normal = self.refine(work_t, rays_t, coarse.to(dtype), semantic, steps, generators, start,
                                 None if init is None else init.to(dtype))
        normal = normal.float()[:, :, :size[0], :size[1]]
        if match_input_resolution and size != (height, width):
            normal = F.interpolate(normal, size=(height, width), mode="bilinear", align_corners=False)
            normal = visible_hemisphere(normal, ray_directions(intrinsics, height, width))
        return F.normalize(normal, dim=1)
