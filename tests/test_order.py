"""A worker's read and emit order, on integers: every planned sample once per cycle, shards interleaved, a
shuffle buffer that emits from the start, positives at their rate, and a replay that resumes it exactly."""
import collections
import itertools

import numpy as np
import pytest

from data.order import POSITIVE, Emit, Open, OrderSpec, Read, advance, interleaved, shuffled, worker_events
from data.plan import Piece

PIECES = (Piece(3, 10, 40), Piece(0, 0, 25), Piece(7, 5, 6), Piece(2, 0, 50), Piece(5, 20, 33))
COUNTS = [25, 1, 50, 40, 1, 33, 1, 6]


def _emits(events, n=None):
    return [e.ref for e in itertools.islice((e for e in events if isinstance(e, Emit)), n)]


def test_interleave_reads_every_sample_once_alternating_shards():
    reads = [e.ref for e in interleaved(((p, 0) for p in PIECES), 3) if isinstance(e, Read)]
    assert collections.Counter((r.shard, r.index) for r in reads) == collections.Counter(
        (p.shard, i) for p in PIECES for i in range(p.start, p.stop))
    first = [r.shard for r in reads[:6]]
    assert first == [3, 0, 7, 2, 3, 0]  # one from each open piece in turn; piece 7 (one sample) makes way for 2
    for shard in {r.shard for r in reads}:  # each piece is read in order
        idx = [r.index for r in reads if r.shard == shard]
        assert idx == sorted(idx)


def test_shuffle_buffer_emits_from_the_start_and_holds_at_most_its_capacity():
    rng = np.random.default_rng(0)
    reads = interleaved(((Piece(0, 0, 5000), 0),), 1)
    held, max_held, reads_before_first_emit = 0, 0, None
    n_reads = 0
    order = []
    for e in shuffled(reads, capacity=1000, initial=100, rng=rng):
        if isinstance(e, Read):
            held += 1
            n_reads += 1
        elif isinstance(e, Emit):
            held -= 1
            order.append(e.ref.index)
            if reads_before_first_emit is None:
                reads_before_first_emit = n_reads
        max_held = max(max_held, held)
    assert reads_before_first_emit == 100  # not 1000: it starts once it holds `initial`
    assert max_held <= 1000 and sorted(order) == list(range(5000))
    displacement = np.abs(np.array(order) - np.arange(5000))
    assert np.median(displacement) > 100  # really shuffled, not a near-identity


def test_exact_cycles_empty_the_buffer_before_repeating():
    spec = OrderSpec("exact", capacity=64, interleave=2, seeds=(0, 1, 0, 0))
    total = sum(p.size for p in PIECES)
    refs = _emits(worker_events(spec, PIECES, COUNTS), 2 * total + 7)
    assert {r.tag for r in refs[:total]} == {0} and {r.tag for r in refs[total:2 * total]} == {1}
    assert len({(r.shard, r.index) for r in refs[:total]}) == total  # each planned sample once per cycle


def test_positives_are_mixed_in_at_their_rate_each_class_equally():
    spec = OrderSpec("exact", capacity=16, interleave=2, seeds=(0, 0, 0, 0), positive_ratio=0.25)
    pools = [np.array([0, 1]), np.array([2, 3, 4, 5, 6, 7])]
    refs = _emits(worker_events(spec, PIECES, COUNTS, pools), 1000)
    pos = [r for r in refs if r.shard == POSITIVE]
    assert abs(len(pos) / len(refs) - 0.2) < 0.01  # 1 positive per 4 background samples
    small = sum(r.index in (0, 1) for r in pos)
    assert abs(small - len(pos) / 2) < 0.15 * len(pos)  # class 1 has 2 positives, class 2 six: equal draws
    assert len({r.tag for r in pos}) == len(pos)  # every repeat gets its own augmentation tag


@pytest.mark.parametrize("mode", ["exact", "resampled"])
@pytest.mark.parametrize("skip", [0, 1, 37, 150])
def test_advance_then_continue_equals_an_uninterrupted_stream(mode, skip):
    spec = OrderSpec(mode, capacity=32, interleave=3, seeds=(4, 2, 1, 0), positive_ratio=0.1)
    pools = [np.arange(5)]
    full = _emits(worker_events(spec, PIECES, COUNTS, pools), skip + 100)
    events = worker_events(spec, PIECES, COUNTS, pools)
    position = advance(events, skip)
    rest = list(itertools.islice((e for e in events if isinstance(e, (Emit, Read, Open))), 10_000))
    # what the replay says is held plus what the continued stream reads is exactly what it then emits
    emitted = [e.ref for e in rest if isinstance(e, Emit)][:100]
    assert emitted == full[skip:skip + 100]
    read_later = {e.ref for e in rest if isinstance(e, Read)}
    for ref in emitted:
        if ref.shard != POSITIVE:
            assert ref in set(position.held) | read_later
    assert len(position.held) <= 32
    for (shard, tag), (piece, nxt) in position.open.items():
        assert piece.shard == shard and piece.start <= nxt < piece.stop
