"""The contract between the loop and a model family.

The loop knows nothing about images, labels or models. A family hands it a ``Task``: something that
builds the model and datasets, turns a batch into a loss, and sums evaluation metrics over a batch.
Everything else (devices, distribution, precision, optimizers, checkpoints, records) is the loop's.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset


class Task:
    #: The evaluation metric that picks the ``best`` checkpoint, and whether higher is better.
    eval_metric: str = "loss"
    higher_is_better: bool = False

    def setup(self, device: torch.device) -> None:
        """Optional: called once the device is known, before ``build_model``. Frozen parts (a
        tokenizer, a teacher) are loaded here and kept on the task: they stay outside the optimizer,
        the EMA, DDP and the checkpoint's weights. Record their weight files in ``model_config()``."""

    def build_model(self) -> nn.Module:
        """The module that trains, and only that."""
        raise NotImplementedError

    def model_config(self) -> dict:
        """What rebuilds the model: goes into every checkpoint's safetensors metadata.
        Must hold ``"model"`` (the timm/kzoo name) and JSON-able keyword arguments."""
        raise NotImplementedError

    def train_dataset(self) -> Dataset:
        raise NotImplementedError

    def val_dataset(self) -> Dataset | None:
        return None

    def sample_names(self, dataset: Dataset) -> Iterable[str] | None:
        """Optional: one name per sample of the training set, in index order (e.g. its file path).
        Checkpoints hold a hash of them, so a resume notices when the data changed under the saved
        position; without names only the number of samples is compared."""
        return None

    def collate(self, samples: list):
        return torch.utils.data.default_collate(samples)

    def train_loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The scalar loss of one training batch (already on the device, run under autocast)."""
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, batch) -> dict[str, float]:
        """Metric *sums* over one evaluation batch, with ``"count"``; the loop adds them over batches
        and ranks and divides by the count, so means are exact whatever the sharding."""
        raise NotImplementedError

    def sample(self, model: nn.Module, out_dir: Path | None, epoch: int | None, step: int) -> None:
        """Optional: something to look at (e.g. a sample grid) at the end of each epoch (``epoch``
        is the finished one) and every ``--sample-every`` steps (``epoch`` is None). Called on
        every rank, because under FSDP each forward of the sharded model is a collective; rank 0
        gets the run folder to write into, the other ranks ``None``."""


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def picture_path(out_dir: Path, folder: str, epoch: int | None, step: int) -> Path:
    """Where ``Task.sample`` writes its picture: ``out_dir/folder/epoch-EEEE.png`` at an epoch end,
    ``step-SSSSSSS.png`` for ``--sample-every``; the folder is made."""
    (out_dir / folder).mkdir(parents=True, exist_ok=True)
    return out_dir / folder / (f"step-{step:07d}.png" if epoch is None else f"epoch-{epoch:04d}.png")
