"""Kolmogorov-Arnold Transformer (KAT) for timm.

KAT is timm's ViT with each MLP replaced by two group-rational KAN layers (``layers.KAN``):
``x + attn(norm1(x))``, then ``x + KAN(norm2(x))``. The whole timm model API (features_only,
forward_intermediates, grad checkpointing, pos-embed resampling) comes from ``VisionTransformer``;
this module adds the KAN layer, KAT's initialisation, the configs, checkpoint loading and the
``@register_model`` entry points.

Paper: https://arxiv.org/abs/2409.10594. Official code: https://github.com/Adamdad/kat.
"""
from __future__ import annotations

import math
import pickle
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError
from huggingface_hub.utils import LocalEntryNotFoundError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import (build_model_with_cfg, generate_default_cfgs, load_state_dict, register_model,
                         resolve_pretrained_cfg)
from timm.models._helpers import clean_state_dict
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn
from torch import nn

from ..hub import offline_message
from ..layers import KAN, RATIONAL_PARAMETERS

__all__ = ["KAT", "checkpoint_filter_fn", "from_vit", "load_checkpoint_file"]


class KAT(VisionTransformer):
    """Vision Transformer whose MLPs are group-rational KANs.

    Args:
        act_init: the function act2 of every KAN starts as ("swish" in the official models, or
            "gelu"); act1 always starts as the identity.
        num_groups: rational groups per activation (8 in the official models).
        mimetic_init: initialise attention mimetically (as the official models do).
        **kwargs: ``VisionTransformer`` arguments (img_size, embed_dim, depth, ...).
    """

    def __init__(self, act_init: str = "swish", num_groups: int = 8, mimetic_init: bool = True, **kwargs):
        self.act_init = act_init
        self.mimetic_init = mimetic_init
        kwargs.setdefault("mlp_layer", partial(KAN, act_init=act_init, num_groups=num_groups))
        super().__init__(**kwargs)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset)
        if self.mimetic_init:
            init_attention_mimetic(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        rationals = {name for name, _ in self.named_parameters() if name.endswith(RATIONAL_PARAMETERS)}
        return super().no_weight_decay() | rationals


def _mimetic_factors(dim: int, alpha: float, beta: float, sign: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L @ R = alpha * U(+-sqrt(3/dim)) + sign * beta * I, split by SVD."""
    bound = math.sqrt(3.0 / dim)
    target = alpha * torch.empty(dim, dim, device=device).uniform_(-bound, bound)
    target += sign * beta * torch.eye(dim, device=device)
    u, s, vh = torch.linalg.svd(target)
    root = s.sqrt()
    return u * root, root[:, None] * vh


@torch.no_grad()
def init_attention_mimetic(model: VisionTransformer, qk=(0.7, 0.7), vo=(0.4, 0.4)) -> None:
    """Mimetic attention init (Trockman & Kolter, 2023), as KAT uses it.

    Per block, Wq^T Wk = alpha Z + beta I and Wo Wv = alpha Z - beta I for uniform random Z; the
    rank-dim factorisation is split across heads, head h taking singular directions h*d..(h+1)*d.
    """
    for block in model.blocks:
        qkv, proj = block.attn.qkv.weight, block.attn.proj.weight
        if qkv.is_meta:
            return
        dim = qkv.shape[1]
        left, right = _mimetic_factors(dim, *qk, sign=1.0, device=qkv.device)
        qkv[:dim] = left.T.to(qkv.dtype)
        qkv[dim:2 * dim] = right.to(qkv.dtype)
        left, right = _mimetic_factors(dim, *vo, sign=-1.0, device=qkv.device)
        qkv[2 * dim:] = right.to(qkv.dtype)
        proj.copy_(left.to(proj.dtype))


# --- checkpoints -------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def load_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights in a local .safetensors or .pth/.bin checkpoint of any timm model: EMA weights
    first, training wrappers and DDP prefixes removed. Read by timm's loader with weights_only=True
    passed explicitly, so a file that pickles anything but tensors and plain containers is refused.

    Raises ValueError naming the file when it is missing or cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        return load_state_dict(str(path), weights_only=True)
    # What torch, timm and safetensors raise for a corrupt file, a refused pickle (RuntimeError from
    # timm, which names the refused globals), or content that is not a mapping (AttributeError).
    except (OSError, EOFError, RuntimeError, AttributeError, pickle.UnpicklingError, SafetensorError) as error:
        reason = (str(error).splitlines() or [""])[0] or "empty or cut short"
        raise ValueError(f"{path}: cannot read checkpoint ({type(error).__name__}: {reason})") from None


def _unwrap(state_dict: dict) -> dict[str, torch.Tensor]:
    """The model weights inside a training checkpoint: EMA first, then 'state_dict' or 'model'."""
    for key in _WRAPPER_KEYS:
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return clean_state_dict(state_dict)


def _check_fits(state_dict: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise a ValueError listing what does not fit; head and stem shapes are left to timm's adapters."""
    expected = model.state_dict()
    adaptable = ("head.", "patch_embed.proj.weight")
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(state_dict))
              if state_dict[k].shape != expected[k].shape and not k.startswith(adaptable)]
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                if keys]
    if problems:
        raise ValueError(f"{source}: checkpoint does not fit this {type(model).__name__} "
                         f"(embed_dim={getattr(model, 'embed_dim', '?')}, depth={len(model.blocks)}): "
                         + "; ".join(problems))


