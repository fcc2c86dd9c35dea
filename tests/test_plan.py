"""The epoch plan on simulated worlds: disjoint, covering, and the same number of steps on every rank."""
import collections

import pytest

from data.plan import for_worker, padding_report, steps_per_epoch, worker_batches


def _counts(n_shards: int, seed: int) -> list[int]:
    import numpy as np

    return [int(c) for c in np.random.default_rng(seed).integers(1, 40, size=n_shards)]


def _samples(counts, plan):
    return [(p.shard, i) for p in plan.pieces for i in range(p.start, p.stop)]


WORLDS = [(w, k) for w in (1, 2, 3, 8, 17, 64) for k in (0, 1, 3, 8)]


@pytest.mark.parametrize("world, workers", WORLDS)
@pytest.mark.parametrize("n_shards", [1, 5, 130])
def test_exact_plan_is_disjoint_covering_and_balanced(world, workers, n_shards):
    counts = _counts(n_shards, n_shards + world)
    if sum(counts) < world * max(workers, 1):
        counts = [c + world * max(workers, 1) for c in counts]
    seen = collections.Counter()
    steps = set()
    for rank in range(world):
        per_rank = 0
        for worker in range(max(workers, 1)):
            plan = for_worker(counts, seed=3, epoch=1, world=world, rank=rank, worker=worker, workers=workers,
                              batch_size=4, policy="pad")
            seen.update(_samples(counts, plan))
            steps.add(plan.steps)
            per_rank += plan.batches
        assert per_rank == plan.steps  # the workers' quotas add up to the rank's steps
    assert len(steps) == 1  # every rank runs the same number of steps
    assert sum(seen.values()) == sum(counts) and max(seen.values()) == 1  # each sample exactly once
    assert set(seen) == {(s, i) for s, c in enumerate(counts) for i in range(c)}


def test_fewer_shards_than_slots_split_samples_evenly():
    counts = [100, 7]
    sizes = [for_worker(counts, seed=0, epoch=0, world=4, rank=r, worker=w, workers=2, batch_size=5).samples
             for r in range(4) for w in range(2)]
    assert sum(sizes) == 107 and max(sizes) - min(sizes) <= 1


def test_pad_and_drop_policies():
    counts = [10, 10, 3]  # three shards over three ranks: 10, 10 and 3 samples
    pad = steps_per_epoch(counts, world=3, batch_size=2, policy="pad", seed=0, epoch=0)
    drop = steps_per_epoch(counts, world=3, batch_size=2, policy="drop", seed=0, epoch=0)
    assert (pad, drop) == (5, 1)
    rep = padding_report(counts, world=3, workers=0, batch_size=2, seed=0, epoch=0, policy="pad")
    assert rep == {"steps": 5, "padded": 7, "dropped": 0}
    rep = padding_report(counts, world=3, workers=0, batch_size=2, seed=0, epoch=0, policy="drop")
    assert rep == {"steps": 1, "padded": 0, "dropped": 17}


def test_resampled_mode_has_a_fixed_epoch_length():
    counts = [10, 10, 3]
    plans = [for_worker(counts, seed=0, epoch=e, world=3, rank=r, worker=0, workers=0, batch_size=2,
                        mode="resampled") for r in range(3) for e in range(3)]
    assert {p.steps for p in plans} == {23 // 6} and all(p.pieces == () for p in plans)


def test_worker_batches_follow_round_robin():
    assert [worker_batches(7, w, 3) for w in range(3)] == [3, 2, 2]
    assert worker_batches(7, 0, 0) == 7


def test_unbalanceable_worlds_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="lower data.batch_size or use fewer ranks"):
        for_worker([3, 2], seed=0, epoch=0, world=4, rank=0, worker=0, workers=0, batch_size=8, policy="drop")
    with pytest.raises(ValueError, match="use fewer data.num_workers, more shards, or data.mode=resampled"):
        for_worker([2], seed=0, epoch=0, world=1, rank=0, worker=0, workers=4, batch_size=1)
    with pytest.raises(ValueError, match="shard list is empty"):
        for_worker([], seed=0, epoch=0, world=1, rank=0, worker=0, workers=0, batch_size=1)
