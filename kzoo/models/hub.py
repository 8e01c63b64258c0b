"""Where weights come from: a local file, the Hugging Face Hub, or a family's default.

A weights argument is one of
  - a local path;
  - ``hf-hub:ORG/REPO/FILE``, a file in a Hub model repository;
  - the name of an official file in ``OFFICIAL`` (e.g. ``hmar-d16``);
  - nothing, where the family has a default.

Downloads go through ``huggingface_hub`` into its standard cache (``HF_HOME``, ``HF_HUB_CACHE``), so
a file is fetched once; with ``HF_HUB_OFFLINE=1`` it is served from that cache with no network.
KAT's ``pretrained=True`` goes through timm's own ``hf_hub_id`` mechanism instead, which uses the
same cache.
"""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

HUB_PREFIX = "hf-hub:"

#: Official weights by name (shared/reference/hmar.md §0): HMAR's transformers, VAR's, and the
#: multi-scale VQ-VAE both use.
OFFICIAL = {
    **{f"hmar-d{depth}": f"hf-hub:nvidia/HMAR/hmar-d{depth}.pth" for depth in (16, 20, 24, 30)},
    **{f"var-d{depth}": f"hf-hub:FoundationVision/var/var_d{depth}.pth" for depth in (16, 20, 24, 30)},
    "vae_ch160v4096z32": "hf-hub:FoundationVision/var/vae_ch160v4096z32.pth",
}


def resolve_weights(spec: str | Path | None, default: str | None = None) -> Path:
    """The local file that ``spec`` (or, when it is empty, ``default``) names, downloading it
    into the Hugging Face cache when it lives on the Hub and is not cached yet.

    Raises ValueError with one line naming the file: a missing local file, a malformed ``hf-hub:``
    spec, or a Hub file that cannot be had (offline and not cached, no such repository or file).
    """
    spec = str(spec) if spec not in (None, "") else default
    if spec is None:
        raise ValueError("no weights given, and this model has no default: pass a file or hf-hub:ORG/REPO/FILE")
    spec = OFFICIAL.get(spec, spec)
    if not spec.startswith(HUB_PREFIX):
        path = Path(spec).expanduser()
        if not path.exists():
            raise ValueError(f"{path}: no such weights file or checkpoint folder")
        return path
    repo_id, filename = split_hub_spec(spec)
    return hub_file(repo_id, filename)


def split_hub_spec(spec: str) -> tuple[str, str]:
    """``hf-hub:ORG/REPO/FILE`` -> (``ORG/REPO``, ``FILE``); FILE may hold folders."""
    parts = spec[len(HUB_PREFIX):].split("/", 2)
    if not spec.startswith(HUB_PREFIX) or len(parts) < 3 or not all(parts):
        raise ValueError(f"{spec}: expected hf-hub:ORG/REPO/FILE")
    return f"{parts[0]}/{parts[1]}", parts[2]


def hub_file(repo_id: str, filename: str) -> Path:
    """``filename`` of Hub model repository ``repo_id``, from the cache or downloaded into it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename))
    except LocalEntryNotFoundError:
        raise ValueError(offline_message(f"{HUB_PREFIX}{repo_id}/{filename}")) from None
    except EntryNotFoundError:
        raise ValueError(f"{HUB_PREFIX}{repo_id}/{filename}: the repository has no such file") from None
    except HfHubHTTPError as error:  # no such repository, gated, server errors
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{HUB_PREFIX}{repo_id}/{filename}: {reason}") from None


def offline_message(what: str) -> str:
    """One line for weights that are neither cached nor downloadable, saying how to get past it."""
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
    return (f"{what}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; download it once "
            "with a network (the same cache is then used offline), or pass a local file instead")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a local .pth (weights only) or .safetensors file, with one-line errors."""
    try:
        if path.suffix == ".safetensors":
            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    # What torch and safetensors raise for a corrupt or truncated file, or a refused pickle.
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, struct.error, SafetensorError) as error:
        reason = (str(error).splitlines() or [""])[0] or "empty or cut short"
        raise ValueError(f"{path}: cannot read checkpoint ({type(error).__name__}: {reason})") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state_dict


def check_fits(state_dict: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise a one-line ValueError listing what does not fit; buffers may be missing."""
    expected = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    missing = sorted(set(expected) - set(state_dict) - buffers)
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k].shape]
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                if keys]
    if problems:
        raise ValueError(f"{source}: checkpoint does not fit this {type(model).__name__}: " + "; ".join(problems))
