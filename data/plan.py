"""Who reads what in an epoch: a pure function of (shard sizes, seed, epoch, world, rank, workers, batch size).

Data-parallel ranks must run the same number of steps or the first collective after the shortest rank stops
hangs every other rank. So the step count is computed here from the manifest's shard sizes alone, identically
on every rank, and each loader worker is told exactly how many batches to produce; a worker that runs out
pads by repeating its own samples, one with too many drops the rest. Nothing depends on what a rank actually
reads, so the plan can be tested on simulated worlds without processes.

Two modes:
- exact: every sample once per epoch (up to the padding/dropping needed to equalise ranks, which is reported);
- resampled: an endless, seeded draw of shards with replacement and a fixed epoch length (the webdataset
  maintainer's recommendation for very large sets; resuming mid-epoch starts a fresh seeded stream).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

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


def _slot_pieces(counts: list[int], slots: int, order: np.ndarray) -> list[list[Piece]]:
    """Deal whole shards to slots; when shards are fewer than slots, cut the shuffled sequence of samples into
    ``slots`` contiguous ranges instead (balanced to one sample), each touching one or two shards."""
    if len(counts) >= slots:
        return [[Piece(int(s), 0, counts[int(s)]) for s in order[slot::slots]] for slot in range(slots)]
    starts = np.cumsum([0] + [counts[int(s)] for s in order])
    total = int(starts[-1])
    out: list[list[Piece]] = []
    for slot in range(slots):
        lo, hi = slot * total // slots, (slot + 1) * total // slots
        pieces = []
        for pos, shard in enumerate(order):
            a, b = max(lo, int(starts[pos])), min(hi, int(starts[pos + 1]))
            if a < b:
                pieces.append(Piece(int(shard), a - int(starts[pos]), b - int(starts[pos])))
        out.append(pieces)
    return out


def worker_batches(steps: int, worker: int, workers: int) -> int:
    """Batches worker ``worker`` contributes when the DataLoader takes ``steps`` batches round-robin."""
    return len(range(worker, steps, max(workers, 1)))


def steps_per_epoch(counts: list[int], *, world: int, batch_size: int, mode: str = "exact",
                    policy: str = "pad", emit_ratio: float = 1.0, seed: int = 0, epoch: int = 0,
                    workers: int = 0) -> int:
    """Batches every rank runs this epoch. ``emit_ratio`` > 1 when re-sampled positives are mixed in."""
    if mode == "resampled":
        return int(sum(counts) * emit_ratio) // (world * batch_size)
    per_rank = rank_samples(counts, world=world, workers=workers, seed=seed, epoch=epoch)
    emitted = [n * emit_ratio for n in per_rank]
    if policy == "drop":
        return int(min(math.floor(n / batch_size) for n in emitted))
    return int(max(math.ceil(n / batch_size) for n in emitted))


def rank_samples(counts: list[int], *, world: int, workers: int, seed: int, epoch: int) -> list[int]:
    w = max(workers, 1)
    slots = _layout(tuple(counts), world * w, seed, epoch)
    sizes = [sum(p.size for p in pieces) for pieces in slots]
    return [sum(sizes[r * w:(r + 1) * w]) for r in range(world)]


def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


@functools.lru_cache(maxsize=64)
def _layout(counts: tuple[int, ...], slots: int, seed: int, epoch: int) -> tuple[tuple[Piece, ...], ...]:
    """Every slot's pieces for one epoch; cached because each worker of each rank asks for the same layout."""
    return tuple(tuple(p) for p in _slot_pieces(list(counts), slots, _order(len(counts), seed, epoch)))


def for_worker(counts: list[int], *, seed: int, epoch: int, world: int, rank: int, worker: int, workers: int,
               batch_size: int, mode: str = "exact", policy: str = "pad", emit_ratio: float = 1.0) -> WorkerPlan:
    """The plan of loader worker ``worker`` (0 when there are no worker processes) of rank ``rank``.

    Raises ValueError, saying what to change, for a world that cannot be balanced.
    """
    if not counts or sum(counts) == 0:
        raise ValueError("the shard list is empty: nothing to plan; check the manifest")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    steps = steps_per_epoch(counts, world=world, batch_size=batch_size, mode=mode, policy=policy,
                            emit_ratio=emit_ratio, seed=seed, epoch=epoch, workers=workers)
    if steps == 0:
        raise ValueError(f"{sum(counts)} samples cannot give every one of {world} ranks one batch of {batch_size}:"
                         " lower data.batch_size or use fewer ranks")
    batches = worker_batches(steps, worker, workers)
    if mode == "resampled":
        return WorkerPlan((), 0, batches, steps)
    w = max(workers, 1)
    pieces = _layout(tuple(counts), world * w, seed, epoch)[rank * w + worker]
    samples = sum(p.size for p in pieces)
    if batches and samples == 0:
        raise ValueError(f"cannot balance {sum(counts)} samples in {len(counts)} shards over {world} ranks x "
                         f"{w} loader workers: worker {worker} of rank {rank} gets no sample; use fewer "
                         "data.num_workers, more shards, or data.mode=resampled")
    return WorkerPlan(pieces, samples, batches, steps)


def padding_report(counts: list[int], *, world: int, workers: int, batch_size: int, seed: int, epoch: int,
                   policy: str, emit_ratio: float = 1.0) -> dict[str, int]:
    """How many samples exact mode repeats (pad) or leaves out (drop) this epoch, over all ranks."""
    steps = steps_per_epoch(counts, world=world, batch_size=batch_size, policy=policy, emit_ratio=emit_ratio,
                            seed=seed, epoch=epoch, workers=workers)
    w = max(workers, 1)
    slots = _layout(tuple(counts), world * w, seed, epoch)
    padded = dropped = 0
    for rank in range(world):
        for worker in range(w):
            have = sum(p.size for p in slots[rank * w + worker]) * emit_ratio
            need = worker_batches(steps, worker, workers) * batch_size
            padded += max(0, int(need - have))
            dropped += max(0, int(have - need))
    return {"steps": steps, "padded": padded, "dropped": dropped}
