"""The order in which one loader worker reads and emits samples: a pure function of its plan and seeds, no I/O.

A worker opens its planned pieces (data.plan) a few at a time and reads them interleaved, so consecutive reads
come from different shards; the reads go into a shuffle buffer that emits a random held sample once it holds a
few (it fills up while it emits, so the first batch does not wait for a full buffer); re-sampled positives are
mixed into the emitted stream at a fixed rate. The result is a stream of events on integer references:

- ``Open(piece, tag)``: start reading ``piece`` (samples ``start``..``stop``-1 of a shard);
- ``Read(ref)``: the next sample of an open piece enters the buffer;
- ``Emit(ref)``: a held sample (or a re-sampled positive) leaves, to be decoded and batched.

Keeping the order apart from the reading is what makes a resume cheap: ``advance`` replays the events on
integers up to the number of samples already emitted, which says exactly which samples sit in the buffer and
where each open piece stands, so the reader (data.reader) fetches just those, with byte-range reads, and never
re-reads what was consumed before the checkpoint.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Union

import numpy as np

from data.plan import Piece

POSITIVE = -1
"""``Ref.shard`` of a re-sampled positive; its ``index`` points into the positive table."""


class Ref(NamedTuple):
    shard: int
    """Index into the epoch's shard list (the plan's ``counts``), or POSITIVE."""
    index: int
    """Sample index within the shard (for POSITIVE: row of the positive table)."""
    tag: int
    """0 for a sample's first read this epoch; n > 0 for a repeat (pad cycle, resampled draw, n-th positive).
    A repeat gets its own augmentation (its key gets a '#n' suffix)."""


class Open(NamedTuple):
    piece: Piece
    tag: int


class Read(NamedTuple):
    ref: Ref


class Emit(NamedTuple):
    ref: Ref


Event = Union[Open, Read, Emit]


def interleaved(pieces: Iterable[tuple[Piece, int]], interleave: int) -> Iterator[Open | Read]:
    """Read up to ``interleave`` pieces at a time, one sample from each in turn; a finished piece is replaced
    by the next one. ``pieces`` may be endless (resampled mode)."""
    pending = iter(pieces)
    active: list[list] = []  # [piece, tag, next index]

    def refill() -> Iterator[Open]:
        while len(active) < max(interleave, 1):
            nxt = next(pending, None)
            if nxt is None:
                return
            piece, tag = nxt
            if piece.size > 0:
                active.append([piece, tag, piece.start])
                yield Open(piece, tag)

    yield from refill()
    turn = 0
    while active:
        turn %= len(active)
        slot = active[turn]
        piece, tag, index = slot
        yield Read(Ref(piece.shard, index, tag))
        slot[2] += 1
        if slot[2] == piece.stop:
            active.pop(turn)
            yield from refill()
        else:
            turn += 1


def shuffled(reads: Iterator[Open | Read], capacity: int, initial: int,
             rng: np.random.Generator) -> Iterator[Event]:
    """A shuffle buffer of ``capacity`` samples that starts emitting once it holds ``initial`` (webdataset's
    rule: while not full it takes two reads per emit, so it fills as it goes)."""
    buffer: list[Ref] = []

    def take() -> Iterator[Open | Read]:
        for event in reads:
            yield event
            if isinstance(event, Read):
                buffer.append(event.ref)
                return

    while True:
        before = len(buffer)
        yield from take()
        if len(buffer) == before:
            break
        if len(buffer) < capacity:
            yield from take()
        if len(buffer) >= initial:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield Emit(buffer.pop())
    while buffer:
        i = int(rng.integers(len(buffer)))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        yield Emit(buffer.pop())


def in_order(reads: Iterator[Open | Read]) -> Iterator[Event]:
    """No shuffle (evaluation): every sample is emitted as soon as it is read."""
    for event in reads:
        yield event
        if isinstance(event, Read):
            yield Emit(event.ref)


def with_positives(events: Iterator[Event], pools: list[np.ndarray], ratio: float,
                   rng: np.random.Generator) -> Iterator[Event]:
    """After each emitted background sample, emit positives so that they stay at ``ratio`` per background
    sample; each rare class equally often, each class's positives in a fresh random order per pass."""
    orders = [rng.permutation(len(p)) for p in pools]
    cursor = [0] * len(pools)
    background = emitted = 0
    for event in events:
        yield event
        if not isinstance(event, Emit):
            continue
        background += 1
        while emitted < int(background * ratio):
            c = int(rng.integers(len(pools)))
            if cursor[c] == len(orders[c]):
                orders[c], cursor[c] = rng.permutation(len(pools[c])), 0
            emitted += 1
            yield Emit(Ref(POSITIVE, int(pools[c][orders[c][cursor[c]]]), emitted))
            cursor[c] += 1


