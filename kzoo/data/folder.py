"""ImageFolder trees through timm's ``create_dataset``, with unreadable files skipped by name.

timm already skips an image it cannot decode, but its warning gives only the index. Here timm is
asked to give up at once instead, and the skip happens one level up, where the file name is known.
"""
from __future__ import annotations

import logging
from pathlib import Path

from timm.data import create_dataset
from torch.utils.data import Dataset

log = logging.getLogger("kzoo.data")

MAX_CONSECUTIVE_SKIPS = 16


class SkipUnreadable(Dataset):
    """``dataset[index]``, or the next readable sample, with a warning naming each skipped file."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.dataset._max_retries = 1  # timm then raises "Failed to load" instead of skipping silently

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        for attempt in range(MAX_CONSECUTIVE_SKIPS):
            candidate = (index + attempt) % len(self.dataset)
            try:
                return self.dataset[candidate]
            except (OSError, RuntimeError) as error:
                if isinstance(error, RuntimeError) and not str(error).startswith("Failed to load"):
                    raise
                log.warning("skipped unreadable image %s", self.dataset.filename(candidate, absolute=True))
        raise RuntimeError(f"{MAX_CONSECUTIVE_SKIPS} consecutive unreadable images from "
                           f"{self.dataset.filename(index, absolute=True)} on")


def image_folder(root: str | Path, split: str, *, transform=None, input_img_mode: str = "RGB") -> SkipUnreadable:
    """``root/split/<class>/<image>`` as a dataset of (image, class index); classes sorted by name."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such dataset folder (expected {split}/<class>/<images>)")
    try:
        dataset = create_dataset("", root=str(folder), split=split, is_training=False,
                                 transform=transform, input_img_mode=input_img_mode)
    except RuntimeError as error:  # timm: "Found 0 images in subfolders of ..."
        raise ValueError(f"{folder}: {error}".splitlines()[0]) from None
    return SkipUnreadable(dataset)
