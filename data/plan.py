"""Who reads what in an epoch: a pure function of (shard sizes, seed, epoch, world, rank, workers, batch size).

Data-parallel ranks must run the same number of steps or the first collective after the shortest rank stops
hangs every other rank. So the step count is computed here from the manifest's shard sizes alone, identically
on every rank, and each loader worker is told exactly how many batches to produce; a worker that runs out
pads by repeating its own samples, one with too many drops the rest. Nothing depends on what a rank actually
reads, so the plan can be tested on simulated worlds without processes.

The epoch is one sequence: the shards in a seeded order, their samples end to end. Each rank takes an equal
contiguous stretch of it (to one sample) and splits it among its loader workers in proportion to the batches
each must produce. Ranks and workers then differ by at most one sample from their quota, so padding or
dropping costs less than one batch per rank however uneven the shards are; the price is that a worker's
first piece may start mid-shard.

Two modes:
- exact: every sample once per epoch (up to the padding/dropping needed to equalise ranks, which is reported);
- resampled: an endless, seeded draw of shards with replacement and a fixed epoch length (the webdataset
  maintainer's recommendation for very large sets).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Samples ``start`` .. ``stop`` - 1 (in stored order) of shard ``shard``."""

    shard: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class WorkerPlan:
    pieces: tuple[Piece, ...]
    """What this worker reads, in order (exact mode); empty in resampled mode, which draws shards itself."""
    samples: int
    """Samples those pieces hold."""
    batches: int
    """Batches this worker must produce this epoch: the same total on every rank."""
    steps: int
    """Batches per rank this epoch (the DataLoader takes them round-robin from the workers)."""


def worker_batches(steps: int, worker: int, workers: int) -> int:
    """Batches worker ``worker`` contributes when the DataLoader takes ``steps`` batches round-robin."""
    return len(range(worker, steps, max(workers, 1)))


def _check(counts: Sequence[int], world: int, batch_size: int) -> int:
    if not counts or sum(counts) == 0:
        raise ValueError("the shard list is empty: nothing to plan; check the manifest")
    if world < 1:
        raise ValueError(f"a world of {world} ranks cannot train: give at least 1 rank")
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} is not positive: give data.batch_size >= 1")
    return sum(counts)


