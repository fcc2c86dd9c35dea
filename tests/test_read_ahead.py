"""Read-ahead of remote ranges (data.ranged.RangeReader): the same bytes as without it, never more ranges in
flight than its bound, no thread left after close, a forked process starting its own threads, and an outage
that hits a prefetched range handled exactly as a read without read-ahead handles it. Against a real SeaweedFS:
this module's own, which the outage tests stop and start (the session one is shared)."""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import uuid

import numpy as np
import pytest

from conftest import noise_samples, own_seaweedfs
from data import ranged, remote, storage
from data.order import Emit, Open, Read, Ref
from data.plan import Piece
from data.reader import ShardReader
from data.shards import read_manifest, write_shard_set

KIB = 1 << 10
CHUNK = 64 * KIB
WAIT_S = 60  # only a bound on a hang: no assertion depends on how long anything took


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """This module's own SeaweedFS (conftest.own_seaweedfs)."""
    with own_seaweedfs(tmp_path_factory.mktemp("read-ahead-seaweedfs")) as server:
        yield server


@pytest.fixture
def stats(monkeypatch):
    monkeypatch.setattr(remote, "STATS", dict.fromkeys(remote.STATS, 0))
    monkeypatch.setenv(remote.OUTAGE_ENV, "600")
    return remote.STATS


def new_url(server) -> str:
    return f"s3://{server.bucket}/read-ahead/{uuid.uuid4().hex[:8]}"


def read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("bgsplit-read-ahead")]


class InFlight:
    """Wraps ranged._fetch_range: counts the range requests running at once, and can hold requests back."""

    def __init__(self, monkeypatch, hold=None):
        self.real = ranged._fetch_range
        self.lock = threading.Lock()
        self.active = self.most = 0
        self.calls: list[tuple[int, int, str]] = []
        self.hold = hold
        monkeypatch.setattr(ranged, "_fetch_range", self)

    def __call__(self, fs, path, start, end):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
            self.calls.append((start, end, threading.current_thread().name))
        try:
            if self.hold is not None:
                self.hold(start, end)
            return self.real(fs, path, start, end)
        finally:
            with self.lock:
                self.active -= 1


RANGES = [(0, None), (1, 999_999), (65_535, 131_073), (123_457, 123_457), (999_990, None), (70_000, 700_000)]