def checkpoint_filter_fn(state_dict: dict, model: VisionTransformer, source: str = "checkpoint") -> dict:
    """Official KAT or kzoo checkpoints to this model: unwrap, strip DDP/compile prefixes,
    resample pos_embed and patch_embed, then check every key and shape."""
    state_dict = vit_checkpoint_filter_fn(_unwrap(state_dict), model)
    _check_fits(state_dict, model, source)
    return state_dict


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "fixed_input_size": True,
        "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "mit",
        "paper_ids": "arXiv:2409.10594", "paper_name": "Kolmogorov-Arnold Transformer",
        "origin_url": "https://github.com/Adamdad/kat", **kwargs,
    }


_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}
# Paper top-1 on ImageNet-1k (reference/kat.md §4.1): from scratch, and fine-tuned from ViT weights.
_TOP1 = {"tiny": (74.6, 75.7), "small": (81.2, 82.0), "base": (82.3, 82.8)}


def _official(size: str, note: str) -> dict:
    """The two official weight sets of a size: ``in1k`` (default, trained from scratch) and
    ``vitft`` (initialised from ViT), in the Hub repositories the KAT authors publish."""
    scratch, finetuned = _TOP1[size]
    return {
        ".in1k": _cfg(hf_hub_id=f"adamdad/kat_{size}_patch16_224", notes=f"{note}; ImageNet-1k top-1 {scratch}"),
        ".vitft": _cfg(hf_hub_id=f"adamdad/kat_{size}_patch16_224.vitft",
                        notes=f"{note}; initialised from ViT; ImageNet-1k top-1 {finetuned}"),
    }


# The original registers a plain dict, so only untagged names reach timm and its .vitft tags fail;
# here every tag is a timm pretrained cfg. The un-suffixed names and the aliases are the swish models
# the official weights are.
default_cfgs = generate_default_cfgs({
    **{f"{name}{tag}": cfg
       for size in _SIZES
       for name, note in ((f"kat_{size}_patch16_224", "swish init"), (f"kat_{size}_swish_patch16_224", "swish init"),
                          (f"kat_{size}", f"alias of kat_{size}_patch16_224"))
       for tag, cfg in _official(size, note).items()},
    **{f"kat_{size}_gelu_patch16_224": _cfg(notes="gelu init; no official weights") for size in _SIZES},
})


def _local_weights(variant: str, kwargs: dict) -> str | None:
    """The local file named by ``pretrained_cfg_overlay`` or ``pretrained_cfg``, if any."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    cfg = kwargs.get("pretrained_cfg")
    file = overlay.get("file") or (cfg.get("file") if isinstance(cfg, dict) else getattr(cfg, "file", None))
    return str(file) if file else None


def _create_kat(variant: str, pretrained: bool = False, act_init: str = "swish", **kwargs) -> KAT:
    """timm's builder. Pretrained weights come from a local file when one is named (never touching
    the network), else from the cfg's Hub repository through timm, into the Hugging Face cache."""
    out_indices = kwargs.pop("out_indices", 3)
    filter_fn = checkpoint_filter_fn
    hub_id = None
    if pretrained:
        overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
        local = _local_weights(variant, kwargs)
        if "state_dict" in overlay:  # weights read by the caller are used as given, as timm's loader does
            source = str(overlay.get("file") or "state_dict")
        elif local:
            source = local
            overlay["state_dict"] = load_checkpoint_file(local)
        else:
            cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                         pretrained_cfg_overlay=overlay)
            hub_id = cfg.hf_hub_id
            if not hub_id:
                raise ValueError(f"{variant}: no official weights; pass a local file with "
                                 f"pretrained_cfg_overlay=dict(file=PATH)")
            source = f"hf-hub:{hub_id}"
        kwargs["pretrained_cfg_overlay"] = overlay
        filter_fn = partial(checkpoint_filter_fn, source=source)
    try:
        return build_model_with_cfg(
            KAT, variant, pretrained,
            pretrained_filter_fn=filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
            act_init=act_init,
            **kwargs,
        )
    except LocalEntryNotFoundError:  # offline, or no network, and not in the cache
        raise ValueError(offline_message(f"{variant} weights (hf-hub:{hub_id})") + ", e.g. "
                         "pretrained_cfg_overlay=dict(file=PATH)") from None


