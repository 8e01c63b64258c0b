"""Class-conditional next-scale transformer: HMAR's Markovian decoder, and VAR's as a mode.

The sequence holds the token maps of all scales, coarse to fine (L = sum pn_k^2 tokens). Scale 0's
tokens are start tokens made from the class embedding; scale k > 0's input is the tokenizer's
cumulative reconstruction of scales < k, area-resampled to pn_k x pn_k (``VQVAE.idx_to_var_input``).
Every position predicts its own scale's codebook index, so one forward gives teacher-forced logits
for the whole image. Blocks are AdaLN-modulated by the class embedding; q and k are L2-normalised
and q scaled by a learned per-head factor, with softmax scale 1.

The two models differ only in who attends to whom, i.e. in the key ranges handed to
``torch.ops.kzoo.block_sparse_attention``:
  - ``markov`` (HMAR): a token sees its own scale only; earlier scales reach it through its input;
  - ``block_causal`` (VAR): a token sees its own scale and every earlier one.

HMAR's masked-prediction stage adds a branch (``mask_branch_depth`` > 0): the last n blocks and the
head are duplicated as ``mask_blocks``/``mask_head_nm``/``mask_head``, with a learned ``mask_embed``.
The shared first depth - n blocks feed either the next-scale blocks (the rest of ``blocks``) or the
mask blocks, as in HMAR's combined inference module. The mask branch re-predicts hidden tokens of a
scale from the previous scales' reconstruction plus the scale's visible tokens.

Parameter names and shapes are VAR's (``var_d16.pth`` and HMAR's stage-1 checkpoints load
unchanged); HMAR's combined ``hmar-d16.pth`` is renamed on load (``from_official_layout``) and back
(``to_official_layout``). The official additive mask ``attn_bias_for_masking`` is replaced by the
range tensors.

Papers: VAR, https://arxiv.org/abs/2404.02905 (code: https://github.com/FoundationVision/VAR);
HMAR, https://arxiv.org/abs/2506.04421 (code: https://github.com/NVlabs/HMAR).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from kzoo.kernels import block_sparse_attention, scale_ranges

from ..hub import check_fits, read_state_dict, resolve_weights
from .vqvae import VAR_PATCH_NUMS

__all__ = ["NextScaleTransformer", "AdaLNBlock", "AdaLNBeforeHead", "ScaleSelfAttention", "FeedForward", "KVCache",
           "ATTENTION_MODES", "is_combined_layout", "from_official_layout", "to_official_layout", "load_official",
           "hmar_d16", "hmar_d20", "hmar_d24", "hmar_d30", "hmar_mnist", "var_d16", "var_d20", "var_d24", "var_d30"]

ATTENTION_MODES = ("markov", "block_causal")

# The official additive mask; kzoo's mask is the range tensors, so a file may carry it or not.
_OFFICIAL_MASK_KEY = "attn_bias_for_masking"

# Token counts of the official schedules, to recognise a checkpoint's scales from its shapes.
_KNOWN_PATCH_NUMS = {
    (10, 680): VAR_PATCH_NUMS,
    (10, 2240): (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    (14, 9451): (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


# --- blocks ------------------------------------------------------------------------------------

class KVCache:
    """One block's keys and values of the scales run so far (VAR mode's sampler: a scale attends to
    every earlier one, which is then not recomputed)."""

    def __init__(self):
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def extend(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append (B, H, n, D) keys and values; return all of them so far."""
        if self.keys is not None:
            keys, values = torch.cat((self.keys, keys), dim=2), torch.cat((self.values, values), dim=2)
        self.keys, self.values = keys, values
        return keys, values