@pytest.mark.parametrize("read_ahead", [CHUNK, 4 * CHUNK, 100 * KIB, 32 << 20])
def test_the_same_bytes_with_and_without_read_ahead(store, stats, read_ahead):
    url, blob = new_url(store), os.urandom(1_000_003)
    storage.write_bytes(url, blob)
    for start, end in RANGES:
        want = blob[start:end]
        before = stats["bytes_read"]
        with ranged.open_range(url, start, end, chunk=CHUNK, read_ahead=read_ahead) as f:
            assert f.read() == want, (start, end)
        assert stats["bytes_read"] - before == len(want)  # each byte fetched once, none past the end
        with ranged.open_range(url, start, end, chunk=CHUNK, read_ahead=read_ahead) as f, \
                ranged.open_range(url, start, end, chunk=CHUNK) as plain:
            parts, plain_parts = [], []
            for size in (1, 4098, 70_000, 10_001, 200_000, 3):
                parts.append(f.read(size))
                plain_parts.append(plain.read(size))
            f.seek(len(want) // 3)  # backwards and forwards, inside and outside what was prefetched
            plain.seek(len(want) // 3)
            parts.append(f.read(50_000))
            plain_parts.append(plain.read(50_000))
            f.seek(max(0, len(want) - 5))
            plain.seek(max(0, len(want) - 5))
            parts.append(f.read())
            plain_parts.append(plain.read())
            assert parts == plain_parts and f.tell() == plain.tell() == len(want)
    assert not read_ahead_threads()


def test_a_shard_reads_the_same_samples_with_read_ahead_on_and_off(store):
    samples = noise_samples(60, (40, 60), width=3)
    root = new_url(store)
    write_shard_set(root, samples, rare_classes=["r"], class_names=["bg", "R"], max_count=20)
    m = read_manifest(root)
    assert len(m.shards) == 3 and m.shards[0].bytes > 6 * 16 * KIB  # several 16 KiB ranges per shard

    def read(read_ahead_mb, piece=None):
        reader = ShardReader(m, m.shards, read_ahead_mb=read_ahead_mb)
        if piece is not None:
            return [(s.key, s.fields) for s in reader.samples(*piece)]
        return [[(s.key, s.fields) for s in reader.samples(k, 0, m.shards[k].count)] for k in range(3)]

    off = read(0)
    assert [k for shard in off for k, _ in shard] == [s[0] for s in samples]
    for mb in (16 / 1024, 64 / 1024, 32):  # one range ahead of 16 KiB, four of 16 KiB, the default
        assert read(mb) == off
        assert read(mb, (1, 3, 17)) == off[1][3:17]
    assert not read_ahead_threads()


def test_in_flight_ranges_never_exceed_the_bound_and_reach_it(store, stats, monkeypatch):
    """Four ranges ahead: the first four requests are held until all four are running at once (so read-ahead
    really overlaps them); at no point are more than four running."""
    url, blob = new_url(store), os.urandom(20 * CHUNK + 7)
    storage.write_bytes(url, blob)
    all_four = threading.Event()

    def hold(start, end):
        if start < 4 * CHUNK:
            with counter.lock:
                if counter.active == 4:
                    all_four.set()
            all_four.wait(WAIT_S)

    counter = InFlight(monkeypatch, hold)
    with ranged.open_range(url, chunk=CHUNK, read_ahead=4 * CHUNK) as f:
        assert f.raw.depth == 4
        data = []
        while part := f.read(10_000):
            data.append(part)
            assert len(f.raw._pending) <= 4  # bytes held: four ranges ahead plus the one being read
    assert b"".join(data) == blob
    assert all_four.is_set() and counter.most == 4
    assert sorted((a, b) for a, b, _ in counter.calls) == [(a, min(a + CHUNK, len(blob)))
                                                          for a in range(0, len(blob), CHUNK)]
    assert all(name.startswith("bgsplit-read-ahead") for _, _, name in counter.calls)
    # small chunks with a large read-ahead: the MB bound would allow 512 ranges; the thread bound holds
    with ranged.open_range(url, chunk=CHUNK, read_ahead=32 << 20) as f:
        assert f.raw.depth == ranged.READ_AHEAD_MAX_RANGES
    assert not read_ahead_threads()


def test_close_in_the_middle_stops_fetching_and_leaves_no_thread(store, stats, monkeypatch):
    url, blob = new_url(store), os.urandom(40 * CHUNK)
    storage.write_bytes(url, blob)
    counter = InFlight(monkeypatch)
    f = ranged.open_range(url, chunk=CHUNK, read_ahead=3 * CHUNK)
    assert not read_ahead_threads()  # threads start at the first read, not at open
    assert f.read(100) == blob[:100]
    assert read_ahead_threads()
    f.close()
    assert not read_ahead_threads()
    assert counter.active == 0 and len(counter.calls) <= 1 + 3  # the range read and three ahead, no more
    assert stats["bytes_read"] <= 4 * CHUNK


def _read_rest(f, queue) -> None:
    queue.put(f.read())


def test_a_reader_inherited_by_a_forked_process_starts_its_own_threads(monkeypatch):
    """A forked process inherits the pool object but none of its threads: it must start its own, not wait on
    requests that no thread will ever run. (fsspec's in-memory store: s3fs objects themselves cannot cross a
    fork, so DataLoader workers open their readers after it.)"""
    url, blob = f"memory://read-ahead/{uuid.uuid4().hex[:8]}", os.urandom(30 * CHUNK)
    storage.write_bytes(url, blob)
    f = ranged.open_range(url, chunk=CHUNK, read_ahead=4 * CHUNK)
    assert f.read(CHUNK + 10) == blob[:CHUNK + 10] and f.raw._pending  # ranges in flight in this process
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_rest, args=(f, queue))
    child.start()
    rest = queue.get(timeout=WAIT_S)
    child.join(WAIT_S)
    assert child.exitcode == 0 and rest == blob[CHUNK + 10:]
    assert f.read() == blob[CHUNK + 10:]  # the parent's own reader is untouched
    f.close()


def test_the_next_shard_s_first_range_is_in_flight_before_it_is_opened(store, monkeypatch):
    rng = np.random.default_rng(1)
    samples = [(f"n{i:03d}", rng.bytes(3000), 0, "x") for i in range(30)]
    root = new_url(store)
    write_shard_set(root, samples, rare_classes=["r"], class_names=["bg", "R"], max_count=10)
    m = read_manifest(root)
    counter = InFlight(monkeypatch)
    reader = ShardReader(m, m.shards, read_ahead_mb=1)
    events = []
    for k, info in enumerate(m.shards):  # in order, one shard at a time (evaluation's order)
        events.append(Open(Piece(k, 0, info.count), 0))
        for i in range(info.count):
            events += [Read(Ref(k, i, 0)), Emit(Ref(k, i, 0))]
    seen = []
    for ref, sample in reader.run(iter(events)):
        seen.append(sample.key)
        if ref == Ref(0, 0, 0):  # the first sample of the first shard: the next ones have been asked for
            assert set(reader._warm) == {(1, 0, m.shards[1].bytes), (2, 0, m.shards[2].bytes)}
            assert all(len(stream.raw._pending) == 1 for stream in reader._warm.values())
    assert seen == [s[0] for s in samples]
    assert len(counter.calls) == len(m.shards)  # one request per shard: the early one was used, not repeated
    assert not reader._warm and not read_ahead_threads()


def test_an_outage_during_a_prefetched_range_is_waited_out_as_without_read_ahead(store, stats, monkeypatch):
    """The store goes away while a prefetched range is being fetched; it is back before the deadline: the read
    finishes with the right bytes, the failed prefetch counted as a retry, nothing given up."""
    url, blob = new_url(store), os.urandom(10 * CHUNK)
    storage.write_bytes(url, blob)
    down, failed = threading.Event(), threading.Event()

    def hold(start, end):
        if start >= 2 * CHUNK and not failed.is_set():
            down.wait(WAIT_S)

    counter = InFlight(monkeypatch, hold)
    real = counter.real

    def real_then_note(fs, path, start, end):
        try:
            return real(fs, path, start, end)
        except Exception:
            failed.set()
            raise

    counter.real = real_then_note
    with ranged.open_range(url, chunk=CHUNK, read_ahead=3 * CHUNK) as f:
        head = f.read(2 * CHUNK)  # ranges 0 and 1, fetched while the store is up; 2-4 held in flight
        with store.down():
            down.set()
            assert failed.wait(WAIT_S)  # a prefetch hit the outage
        rest = f.read()
    assert head + rest == blob
    assert stats["retries"] >= 1 and stats["failures"] == 0
    redone = [(a, name) for a, _, name in counter.calls if a == 2 * CHUNK]
    assert redone[0][1].startswith("bgsplit-read-ahead") and len(redone) >= 2  # prefetched, then read again


def test_an_outage_past_the_deadline_in_a_prefetched_range_raises_storage_outage(store, stats, monkeypatch):
    """The same, with the store down past storage.outage_timeout_s: the StorageOutage of a read without
    read-ahead, naming the prefetched range, raised where that range is read; one failure counted."""
    monkeypatch.setenv(remote.OUTAGE_ENV, "2")
    url, blob = new_url(store), os.urandom(10 * CHUNK)
    storage.write_bytes(url, blob)
    down = threading.Event()

    def hold(start, end):
        if start >= 2 * CHUNK:
            down.wait(WAIT_S)

    counter = InFlight(monkeypatch, hold)
    with ranged.open_range(url, chunk=CHUNK, read_ahead=3 * CHUNK) as f:
        assert f.read(2 * CHUNK) == blob[:2 * CHUNK]
        with store.down():
            down.set()
            with pytest.raises(remote.StorageOutage) as info:
                f.read()
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"read {url} bytes {2 * CHUNK}-{3 * CHUNK}: ")
    assert "raise storage.outage_timeout_s (now 2s" in message
    assert stats["failures"] == 1
    assert any(a == 2 * CHUNK and name.startswith("bgsplit-read-ahead") for a, _, name in counter.calls)
    assert not read_ahead_threads()