@dataclass(frozen=True)
class OrderSpec:
    """Everything that fixes one worker's order for one epoch (besides its plan)."""

    mode: str
    """exact: the plan's pieces, repeated in further cycles only when padding needs more; resampled: whole
    shards drawn with replacement, endlessly."""
    capacity: int
    """Shuffle-buffer samples (0 or 1: no shuffle)."""
    interleave: int
    """Pieces read at a time."""
    seeds: tuple[int, ...]
    """(seed, epoch, rank, role): every random choice of the worker's epoch derives from these."""
    positive_ratio: float = 0.0
    """Re-sampled positives per background sample (balanced sampling); 0: none."""


def worker_events(spec: OrderSpec, pieces: tuple[Piece, ...], counts: list[int],
                  positive_pools: list[np.ndarray] | None = None) -> Iterator[Event]:
    """The endless event stream of one worker's epoch (the caller stops at its quota of batches)."""
    shuffle_rng = np.random.default_rng([*spec.seeds, 1])

    def emitted(reads: Iterator[Open | Read]) -> Iterator[Event]:
        if spec.capacity <= 1:
            return in_order(reads)
        return shuffled(reads, spec.capacity, max(min(spec.capacity, 100), 1), shuffle_rng)

    if spec.mode == "resampled":
        draw_rng = np.random.default_rng([*spec.seeds, 2])
        draws = ((Piece(s, 0, counts[s]), n + 1) for n, s in
                 enumerate(int(draw_rng.integers(len(counts))) for _ in itertools.count()))
        events = emitted(interleaved(draws, spec.interleave))
    else:
        # exact: cycle 0 emits every planned sample once (the buffer empties before a cycle ends); later cycles,
        # repeats, only run when padding asks for them
        events = itertools.chain.from_iterable(
            emitted(interleaved(((p, cycle) for p in pieces), spec.interleave))
            for cycle in (itertools.count() if pieces else ()))
    if spec.positive_ratio > 0 and positive_pools:
        events = with_positives(events, positive_pools, spec.positive_ratio, np.random.default_rng([*spec.seeds, 3]))
    return events


@dataclass
class Position:
    """Where a worker's stream stands after some emits: what the buffer holds and where open pieces are."""

    held: list[Ref]
    """Samples read but not yet emitted, in read order."""
    open: dict[tuple[int, int], tuple[Piece, int]]
    """(shard, tag) of each open piece -> (piece, next sample index to read)."""


def advance(events: Iterator[Event], emits: int) -> Position:
    """Consume ``events`` until ``emits`` samples were emitted (nothing is read: these are integers)."""
    held: dict[Ref, None] = {}
    open_: dict[tuple[int, int], tuple[Piece, int]] = {}
    done = 0
    while done < emits:
        event = next(events, None)
        if event is None:
            break
        if isinstance(event, Emit):
            done += 1
            held.pop(event.ref, None)
        elif isinstance(event, Read):
            ref = event.ref
            held[ref] = None
            piece, _ = open_[ref.shard, ref.tag]
            if ref.index + 1 == piece.stop:
                del open_[ref.shard, ref.tag]
            else:
                open_[ref.shard, ref.tag] = (piece, ref.index + 1)
        else:
            open_[event.piece.shard, event.tag] = (event.piece, event.piece.start)
    return Position(list(held), open_)