def steps_per_epoch(counts: Sequence[int], *, world: int, batch_size: int, mode: str = "exact",
                    policy: str = "pad", emit_ratio: float = 1.0) -> int:
    """Batches every rank runs each epoch. ``emit_ratio`` > 1 when re-sampled positives are mixed in.

    Ranks hold floor or ceil of N / world samples whatever the shards, so the count depends on N alone: the
    same every epoch, so a training stream can run from one epoch into the next without a pause.
    """
    n = _check(counts, world, batch_size)
    if mode == "resampled":
        return int(n * emit_ratio) // (world * batch_size)
    if policy == "drop":
        return math.floor(n // world * emit_ratio / batch_size)
    return math.ceil(-(-n // world) * emit_ratio / batch_size)


def _nonzero_steps(counts: Sequence[int], world: int, batch_size: int, mode: str, policy: str,
                   emit_ratio: float) -> int:
    steps = steps_per_epoch(counts, world=world, batch_size=batch_size, mode=mode, policy=policy,
                            emit_ratio=emit_ratio)
    if steps == 0:
        raise ValueError(f"{sum(counts)} samples cannot give every one of {world} ranks one batch of {batch_size}:"
                         " lower data.batch_size or use fewer ranks")
    return steps


@functools.lru_cache(maxsize=8)
def _sequence(counts: tuple[int, ...], seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's shard order (empty shards left out) and where each shard starts in the sample sequence.

    Cached because every loader worker of every rank asks for the same epoch; bounded because a key holds
    the whole count list.
    """
    sizes = np.asarray(counts, dtype=np.int64)
    order = np.random.default_rng([seed, epoch]).permutation(len(sizes))
    order = order[sizes[order] > 0]
    starts = np.concatenate([[0], np.cumsum(sizes[order])])
    order.flags.writeable = starts.flags.writeable = False
    return order, starts


def _cuts(n: int, world: int, workers: int, steps: int, ranks: np.ndarray) -> np.ndarray:
    """Sequence positions where each worker's range of the given ranks begins (column w) and ends (w + 1)."""
    w = np.arange(max(workers, 1) + 1)
    q, rem = divmod(steps, max(workers, 1))
    before = q * w + np.minimum(w, rem)  # batches of the workers before worker w (round-robin)
    r = np.asarray(ranks, dtype=np.int64)[:, None]
    lo = r * n // world
    return lo + ((r + 1) * n // world - lo) * before // steps


def _no_sample(n: int, shards: int, world: int, workers: int, rank: int, worker: int) -> ValueError:
    return ValueError(f"cannot balance {n} samples in {shards} shards over {world} ranks x {max(workers, 1)} "
                      f"loader workers: worker {worker} of rank {rank} gets no sample; use fewer "
                      "data.num_workers, more shards, or data.mode=resampled")


def for_worker(counts: Sequence[int], *, seed: int, epoch: int, world: int, rank: int, worker: int,
               workers: int, batch_size: int, mode: str = "exact", policy: str = "pad",
               emit_ratio: float = 1.0) -> WorkerPlan:
    """The plan of loader worker ``worker`` (0 when there are no worker processes) of rank ``rank``.

    Raises ValueError, saying what to change, for a world that cannot be balanced.
    """
    steps = _nonzero_steps(counts, world, batch_size, mode, policy, emit_ratio)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    if not 0 <= worker < max(workers, 1):
        raise ValueError(f"loader worker {worker} is outside {max(workers, 1)} loader workers")
    batches = worker_batches(steps, worker, workers)
    if mode == "resampled":
        return WorkerPlan((), 0, batches, steps)
    n = sum(counts)
    lo, hi = (int(c) for c in _cuts(n, world, workers, steps, np.array([rank]))[0, worker:worker + 2])
    if lo == hi:
        if batches:
            raise _no_sample(n, len(counts), world, workers, rank, worker)
        return WorkerPlan((), 0, 0, steps)
    order, starts = _sequence(tuple(counts), seed, epoch)
    pos = np.arange(np.searchsorted(starts, lo, "right") - 1, np.searchsorted(starts, hi, "left"))
    begin = np.maximum(starts[pos], lo) - starts[pos]
    end = np.minimum(starts[pos + 1], hi) - starts[pos]
    pieces = tuple(Piece(int(s), int(a), int(b)) for s, a, b in zip(order[pos], begin, end))
    return WorkerPlan(pieces, hi - lo, batches, steps)


def split_shards(counts: Sequence[int], part: int, parts: int) -> list[int]:
    """Part ``part`` of ``parts`` of a set split into whole shards (manifest indices, in order): the one rule for
    every pass over whole shards (evaluation, teacher labels, mining; a torchrun rank or a Ray task's group).

    Whole shards because a batch never spans two shards, so each forward pass holds the same images however the
    work is split. A shard goes to the part whose equal stretch of the N samples holds the shard's middle: parts
    are contiguous and differ from N / parts by less than the largest shard; with more parts than shards some
    parts are empty (a rank with none still takes part in the collectives). Training is split finer, by sample
    (``for_worker``), because its ranks must run equal step counts."""
    if parts < 1:
        raise ValueError(f"a split into {parts} parts cannot be made: give at least 1 rank or task")
    if not 0 <= part < parts:
        raise ValueError(f"rank {part} is outside a world of {parts} (ranks, or Ray tasks)")
    sizes = np.asarray(counts, dtype=np.int64)
    if (sizes < 0).any():
        raise ValueError(f"shard sample counts must not be negative, got {list(counts)}: check the manifest")
    n = int(sizes.sum())
    if n == 0:
        raise ValueError("the set's manifest lists no samples: rebuild it with `bgsplit shards build`")
    starts = np.cumsum(sizes) - sizes
    owners = np.minimum((2 * starts + sizes) * parts // (2 * n), parts - 1)
    return np.flatnonzero(owners == part).tolist()


def shard_groups(counts: Sequence[int], per_group: int) -> list[list[int]]:
    """The set cut into about len(counts) / per_group groups of whole shards balanced by samples (Ray tasks):
    ``split_shards`` with one part per group, empty parts left out."""
    if per_group < 1:
        raise ValueError(f"shards per task must be at least 1, got {per_group}")
    if not len(counts):
        return []
    parts = -(-len(counts) // per_group)
    return [g for g in (split_shards(counts, i, parts) for i in range(parts)) if g]


def padding_report(counts: Sequence[int], *, world: int, workers: int, batch_size: int, policy: str,
                   emit_ratio: float = 1.0, seed: int = 0, epoch: int = 0) -> dict[str, Any]:
    """What exact mode costs this epoch over all ranks: samples repeated (pad) or left out (drop), and how
    the workers' reads fall on shards (a piece starting mid-shard costs a seek)."""
    steps = _nonzero_steps(counts, world, batch_size, "exact", policy, emit_ratio)
    n = sum(counts)
    cuts = _cuts(n, world, workers, steps, np.arange(world))
    lo, hi = cuts[:, :-1], cuts[:, 1:]
    samples = hi - lo
    batches = np.array([[worker_batches(steps, w, workers) for w in range(max(workers, 1))]])
    starving = np.argwhere((batches > 0) & (samples == 0))
    if len(starving):
        raise _no_sample(n, len(counts), world, workers, int(starving[0, 0]), int(starving[0, 1]))
    have = np.floor(samples * emit_ratio).astype(np.int64)
    need = batches * batch_size
    _, starts = _sequence(tuple(counts), seed, epoch)
    first = np.searchsorted(starts, lo, "right") - 1
    pieces = np.where(samples > 0, np.searchsorted(starts, hi, "left") - first, 0)
    emitted = steps * batch_size * world
    padded, dropped = int(np.maximum(need - have, 0).sum()), int(np.maximum(have - need, 0).sum())
    return {"steps": steps, "padded": padded, "dropped": dropped, "samples": n, "emitted": emitted,
            "waste_fraction": (padded + dropped) / emitted,
            # a worker's range is contiguous, so each of its pieces is a different shard
            "pieces_per_worker_max": int(pieces.max()),
            "mid_shard_starts": int(((samples > 0) & (starts[first] != lo)).sum()),
            "samples_per_worker_min": int(samples.min()), "samples_per_worker_max": int(samples.max())}


def plan_summary(counts: Sequence[int], *, world: int, workers: int, batch_size: int, mode: str, policy: str,
                 emit_ratio: float = 1.0, seed: int = 0, epoch: int = 0) -> dict[str, Any]:
    """Everything worth knowing about an epoch's plan before paying for a cluster (``bgsplit shards plan``)."""
    n = _check(counts, world, batch_size)
    out: dict[str, Any] = {"world": world, "workers": workers, "batch_size": batch_size, "mode": mode,
                           "policy": policy, "emit_ratio": emit_ratio, "shards": len(counts), "samples": n,
                           "samples_per_rank_min": n // world, "samples_per_rank_max": -(-n // world)}
    if mode == "resampled":
        steps = _nonzero_steps(counts, world, batch_size, mode, policy, emit_ratio)
        return {**out, "steps": steps, "emitted": steps * batch_size * world}
    return {**out, **padding_report(counts, world=world, workers=workers, batch_size=batch_size, policy=policy,
                                    emit_ratio=emit_ratio, seed=seed, epoch=epoch)}


def plan_for_manifest(manifest: Any, *, world: int, workers: int, batch_size: int, mode: str = "exact",
                      policy: str = "pad", sampling: str = "natural", positive_fraction: float = 0.125,
                      seed: int = 0) -> dict[str, Any]:
    """The summary for a shard set as training would plan it: balanced sampling plans the background shards
    only and mixes re-sampled positives in at ``positive_fraction`` (data.loader.ShardStream)."""
    if sampling == "balanced" and not 0 < positive_fraction < 1:
        raise ValueError(f"positive fraction {positive_fraction} is outside (0, 1): give e.g. 0.125")
    kind = "background" if sampling == "balanced" else None
    counts = [s.count for s in manifest.shards if kind is None or s.kind == kind]
    return plan_summary(counts, world=world, workers=workers, batch_size=batch_size, mode=mode, policy=policy,
                        emit_ratio=1.0 / (1.0 - positive_fraction) if kind else 1.0, seed=seed)


def _span(lo: int, hi: int) -> str:
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def _n(count: int, word: str) -> str:
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def describe_plan(summary: dict[str, Any]) -> str:
    s = summary
    extra = f" (background; x{s['emit_ratio']:.3f} with re-sampled positives)" if s["emit_ratio"] != 1 else ""
    lines = [f"{s['mode']} mode{'' if s['mode'] == 'resampled' else ' (' + s['policy'] + ')'}, {_n(s['world'], 'rank')}"
             f" x {_n(max(s['workers'], 1), 'loader worker')}, batch {s['batch_size']}: "
             f"{_n(s['steps'], 'step')} per rank per epoch",
             f"{_n(s['samples'], 'sample')}{extra} in {_n(s['shards'], 'shard')}; "
             f"{_span(s['samples_per_rank_min'], s['samples_per_rank_max'])} per rank"]
    if s["mode"] == "resampled":
        lines.append(f"shards drawn with replacement: {s['emitted']:,} samples emitted per epoch")
        return "\n".join(lines)
    lines[-1] += (f", {_span(s['samples_per_worker_min'], s['samples_per_worker_max'])} per worker in at most "
                  f"{_n(s['pieces_per_worker_max'], 'piece')} ({s['mid_shard_starts']:,} start mid-shard)")
    lines.append(f"{s['padded']:,} samples repeated and {s['dropped']:,} left out: {100 * s['waste_fraction']:.2f}% "
                 f"of the {s['emitted']:,} emitted")
    return "\n".join(lines)
