"""Class-conditional sampling of HMAR and VAR (hmar.md §1.4, §1.5 and §7).

Scale by scale, coarse to fine:
  1. the next-scale pass predicts every token of the scale from the reconstruction of the earlier
     scales (HMAR: the scale's tokens alone; VAR mode: with a KV cache of every earlier scale);
  2. where the mask schedule asks for it (HMAR), the least confident tokens are hidden and
     re-predicted by the mask branch over several steps, MaskGIT-style;
  3. the scale's codes are added to the cumulative reconstruction f_hat.
The image is the tokenizer's decoding of f_hat.

Guidance doubles the batch as [conditional; null class] and mixes the logits as
``(1 + t) cond - t uncond`` with ``t = cfg * k / (K - 1)`` at scale k. The official sampler turns
guidance off in the mask steps (a hard-coded 1e-6); here they use the scale's ramped guidance by
default, and ``mask_cfg`` sets their own ramp (``mask_cfg=0`` reproduces the original).

Each sample draws from its own generator, seeded with ``seed + index``, so a sample depends on the
seed and its index only, not on the batch it was drawn in.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from .hmar import KVCache, NextScaleTransformer
from .vqvae import VQVAE

__all__ = ["DEFAULT_MASK_SCHEDULE", "default_mask_schedule", "check_mask_schedule", "filter_logits", "sample"]

# hmar.md §1.4: the official default for the 256px scales (1, 2, 3, 4, 5, 6, 8, 10, 13, 16): the 2x2
# scale gets one mask step over 3 tokens, the 3x3 scale three steps over 8, 7 and 5.
DEFAULT_MASK_SCHEDULE = ((1,), (1, 3), (1, 1, 2, 5), (16,), (25,), (36,), (64,), (100,), (169,), (256,))


def default_mask_schedule(patch_nums: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The official default's entries for the scales of side 1, 2 and 3 (refined), one pass elsewhere."""
    by_side = {1: (1,), 2: (1, 3), 3: (1, 1, 2, 5)}
    return tuple(by_side.get(pn, (pn * pn,)) for pn in patch_nums)


def check_mask_schedule(schedule, patch_nums: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """``schedule`` as a tuple of tuples, or a one-line ValueError. Only an entry's length and the
    sums of its tail matter (the first number is never read): scale k is re-predicted
    ``len(schedule[k]) - 1`` times, first over its ``sum(schedule[k][1:])`` least confident tokens."""
    if not isinstance(schedule, (list, tuple)) or len(schedule) != len(patch_nums):
        raise ValueError(f"mask schedule needs one entry per scale ({len(patch_nums)} for patch_nums "
                         f"{tuple(patch_nums)}), got {schedule!r}")
    checked = []
    for k, (entry, pn) in enumerate(zip(schedule, patch_nums)):
        if (not isinstance(entry, (list, tuple)) or not entry
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry)):
            raise ValueError(f"mask schedule entry {k} must be a non-empty list of counts >= 0, got {entry!r}")
        if sum(entry[1:]) > pn * pn:
            raise ValueError(f"mask schedule entry {k} masks {sum(entry[1:])} tokens of a {pn}x{pn} scale")
        if k == 0 and len(entry) > 1:
            raise ValueError("mask schedule entry 0 must have one number: the class tokens cannot be masked")
        checked.append(tuple(entry))
    return tuple(checked)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Set to -inf, in place, the logits outside the top ``top_k`` and outside the smallest set whose
    probability exceeds ``top_p``, per row of the last dim; 0 turns each filter off. The most
    likely token always survives. Returns ``logits``."""
    vocab = logits.shape[-1]
    if top_k > 0:
        kth = logits.topk(min(top_k, vocab), dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        ascending, order = logits.sort(dim=-1)
        # Drop the least likely tokens while their total stays within 1 - top_p; never the last.
        dropped = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        dropped[..., -1] = False
        logits.masked_fill_(dropped.scatter(-1, order, dropped), float("-inf"))
    return logits


def _guided(logits: Tensor, batch: int, t: float) -> Tensor:
    """(1 + t) cond - t uncond over the doubled batch, or the rows as they are without guidance."""
    if logits.shape[0] == batch:
        return logits
    cond, uncond = logits[:batch], logits[batch:]
    return (1 + t) * cond - t * uncond


def _draw(logits: Tensor, top_k: int, top_p: float, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Sampled indices (B, n) and each one's probability under the filtered distribution (the
    confidence the mask steps rank by)."""
    probabilities = filter_logits(logits.float(), top_k, top_p).softmax(dim=-1)
    indices = torch.stack([torch.multinomial(rows, 1, generator=generator)[:, 0]
                           for rows, generator in zip(probabilities, generators)])
    return indices, probabilities.gather(-1, indices[..., None])[..., 0]


