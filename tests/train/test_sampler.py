"""Batch-exact data sharding: every global batch holds the same examples for any world size and
accumulation split, mid-epoch restarts continue the same order, and augmentation draws depend on
(seed, epoch, index) only."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import Dataset

from normfree.train.distributed import (
    SeededDataset,
    ShardedBatchSampler,
    example_seed,
    shard_indices,
)


def _global_batches(world: int, accum: int, **kw: int) -> list[list[tuple[int, int]]]:
    """Concatenate the ranks' micro-batches of each step (rank-major, as DDP averages)."""
    per_rank = [list(ShardedBatchSampler(103, 24, r, world, accum, **kw)) for r in range(world)]
    steps = len(per_rank[0]) // accum
    out = []
    for s in range(steps):
        batch = []
        for r in range(world):
            for m in per_rank[r][s * accum : (s + 1) * accum]:
                batch += m
        out.append(batch)
    return out


def test_global_batches_do_not_depend_on_world_size_or_accumulation() -> None:
    ref = _global_batches(1, 1, seed=5, epoch=3)
    assert len(ref) == 103 // 24 and all(len(b) == 24 for b in ref)
    for world, accum in ((2, 1), (4, 1), (2, 3), (1, 4)):
        assert _global_batches(world, accum, seed=5, epoch=3) == ref
    flat = [i for b in ref for _, i in b]
    assert len(set(flat)) == len(flat)  # no example twice in an epoch
    assert _global_batches(1, 1, seed=5, epoch=4) != ref  # reshuffled each epoch


def test_start_step_continues_the_epoch() -> None:
    full = list(ShardedBatchSampler(103, 24, 1, 2, 2, seed=0, epoch=1))
    tail = list(ShardedBatchSampler(103, 24, 1, 2, 2, seed=0, epoch=1, start_step=2))
    assert tail == full[2 * 2 :] and len(tail) == (4 - 2) * 2
    capped = ShardedBatchSampler(103, 24, max_steps=2)
    assert capped.steps_per_epoch == 2 and len(list(capped)) == 2


def test_sampler_errors() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ShardedBatchSampler(100, 10, 0, 4)
    with pytest.raises(ValueError, match="larger than the training set"):
        ShardedBatchSampler(5, 8)
    with pytest.raises(ValueError, match="start_step"):
        ShardedBatchSampler(100, 10, start_step=11)


class _Noisy(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
        return torch.rand(2) + i, random.random()


def test_seeded_dataset_draws_from_the_key_only() -> None:
    ds = SeededDataset(_Noisy())
    key = (example_seed(0, 1, 7), 7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = ds[key]
    assert torch.equal(torch.get_rng_state(), before)  # global RNG untouched
    torch.manual_seed(999)
    b = ds[key]
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    c = ds[(example_seed(0, 2, 7), 7)]  # another epoch: another draw
    assert not torch.equal(a[0], c[0])
    assert len({example_seed(0, e, i) for e in range(20) for i in range(500)}) == 20 * 500


def test_eval_shards_partition_the_set() -> None:
    shards = [shard_indices(11, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
