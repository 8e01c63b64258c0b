"""Where the loop is in the data, in a form a checkpoint can hold.

Exact resume needs every batch, and every random augmentation of every sample, to be a function of
(seed, epoch, position) alone, not of the process that happened to draw it. So the batch sampler
draws one permutation and one seed per sample for each epoch from its own generator, yields
``(index, sample_seed)`` pairs, and ``SeededSamples`` runs the dataset's transform under that seed.
Worker count, worker seeding and where a run was resumed then no longer matter.
"""
from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class ShardedBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's batches of one epoch, from any batch onwards.

    Every rank draws the same permutation and takes every ``world_size``-th sample of it, cut to the
    same length on all ranks. ``drop_last`` drops the final partial batch (training); without it,
    nothing is dropped, so evaluation counts every sample exactly once. ``pad`` instead repeats the
    first samples so every rank gets as many batches, which sharded (FSDP) models need because each
    forward is a collective; those few samples are then counted twice, as in timm's validation.
    """

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, pad: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last, self.pad = shuffle, drop_last, pad and not drop_last
        self.epoch, self.start_batch, self.stopped = 0, 0, False

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def stop(self) -> None:
        """End the current pass early: no batch is handed out after this (the next pass starts anew)."""
        self.stopped = True

    def _samples_per_rank(self) -> int:
        if self.drop_last:
            return self.num_samples // self.world_size
        if self.pad:
            return -(-self.num_samples // self.world_size)
        return len(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        per_rank = self._samples_per_rank()
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self):
        self.stopped = False
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = (torch.randperm(self.num_samples, generator=generator) if self.shuffle
                 else torch.arange(self.num_samples))
        seeds = torch.randint(0, 2**31 - 1, (self.num_samples,), generator=generator)
        if self.pad:
            total = self._samples_per_rank() * self.world_size
            order = order.repeat(-(-total // max(self.num_samples, 1)))[:total]
        mine = order[self.rank::self.world_size][: self._samples_per_rank()].tolist()
        for batch in range(self.start_batch, len(self)):
            if self.stopped:
                return
            chunk = mine[batch * self.batch_size:(batch + 1) * self.batch_size]
            yield [(index, int(seeds[index])) for index in chunk]


@contextmanager
def _seeded(seed: int):
    """Seed python, numpy and torch for one sample, restoring the caller's streams afterwards
    (with no DataLoader workers the caller is the training process itself)."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


class SeededSamples(Dataset):
    """``dataset[index]`` under the sample's own seed, for ``ShardedBatchSampler``'s pairs."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index_and_seed: tuple[int, int]):
        index, seed = index_and_seed
        with _seeded(seed):
            return self.dataset[index]