def _lowest(confidence: Tensor, count: int, among: Tensor | None = None) -> Tensor:
    """A (B, n) bool mask of the ``count`` least confident positions (only ``among`` them if given)."""
    if among is not None:
        confidence = confidence.masked_fill(~among, float("inf"))
    order = confidence.argsort(dim=-1)[:, :count]
    return torch.zeros_like(confidence, dtype=torch.bool).scatter_(1, order, True)


@torch.no_grad()
def sample(model: NextScaleTransformer, vqvae: VQVAE, labels: Tensor, *, cfg: float = 1.5, top_k: int = 0,
           top_p: float = 0.0, mask_schedule=None, mask_cfg: float | None = None, seed: int = 0,
           first_index: int = 0, progress: bool = False) -> Tensor:
    """Images (B, C, H, W) in [0, 1] for the class ``labels`` (B,).

    cfg: guidance at the last scale, ramped linearly from 0 at the first.
    top_k, top_p: filters before sampling (0 turns each off); ``top_k=1`` is greedy.
    mask_schedule: one entry per scale (``check_mask_schedule``); default ``default_mask_schedule``
        for a model with a mask branch, no masking without one.
    mask_cfg: the guidance of the mask steps at the last scale, ramped like ``cfg``; default: the
        scale's own guidance. 0 is the official sampler's behaviour.
    seed, first_index: sample i draws from a generator seeded with ``seed + first_index + i``.
    """
    patch_nums = model.patch_nums
    if vqvae.patch_nums != patch_nums or vqvae.vocab_size != model.vocab_size or \
            vqvae.z_channels != model.vae_channels:
        raise ValueError(f"the tokenizer (patch_nums {vqvae.patch_nums}, V={vqvae.vocab_size}, "
                         f"Cvae={vqvae.z_channels}) does not fit the transformer (patch_nums {patch_nums}, "
                         f"V={model.vocab_size}, Cvae={model.vae_channels})")
    if labels.ndim != 1 or labels.is_floating_point() or not ((labels >= 0) & (labels < model.num_classes)).all():
        raise ValueError(f"labels must be class indices in [0, {model.num_classes}), got {labels.tolist()}")
    if mask_schedule is None:
        mask_schedule = default_mask_schedule(patch_nums) if model.mask_branch_depth else \
            tuple((pn * pn,) for pn in patch_nums)
    mask_schedule = check_mask_schedule(mask_schedule, patch_nums)
    if not model.mask_branch_depth and any(len(entry) > 1 for entry in mask_schedule):
        raise ValueError("this model has no mask branch (VAR mode or stage 1): use a schedule of one number per scale")

    batch, device = labels.shape[0], labels.device
    generators = [torch.Generator(device=device).manual_seed(seed + first_index + i) for i in range(batch)]
    num_scales = len(patch_nums)
    ramp = [k / (num_scales - 1) if num_scales > 1 else 1.0 for k in range(num_scales)]
    guided = cfg != 0 or (mask_cfg is not None and mask_cfg != 0)
    rows = torch.cat((labels, torch.full_like(labels, model.num_classes))) if guided else labels
    cond = model.class_emb(rows)
    caches = [KVCache() for _ in model.blocks] if model.attention_mode == "block_causal" else None

    f_hat = vqvae.new_fhat(batch)
    next_input = None
    for k in tqdm(range(num_scales), desc="scales", leave=False, disable=not progress):
        t = cfg * ramp[k]
        t_mask = t if mask_cfg is None else mask_cfg * ramp[k]
        scale_input = _doubled(next_input, rows.shape[0])  # the earlier scales, for every pass of this one
        x = model.embed_scale(k, cond, scale_input)
        logits = _guided(model.scale_logits(x, cond, "next", caches), batch, t)
        indices, confidence = _draw(logits, top_k, top_p, generators)
        schedule = mask_schedule[k]
        if len(schedule) > 1 and sum(schedule[1:]) > 0:
            masked = _lowest(confidence, sum(schedule[1:]))
            for step in range(1, len(schedule)):
                own = vqvae.quantize.own_scale_input(vqvae.quantize.code_map(indices, k), k)
                x = model.embed_scale(k, cond, scale_input, _doubled(own.flatten(2).transpose(1, 2), rows.shape[0]),
                                      _doubled(masked, rows.shape[0]))
                logits = _guided(model.scale_logits(x, cond, "mask"), batch, t_mask)
                redrawn, redrawn_confidence = _draw(logits, top_k, top_p, generators)
                indices = torch.where(masked, redrawn, indices)
                if step + 1 < len(schedule):
                    masked = _lowest(redrawn_confidence, sum(schedule[step + 1:]), among=masked)
        h = vqvae.quantize.code_map(indices, k)
        f_hat, next_map = vqvae.add_scale(f_hat, k, h)
        next_input = next_map.flatten(2).transpose(1, 2)
    return (vqvae.fhat_to_img(f_hat).float() + 1) / 2


def _doubled(x: Tensor | None, rows: int) -> Tensor | None:
    """``x`` repeated for the null-class half of a guided batch."""
    if x is None or x.shape[0] == rows:
        return x
    return torch.cat((x, x))
