"""Multi-scale residual VQ-VAE: the image tokenizer of VAR and HMAR.

An LDM-style conv encoder maps an image to a latent f (Cvae channels, 1/16 of the image side in
VAR's configuration). f is quantized scale by scale against ONE shared codebook: at scale k the
residual still unexplained is area-downsampled to pn_k x pn_k, each position takes its nearest code,
and the code map is bicubic-upsampled back to the latent size, passed through a residual conv Phi
and added to the cumulative reconstruction f_hat (and taken off the residual). The decoder maps
f_hat back to an image in [-1, 1]. A transformer then predicts the scales' indices coarse to fine;
its input for scale k+1 is f_hat after scale k, area-resampled to pn_{k+1} x pn_{k+1}.

The structure, key layout and quantization rules are VAR's (``vae_ch160v4096z32.pth`` loads
unchanged); HMAR reuses that tokenizer as is.

Papers: VAR, https://arxiv.org/abs/2404.02905 (code: https://github.com/FoundationVision/VAR);
HMAR, https://arxiv.org/abs/2506.04421 (code: https://github.com/NVlabs/HMAR).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..hub import check_fits, read_state_dict, resolve_weights

__all__ = ["VQVAE", "MultiScaleQuantizer", "VQVAEOutput", "phi_index", "load_official", "vqvae_f16_4096",
           "vqvae_mnist"]

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _normalize(channels: int, device=None, dtype=None) -> nn.GroupNorm:
    """The GroupNorm of the LDM/VAR autoencoders: 32 groups, eps 1e-6."""
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True, device=device, dtype=dtype)


class Downsample2x(nn.Module):
    """Stride-2 3x3 conv after padding one pixel right and bottom, which halves an even side exactly."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice with a (1x1 conv when the width changes) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = _normalize(in_channels, **dd)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, **dd)
        self.norm2 = _normalize(out_channels, **dd)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, **dd)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1, **dd) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with one fused 1x1 qkv conv (VAR's layout)."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm = _normalize(channels, **dd)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, **dd)
        self.proj_out = nn.Conv2d(channels, channels, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width).transpose(2, 3).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C), softmax scale C ** -0.5
        return x + self.proj_out(h.transpose(1, 2).reshape(batch, channels, height, width))


class MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float, use_attention: bool, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.block_1 = ResnetBlock(channels, channels, dropout, **dd)
        self.attn_1 = AttnBlock(channels, **dd) if use_attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image to latent. One level per entry of ``ch_mult``, each halving the side but the last, which
    carries self-attention after each of its ResnetBlocks when ``use_attention``."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, dropout: float, in_channels: int,
                 z_channels: int, use_attention: bool = True, use_mid_attention: bool = True, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, **dd)
        self.down = nn.ModuleList()
        widths = [ch * m for m in ch_mult]
        block_in = ch
        for level, block_out in enumerate(widths):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, dropout, **dd))
                block_in = block_out
                if level == len(widths) - 1 and use_attention:
                    stage.attn.append(AttnBlock(block_in, **dd))
            if level != len(widths) - 1:
                stage.downsample = Downsample2x(block_in, **dd)
            self.down.append(stage)
        self.mid = MidBlock(block_in, dropout, use_mid_attention, **dd)
        self.norm_out = _normalize(block_in, **dd)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent to image, mirroring the encoder with one more ResnetBlock per level. ``up[i]`` is the
    level of width ``ch * ch_mult[i]``; they run from the last (coarsest) to ``up[0]``."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, dropout: float, out_channels: int,
                 z_channels: int, use_attention: bool = True, use_mid_attention: bool = True, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        widths = [ch * m for m in ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1, **dd)
        self.mid = MidBlock(block_in, dropout, use_mid_attention, **dd)
        stages = []
        for level in reversed(range(len(widths))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, widths[level], dropout, **dd))
                block_in = widths[level]
                if level == len(widths) - 1 and use_attention:
                    stage.attn.append(AttnBlock(block_in, **dd))
            if level != 0:
                stage.upsample = Upsample2x(block_in, **dd)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _normalize(block_in, **dd)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1, **dd)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """The residual conv applied to each scale's upsampled code map: ``h (1 - r) + r conv3x3(h)``."""

    def __init__(self, channels: int, resi_ratio: float, device=None, dtype=None):
        super().__init__(channels, channels, 3, padding=1, device=device, dtype=dtype)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.resi_ratio) + super().forward(h) * self.resi_ratio


