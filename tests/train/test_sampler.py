import random

import numpy as np
import pytest
import torch

from kzoo.train.sampler import SeededSamples, ShardedBatchSampler


def flat(sampler):
    return [pair for batch in sampler for pair in batch]


@pytest.mark.parametrize("num_samples, batch, world", [(23, 4, 1), (23, 4, 3), (7, 3, 2), (5, 2, 7)])
def test_eval_shards_cover_every_sample_once(num_samples, batch, world):
    shards = [ShardedBatchSampler(num_samples, batch, rank=r, world_size=world, shuffle=False, drop_last=False)
              for r in range(world)]
    seen = sorted(index for s in shards for index, _ in flat(s))
    assert seen == list(range(num_samples))
    assert all(len(list(s)) == len(s) for s in shards)


@pytest.mark.parametrize("num_samples, batch, world", [(23, 4, 3), (5, 2, 7), (9, 4, 2)])
def test_padded_shards_have_equal_batches_and_cover_everything(num_samples, batch, world):
    shards = [ShardedBatchSampler(num_samples, batch, rank=r, world_size=world, shuffle=False, drop_last=False,
                                  pad=True) for r in range(world)]
    assert len({len(list(s)) for s in shards}) == 1
    assert {index for s in shards for index, _ in flat(s)} == set(range(num_samples))


def test_training_shards_are_disjoint_equal_and_full_batches():
    shards = [ShardedBatchSampler(50, 4, rank=r, world_size=3, seed=5) for r in range(3)]
    batches = [list(s) for s in shards]
    assert all(len(b) == 4 for shard in batches for b in shard) and len({len(b) for b in batches}) == 1
    indices = [i for shard in batches for b in shard for i, _ in b]
    assert len(indices) == len(set(indices)) == 3 * 4 * 4


def test_epochs_reshuffle_and_are_reproducible():
    sampler = ShardedBatchSampler(40, 5, seed=1)
    sampler.set_epoch(0)
    first = flat(sampler)
    sampler.set_epoch(1)
    second = flat(sampler)
    again = ShardedBatchSampler(40, 5, seed=1)
    again.set_epoch(1)
    assert first != second and flat(again) == second
    assert sorted(i for i, _ in first) == list(range(40))


def test_resuming_mid_epoch_yields_exactly_the_remaining_batches():
    sampler = ShardedBatchSampler(37, 4, rank=1, world_size=2, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_batch=3)
    assert list(sampler) == full[3:]


def test_stop_ends_only_the_current_pass():
    sampler = ShardedBatchSampler(40, 5, seed=1)
    batches = iter(sampler)
    first = next(batches)
    sampler.stop()
    assert list(batches) == []
    assert next(iter(sampler)) == first


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch size"):
        ShardedBatchSampler(10, 0)


class Noisy(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return index, random.random(), float(np.random.rand()), torch.rand(()).item()


def test_seeded_samples_depend_only_on_the_seed_and_leave_global_streams_alone():
    dataset = SeededSamples(Noisy())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = (random.random(), float(np.random.rand()), torch.rand(()).item())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    a = dataset[(2, 1234)]
    assert (random.random(), float(np.random.rand()), torch.rand(()).item()) == expected
    assert dataset[(2, 1234)] == a and dataset[(2, 99)] != a