class ScaleSelfAttention(nn.Module):
    """Self-attention over ranges of keys with L2-normalised q and k (VAR's ``attn_l2_norm``).

    q is multiplied by ``exp(min(scale_mul_1H11, log 100))`` per head and the softmax scale is 1, so
    the logit range is learned and bounded, which keeps fp16/bf16 training stable. The qkv bias is
    (q_bias, 0, v_bias): k needs no bias, since a constant k shift cancels in the softmax.
    """

    def __init__(self, dim: int, num_heads: int, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ScaleSelfAttention: dim={dim} is not divisible by num_heads={num_heads}")
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.max_log_scale = math.log(100.0)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False, **dd)
        self.q_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.v_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.register_buffer("zero_k_bias", torch.zeros(dim, **dd))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0), **dd))
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: Tensor, kv_start: Tensor, kv_end: Tensor, cache: KVCache | None = None) -> Tensor:
        """``kv_start``/``kv_end`` index the keys: x's own, after the cached ones when ``cache`` is given."""
        batch, length, dim = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q_scale = self.scale_mul_1H11.clamp_max(self.max_log_scale).exp()
        # CUDA autocast normalises in fp32 (and the fp32 scale promotes q) while v comes from the
        # bf16 linear; the op takes one dtype.
        q = (F.normalize(q, dim=-1) * q_scale).to(v.dtype)
        k = F.normalize(k, dim=-1).to(v.dtype)
        if cache is not None:
            k, v = cache.extend(k, v)
        out = block_sparse_attention(q, k, v, kv_start, kv_end, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class FeedForward(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_dim, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by the condition (VAR's AdaLNSelfAttn).

    ``ada_lin`` maps the condition to six vectors, in order gamma1, gamma2, scale1, scale2, shift1,
    shift2; the LayerNorm has no affine of its own. Residuals:
    ``x + attn(LN(x)(1 + scale1) + shift1) gamma1`` and ``x + ffn(LN(x)(1 + scale2) + shift2) gamma2``.
    """

    def __init__(self, dim: int, cond_dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 norm_eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False, **dd)
        self.attn = ScaleSelfAttention(dim, num_heads, **dd)
        self.ffn = FeedForward(dim, round(dim * mlp_ratio), **dd)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim, **dd))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor, kv_start: Tensor, kv_end: Tensor,
                cache: KVCache | None = None) -> Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond).view(-1, 1, 6, self.dim).unbind(2)
        attended = self.attn(self.norm(x) * (1 + scale1) + shift1, kv_start, kv_end, cache)
        x = x + self.drop_path(attended * gamma1)
        return x + self.drop_path(self.ffn(self.norm(x) * (1 + scale2) + shift2) * gamma2)


class AdaLNBeforeHead(nn.Module):
    """LN(x)(1 + scale) + shift, with (scale, shift) from the condition, before the logits head."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False, device=device, dtype=dtype)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim, device=device, dtype=dtype))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)
        return self.norm(x) * (1 + scale) + shift


# --- model -------------------------------------------------------------------------------------

class NextScaleTransformer(nn.Module):
    """Class-conditional next-scale predictor over the scales ``patch_nums`` (HMAR or VAR).

    Args:
        vocab_size: codebook size V (logits per token).
        vae_channels: the tokenizer's code width Cvae (input features per token).
        num_classes: class count; row ``num_classes`` of ``class_emb`` is the null class that
            classifier-free guidance uses as the unconditional input.
        depth, embed_dim, num_heads, mlp_ratio: the block stack (VAR: width 64 * depth, heads = depth).
        patch_nums: the scales' sides, coarse to fine.
        attention_mode: ``markov`` (HMAR) or ``block_causal`` (VAR); see the module docstring.
        drop_path_rate: stochastic depth, rising linearly to this rate over the blocks.
        cond_drop_rate: in training, the probability that a label is replaced by the null class.
        mask_branch_depth: n > 0 adds HMAR's masked-prediction branch of n blocks, parallel to the
            last n of ``blocks`` (``markov`` only); 8 in the official models.
        norm_eps: LayerNorm epsilon.
        init_adaln, init_adaln_gamma, init_head, init_std: see ``init_weights``.
    """

    def __init__(self, vocab_size: int = 4096, vae_channels: int = 32, num_classes: int = 1000, depth: int = 16,
                 embed_dim: int = 1024, num_heads: int = 16, mlp_ratio: float = 4.0,
                 patch_nums: tuple[int, ...] = VAR_PATCH_NUMS, attention_mode: str = "markov",
                 drop_path_rate: float = 0.0, cond_drop_rate: float = 0.1, mask_branch_depth: int = 0,
                 norm_eps: float = 1e-6, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                 init_std: float | None = None, device=None, dtype=None):
        super().__init__()
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode={attention_mode!r} is not one of {', '.join(ATTENTION_MODES)}")
        if list(patch_nums) != sorted(set(patch_nums)) or patch_nums[0] < 1:
            raise ValueError(f"patch_nums must be strictly increasing positive sides, got {tuple(patch_nums)}")
        if not 0.0 <= cond_drop_rate <= 1.0:
            raise ValueError(f"cond_drop_rate={cond_drop_rate} is not a probability")
        if not 0 <= mask_branch_depth <= depth:
            raise ValueError(f"mask_branch_depth={mask_branch_depth} must lie in [0, depth={depth}]")
        if mask_branch_depth and attention_mode != "markov":
            raise ValueError("the masked-prediction branch is HMAR's: it needs attention_mode='markov'")
        dd = dict(device=device, dtype=dtype)
        self.vocab_size = vocab_size
        self.vae_channels = vae_channels
        self.num_classes = num_classes
        self.depth = depth
        self.embed_dim = embed_dim
        self.patch_nums = tuple(patch_nums)
        self.attention_mode = attention_mode
        self.cond_drop_rate = cond_drop_rate
        self.mask_branch_depth = mask_branch_depth
        self.num_tokens = sum(pn * pn for pn in self.patch_nums)
        ends = list(itertools.accumulate(pn * pn for pn in self.patch_nums))
        self.scale_spans = [(end - pn * pn, end) for end, pn in zip(ends, self.patch_nums)]
        self.first_tokens = self.patch_nums[0] ** 2
        self.init_std = math.sqrt(1 / embed_dim / 3) if init_std is None else init_std

        self.class_emb = nn.Embedding(num_classes + 1, embed_dim, **dd)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_tokens, embed_dim, **dd))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.num_tokens, embed_dim, **dd))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), embed_dim, **dd)
        self.word_embed = nn.Linear(vae_channels, embed_dim, **dd)
        levels = [k for k, pn in enumerate(self.patch_nums) for _ in range(pn * pn)]
        self.register_buffer("lvl_1L", torch.tensor([levels], device=device))
        # Built once and handed to every block: the attention op plans once per pair of tensors.
        kv_start, kv_end = scale_ranges(self.patch_nums, attention_mode)
        self.register_buffer("kv_start", kv_start.to(device), persistent=False)
        self.register_buffer("kv_end", kv_end.to(device), persistent=False)

        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            AdaLNBlock(embed_dim, embed_dim, num_heads, mlp_ratio, rate, norm_eps, **dd) for rate in rates])
        self.head_nm = AdaLNBeforeHead(embed_dim, embed_dim, norm_eps, **dd)
        self.head = nn.Linear(embed_dim, vocab_size, **dd)
        if mask_branch_depth:
            self.mask_embed = nn.Embedding(1, embed_dim, **dd)
            self.mask_blocks = nn.ModuleList([
                AdaLNBlock(embed_dim, embed_dim, num_heads, mlp_ratio, rate, norm_eps, **dd)
                for rate in rates[depth - mask_branch_depth:]])
            self.mask_head_nm = AdaLNBeforeHead(embed_dim, embed_dim, norm_eps, **dd)
            self.mask_head = nn.Linear(embed_dim, vocab_size, **dd)
        # Ranges over one scale's own tokens (and, with a KV cache, the earlier ones) for the
        # sampler, built once per shape: the attention op plans once per pair of range tensors.
        self._scale_ranges: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.init_weights(init_adaln, init_adaln_gamma, init_head)

    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02) -> None:
        """VAR's initialisation.

        Linears, embeddings and position tables are truncated normals of std ``init_std``
        (sqrt(1 / 3C) by default). The head is scaled by ``init_head`` so the first logits are
        near-uniform; each block's proj and fc2 by 1/sqrt(2 depth) so the residual stream does not
        grow with depth; the AdaLN scale/shift rows by ``init_adaln`` and the gamma rows by
        ``init_adaln_gamma``, so every block starts close to the identity.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=self.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_start, std=self.init_std)
        nn.init.trunc_normal_(self.pos_1LC, std=self.init_std)
        heads = [(self.head_nm, self.head)] + ([(self.mask_head_nm, self.mask_head)] if self.mask_branch_depth else [])
        for head_nm, head in heads:
            head.weight.mul_(init_head)
            head_nm.ada_lin[-1].weight.mul_(init_adaln)
        residual_gain = 1 / math.sqrt(2 * len(self.blocks))
        for block in [*self.blocks, *(self.mask_blocks if self.mask_branch_depth else [])]:
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()
            block.attn.scale_mul_1H11.fill_(math.log(4.0))
            block.attn.proj.weight.mul_(residual_gain)
            block.ffn.fc2.weight.mul_(residual_gain)
            ada_weight = block.ada_lin[-1].weight
            ada_weight[2 * self.embed_dim:].mul_(init_adaln)
            ada_weight[:2 * self.embed_dim].mul_(init_adaln_gamma)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names timm's optimizer factory keeps out of weight decay (besides biases and 1-D
        parameters): the position and level tables and the attention logit scales, as VAR's."""
        return {"pos_start", "pos_1LC", "lvl_embed.weight"} | {
            name for name, _ in self.named_parameters() if name.endswith("scale_mul_1H11")}

    def _check_inputs(self, label_B: Tensor, x_BLCv_wo_first_l: Tensor) -> None:
        if label_B.ndim != 1 or label_B.dtype.is_floating_point or label_B.dtype == torch.bool:
            raise ValueError(f"labels must be a 1-D integer tensor, got {label_B.dtype} "
                             f"of shape {tuple(label_B.shape)}")
        expected = (label_B.shape[0], self.num_tokens - self.first_tokens, self.vae_channels)
        if tuple(x_BLCv_wo_first_l.shape) != expected:
            raise ValueError(f"teacher-forcing input has shape {tuple(x_BLCv_wo_first_l.shape)}; expected "
                             f"(B, L - {self.first_tokens}, Cvae) = {expected} for patch_nums {self.patch_nums}")

    def forward(self, label_B: Tensor, x_BLCv_wo_first_l: Tensor, mask_input: Tensor | None = None,
                masked: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, L, V): position i predicts the index of token i.

        label_B: (B,) class indices in [0, num_classes] (num_classes is the null class).
        x_BLCv_wo_first_l: (B, L - pn_0^2, Cvae), the inputs of scales 1.. (``VQVAE.idx_to_var_input``).
        In training, labels are replaced by the null class with probability ``cond_drop_rate``,
        drawn from torch's global generator.

        With ``mask_input`` (B, L - pn_0^2, Cvae), each scale's own tokens (``VQVAE.idx_to_mask_input``),
        and ``masked`` (B, L) or (L,) bool, the mask branch gives the logits instead: a masked
        token's own code is replaced by ``mask_embed``; the first scale cannot be masked.
        """
        self._check_inputs(label_B, x_BLCv_wo_first_l)
        batch = label_B.shape[0]
        if self.training and self.cond_drop_rate > 0:
            dropped = torch.rand(batch, device=label_B.device) < self.cond_drop_rate
            label_B = torch.where(dropped, self.num_classes, label_B)
        cond = self.class_emb(label_B)
        start = cond[:, None, :] + self.pos_start
        if mask_input is None:
            words = self.word_embed(x_BLCv_wo_first_l.to(self.word_embed.weight.dtype))
        else:
            words = self._masked_words(x_BLCv_wo_first_l, mask_input, self._check_masked(masked, batch))
        x = torch.cat((start, words), dim=1) + self.lvl_embed(self.lvl_1L) + self.pos_1LC
        return self._run(x, cond, "next" if mask_input is None else "mask", self.kv_start, self.kv_end)

    def _check_masked(self, masked: Tensor | None, batch: int) -> Tensor:
        if not self.mask_branch_depth:
            raise ValueError("this model has no masked-prediction branch (mask_branch_depth=0)")
        if masked is None or masked.dtype != torch.bool or masked.shape not in ((self.num_tokens,),
                                                                              (batch, self.num_tokens)):
            raise ValueError(f"masked must be a bool tensor of shape (L,) or (B, L) = ({batch}, {self.num_tokens}), "
                             f"got {None if masked is None else (masked.dtype, tuple(masked.shape))}")
        if masked[..., :self.first_tokens].any():
            raise ValueError("the first scale's tokens (the class tokens) cannot be masked")
        return masked[..., self.first_tokens:]

    def _masked_words(self, next_input: Tensor, mask_input: Tensor, masked: Tensor) -> Tensor:
        """word_embed(next_input) + (mask_embed where masked, else word_embed(mask_input) without
        the bias): the official model's ``word_embed(x_ns) + word_embed(x_mask | mask) + bias``."""
        if mask_input.shape != next_input.shape:
            raise ValueError(f"mask_input has shape {tuple(mask_input.shape)}; expected {tuple(next_input.shape)}")
        weight = self.word_embed.weight
        own = F.linear(mask_input.to(weight.dtype), weight)
        own = torch.where(masked[..., None], self.mask_embed.weight.to(own.dtype), own)
        return self.word_embed(next_input.to(weight.dtype)) + own

    def _run(self, x: Tensor, cond: Tensor, branch: str, kv_start: Tensor, kv_end: Tensor,
             caches: list[KVCache] | None = None) -> Tensor:
        """Shared blocks, then the next-scale or the mask branch, then that branch's head."""
        num_shared = self.depth - self.mask_branch_depth
        if branch == "next":
            blocks, head_nm, head = list(self.blocks), self.head_nm, self.head
        else:
            blocks, head_nm, head = [*self.blocks[:num_shared], *self.mask_blocks], self.mask_head_nm, self.mask_head
        for index, block in enumerate(blocks):
            x = block(x, cond, kv_start, kv_end, None if caches is None else caches[index])
        return head(head_nm(x, cond))

    # --- one scale at a time (the sampler) --------------------------------------------------------

    def embed_scale(self, scale: int, cond: Tensor, next_input: Tensor | None = None,
                    mask_input: Tensor | None = None, masked: Tensor | None = None) -> Tensor:
        """The input tokens (B, pn^2, C) of scale ``scale``: the class start tokens for scale 0; else
        ``next_input`` (B, pn^2, Cvae), the reconstruction of the earlier scales at this scale's grid,
        plus, for the mask branch, ``mask_input`` (the scale's current tokens) with ``masked``
        (B, pn^2) bool positions replaced by ``mask_embed``."""
        begin, end = self.scale_spans[scale]
        if scale == 0:
            if mask_input is not None:
                raise ValueError("the first scale's tokens (the class tokens) cannot be masked")
            x = cond[:, None, :] + self.pos_start
        elif mask_input is None:
            x = self.word_embed(next_input.to(self.word_embed.weight.dtype))
        else:
            x = self._masked_words(next_input, mask_input, masked)
        return x + self.lvl_embed.weight[scale] + self.pos_1LC[:, begin:end]

    def scale_logits(self, x: Tensor, cond: Tensor, branch: str = "next",
                     caches: list[KVCache] | None = None) -> Tensor:
        """Logits (B, n, V) of one scale's tokens ``x`` (``embed_scale``) through the ``next`` or
        ``mask`` branch. Attention covers the scale's own tokens, plus, with ``caches`` (one
        ``KVCache`` per block, VAR mode), every earlier scale's, which the caches then keep."""
        if branch not in ("next", "mask"):
            raise ValueError(f"branch must be 'next' or 'mask', got {branch!r}")
        if branch == "mask" and not self.mask_branch_depth:
            raise ValueError("this model has no masked-prediction branch (mask_branch_depth=0)")
        queries = x.shape[1]
        keys = queries + (0 if caches is None or caches[0].keys is None else caches[0].keys.shape[2])
        kv_start, kv_end = self._full_ranges(queries, keys, x.device)
        return self._run(x, cond, branch, kv_start, kv_end, caches)

    def _full_ranges(self, queries: int, keys: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (queries, keys, device)
        if key not in self._scale_ranges:
            self._scale_ranges[key] = (torch.zeros(queries, dtype=torch.int32, device=device),
                                       torch.full((queries,), keys, dtype=torch.int32, device=device))
        return self._scale_ranges[key]

    # --- the masked-prediction stage -------------------------------------------------------------

    def mask_branch_parameters(self) -> list[nn.Parameter]:
        """What HMAR's masked-prediction stage trains: the mask blocks, head and embedding."""
        if not self.mask_branch_depth:
            raise ValueError("this model has no masked-prediction branch (mask_branch_depth=0)")
        return [*self.mask_embed.parameters(), *self.mask_blocks.parameters(), *self.mask_head_nm.parameters(),
                *self.mask_head.parameters()]

    @torch.no_grad()
    def init_mask_branch(self) -> None:
        """Start the mask branch as a copy of the next-scale branch (the official stage 2 starts
        from the stage-1 weights) and draw ``mask_embed``."""
        for source, target in zip(self.blocks[self.depth - self.mask_branch_depth:], self.mask_blocks):
            target.load_state_dict(source.state_dict())
        self.mask_head_nm.load_state_dict(self.head_nm.state_dict())
        self.mask_head.load_state_dict(self.head.state_dict())
        nn.init.trunc_normal_(self.mask_embed.weight, std=self.init_std)

    def load_official(self, path: str | Path) -> NextScaleTransformer:
        """Load an official state dict strictly: VAR's layout (``var_d16.pth``, HMAR's stage-1
        checkpoints, or a .safetensors of the same keys), or HMAR's combined layout
        (``hmar-d16.pth``, see ``from_official_layout``). The official mask and the level and
        zero-bias buffers may be present or absent. Raises a one-line ValueError naming the file."""
        path = resolve_weights(path)
        self._load_fitting(from_official_layout(read_state_dict(path)), str(path))
        return self

    def _load_fitting(self, state_dict: dict[str, Tensor], source: str) -> None:
        state_dict = {name: tensor for name, tensor in state_dict.items() if name != _OFFICIAL_MASK_KEY}
        check_fits(state_dict, self, source)
        self.load_state_dict(state_dict, strict=False)


# --- loaders -----------------------------------------------------------------------------------

def _architecture_from_keys(state_dict: dict[str, Tensor], source: str) -> dict:
    """The constructor arguments that a VAR-layout state dict's shapes determine."""
    needed = ("pos_1LC", "class_emb.weight", "lvl_embed.weight", "word_embed.weight", "head.weight",
              "blocks.0.attn.scale_mul_1H11")
    missing = [key for key in needed if key not in state_dict]
    if missing:
        raise ValueError(f"{source}: not a VAR/HMAR next-scale checkpoint (missing {', '.join(missing)})")
    depth = _count_blocks(state_dict, "blocks.")
    num_scales = state_dict["lvl_embed.weight"].shape[0]
    num_tokens = state_dict["pos_1LC"].shape[1]
    args = dict(depth=depth, embed_dim=state_dict["pos_1LC"].shape[2],
                num_heads=state_dict["blocks.0.attn.scale_mul_1H11"].shape[1],
                num_classes=state_dict["class_emb.weight"].shape[0] - 1,
                vocab_size=state_dict["head.weight"].shape[0], vae_channels=state_dict["word_embed.weight"].shape[1],
                mask_branch_depth=_count_blocks(state_dict, "mask_blocks."))
    if (num_scales, num_tokens) in _KNOWN_PATCH_NUMS:
        args["patch_nums"] = _KNOWN_PATCH_NUMS[(num_scales, num_tokens)]
    return args


def is_combined_layout(state_dict: dict[str, Tensor]) -> bool:
    """Whether ``state_dict`` is HMAR's combined inference module (``hmar-d{depth}.pth``)."""
    return "word_embed_bias" in state_dict or any(name.startswith("base_blocks.") for name in state_dict)


def from_official_layout(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """HMAR's combined layout -> kzoo's names; other layouts unchanged.

    The combined module shares ``base_blocks`` and then branches: ``ns_blocks`` + ``ns_head_nm`` +
    ``ns_head`` predict the next scale, ``mask_blocks`` + ``mask_head_nm`` + ``mask_head`` (with
    ``mask_embed``) re-predict masked tokens. In kzoo's layout the next-scale model is ``blocks``
    (base_blocks then ns_blocks) with ``head_nm``/``head``; ``word_embed_bias`` is ``word_embed``'s
    bias; the mask branch keeps its names.
    """
    if not is_combined_layout(state_dict):
        return state_dict
    num_base = _count_blocks(state_dict, "base_blocks.")
    ours = {}
    for name, tensor in state_dict.items():
        if name.startswith("base_blocks."):
            ours["blocks." + name.removeprefix("base_blocks.")] = tensor
        elif name.startswith("ns_blocks."):
            index, rest = name.removeprefix("ns_blocks.").split(".", 1)
            ours[f"blocks.{num_base + int(index)}.{rest}"] = tensor
        elif name.startswith("ns_head"):
            ours[name.removeprefix("ns_")] = tensor
        elif name == "word_embed_bias":
            ours["word_embed.bias"] = tensor
        else:
            ours[name] = tensor
    return ours


def to_official_layout(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """kzoo's names -> HMAR's combined layout for a model with a mask branch; VAR's layout (kzoo's
    own) without one. The inverse of ``from_official_layout``."""
    num_branch = _count_blocks(state_dict, "mask_blocks.")
    if not num_branch:
        return state_dict
    num_base = _count_blocks(state_dict, "blocks.") - num_branch
    official = {}
    for name, tensor in state_dict.items():
        if name.startswith("blocks."):
            index, rest = name.removeprefix("blocks.").split(".", 1)
            if int(index) < num_base:
                official[f"base_blocks.{index}.{rest}"] = tensor
            else:
                official[f"ns_blocks.{int(index) - num_base}.{rest}"] = tensor
        elif name.startswith(("head.", "head_nm.")):
            official["ns_" + name] = tensor
        elif name == "word_embed.bias":
            official["word_embed_bias"] = tensor
        else:
            official[name] = tensor
    return official


def _count_blocks(state_dict: dict[str, Tensor], prefix: str) -> int:
    indices = {int(name.removeprefix(prefix).split(".", 1)[0]) for name in state_dict if name.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def load_official(path: str | Path, **kwargs) -> NextScaleTransformer:
    """A model built to fit the official file ``path`` (a local file, ``hf-hub:ORG/REPO/FILE`` or a
    name such as ``var-d16`` or ``hmar-d16``), with its weights loaded strictly.

    Depth, width, heads, classes, V, Cvae and the mask branch's depth come from the file's shapes,
    the scales from its token count when it is an official schedule (else pass ``patch_nums``).
    The attention mode follows the layout: ``markov`` for HMAR's combined files, ``block_causal``
    for VAR's layout, the one VAR's files are released in; pass ``attention_mode="markov"`` for
    HMAR stage-1 checkpoints. ``kwargs`` override the rest.
    """
    path = resolve_weights(path)
    official = read_state_dict(path)
    state_dict = from_official_layout(official)
    args = dict(attention_mode="markov" if is_combined_layout(official) else "block_causal", drop_path_rate=0.0)
    args.update(_architecture_from_keys(state_dict, str(path)), **kwargs)
    model = NextScaleTransformer(**args)
    model._load_fitting(state_dict, str(path))
    return model


# --- entry points ------------------------------------------------------------------------------

def _imagenet(depth: int, attention_mode: str, kwargs: dict) -> NextScaleTransformer:
    """VAR/HMAR's ImageNet 256px configuration at ``depth``: width 64 depth, heads = depth,
    drop path 0.1 depth / 24, label drop 0.1, V=4096, Cvae=32."""
    model_args = dict(vocab_size=4096, vae_channels=32, num_classes=1000, depth=depth, embed_dim=64 * depth,
                      num_heads=depth, patch_nums=VAR_PATCH_NUMS, attention_mode=attention_mode,
                      drop_path_rate=0.1 * depth / 24, cond_drop_rate=0.1)
    return NextScaleTransformer(**dict(model_args, **kwargs))


def hmar_d16(**kwargs) -> NextScaleTransformer:
    """HMAR-d16 (width 1024, 16 heads), Markovian attention: 310M parameters for the next-scale
    model; ``mask_branch_depth=8`` gives the combined model of ``hmar-d16.pth`` (468M)."""
    return _imagenet(16, "markov", kwargs)


def hmar_d20(**kwargs) -> NextScaleTransformer:
    """HMAR-d20 next-scale model (600M; width 1280, 20 heads), Markovian attention."""
    return _imagenet(20, "markov", kwargs)


def hmar_d24(**kwargs) -> NextScaleTransformer:
    """HMAR-d24 next-scale model (1.0B; width 1536, 24 heads), Markovian attention."""
    return _imagenet(24, "markov", kwargs)


def hmar_d30(**kwargs) -> NextScaleTransformer:
    """HMAR-d30 next-scale model (2.0B; width 1920, 30 heads), Markovian attention."""
    return _imagenet(30, "markov", kwargs)


def var_d16(**kwargs) -> NextScaleTransformer:
    """VAR-d16 (310M): the same network with block-causal attention."""
    return _imagenet(16, "block_causal", kwargs)


def var_d20(**kwargs) -> NextScaleTransformer:
    """VAR-d20 (600M), block-causal attention."""
    return _imagenet(20, "block_causal", kwargs)


def var_d24(**kwargs) -> NextScaleTransformer:
    """VAR-d24 (1.0B), block-causal attention."""
    return _imagenet(24, "block_causal", kwargs)


def var_d30(**kwargs) -> NextScaleTransformer:
    """VAR-d30 (2.0B), block-causal attention."""
    return _imagenet(30, "block_causal", kwargs)


def hmar_mnist(**kwargs) -> NextScaleTransformer:
    """A small model for ``vqvae_mnist``'s tokens (scales (1, 2, 3, 4, 5, 7), 104 tokens, V=512,
    Cvae=16) and 10 classes: depth 4, width 128, 4 heads of 32 (1.3M parameters, small enough to
    train on two CPU cores and to ship). Pass ``attention_mode="block_causal"`` for VAR mode."""
    model_args = dict(vocab_size=512, vae_channels=16, num_classes=10, depth=4, embed_dim=128, num_heads=4,
                      patch_nums=(1, 2, 3, 4, 5, 7), attention_mode="markov", drop_path_rate=0.0,
                      cond_drop_rate=0.1)
    return NextScaleTransformer(**dict(model_args, **kwargs))
