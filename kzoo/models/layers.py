"""Modules shared by the model families."""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kzoo.kernels import block_sparse_attention, group_rational, reference

# Initial (numerator a0..a5, denominator b0..b3) for the kernels' version-A form
# F(x) = sum a_i x^i / (1 + sum |b_i| |x|^(i+1)), each within 2e-2 of its target on [-3, 3].
# "swish" is the official KAT preset, which is already a version-A fit (max error 1.2e-3).
# "gelu" and "relu" are refitted by tools/fit_rational_init.py: the official "gelu" preset was
# fitted for the version-B denominator and misses GELU by 1.4 at x = 3 under the kernels' form.
RATIONAL_INITS: dict[str, tuple[list[float], list[float]]] = {
    "identity": ([0.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),
    "swish": (
        [3.054879741161051e-07, 0.5000007853744493, 0.24999783422824703,
         0.05326628273219478, 0.005803034571292244, 0.0002751961022402342],
        [-4.111554955950634e-06, 0.10652899335007572, -1.2690007399796238e-06, 0.0005502331264140556],
    ),
    "gelu": (
        [-0.0012427134079923115, 0.49982003353125987, 0.4078986615686826,
         0.10696418292718651, 0.00882503345857099, 5.5109481913832316e-05],
        [1.5028381298729879e-05, 0.21306947753871153, 0.0005985868033151967, -7.006324576504374e-13],
    ),
    "relu": (
        [0.015197055015080356, 0.5173680270170702, 2.6953133671068215,
         4.20816008540011, 2.3433850610659883, 0.4147299792981999],
        [0.269490960086726, 7.92110021716846, 0.30067622183838, -0.7734554883002527],
    ),
}

# The function each preset approximates on [-3, 3].
RATIONAL_TARGETS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
}


# The names of GroupRational's coefficient parameters: models leave them out of weight decay.
RATIONAL_PARAMETERS = ("weight_numerator", "weight_denominator")


class GroupRational(nn.Module):
    """KAT's group-rational activation: one learnable rational function per channel group.

    Args:
        num_groups: G; the channel count must be divisible by it.
        init: the function the rational starts as, a key of ``RATIONAL_INITS``.
        channel_dim: -1 for tokens (B, L, C); 1 for conv feature maps (N, C, H, W).
        numerator_per_group: a (G, 6) numerator instead of the (1, 6) one shared by all groups
            (the official checkpoints share the numerator and keep a denominator per group).
    """

    def __init__(self, num_groups: int = 8, init: str = "swish", channel_dim: int = -1,
                 numerator_per_group: bool = False, device=None, dtype=None):
        super().__init__()
        if init not in RATIONAL_INITS:
            raise ValueError(f"GroupRational: init={init!r} is not one of {', '.join(RATIONAL_INITS)}")
        if num_groups < 1:
            raise ValueError(f"GroupRational: num_groups={num_groups} must be positive")
        self.num_groups = num_groups
        self.init = init
        self.channel_dim = channel_dim
        numerator_rows = num_groups if numerator_per_group else 1
        self.weight_numerator = nn.Parameter(torch.empty(numerator_rows, 6, device=device, dtype=dtype))
        self.weight_denominator = nn.Parameter(torch.empty(num_groups, 4, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        numerator, denominator = RATIONAL_INITS[self.init]
        self.weight_numerator.copy_(torch.tensor(numerator, device=self.weight_numerator.device).expand_as(self.weight_numerator))
        self.weight_denominator.copy_(torch.tensor(denominator, device=self.weight_denominator.device).expand_as(self.weight_denominator))

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript calls registered ops, not Python
            return torch.ops.kzoo.group_rational(x, self.weight_numerator, self.weight_denominator, self.channel_dim)
        return group_rational(x, self.weight_numerator, self.weight_denominator, channel_dim=self.channel_dim)

    def extra_repr(self) -> str:
        return (f"num_groups={self.num_groups}, init={self.init!r}, channel_dim={self.channel_dim}, "
                f"numerator_rows={self.weight_numerator.shape[0]}")


@lru_cache(maxsize=None)
def rational_gain(init: str) -> float:
    """Variance-preserving gain alpha = Var[x] / E[F(x)^2] for x ~ N(0, 1) (KAT paper, Table 3).

    Integrated numerically for the preset as the kernels evaluate it, so it is exact for the
    coefficients in use: swish 2.811 and gelu 2.352, as for SiLU and GELU themselves (the paper
    lists 2.8178 and 2.3568).
    """
    numerator, denominator = RATIONAL_INITS[init]
    x = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64, device="cpu")
    f = reference.group_rational(x[:, None], torch.tensor([numerator], dtype=torch.float64, device="cpu"),
                                 torch.tensor([denominator], dtype=torch.float64, device="cpu"), -1)[:, 0]
    density = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return 1.0 / torch.trapezoid(f * f * density, x).item()


class KAN(nn.Module):
    """KAT's channel mixer, two GR-KAN layers: act1 -> fc1 -> act2 -> fc2.

    act1 starts as the identity and act2 as ``act_init``, so at initialisation the block computes
    Linear -> act_init -> Linear, like a ViT MLP. Takes timm's ``mlp_layer`` arguments; ``act_layer``
    is accepted and ignored, the activations being the rationals.

    ``init_weights`` draws fc1 and fc2 from N(0, gain / fan_in) with the gain of the rational that
    feeds each layer (identity: 1; swish: 2.81; gelu: 2.35), the variance-preserving init of the
    paper. The official code meant to do this, but a later trunc_normal(0.02) overwrote it
    (reference/kat.md section 1.5); timm calls ``init_weights`` after initialising the Linears,
    so here it takes effect.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer=None, norm_layer=None, bias: bool = True, drop: float = 0.0,
                 act_init: str = "swish", num_groups: int = 8, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.act1 = GroupRational(num_groups, "identity", device=device)
        self.drop1 = nn.Dropout(drop)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        self.act2 = GroupRational(num_groups, act_init, device=device)
        self.drop2 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **dd)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for act, fc in ((self.act1, self.fc1), (self.act2, self.fc2)):
            nn.init.normal_(fc.weight, std=math.sqrt(rational_gain(act.init) / fc.in_features))
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(self.drop1(self.act1(x)))
        x = self.norm(self.drop2(self.act2(x)))
        return self.fc2(x)


class SparseSelfAttention(nn.Module):
    """Multi-head self-attention in which token i attends keys ``kv_start[i] <= j < kv_end[i]``.

    The ranges are computed once per layout (``kzoo.kernels.scale_ranges`` and friends) and passed
    to ``forward``; the attention runs on ``torch.ops.kzoo.block_sparse_attention``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_norm: bool = False,
                 proj_bias: bool = True, proj_drop: float = 0.0, norm_layer=nn.LayerNorm,
                 scale: float | None = None, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SparseSelfAttention: dim={dim} is not divisible by num_heads={num_heads}")
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5 if scale is None else scale
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, kv_start: Tensor, kv_end: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # CUDA autocast runs the norms in fp32 and the linear in bf16; the op takes one dtype.
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        x = block_sparse_attention(q, k, v, kv_start, kv_end, scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, length, dim)))
