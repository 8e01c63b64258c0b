"""YOSO, StableNormal's one-step normal estimator ("You Only Sample Once", Ye et al. 2024), on kzoo's parts.

The original is a Stable Diffusion UNet that maps Gaussian noise plus the image to the normal
latent in one pass (stablenormal.md §1.2). Here the network works in pixel space and borrows
DSINE's cheap inductive biases (§6.2): every pixel's camera ray is an input, concatenated again
at each decoder scale, and the output is projected onto the visible hemisphere (cos(n, view)
>= ``MIN_VIEW_COS``), which halves the output space.

Two encoders, one decoder:

- ``encoder="kat"``: a conv stem with group-rational activations down to 1/4, then a ``kat_*``
  model (timm's ViT with KAT's group-rational KAN) over 2x2 patches of the stem's features, read
  through ``forward_intermediates`` at 1/8 and reassembled to 1/8 and 1/16, as DPT does. Its 1/8
  features are also the semantic prior of the SG-DRN refiner (the original uses DINOv2 there).
- ``encoder="conv"``: group-rational conv stages from 1/2 down to 1/16.

Both start at 1/2: the decoder predicts at 1/2, brings the prediction to full size, bilinearly or
by DSINE's learnt convex upsampling (each full-resolution pixel a softmax-weighted mix of its
3x3 neighbours at 1/2, so it can take its values from its own side of an edge), and a light
full-resolution conv, which sees the image and rays again, corrects the result, so the cost of
full resolution is one thin layer.

The noise input is the original's: YOSO sees a noise map, and StableNormal's shrinkage
regulariser replaces it with zeros for a fraction of training samples. Inference feeds zeros,
the anchored, deterministic prediction (turbo).
"""
from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import RATIONAL_PARAMETERS, GroupRational

__all__ = ["YOSO", "ConvBlock", "ConvEncoder", "ConvexUpsample2x", "KATEncoder", "UNetDecoder", "ESTIMATORS",
           "ray_directions", "assumed_intrinsics", "visible_hemisphere", "yoso_kat", "yoso_conv", "DEFAULT_FOV_DEGREES"]

# Unknown intrinsics: DSINE's assumption, a 60 degree field of view across the longer side.
DEFAULT_FOV_DEGREES = 60.0
# DSINE's Ray-ReLU bound: a visible surface makes at least this cosine with the direction to the camera.
MIN_VIEW_COS = 0.01
RATIONAL_GROUPS = 8
# Index of the 1/8 features in an encoder's outputs (strides 2, 4, 8, 16).
SEMANTIC_LEVEL = 2


def assumed_intrinsics(height: int, width: int, batch: int = 1, fov_degrees: float = DEFAULT_FOV_DEGREES,
                       device=None) -> Tensor:
    """(B, 3, 3) pixel-space K with the principal point at the centre and ``fov_degrees`` across the longer side."""
    focal = max(height, width) / 2 / math.tan(math.radians(fov_degrees) / 2)
    k = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]], device=device)
    return k.expand(batch, 3, 3).clone()


def ray_directions(intrinsics: Tensor, height: int, width: int) -> Tensor:
    """(B, 3, H, W) unit ray directions through the pixel centres in OpenGL camera space (+x right,
    +y up, looking down -z); ``intrinsics`` (B, 3, 3) is the pixel-space K, whose v axis points down."""
    k = intrinsics.float()
    v, u = torch.meshgrid(torch.arange(height, device=k.device, dtype=torch.float32) + 0.5,
                          torch.arange(width, device=k.device, dtype=torch.float32) + 0.5, indexing="ij")
    fx, fy, cx, cy = (k[:, 0, 0, None, None], k[:, 1, 1, None, None], k[:, 0, 2, None, None], k[:, 1, 2, None, None])
    x = (u - cx) / fx
    y = -(v - cy) / fy
    return F.normalize(torch.stack([x, y, -torch.ones_like(x)], dim=1), dim=1)


def _unit(v: Tensor, eps: float = 1e-6) -> Tensor:
    """``F.normalize(v, dim=1, eps=eps)`` for float32 maps: on CPU, F.normalize over 3 channels of an
    NCHW map costs eight times as much, with its backward, as this sum of squares."""
    return v * torch.rsqrt((v * v).sum(1, keepdim=True).clamp_min(eps * eps))


def visible_hemisphere(normal: Tensor, rays: Tensor, min_cos: float = MIN_VIEW_COS) -> Tensor:
    """Unit normals turned toward the camera just enough that cos(n, -ray) >= ``min_cos`` (DSINE's Ray-ReLU)."""
    view = -rays
    normal = _unit(normal)
    shortfall = (min_cos - (normal * view).sum(1, keepdim=True)).clamp_min(0)
    return _unit(normal + shortfall * view)


class ConvBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and group-rational activations, and a residual path.
    ``film`` (B, 2 * out_channels) scales and shifts the second normalisation (the refiner's
    timestep conditioning)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(RATIONAL_GROUPS, out_channels)
        self.act1 = GroupRational(RATIONAL_GROUPS, "swish", channel_dim=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(RATIONAL_GROUPS, out_channels)
        self.act2 = GroupRational(RATIONAL_GROUPS, "swish", channel_dim=1)
        self.skip = (nn.Identity() if in_channels == out_channels and stride == 1
                     else nn.Conv2d(in_channels, out_channels, 1, stride, bias=False))

    def forward(self, x: Tensor, film: Tensor | None = None) -> Tensor:
        y = self.conv2(self.act1(self.norm1(self.conv1(x))))
        y = self.norm2(y)
        if film is not None:
            scale, shift = film[:, :, None, None].chunk(2, dim=1)
            y = y * (1 + scale) + shift
        return self.act2(y + self.skip(x))


class ConvEncoder(nn.Module):
    """Group-rational conv stages: ``widths[i]`` channels at stride 2**(i + 1)."""

    def __init__(self, in_channels: int, widths=(32, 64, 128, 192)):
        super().__init__()
        self.widths = tuple(widths)
        self.stages = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else widths[i - 1], width, stride=2) for i, width in enumerate(widths))

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class KATEncoder(nn.Module):
    """A conv stem to 1/4, then a ``kat_*`` transformer over 2x2 patches of the stem's features.

    The transformer's intermediate token maps (1/8) are concatenated, projected, and reassembled
    to 1/8 and 1/16, so the decoder sees the same four strides (2 to 16) as with ``ConvEncoder``.
    """

    def __init__(self, in_channels: int, stem_widths=(32, 64), kat_model: str = "kat_tiny",
                 embed_dim: int = 128, depth: int = 4, num_heads: int = 4, out_widths=(128, 192),
                 native_size: int = 128):
        super().__init__()
        self.stem = ConvEncoder(in_channels, stem_widths)
        self.kat = timm.create_model(kat_model, pretrained=False, num_classes=0, global_pool="", class_token=False,
                                     in_chans=stem_widths[-1], patch_size=2, img_size=native_size // 4,
                                     embed_dim=embed_dim, depth=depth, num_heads=num_heads, dynamic_img_size=True)
        self.kat.norm = nn.Identity()  # the intermediates are read un-normalised; the final norm would be unused
        self.out_indices = list(range(depth))
        self.reassemble8 = nn.Conv2d(embed_dim * depth, out_widths[0], 1)
        self.reassemble16 = nn.Conv2d(out_widths[0], out_widths[1], 3, 2, 1)
        self.widths = (*stem_widths, *out_widths)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = self.stem(x)
        tokens = self.kat.forward_intermediates(features[-1], indices=self.out_indices, output_fmt="NCHW",
                                                intermediates_only=True)
        eighth = self.reassemble8(torch.cat(tokens, dim=1))
        return [*features, eighth, self.reassemble16(F.gelu(eighth))]


class ConvexUpsample2x(nn.Module):
    """DSINE's (and RAFT's) convex upsampling by 2: each output pixel is a softmax-weighted mix of
    the 3x3 input pixels around its source, the weights predicted from features at the input's
    resolution, so a pixel beside an edge can take its value from its own side alone.

    The weight conv starts at zero with biases that reproduce ``F.interpolate(..., scale_factor=2,
    mode="bilinear")`` (replicate padding is its border clamp), up to a leak of 4.5e-5 to each of
    the five neighbours bilinear leaves out: a trained network with bilinear upsampling keeps its output when
    it grows this module, and training learns the sharper weights from there.
    """

    # Logit of the neighbours bilinear gives no weight: exp(-10) = 4.5e-5 each, 2.3e-4 for all five;
    # finite, so training can still raise them.
    UNUSED_LOGIT = -10.0

    def __init__(self, feature_channels: int):
        super().__init__()
        self.weights = nn.Conv2d(feature_channels, 9 * 4, 3, 1, 1)
        nn.init.zeros_(self.weights.weight)
        with torch.no_grad():
            self.weights.bias.copy_(self.bilinear_logits())

    @classmethod
    def bilinear_logits(cls) -> Tensor:
        """(36,) logits ordered (neighbour 3x3, sub-row, sub-column): bilinear's 1/16, 3/16, 9/16 weights."""
        # Output sub-row 0 sits a quarter pixel above its source row: 1/4 from the row above, 3/4 from its own.
        taps = torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.75, 0.25]], dtype=torch.float64)
        weights = torch.einsum("ak,bl->klab", taps, taps).reshape(36)  # (ky, kx, sub-row, sub-column)
        unused = torch.full_like(weights, cls.UNUSED_LOGIT)
        return torch.where(weights > 0, weights.clamp_min(1e-30).log(), unused).float()

    def forward(self, x: Tensor, features: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        weights = self.weights(features).view(batch, 1, 9, 2, 2, height, width).softmax(dim=2)
        neighbours = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3).view(batch, channels, 9, 1, 1, height, width)
        up = (weights * neighbours).sum(2)  # (B, C, 2, 2, H, W)
        return up.permute(0, 1, 4, 2, 5, 3).reshape(batch, channels, 2 * height, 2 * width)


UPSAMPLINGS = ("bilinear", "convex")


