"""ImageFolder trees through timm's ``create_dataset``, with unreadable files skipped by name.

timm's own dataset skips an image it cannot decode, but its warning gives only the index. So timm
is asked for the undecoded bytes (its public ``load_bytes``), and decoding happens here, where the
file name is known.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

from PIL import Image
from timm.data import create_dataset
from torch.utils.data import Dataset

log = logging.getLogger("kzoo.data")

MAX_CONSECUTIVE_SKIPS = 16


class SkipUnreadable(Dataset):
    """``(transform(image), class)`` for ``index``, or for the next readable file, with a warning
    naming each skipped file. ``dataset`` is a timm ImageDataset created with ``load_bytes=True``."""

    def __init__(self, dataset, transform=None, input_img_mode: str = "RGB"):
        self.dataset = dataset
        self.transform = transform
        self.input_img_mode = input_img_mode

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        for attempt in range(MAX_CONSECUTIVE_SKIPS):
            candidate = (index + attempt) % len(self.dataset)
            data, target = self.dataset[candidate]
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image = image.convert(self.input_img_mode)  # decodes every pixel: truncated files fail here
            except OSError:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
                log.warning("skipped unreadable image %s", self.dataset.filename(candidate, absolute=True))
                continue
            return (self.transform(image) if self.transform is not None else image), target
        raise RuntimeError(f"{MAX_CONSECUTIVE_SKIPS} consecutive unreadable images from "
                           f"{self.dataset.filename(index, absolute=True)} on")


def image_folder(root: str | Path, split: str, *, transform=None, input_img_mode: str = "RGB") -> SkipUnreadable:
    """``root/split/<class>/<image>`` as a dataset of (image, class index); classes sorted by name."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such dataset folder (expected {split}/<class>/<images>)")
    try:
        dataset = create_dataset("", root=str(folder), split=split, is_training=False, load_bytes=True)
    except RuntimeError as error:  # timm: "Found 0 images in subfolders of ..."
        raise ValueError(f"{folder}: {error}".splitlines()[0]) from None
    return SkipUnreadable(dataset, transform, input_img_mode)
