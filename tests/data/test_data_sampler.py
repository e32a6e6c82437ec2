"""AtomBalancedBatchSampler: coverage, balance, determinism, world-size independence, resume."""
from __future__ import annotations

import numpy as np
import pytest

from esen_train.data.sampler import AtomBalancedBatchSampler


def _natoms(count: int = 500, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 61, size=count)


def _epoch(natoms, max_atoms, world_size, seed=7, epoch=0, shuffle=True) -> list[list[list[int]]]:
    """batches[rank][step] for one epoch."""
    per_rank = []
    for rank in range(world_size):
        sampler = AtomBalancedBatchSampler(natoms, max_atoms, rank, world_size, seed, shuffle)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    return per_rank


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_index_once_per_epoch_and_equal_batch_counts(world_size):
    natoms = _natoms()
    batches = _epoch(natoms, 300, world_size)
    assert len({len(rank_batches) for rank_batches in batches}) == 1
    sampler = AtomBalancedBatchSampler(natoms, 300, 0, world_size, seed=7)
    assert len(batches[0]) == len(sampler)
    seen = [i for rank_batches in batches for batch in rank_batches for i in batch]
    assert sorted(seen) == list(range(len(natoms)))  # each index once: ranks are disjoint
    assert all(len(batch) >= 1 for rank_batches in batches for batch in rank_batches)


@pytest.mark.parametrize("world_size", [2, 4])
def test_parts_are_balanced_and_global_batches_capped(world_size):
    natoms = _natoms()
    batches = _epoch(natoms, 400, world_size)
    for step in range(len(batches[0])):
        parts = [batches[rank][step] for rank in range(world_size)]
        loads = [int(natoms[part].sum()) for part in parts]
        largest = max(int(natoms[part].max()) for part in parts)
        # Largest-first into the lightest part: loads differ by at most the largest structure.
        assert max(loads) - min(loads) <= largest
        is_last = step == len(batches[0]) - 1
        if not is_last:  # only the last batch may take a leftover beyond the cap
            assert sum(loads) <= 400


def test_deterministic_from_seed_and_epoch():
    natoms = _natoms()
    assert _epoch(natoms, 300, 2, seed=3, epoch=1) == _epoch(natoms, 300, 2, seed=3, epoch=1)
    assert _epoch(natoms, 300, 2, seed=3, epoch=1) != _epoch(natoms, 300, 2, seed=3, epoch=2)
    assert _epoch(natoms, 300, 2, seed=3, epoch=1) != _epoch(natoms, 300, 2, seed=4, epoch=1)


def test_without_shuffle_batches_follow_dataset_order():
    natoms = _natoms(100)
    (batches,) = _epoch(natoms, 200, 1, shuffle=False)
    assert [i for batch in batches for i in batch] == list(range(100))


@pytest.mark.parametrize("world_size", [2, 3])
def test_global_batches_do_not_depend_on_world_size(world_size):
    natoms = _natoms()
    max_atoms = 400  # >= world_size * max(natoms): rule "at least one per rank" never acts
    (single,) = _epoch(natoms, max_atoms, 1)
    split = _epoch(natoms, max_atoms, world_size)
    unions = [sorted(i for rank in split for i in rank[step]) for step in range(len(split[0]))]
    expected = [sorted(batch) for batch in single]
    if len(single[-1]) < world_size:  # documented: a too-small leftover joins the batch before
        expected = expected[:-2] + [sorted(single[-2] + single[-1])]
    assert unions == expected


def test_oversized_structures_and_leftover():
    natoms = np.array([50, 50, 500, 50, 50, 10])
    (single,) = _epoch(natoms, 100, 1, shuffle=False)
    assert single == [[0, 1], [2], [3, 4], [5]]  # a structure above the cap is a batch of its own
    pairs = _epoch(natoms, 100, 2, shuffle=False)
    unions = [sorted(pairs[0][step] + pairs[1][step]) for step in range(len(pairs[0]))]
    # With two ranks a batch needs two structures; the last one (index 5) joins the batch before.
    assert unions == [[0, 1], [2, 3], [4, 5]]
    assert pairs[0][1] == [2] and pairs[1][1] == [3]  # largest first into the lightest part


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("consumed", [0, 5, 17])
def test_resume_mid_epoch_continues_exactly(world_size, consumed):
    natoms = _natoms()
    for rank in range(world_size):
        uninterrupted = AtomBalancedBatchSampler(natoms, 300, rank, world_size, seed=11)
        uninterrupted.set_epoch(3)
        full = list(uninterrupted)

        first = AtomBalancedBatchSampler(natoms, 300, rank, world_size, seed=11)
        first.set_epoch(3)
        iterator = iter(first)
        head = [next(iterator) for _ in range(consumed)]
        state = first.state_dict()
        assert state == {"epoch": 3, "batches_done": consumed}

        resumed = AtomBalancedBatchSampler(natoms, 300, rank, world_size, seed=11)
        resumed.load_state_dict(state)
        tail = list(resumed)
        assert head + tail == full
        assert resumed.state_dict() == {"epoch": 3, "batches_done": len(full)}
        # The resume offset applies once: the next epoch starts from its beginning.
        resumed.set_epoch(4)
        uninterrupted.set_epoch(4)
        assert list(resumed) == list(uninterrupted)


def test_resume_at_end_of_epoch_yields_nothing_more():
    natoms = _natoms(50)
    sampler = AtomBalancedBatchSampler(natoms, 100, 0, 1, seed=0)
    sampler.load_state_dict({"epoch": 0, "batches_done": len(sampler)})
    assert list(sampler) == []
    with pytest.raises(ValueError, match="outside epoch"):
        sampler.load_state_dict({"epoch": 0, "batches_done": len(sampler) + 1})


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="cannot be spread"):
        AtomBalancedBatchSampler(np.array([3]), 100, 0, 2, seed=0)
    with pytest.raises(ValueError, match="rank"):
        AtomBalancedBatchSampler(_natoms(10), 100, 2, 2, seed=0)
    with pytest.raises(ValueError, match="integer"):
        AtomBalancedBatchSampler(np.array([1.5, 2.0]), 100, 0, 1, seed=0)