def phi_index(scale_index: int, num_scales: int, num_phis: int) -> int:
    """Which of ``num_phis`` shared Phi convs scale ``scale_index`` of ``num_scales`` uses (hmar.md §7).

    The Phis sit at evenly spaced ticks in [0, 1] (``linspace(1/(3n), 1 - 1/(3n), n)`` for n = 4, as
    VAR's released tokenizer was built, ``linspace(1/(2n), 1 - 1/(2n), n)`` otherwise); a scale takes
    the tick nearest to its relative depth k/(K-1), the first one on a tie.
    """
    margin = 1 / (3 * num_phis) if num_phis == 4 else 1 / (2 * num_phis)
    ticks = torch.linspace(margin, 1 - margin, num_phis, dtype=torch.float64)
    position = scale_index / max(num_scales - 1, 1)
    return int(torch.argmin((ticks - position).abs()))


class PhiPartiallyShared(nn.Module):
    """``share_quant_resi`` Phi convs, shared by the scales as ``phi_index`` assigns them."""

    def __init__(self, channels: int, num_phis: int, resi_ratio: float, device=None, dtype=None):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, resi_ratio, device=device, dtype=dtype) for _ in range(num_phis))


class VQVAEOutput(NamedTuple):
    """What the training forward returns.

    reconstruction: the decoder's output (not clamped), gradients reaching the encoder through the
        straight-through estimator.
    codebook_loss: mean over scales of ||f_hat_k - sg(f)||^2, which trains the codebook and the Phis.
    commitment_loss: beta times the mean over scales of ||sg(f_hat_k) - f||^2, which trains the encoder.
    indices: per scale, the (B, pn*pn) code indices, row-major.
    """
    reconstruction: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    indices: list[torch.Tensor]


