"""SG-DRN, StableNormal's semantic-guided diffusion refinement network, on kzoo's parts.

The original refines the YOSO latent with a ControlNet-conditioned Stable Diffusion UNet that
predicts x0, and injects frozen DINOv2 features into the UNet's encoder, computed once per image
and independent of the timestep (stablenormal.md §1.3). Here, in pixel space:

- the input is the noisy normal map x_t concatenated with the image, its rays and the YOSO
  estimate (the image ControlNet's role);
- the timestep modulates every conv block (FiLM) and every transformer block (AdaLN);
- at 1/8 the features become tokens for transformer blocks whose self-attention is kzoo's
  block-sparse kernel with ``window_ranges``: each token sees the tokens within ``window_rows``
  rows of it in raster order, a band that keeps attention local and linear in the image size;
- the frozen estimator's 1/8 KAT features (the semantic prior, DINOv2's role) are added to those
  tokens through a zero-initialised projection, once per image;
- the output is x0, parameterised as a correction to the YOSO estimate whose last layer starts
  at zero: an untrained refiner returns the estimate unchanged, so refinement can only be
  learned on top of it.

``forward`` is the training forward: the x0 prediction for one timestep.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kzoo.kernels import window_ranges

from ..layers import KAN, RATIONAL_PARAMETERS, SparseSelfAttention
from .estimator import ConvBlock, visible_hemisphere

__all__ = ["SGDRN", "WindowBlock", "REFINERS", "sgdrn_small", "timestep_embedding"]


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B, dim) of integer timesteps."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class WindowBlock(nn.Module):
    """timm's Block shape (norm, attention, norm, KAN) with AdaLN scale/shift/gate from the timestep."""

    def __init__(self, dim: int, num_heads: int, cond_dim: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = SparseSelfAttention(dim, num_heads, qk_norm=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = KAN(dim, int(dim * mlp_ratio))
        self.modulation = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, cond: Tensor, kv_start: Tensor, kv_end: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, dim=-1)
        x = x + (1 + gate1) * self.attn(self.norm1(x) * (1 + scale1) + shift1, kv_start, kv_end)
        return x + (1 + gate2) * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class SGDRN(nn.Module):
    """x0-predicting refiner: ``forward(x_t, timesteps, image, rays, coarse, semantic)`` -> unit normals.

    Args:
        semantic_channels: channels of the estimator's 1/8 features.
        widths: conv widths at strides 2, 4 (the correction is predicted at 1/2 and upsampled:
            the estimate it corrects carries the full-resolution detail).
        dim, depth, num_heads: the 1/8 transformer.
        window_rows: the attention band, in rows of the 1/8 token grid, on each side.
    """

    stride = 8

    def __init__(self, semantic_channels: int = 128, widths=(32, 64), dim: int = 128, depth: int = 2,
                 num_heads: int = 4, window_rows: int = 2, cond_dim: int = 128):
        super().__init__()
        self.widths = tuple(widths)
        self.window_rows = window_rows
        self.cond_dim = cond_dim
        self.time_mlp = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        in_channels = 3 + 3 + 3 + 3  # x_t, image, rays, coarse estimate
        self.down = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else widths[i - 1], width, stride=2) for i, width in enumerate(widths))
        self.down_film = nn.ModuleList(nn.Linear(cond_dim, 2 * width) for width in widths)
        self.to_tokens = nn.Conv2d(widths[-1], dim, 3, 2, 1)
        self.semantic_proj = nn.Conv2d(semantic_channels, dim, 1)
        nn.init.zeros_(self.semantic_proj.weight)
        nn.init.zeros_(self.semantic_proj.bias)
        self.blocks = nn.ModuleList(WindowBlock(dim, num_heads, cond_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.from_tokens = nn.Conv2d(dim, widths[-1], 1)
        self.up = nn.ModuleList(ConvBlock(widths[min(i + 1, len(widths) - 1)] + widths[i] + 3, widths[i])
                                for i in reversed(range(len(widths))))
        self.up_film = nn.ModuleList(nn.Linear(cond_dim, 2 * widths[i]) for i in reversed(range(len(widths))))
        self.head = nn.Conv2d(widths[0], 3, 3, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self._ranges: dict[tuple[int, int, str], tuple[Tensor, Tensor]] = {}

    def ranges(self, height: int, width: int, device) -> tuple[Tensor, Tensor]:
        """The band of ``window_rows`` rows on each side of each 1/8 token, made once per grid size:
        the attention op plans once per pair of range tensors."""
        key = (height, width, str(device))
        if key not in self._ranges:
            reach = self.window_rows * width
            start, end = window_ranges(height * width, reach, reach)
            self._ranges[key] = (start.to(device), end.to(device))
        return self._ranges[key]

    def forward(self, x_t: Tensor, timesteps: Tensor, image: Tensor, rays: Tensor, coarse: Tensor,
                semantic: Tensor) -> Tensor:
        if x_t.shape[-2] % self.stride or x_t.shape[-1] % self.stride:
            raise ValueError(f"SGDRN: size {tuple(x_t.shape[-2:])} is not a multiple of {self.stride}")
        cond = self.time_mlp(timestep_embedding(timesteps, self.cond_dim).to(x_t.dtype))
        x = torch.cat([x_t, image * 2 - 1, rays, coarse], dim=1)
        skips = []
        for block, film in zip(self.down, self.down_film):
            x = block(x, film(cond))
            skips.append(x)
        tokens = self.to_tokens(x)
        tokens = tokens + self.semantic_proj(F.interpolate(semantic, size=tokens.shape[-2:], mode="bilinear",
                                                           align_corners=False))
        batch, dim, height, width = tokens.shape
        kv_start, kv_end = self.ranges(height, width, tokens.device)
        tokens = tokens.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, cond, kv_start, kv_end)
        x = self.from_tokens(self.norm(tokens).transpose(1, 2).reshape(batch, dim, height, width))
        for block, film, skip in zip(self.up, self.up_film, reversed(skips)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip, F.interpolate(rays, size=skip.shape[-2:], mode="area")], dim=1), film(cond))
        correction = F.interpolate(self.head(x), size=coarse.shape[-2:], mode="bilinear", align_corners=False)
        return visible_hemisphere(coarse + correction.float(), rays)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.endswith(RATIONAL_PARAMETERS)}


def sgdrn_small(**kwargs) -> SGDRN:
    """The bundled refiner: conv 32/64 at 1/2 and 1/4, two 128-wide window-attention blocks at 1/8."""
    return SGDRN(**kwargs)


REFINERS = {"sgdrn_small": sgdrn_small}
