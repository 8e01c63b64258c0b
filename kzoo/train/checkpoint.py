"""Checkpoints that survive being killed at any instant, and load without unpickling code.

A checkpoint is a folder ``checkpoints/step-<N>/`` holding
  model.safetensors   the weights, with the model name and config in the metadata
  ema.safetensors     the EMA weights, when EMA is on
  state.pt            optimizer, scheduler, scaler, counters, data position (torch.load(weights_only=True))
  rng-<rank>.pt       every rank's python/numpy/torch/cuda random streams
It is written under a temporary name, every file fsync'ed, and renamed into place in one step;
``last`` and ``best`` are symlinks swapped by rename. A reader therefore sees a whole checkpoint or
none, and a kill mid-save leaves the previous one intact. A step saved a second time (a run stopped
in an epoch's last step saves it again at the epoch's end) replaces the first copy only after the
new one is in place; ``CheckpointWriter.recover`` finishes or undoes a replacement a kill cut short.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

MODEL_FILE, EMA_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "state.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then fsync and rename over ``path``: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


# --- random streams as plain tensors (so weights_only loading can read them) ------------------------

def rng_state() -> dict[str, torch.Tensor]:
    version, python_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": torch.tensor(python_state, dtype=torch.int64),
        "python_version": torch.tensor(version),
        "python_gauss": torch.tensor(float("nan") if gauss is None else gauss, dtype=torch.float64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": torch.tensor([pos, has_gauss]),
        "numpy_gauss": torch.tensor(cached, dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    gauss = state["python_gauss"].item()
    random.setstate((int(state["python_version"]), tuple(state["python"].tolist()),
                     None if gauss != gauss else gauss))
    pos, has_gauss = state["numpy_pos"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss,
                         state["numpy_gauss"].item()))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- reading ---------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    state: dict
    metadata: dict[str, str]

    def rng(self, rank: int) -> dict[str, torch.Tensor] | None:
        file = self.path / f"rng-{rank}.pt"
        return _load_tensors(file, "random-stream state") if file.exists() else None


def checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint folder named by ``path``: the folder, ``last``/``best``, or a file inside it."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / STATE_FILE).exists():
        raise FileNotFoundError(f"{path}: not a kzoo checkpoint (no {STATE_FILE} in {folder})")
    return folder.resolve()


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights and metadata of a ``.safetensors`` file, or of a checkpoint folder's model."""
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: no such checkpoint file")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(file)), metadata
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{file}: unreadable safetensors file ({error})") from None


def read_kzoo_model(path: str | Path, prefer_ema: bool = True) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(weights, model config) of a kzoo checkpoint folder (its EMA weights when it has them and
    ``prefer_ema``) or of a kzoo ``.safetensors`` file; None for any other file, which the caller
    may read as a third-party format."""
    path = Path(path)
    if not (path.is_dir() or path.suffix == ".safetensors"):
        return None
    file = path / EMA_FILE if prefer_ema and path.is_dir() and (path / EMA_FILE).exists() else path
    weights, metadata = read_weights(file)
    if metadata.get("format") != "kzoo":
        return None
    return weights, json.loads(metadata["config"])


def load_strict(model: nn.Module, weights: dict[str, torch.Tensor], source: Path,
                may_miss: set[str] = frozenset()) -> nn.Module:
    """``model`` with ``weights`` loaded, or a one-line error naming ``source`` when they do not fit.
    Keys in ``may_miss`` (parameters a grown model initialises to keep the smaller one's output)
    keep their initial values when ``weights`` lacks them."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [key for key in missing if key not in may_miss]
    if missing or unexpected:
        raise ValueError(f"{source}: does not fit the model it names (missing {len(missing)} keys, e.g. "
                         f"{missing[:2]}; unexpected {len(unexpected)}, e.g. {unexpected[:2]})")
    return model


def load(path: str | Path) -> Checkpoint:
    folder = checkpoint_folder(path)
    model, metadata = read_weights(folder / MODEL_FILE)
    ema = read_weights(folder / EMA_FILE)[0] if (folder / EMA_FILE).exists() else None
    state = _load_tensors(folder / STATE_FILE, "training state")
    if not isinstance(state, dict):
        raise ValueError(f"{folder / STATE_FILE}: unreadable training state (a {type(state).__name__}, not a dict)")
    return Checkpoint(folder, model, ema, state, metadata)


def _load_tensors(file: Path, what: str):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or non-tensor files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{file}: unreadable {what} ({type(error).__name__}: {reason})") from None


# --- writing ---------------------------------------------------------------------------------------

class CheckpointWriter:
    """Writes step folders under ``root``, keeps ``last``, ``best`` and the newest ``keep`` folders."""

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = Path(root), max(1, keep)

    def staging(self, step: int) -> Path:
        return self.root / f".step-{step:08d}.partial"

    def begin(self, step: int) -> None:
        """Main rank: a fresh staging folder that every rank then writes its files into."""
        staging = self.staging(step)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)

    @staticmethod
    def write_rng(staging: Path, rank: int) -> None:
        atomic_write(staging / f"rng-{rank}.pt", lambda tmp: torch.save(rng_state(), tmp))

    def commit(self, step: int, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
               state: dict, metadata: dict[str, str], is_best: bool) -> Path:
        """Main rank, after every rank wrote its RNG: the weights and state, then the rename."""
        staging = self.staging(step)
        contiguous = lambda tensors: {k: v.detach().contiguous().cpu() for k, v in tensors.items()}  # noqa: E731
        atomic_write(staging / MODEL_FILE, lambda tmp: save_file(contiguous(model), tmp, metadata=metadata))
        if ema is not None:
            atomic_write(staging / EMA_FILE, lambda tmp: save_file(contiguous(ema), tmp, metadata=metadata))
        atomic_write(staging / STATE_FILE, lambda tmp: torch.save(state, tmp))
        _fsync_dir(staging)
        final = self.root / f"step-{step:08d}"
        replaced = self._replaced(step)
        if final.exists():  # the same step saved again: set the old copy aside until the new one is in
            os.replace(final, replaced)
            _fsync_dir(self.root)
        os.replace(staging, final)
        _fsync_dir(self.root)
        atomic_symlink(self.root / "last", final.name)
        if is_best:
            atomic_symlink(self.root / "best", final.name)
        shutil.rmtree(replaced, ignore_errors=True)
        self._prune()
        return final

    def _replaced(self, step: int) -> Path:
        return self.root / f".step-{step:08d}.replaced"

    def recover(self) -> None:
        """Main rank, before anything is saved: put back a step folder that a kill left set aside,
        or drop it when its replacement made it in; drop unfinished staging folders."""
        for replaced in self.root.glob(".step-*.replaced"):
            final = self.root / replaced.name[1:-len(".replaced")]
            if final.exists():
                shutil.rmtree(replaced)
            else:
                os.replace(replaced, final)
                _fsync_dir(self.root)
        for staging in self.root.glob(".step-*.partial"):
            shutil.rmtree(staging, ignore_errors=True)

    def _prune(self) -> None:
        pinned = {(self.root / name).resolve() for name in ("last", "best") if (self.root / name).exists()}
        folders = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in folders[:-self.keep]:
            if old.resolve() not in pinned:
                shutil.rmtree(old)


def metadata_for(config: dict, step: int, epoch: int) -> dict[str, str]:
    """Safetensors metadata for a task's ``model_config()`` (which names the model under "model")."""
    return {"format": "kzoo", "model": config["model"], "config": json.dumps(config, sort_keys=True),
            "step": str(step), "epoch": str(epoch)}