class MultiScaleQuantizer(nn.Module):
    """Residual quantization of a latent over ``patch_nums`` with one shared codebook (VAR's
    ``VectorQuantizer2``, L2 nearest neighbour, no z-normalisation).

    ``ema_vocab_hit_SV`` (scales x V) is a running average of how often each code is picked at each
    scale, updated in training mode; it serves codebook-usage reports and dead-code restarts.
    """

    def __init__(self, vocab_size: int, embed_dim: int, patch_nums: tuple[int, ...], beta: float = 0.25,
                 quant_resi: float = 0.5, share_quant_resi: int = 4, device=None, dtype=None):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.patch_nums = tuple(patch_nums)
        self.beta = beta
        self.quant_resi = PhiPartiallyShared(embed_dim, share_quant_resi, quant_resi, device=device, dtype=dtype)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size, device=device,
                                                             dtype=dtype))
        self.embedding = nn.Embedding(vocab_size, embed_dim, device=device, dtype=dtype)

    def init_weights(self) -> None:
        # Codes start near zero, so the first residuals are quantized to almost nothing and the
        # encoder is not pulled toward arbitrary points early on (the VQGAN convention).
        nn.init.uniform_(self.embedding.weight, -1 / self.vocab_size, 1 / self.vocab_size)

    def phi(self, scale_index: int) -> Phi:
        num_phis = len(self.quant_resi.qresi_ls)
        return self.quant_resi.qresi_ls[phi_index(scale_index, len(self.patch_nums), num_phis)]

    def code_map(self, idx: torch.Tensor, scale_index: int) -> torch.Tensor:
        """(B, pn*pn) indices to their (B, Cvae, pn, pn) code map."""
        pn = self.patch_nums[scale_index]
        return self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], self.embed_dim, pn, pn)

    def upsampled_code(self, h: torch.Tensor, scale_index: int) -> torch.Tensor:
        """A scale's code map as it enters f_hat: bicubic up to the latent size, then its Phi.
        The last scale is already at the latent size and is not resampled."""
        if scale_index != len(self.patch_nums) - 1:
            side = self.patch_nums[-1]
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        return self.phi(scale_index)(h)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Quantize the latent f (B, Cvae, pn_K, pn_K): (f_hat, indices, codebook_loss, commitment_loss).

        f_hat carries gradients to the codebook and the Phis only; the straight-through estimator
        is the caller's (``VQVAE.forward``).
        """
        # Nearest-code search and losses in float32 even under autocast: bf16 distances mis-rank codes.
        with torch.autocast(device_type=f.device.type, enabled=False):
            return self._quantize(f.float() if f.dtype in (torch.float16, torch.bfloat16) else f)

    def _quantize(self, f: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        f_detached = f.detach()
        residual = f_detached
        f_hat = torch.zeros_like(f_detached)
        codebook = self.embedding.weight
        codebook_sq = codebook.detach().square().sum(1)
        indices, codebook_loss, commitment_loss = [], f.new_zeros(()), f.new_zeros(())
        num_scales = len(self.patch_nums)
        for k, pn in enumerate(self.patch_nums):
            rest = residual if k == num_scales - 1 else F.interpolate(residual, size=(pn, pn), mode="area")
            rest = rest.detach().permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
            distance = torch.addmm(rest.square().sum(1, keepdim=True) + codebook_sq, rest, codebook.detach().T,
                                   alpha=-2)
            idx = distance.argmin(1).view(f.shape[0], pn * pn)
            if self.training:
                with torch.no_grad():
                    hits = torch.bincount(idx.flatten(), minlength=self.vocab_size).to(self.ema_vocab_hit_SV)
                    self.ema_vocab_hit_SV[k].mul_(0.99).add_(hits, alpha=0.01)
            h = self.upsampled_code(self.code_map(idx, k), k)
            f_hat = f_hat + h
            residual = residual - h
            indices.append(idx)
            codebook_loss = codebook_loss + F.mse_loss(f_hat, f_detached)
            commitment_loss = commitment_loss + F.mse_loss(f_hat.detach(), f)
        return f_hat, indices, codebook_loss / num_scales, self.beta * commitment_loss / num_scales

    def idx_to_fhat(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """The cumulative reconstruction after all scales: the sum of the upsampled codes."""
        f_hat = None
        for k, idx in enumerate(indices):
            h = self.upsampled_code(self.code_map(idx, k), k)
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def idx_to_var_input(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input (B, L - pn_1^2, Cvae): for k = 1..K-1, f_hat after scales < k,
        area-resampled to pn_k x pn_k and flattened row-major, concatenated over k."""
        batch = indices[0].shape[0]
        side = self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(batch, self.embed_dim, side, side)
        next_inputs = []
        for k in range(len(self.patch_nums) - 1):
            f_hat, next_input = self.add_scale(f_hat, k, self.code_map(indices[k], k))
            next_inputs.append(next_input.flatten(2).transpose(1, 2))
        if not next_inputs:
            return f_hat.new_zeros(batch, 0, self.embed_dim)
        return torch.cat(next_inputs, dim=1)

    def own_scale_input(self, h: torch.Tensor, scale_index: int) -> torch.Tensor:
        """A scale's code map h (B, Cvae, pn, pn) as HMAR's mask branch reads it: bicubic up to the
        latent size, its Phi, then area-resampled back to pn x pn."""
        pn = self.patch_nums[scale_index]
        return F.interpolate(self.upsampled_code(h, scale_index), size=(pn, pn), mode="area")

    def idx_to_mask_input(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """The mask branch's teacher-forcing input (B, L - pn_1^2, Cvae): for k = 1..K-1, scale k's
        own tokens through ``own_scale_input``, flattened row-major, concatenated over k."""
        inputs = [self.own_scale_input(self.code_map(indices[k], k), k).flatten(2).transpose(1, 2)
                  for k in range(1, len(self.patch_nums))]
        if not inputs:
            return self.embedding.weight.new_zeros(indices[0].shape[0], 0, self.embed_dim)
        return torch.cat(inputs, dim=1)

    def add_scale(self, f_hat: torch.Tensor, scale_index: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampler step: add scale ``scale_index``'s code map h (B, Cvae, pn, pn) to f_hat.

        Returns (f_hat, next_input), where next_input is the new f_hat area-resampled to the next
        scale's grid (B, Cvae, pn_{k+1}, pn_{k+1}), or f_hat itself after the last scale.
        f_hat is not modified in place.
        """
        f_hat = f_hat + self.upsampled_code(h, scale_index)
        if scale_index == len(self.patch_nums) - 1:
            return f_hat, f_hat
        pn_next = self.patch_nums[scale_index + 1]
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")


class VQVAE(nn.Module):
    """Multi-scale residual VQ-VAE (VAR's tokenizer).

    Args:
        vocab_size: codebook size V.
        z_channels: latent and code width Cvae.
        ch, ch_mult, num_res_blocks, dropout: the conv autoencoder; the image side shrinks by
            ``2 ** (len(ch_mult) - 1)``.
        in_channels: image channels (3, or 1 for MNIST).
        patch_nums: the scales' sides; the last one is the latent side, so images must be
            ``patch_nums[-1] * downsample`` pixels square.
        beta: commitment weight.
        quant_resi: the Phi blend ratio.
        share_quant_resi: how many Phi convs the scales share.
        use_attention, use_mid_attention: self-attention at the coarsest level and in the mid blocks.
    """

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160,
                 ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, dropout: float = 0.0,
                 in_channels: int = 3, patch_nums: tuple[int, ...] = VAR_PATCH_NUMS, beta: float = 0.25,
                 quant_resi: float = 0.5, share_quant_resi: int = 4, use_attention: bool = True,
                 use_mid_attention: bool = True, device=None, dtype=None):
        super().__init__()
        if list(patch_nums) != sorted(set(patch_nums)) or patch_nums[0] < 1:
            raise ValueError(f"patch_nums must be strictly increasing positive sides, got {tuple(patch_nums)}")
        if share_quant_resi < 1:
            raise ValueError(f"share_quant_resi must be at least 1, got {share_quant_resi}")
        dd = dict(device=device, dtype=dtype)
        self.in_channels = in_channels
        self.vocab_size = vocab_size
        self.z_channels = z_channels
        self.patch_nums = tuple(patch_nums)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.img_size = self.patch_nums[-1] * self.downsample
        autoencoder = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, dropout=dropout,
                           z_channels=z_channels, use_attention=use_attention, use_mid_attention=use_mid_attention)
        self.encoder = Encoder(in_channels=in_channels, **autoencoder, **dd)
        self.decoder = Decoder(out_channels=in_channels, **autoencoder, **dd)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, self.patch_nums, beta, quant_resi,
                                            share_quant_resi, **dd)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1, **dd)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, padding=1, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        self.quantize.init_weights()

    @property
    def num_tokens(self) -> int:
        """L, the tokens of all scales together."""
        return sum(pn * pn for pn in self.patch_nums)

    def _check_image(self, img: torch.Tensor) -> None:
        if img.ndim != 4 or img.shape[1] != self.in_channels:
            raise ValueError(f"expected images (B, {self.in_channels}, {self.img_size}, {self.img_size}), "
                             f"got shape {tuple(img.shape)}")
        if img.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"image size {tuple(img.shape[-2:])} does not fit this VQ-VAE: it needs "
                             f"{self.img_size}x{self.img_size} (last scale {self.patch_nums[-1]} x downsample "
                             f"{self.downsample})")

    def _check_indices(self, indices: list[torch.Tensor], num_scales: int) -> None:
        if len(indices) != num_scales:
            raise ValueError(f"expected indices for {num_scales} scales, got {len(indices)}")
        for k, idx in enumerate(indices):
            pn = self.patch_nums[k]
            if idx.ndim != 2 or idx.shape != (indices[0].shape[0], pn * pn) or idx.is_floating_point():
                raise ValueError(f"scale {k}: expected integer indices (B, {pn * pn}), got {idx.dtype} "
                                 f"{tuple(idx.shape)}")

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] to the continuous latent f (B, Cvae, pn_K, pn_K)."""
        self._check_image(img)
        return self.quant_conv(self.encoder(img))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """A cumulative reconstruction to images, clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def forward(self, img: torch.Tensor) -> VQVAEOutput:
        """Training forward: encode, quantize all scales, decode through the straight-through estimator."""
        f = self.encode(img)
        f_hat, indices, codebook_loss, commitment_loss = self.quantize(f)
        # Straight-through: the decoder sees f_hat's values, the encoder gets the decoder's gradient.
        f_hat = f + (f_hat - f).detach()
        return VQVAEOutput(self.decoder(self.post_quant_conv(f_hat)), codebook_loss, commitment_loss, indices)

    @torch.no_grad()
    def img_to_idx(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Images to per-scale indices: K LongTensors (B, pn_k * pn_k), row-major."""
        return self.quantize(self.encode(img))[1]

    def idx_to_fhat(self, indices: list[torch.Tensor]) -> torch.Tensor:
        self._check_indices(indices, len(self.patch_nums))
        return self.quantize.idx_to_fhat(indices)

    def idx_to_img(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale indices of all K scales to images in [-1, 1]."""
        return self.fhat_to_img(self.idx_to_fhat(indices))

    def idx_to_var_input(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """The transformer's teacher-forcing input (B, L - 1, Cvae) from the K scales' indices (the
        last scale's are not read): f_hat after scales < k area-resampled to scale k, for k = 1..K-1."""
        self._check_indices(indices, len(self.patch_nums))
        return self.quantize.idx_to_var_input(indices)

    def idx_to_mask_input(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """The mask branch's teacher-forcing input (B, L - 1, Cvae): each scale k >= 1's own tokens
        (see ``MultiScaleQuantizer.idx_to_mask_input``)."""
        self._check_indices(indices, len(self.patch_nums))
        return self.quantize.idx_to_mask_input(indices)

    def add_scale(self, f_hat: torch.Tensor, scale_index: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampler step; see ``MultiScaleQuantizer.add_scale``. Start from ``new_fhat(B)``."""
        return self.quantize.add_scale(f_hat, scale_index, h)

    def new_fhat(self, batch_size: int) -> torch.Tensor:
        """An empty cumulative reconstruction (B, Cvae, pn_K, pn_K) for the sampler to fill."""
        side = self.patch_nums[-1]
        return self.quantize.embedding.weight.new_zeros(batch_size, self.z_channels, side, side)

    def load_official(self, path: str | Path) -> VQVAE:
        """Load a VAR-layout state dict (``vae_ch160v4096z32.pth``, or a .safetensors of the same keys)
        strictly; the usage buffer may be absent. Raises a one-line ValueError naming the file."""
        path = resolve_weights(path)
        state_dict = read_state_dict(path)
        check_fits(state_dict, self, str(path))
        self.load_state_dict(state_dict, strict=False)
        return self


def load_official(path: str | Path, **kwargs) -> VQVAE:
    """VAR's tokenizer (``vqvae_f16_4096(**kwargs)``) with the weights in ``path``: a local file,
    ``hf-hub:ORG/REPO/FILE`` or the official name ``vae_ch160v4096z32``."""
    return vqvae_f16_4096(**kwargs).load_official(path)


def vqvae_f16_4096(**kwargs) -> VQVAE:
    """VAR's and HMAR's tokenizer: V=4096, Cvae=32, ch=160, 16x downsampling, 4 shared Phis;
    256px images with the default scales (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)."""
    model_args = dict(vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                      dropout=0.0, in_channels=3, patch_nums=VAR_PATCH_NUMS, share_quant_resi=4)
    return VQVAE(**dict(model_args, **kwargs))


def vqvae_mnist(**kwargs) -> VQVAE:
    """A small tokenizer for 28x28 single-channel images: 4x downsampling (ch_mult (1, 2, 2)) to a
    7x7 latent, quantized over the scales (1, 2, 3, 4, 5, 7) (104 tokens) with V=512, Cvae=16 and
    4 shared Phis. For 32x32 images pass ``patch_nums=(1, 2, 3, 4, 6, 8)``."""
    model_args = dict(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, dropout=0.0,
                      in_channels=1, patch_nums=(1, 2, 3, 4, 5, 7), share_quant_resi=4)
    return VQVAE(**dict(model_args, **kwargs))