class UNetDecoder(nn.Module):
    """Upsample, concatenate the skip and the rays of that scale, ConvBlock, up to 1/2; a 3-channel
    head there; then to full size (``upsample``: bilinear, or convex with weights learnt from the
    1/2 features) and a light full-resolution conv that sees the image and rays again, so edges are
    placed where the image has them (most of the cost stays at 1/2)."""

    def __init__(self, widths, ray_channels: int = 3, out_channels: int = 3, edge_width: int = 16,
                 upsample: str = "bilinear"):
        super().__init__()
        if upsample not in UPSAMPLINGS:
            raise ValueError(f"UNetDecoder: upsample={upsample!r} is not one of {', '.join(UPSAMPLINGS)}")
        widths = tuple(widths)
        self.blocks = nn.ModuleList(
            ConvBlock(widths[i + 1] + widths[i] + ray_channels, widths[i]) for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], out_channels, 3, 1, 1)
        self.upsample = ConvexUpsample2x(widths[0]) if upsample == "convex" else None
        self.edge = nn.Sequential(nn.Conv2d(out_channels + 3 + ray_channels, edge_width, 3, 1, 1),
                                  GroupRational(RATIONAL_GROUPS, "swish", channel_dim=1),
                                  nn.Conv2d(edge_width, out_channels, 3, 1, 1))

    def forward(self, features: list[Tensor], image: Tensor, rays: Tensor) -> Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip, F.interpolate(rays, size=skip.shape[-2:], mode="area")], dim=1))
        if self.upsample is None:
            x = F.interpolate(self.head(x), size=image.shape[-2:], mode="bilinear", align_corners=False)
        else:  # the encoder's stride of 2 and the input's multiple of 16 make the size exactly twice x's
            x = self.upsample(self.head(x), x)
        return x + self.edge(torch.cat([x, image, rays], dim=1))


class YOSO(nn.Module):
    """One-step normal estimator: (image, rays, noise) -> unit normals on the visible hemisphere.

    Args:
        encoder: "kat" or "conv" (see the module docstring).
        noise_channels: channels of the noise input (0: none, a plain regressor).
        upsample: "bilinear" or "convex", how the decoder's 1/2 prediction reaches full size.
        encoder_kwargs: passed to the encoder (widths, KAT size).

    ``forward(image, rays, noise=None)`` takes images in [0, 1] (B, 3, H, W) with H and W
    multiples of ``stride``, unit rays (B, 3, H, W) and an optional noise map; None feeds zeros.
    """

    stride = 16

    def __init__(self, encoder: str = "kat", noise_channels: int = 3, native_size: int = 128,
                 upsample: str = "bilinear", **encoder_kwargs):
        super().__init__()
        self.noise_channels = noise_channels
        self.native_size = native_size
        in_channels = 3 + 3 + noise_channels
        if encoder == "kat":
            self.encoder = KATEncoder(in_channels, native_size=native_size, **encoder_kwargs)
        elif encoder == "conv":
            self.encoder = ConvEncoder(in_channels, **encoder_kwargs)
        else:
            raise ValueError(f"YOSO: encoder={encoder!r} is not 'kat' or 'conv'")
        self.encoder_name = encoder
        self.decoder = UNetDecoder(self.encoder.widths, upsample=upsample)
        # The semantic prior handed to the refiner: the 1/8 features.
        self.semantic_channels = self.encoder.widths[SEMANTIC_LEVEL]

    def encode(self, image: Tensor, rays: Tensor, noise: Tensor | None = None) -> list[Tensor]:
        if image.shape[-2] % self.stride or image.shape[-1] % self.stride:
            raise ValueError(f"YOSO: image size {tuple(image.shape[-2:])} is not a multiple of {self.stride} "
                             "(StableNormal.predict pads for you)")
        if noise is None:
            noise = image.new_zeros(image.shape[0], self.noise_channels, *image.shape[-2:])
        return self.encoder(torch.cat([image * 2 - 1, rays, noise], dim=1))

    def forward(self, image: Tensor, rays: Tensor, noise: Tensor | None = None,
                return_semantic: bool = False):
        features = self.encode(image, rays, noise)
        normal = visible_hemisphere(self.decoder(features, image * 2 - 1, rays).float(), rays)
        return (normal, features[SEMANTIC_LEVEL]) if return_semantic else normal

    def grown_keys(self) -> set[str]:
        """Parameters that keep a bilinear estimator's output when it grows into this one (the convex
        upsampling's, at their initial values): what a checkpoint without them may leave unset."""
        if self.decoder.upsample is None:
            return set()
        return {"decoder.upsample." + name for name in self.decoder.upsample.state_dict()}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.endswith((*RATIONAL_PARAMETERS, "pos_embed"))}


def yoso_kat(**kwargs) -> YOSO:
    """YOSO on a conv stem and a 4-block, 128-wide KAT (about 1.5M parameters): kzoo's bundled estimator."""
    return YOSO(encoder="kat", **kwargs)


def yoso_conv(**kwargs) -> YOSO:
    """YOSO on group-rational conv stages 32/64/128/192 at strides 2 to 16."""
    return YOSO(encoder="conv", **kwargs)


ESTIMATORS = {"yoso_kat": yoso_kat, "yoso_conv": yoso_conv}