def _kat(variant: str, size: str, act_init: str, pretrained: bool, **kwargs) -> KAT:
    return _create_kat(variant, pretrained=pretrained, act_init=act_init,
                       **dict(dict(patch_size=16, **_SIZES[size]), **kwargs))


# --- conversion from ViT -----------------------------------------------------------------------

def from_vit(vit_state_dict: dict, act_init: str = "gelu", num_heads: int | None = None, **kwargs) -> KAT:
    """KAT* from a timm ViT/DeiT state dict: every ViT weight copied, act1 the identity, act2 ``act_init``.

    With ``act_init="gelu"`` the result computes nearly the ViT's own function (the gelu preset is
    within 1.5e-3 of GELU on [-3, 3]); ``"swish"`` reproduces the official KAT* recipe, which starts
    from a different function. ``num_heads`` defaults to embed_dim // 64, as in ViT/DeiT.
    """
    state_dict = _unwrap(vit_state_dict)
    patch_weight = state_dict["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    has_class_token = "cls_token" in state_dict
    grid = math.isqrt(state_dict["pos_embed"].shape[1] - int(has_class_token))
    args = dict(
        img_size=grid * patch_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads or embed_dim // 64,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        num_classes=state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0,
        class_token=has_class_token, act_init=act_init, mimetic_init=False,
    )
    model = KAT(**dict(args, **kwargs))
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(RATIONAL_PARAMETERS)]
    if missing or result.unexpected_keys:
        raise ValueError(f"from_vit: state dict does not fit a KAT of embed_dim={embed_dim}, depth={depth}: "
                         f"missing {missing[:6]}, unexpected {result.unexpected_keys[:6]}")
    return model


# --- entry points ------------------------------------------------------------------------------

@register_model
def kat_tiny_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    """KAT-T/16 (5.7M parameters), swish-initialised as the official model."""
    return _kat("kat_tiny_patch16_224", "tiny", "swish", pretrained, **kwargs)


@register_model
def kat_tiny_swish_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    return _kat("kat_tiny_swish_patch16_224", "tiny", "swish", pretrained, **kwargs)


@register_model
def kat_tiny_gelu_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    return _kat("kat_tiny_gelu_patch16_224", "tiny", "gelu", pretrained, **kwargs)


@register_model
def kat_small_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    """KAT-S/16 (22.1M parameters), swish-initialised as the official model."""
    return _kat("kat_small_patch16_224", "small", "swish", pretrained, **kwargs)


@register_model
def kat_small_swish_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    return _kat("kat_small_swish_patch16_224", "small", "swish", pretrained, **kwargs)


@register_model
def kat_small_gelu_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    return _kat("kat_small_gelu_patch16_224", "small", "gelu", pretrained, **kwargs)


@register_model
def kat_base_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    """KAT-B/16 (86.6M parameters), swish-initialised as the official model."""
    return _kat("kat_base_patch16_224", "base", "swish", pretrained, **kwargs)


@register_model
def kat_base_swish_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    return _kat("kat_base_swish_patch16_224", "base", "swish", pretrained, **kwargs)


@register_model
def kat_base_gelu_patch16_224(pretrained: bool = False, **kwargs) -> KAT:
    return _kat("kat_base_gelu_patch16_224", "base", "gelu", pretrained, **kwargs)


@register_model
def kat_tiny(pretrained: bool = False, **kwargs) -> KAT:
    """Alias of kat_tiny_patch16_224."""
    return _kat("kat_tiny", "tiny", "swish", pretrained, **kwargs)


@register_model
def kat_small(pretrained: bool = False, **kwargs) -> KAT:
    """Alias of kat_small_patch16_224."""
    return _kat("kat_small", "small", "swish", pretrained, **kwargs)


@register_model
def kat_base(pretrained: bool = False, **kwargs) -> KAT:
    """Alias of kat_base_patch16_224."""
    return _kat("kat_base", "base", "swish", pretrained, **kwargs)