def _in_order_events(m, shards):
    events = []
    for k in shards:
        events.append(Open(Piece(k, 0, m.shards[k].count), 0))
        for i in range(m.shards[k].count):
            events += [Read(Ref(k, i, 0)), Emit(Ref(k, i, 0))]
    return events


def test_the_next_run_s_first_pieces_are_in_flight_before_this_run_ends(store, monkeypatch):
    """The next epoch's first shards are warmed while this epoch ends, kept open across the two runs, used by
    the next run without a second request, and closed by close() when no next run comes."""
    rng = np.random.default_rng(2)
    samples = [(f"e{i:03d}", rng.bytes(3000), 0, "x") for i in range(40)]
    root = new_url(store)
    write_shard_set(root, samples, rare_classes=["r"], class_names=["bg", "R"], max_count=10)
    m = read_manifest(root)
    assert len(m.shards) == 4
    counter = InFlight(monkeypatch)
    reader = ShardReader(m, m.shards, read_ahead_mb=1)
    first, second = _in_order_events(m, [0, 1]), _in_order_events(m, [3, 2])
    whole = {k: (k, 0, m.shards[k].bytes) for k in range(4)}
    seen = []
    for ref, sample in reader.run(iter(first), emits=20, then=(iter(second), 20)):
        seen.append(sample.key)
        if ref == Ref(1, 9, 0):  # this run's last sample: the next run's first shards are asked for
            assert set(reader._warm) == {whole[3], whole[2]}
    assert set(reader._warm) == {whole[3], whole[2]}  # kept open past the run's end
    assert all(len(stream.raw._pending) == 1 for stream in reader._warm.values())
    seen += [sample.key for _, sample in reader.run(iter(second), emits=20)]
    assert seen == [s[0] for s in samples[:20]] + [s[0] for s in samples[30:]] + [s[0] for s in samples[20:30]]
    assert len(counter.calls) == 4  # one request per shard: the early ones were used, not repeated
    assert not reader._warm and not read_ahead_threads()

    # a next run that never comes: what was warmed for it is closed, not left in flight
    list(reader.run(iter(_in_order_events(m, [0])), emits=10, then=(iter(_in_order_events(m, [1])), 10)))
    assert set(reader._warm) == {whole[1]}
    reader.close()
    assert not reader._warm and not read_ahead_threads()

    # a next run that reads other pieces: the warmed ones are closed at its end, unused
    list(reader.run(iter(_in_order_events(m, [0])), emits=10, then=(iter(_in_order_events(m, [2])), 10)))
    list(reader.run(iter(_in_order_events(m, [3])), emits=10))
    assert not reader._warm and not read_ahead_threads()


