"""The epoch plan on simulated worlds: disjoint, covering, the same steps on every rank, and (almost) no waste."""
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from data.plan import (describe_plan, for_worker, padding_report, plan_summary, steps_per_epoch,
                       worker_batches)

SEED, EPOCH, BATCH = 3, 1, 8


def _counts(n_shards: int, world: int) -> list[int]:
    """Uneven shard sizes (some empty), scaled up only as far as the world needs one batch per rank."""
    rng = np.random.default_rng(n_shards * 1000 + world)
    counts = rng.integers(1 if n_shards == 1 else 0, 60, size=n_shards)
    counts[0] = max(counts[0], 1)
    return [int(c) for c in counts * max(1, math.ceil(2 * world * BATCH / counts.sum()))]


def _sequence_offsets(counts: list[int]) -> np.ndarray:
    """Where each shard starts in the epoch's sample sequence, as documented: seeded order, samples end to end."""
    order = np.random.default_rng([SEED, EPOCH]).permutation(len(counts))
    offsets = np.empty(len(counts), dtype=np.int64)
    offsets[order] = np.concatenate([[0], np.cumsum(np.asarray(counts)[order])[:-1]])
    return offsets


@pytest.mark.parametrize("workers", [0, 1, 4, 16])
@pytest.mark.parametrize("world", [1, 2, 8, 64, 512])
@pytest.mark.parametrize("n_shards", [1, 3, 170, 1000, 20_000])
def test_exact_plan_is_contiguous_covering_balanced_and_wastes_under_a_batch_per_rank(n_shards, world, workers):
    counts = _counts(n_shards, world)
    n, w = sum(counts), max(workers, 1)
    steps = math.ceil(math.ceil(n / world) / BATCH)
    offsets = _sequence_offsets(counts)
    full = world * w <= 64  # small worlds: every rank, and coverage counted sample by sample
    ranks = range(world) if full else sorted({0, 1, world // 2, world - 1})
    cover = np.zeros(n + 1, dtype=np.int64)
    flat = np.concatenate([[0], np.cumsum(counts)])  # shard -> first index in the manifest's own order
    pieces_max = mid_starts = 0
    for rank in ranks:
        plans = [for_worker(counts, seed=SEED, epoch=EPOCH, world=world, rank=rank, worker=k, workers=workers,
                            batch_size=BATCH) for k in range(w)]
        assert {p.steps for p in plans} == {steps}  # the same on every rank
        assert sum(p.batches for p in plans) == steps
        n_rank = (rank + 1) * n // world - rank * n // world
        position = rank * n // world  # the rank's stretch of the sequence, read in worker order
        for p in plans:
            assert p.samples == sum(q.size for q in p.pieces)
            assert abs(p.samples * steps - n_rank * p.batches) < steps  # its batch quota, to one sample
            assert p.samples > 0 or p.batches == 0
            for q in p.pieces:
                assert 0 <= q.start < q.stop <= counts[q.shard]
                assert offsets[q.shard] + q.start == position
                position += q.size
                cover[flat[q.shard] + q.start] += 1
                cover[flat[q.shard] + q.stop] -= 1
            pieces_max = max(pieces_max, len(p.pieces))
            mid_starts += sum(q.start > 0 for q in p.pieces)
        assert position == (rank + 1) * n // world
    rep = padding_report(counts, world=world, workers=workers, batch_size=BATCH, policy="pad", seed=SEED,
                         epoch=EPOCH)
    if full:
        assert np.array_equal(np.cumsum(cover)[:-1], np.ones(n))  # every (shard, index) exactly once
        assert (rep["pieces_per_worker_max"], rep["mid_shard_starts"]) == (pieces_max, mid_starts)
    assert rep["pieces_per_worker_max"] >= pieces_max
    assert (rep["steps"], rep["samples"], rep["emitted"]) == (steps, n, steps * BATCH * world)
    assert rep["dropped"] == 0 and rep["emitted"] - rep["padded"] == n  # the workers' ranges tile the epoch
    drop = padding_report(counts, world=world, workers=workers, batch_size=BATCH, policy="drop")
    assert drop["steps"] == n // world // BATCH
    assert drop["padded"] == 0 and drop["emitted"] + drop["dropped"] == n
    for r in (rep, drop):
        assert r["padded"] + r["dropped"] < world * BATCH  # under one batch per rank
        if n >= 100 * world * BATCH:
            assert r["waste_fraction"] <= 0.01


def test_the_issue_world_wastes_a_quarter_of_a_percent():
    """configs/inat_bg_100.yaml on 8 ranks: 170 shards of 3,400 (whole-shard dealing gave 425 steps, 51% repeats)."""
    counts = [3400] * 170
    rep = padding_report(counts, world=8, workers=16, batch_size=256, policy="pad")
    assert rep["steps"] == math.ceil(170 * 3400 / 8 / 256) == 283
    assert rep["padded"] == 283 * 256 * 8 - 578_000 == 1584 and rep["dropped"] == 0
    assert rep["waste_fraction"] < 0.003
    assert rep["pieces_per_worker_max"] <= 3  # 4,516 samples per worker span at most three shards


def test_pad_and_drop_policies():
    counts = [10, 10, 3]  # 23 samples: ranks of 8, 8 and 7 (whole shards would give 10, 10 and 3)
    assert steps_per_epoch(counts, world=3, batch_size=2, policy="pad") == 4
    assert steps_per_epoch(counts, world=3, batch_size=2, policy="drop") == 3
    rep = padding_report(counts, world=3, workers=0, batch_size=2, policy="pad")
    assert (rep["steps"], rep["padded"], rep["dropped"]) == (4, 1, 0)
    rep = padding_report(counts, world=3, workers=0, batch_size=2, policy="drop")
    assert (rep["steps"], rep["padded"], rep["dropped"]) == (3, 0, 5)


def test_steps_do_not_depend_on_seed_epoch_or_workers_but_pieces_follow_the_seed():
    counts = _counts(40, 4)
    plans = {(s, e): for_worker(counts, seed=s, epoch=e, world=4, rank=1, worker=0, workers=3, batch_size=4)
             for s in (0, 1) for e in (0, 1)}
    assert len({p.steps for p in plans.values()}) == 1
    assert len({p.pieces for p in plans.values()}) == 4  # a fresh shard order every epoch and seed


def test_resampled_mode_has_a_fixed_epoch_length():
    counts = [10, 10, 3]
    plans = [for_worker(counts, seed=0, epoch=e, world=3, rank=r, worker=0, workers=0, batch_size=2,
                        mode="resampled") for r in range(3) for e in range(3)]
    assert {p.steps for p in plans} == {23 // 6} and all(p.pieces == () for p in plans)
    summary = plan_summary(counts, world=3, workers=0, batch_size=2, mode="resampled", policy="pad")
    assert (summary["steps"], summary["emitted"]) == (3, 18)
    assert "drawn with replacement" in describe_plan(summary)


def test_worker_batches_follow_round_robin():
    assert [worker_batches(7, w, 3) for w in range(3)] == [3, 2, 2]
    assert worker_batches(7, 0, 0) == 7
    assert [worker_batches(2, w, 4) for w in range(4)] == [1, 1, 0, 0]


@pytest.mark.parametrize("fraction", [0.125, 0.2, 0.5])
def test_balanced_sampling_plans_background_for_more_steps(fraction):
    counts, world, batch, workers = [37, 50, 13, 0, 29], 3, 4, 2
    ratio = 1 / (1 - fraction)
    steps = math.ceil(math.ceil(sum(counts) / world) * ratio / batch)
    plans = [for_worker(counts, seed=0, epoch=0, world=world, rank=r, worker=k, workers=workers, batch_size=batch,
                        emit_ratio=ratio) for r in range(world) for k in range(workers)]
    assert {p.steps for p in plans} == {steps} and steps > math.ceil(43 / batch)
    assert sum(p.samples for p in plans) == sum(counts)
    rep = padding_report(counts, world=world, workers=workers, batch_size=batch, policy="pad", emit_ratio=ratio)
    assert rep["steps"] == steps
    assert rep["padded"] + rep["dropped"] <= world * (batch + workers)  # a batch per rank, a sample per worker


def test_unbalanceable_worlds_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="lower data.batch_size or use fewer ranks"):
        for_worker([3, 2], seed=0, epoch=0, world=4, rank=0, worker=0, workers=0, batch_size=8, policy="drop")
    # 3 samples on 2 ranks of 2 workers, batch 1: rank 0 holds one sample but both its workers owe a batch
    with pytest.raises(ValueError, match="use fewer data.num_workers, more shards, or data.mode=resampled"):
        for_worker([3], seed=0, epoch=0, world=2, rank=0, worker=0, workers=2, batch_size=1)
    with pytest.raises(ValueError, match="worker 0 of rank 0 gets no sample"):
        padding_report([3], world=2, workers=2, batch_size=1, policy="pad")
    assert for_worker([3], seed=0, epoch=0, world=2, rank=1, worker=0, workers=2, batch_size=1).samples == 1
    for empty in ([], [0, 0]):
        with pytest.raises(ValueError, match="the shard list is empty: nothing to plan; check the manifest"):
            for_worker(empty, seed=0, epoch=0, world=1, rank=0, worker=0, workers=0, batch_size=1)
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        for_worker([10], seed=0, epoch=0, world=2, rank=2, worker=0, workers=0, batch_size=1)
    with pytest.raises(ValueError, match="a world of 0 ranks"):
        steps_per_epoch([10], world=0, batch_size=1)


def _png(v: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), v % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_shards_plan_command(tmp_path, capsys):
    from data.shards import read_manifest, write_shard_set
    from cluster.cli import main

    samples = [(f"k{i:03d}", _png(i), 1 if i % 10 == 0 else 0, "x") for i in range(133)]
    write_shard_set(str(tmp_path), samples, rare_classes=["r"], class_names=["bg", "R"], max_count=9)
    shards = read_manifest(str(tmp_path)).shards
    base = ["shards", "plan", "--data", str(tmp_path), "--world", "4", "--workers", "2", "--batch-size", "8"]

    assert main(base + ["--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = plan_summary([s.count for s in shards], world=4, workers=2, batch_size=8, mode="exact", policy="pad")
    assert (got["steps"], got["padded"], got["samples"]) == (want["steps"], want["padded"], 133)

    assert main(base + ["--sampling", "balanced", "--positive-fraction", "0.2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    background = [s.count for s in shards if s.kind == "background"]
    assert (got["samples"], got["emit_ratio"]) == (sum(background), 1.25) and sum(background) < 133
    assert got["steps"] == math.ceil(math.ceil(sum(background) / 4) * 1.25 / 8)

    assert main(base) == 0
    assert f"{want['steps']} steps per rank per epoch" in capsys.readouterr().out

    assert main(base[:5] + ["0"] + base[6:]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bgsplit: error:") and "world of 0" in err and "\n" not in err