def test_a_training_stream_reads_each_range_once_across_epochs_with_read_ahead(store, monkeypatch):
    """Three epochs of a training stream on S3: the same batches with read-ahead as without, and the same number
    of range requests (the next epoch's early first ranges are used, not fetched again). With read-ahead the next
    epoch's first ranges are already asked for when this epoch's last batch is out; nothing is left in flight when
    the stream ends."""
    import time

    from data.loader import ShardStream

    from data.config import LoaderConfig

    samples = noise_samples(120, (40, 60), width=3)
    root = new_url(store)
    write_shard_set(root, samples, rare_classes=["r"], class_names=["bg", "R"], max_count=15)
    m = read_manifest(root)

    def stream(read_ahead_mb, epochs):
        s = ShardStream(m, LoaderConfig(image_size=16, batch_size=8, interleave=2, shuffle_buffer_mb=0.01,
                                        read_ahead_mb=read_ahead_mb),
                        train=True, seed=3)
        s.epochs = epochs
        return s

    steps = stream(0, 1).batches_per_epoch()
    counter = InFlight(monkeypatch)
    one_epoch = sum(1 for batch in stream(1, 1) if "image" in batch)
    alone = len(counter.calls)  # an epoch with no next one: only its own ranges
    assert one_epoch == steps and not read_ahead_threads()
    got = {}
    for read_ahead_mb in (0, 1):
        counter.calls.clear()
        keys, at_epoch_end = [], None
        for batch in stream(read_ahead_mb, 3):
            if "image" not in batch:
                continue
            keys.append(tuple(batch["key"]))
            if len(keys) == steps:  # epoch 0's last batch: wait (bounded) for requests beyond its own
                deadline = time.monotonic() + (10 if read_ahead_mb else 0)
                while len(counter.calls) <= alone and time.monotonic() < deadline:
                    time.sleep(0.01)
                at_epoch_end = len(counter.calls)
        got[read_ahead_mb] = (keys, len(counter.calls), at_epoch_end)
    assert got[1][0] == got[0][0] and len(got[0][0]) == 3 * steps
    assert got[1][1] == got[0][1]
    assert got[0][2] == alone < got[1][2]  # without read-ahead the next epoch waits for its turn
    assert not read_ahead_threads()


def test_in_flight_keeps_the_order_and_its_bound_and_raises_an_error_at_its_turn():
    """Many small reads (a set's completion records, a shard's source images) run ``depth`` at a time, answers in
    the order asked, and a failed one is raised when the caller reaches it, not before."""
    lock, running, peak = threading.Lock(), [0], [0]
    gate = threading.Event()

    def work(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(0.05 if i % 3 else 0.01)  # out-of-order finishing
        with lock:
            running[0] -= 1
        if i == 17:
            raise OSError(f"item {i} failed")
        return i * i

    got = []
    with pytest.raises(OSError, match="item 17 failed"):
        for item, value in storage.in_flight(work, range(40), depth=4):
            got.append((item, value))
    assert got == [(i, i * i) for i in range(17)]
    assert 1 < peak[0] <= 4
    assert list(storage.in_flight(work, [], depth=4)) == []
    assert [v for _, v in storage.in_flight(work, range(5), depth=0)] == [0, 1, 4, 9, 16]  # depth 0 is one at a time
