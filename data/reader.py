"""Reading samples out of shards with byte-range requests, following the order of data.order.

A worker reads only what its plan gives it: a piece that starts mid-shard is one range request from that
sample's byte offset (from the shard's completion record), and a resumed worker fetches just the samples its
shuffle buffer held, coalescing neighbours into a few ranges, instead of re-reading the epoch so far. The
object store's outages are waited out by data.remote; what is skipped here is only corrupt data (a malformed
or truncated tar, a shard object gone missing), counted against its shard and named in a warning. A damaged tar
header costs its own sample only: the reader goes on at the next sample's recorded offset (the completion
record), so the samples after it are read as usual.

Remote shards are read with read-ahead (data.read_ahead_mb, see data.ranged.RangeReader), and the first range
of a piece about to be opened is fetched while the open pieces are still being decoded, so neither the next
range nor the next shard waits on the store's first-byte latency; nor does the next epoch's first shard, which
is warmed while an epoch ends (ShardReader.run's ``then``).

Re-sampled positives are read from one node-local copy of the positive shards (the page cache is shared by
every process on the node), one sample at a time by offset: no worker holds positives in memory.
"""
from __future__ import annotations

import functools
import io
import itertools
import logging
import os
import re
import tarfile
from collections import deque
from typing import IO, Callable, Iterable, Iterator, NamedTuple

import numpy as np

from data import ranged, remote, storage
from data.config import READ_AHEAD_MB
from data.order import POSITIVE, Emit, Event, Open, Position, Read, Ref
from data.plan import Piece
from data.shards import Manifest, ShardInfo, read_record
from data.teacher_labels import TeacherLabels

log = logging.getLogger("bgsplit.data")

CORRUPT = (tarfile.TarError, EOFError, ValueError, FileNotFoundError)
"""What counts as bad data in a shard (skipped and counted); every other error, outages included, is raised."""
COALESCE_GAP = 1 << 20
"""Held samples of one shard closer than this are fetched in one range request (the gap is read and dropped)."""
LOOKAHEAD_EVENTS = 512
"""How far ahead in its order a reader looks for pieces about to be opened (a few hundred samples: at a
thousand images a second that is far more than a store's first-byte latency)."""
WARM_PIECES = 4
"""Pieces whose first range may be in flight before they are opened (one range each: memory stays bounded)."""
_SKIP_META = re.compile(r"__[^/]*__($|/)")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
"""webdataset's base_plus_ext: a member's key is its name up to the first dot of its last component."""


class Sample(NamedTuple):
    key: str
    fields: dict[str, bytes]
    teacher: tuple[np.ndarray, np.ndarray] | None
    shard: str
    """Shard file name, so a skip is counted against it."""


class ShardReader:
    """Samples of a list of shards (the plan's shard indices refer to it), with their teacher labels."""

    def __init__(self, manifest: Manifest, shards: list[ShardInfo], labels: TeacherLabels | None = None,
                 on_bad_shard: Callable[[str], None] = lambda name: None, read_ahead_mb: float = READ_AHEAD_MB):
        if not read_ahead_mb >= 0:
            raise ValueError(f"data.read_ahead_mb is {read_ahead_mb!r}: give 0 (off) or a size in MB")
        self.manifest, self.shards, self.labels = manifest, shards, labels
        self.on_bad_shard = on_bad_shard
        self._pins: dict[int, ranged.Pin] = {}
        """Per shard, its recorded size and the version this run (epoch) first read: every range is checked
        against it, so an epoch never mixes two versions of a shard rewritten while it runs."""
        self._changed: set[int] = set()
        """Shards found rewritten in this run: their remaining samples are skipped without reading."""
        self._lost: set[tuple[int, int]] = set()
        """(shard, first sample) of each loss counted in this run: an exact epoch's padding cycle reads a worker's
        pieces again, and a damaged sample read twice is still one sample lost (warned and counted once)."""
        self.read_ahead = int(read_ahead_mb * (1 << 20))
        self._warm: dict[tuple[int, int, int], io.BufferedReader] = {}
        """Streams opened ahead of their piece (first range in flight), by (shard, first byte, end byte)."""
        self._carry: set[tuple[int, int, int]] = set()
        """Keys of ``_warm`` opened for the next run (the next epoch): kept open when this run ends."""

    def url(self, shard: int) -> str:
        return storage.join(self.manifest.root, self.shards[shard].url)

    @functools.lru_cache(maxsize=16)
    def offsets(self, shard: int) -> np.ndarray:
        return np.asarray(read_record(self.manifest, self.shards[shard])["offsets"], dtype=np.int64)

    def _sample(self, shard: int, index: int, key: str, fields: dict[str, bytes]) -> Sample:
        info = self.shards[shard]
        teacher = self.labels.rows(info.url, index) if self.labels is not None else None
        return Sample(key, fields, teacher, info.url)

    def _bounds(self, shard: int, start: int, stop: int) -> tuple[int, int]:
        info = self.shards[shard]
        if start == 0 and stop == info.count:
            return 0, info.bytes  # the whole shard: no record needed
        offsets = self.offsets(shard)
        return int(offsets[start]), int(offsets[stop])

    def _recorded_offsets(self, shard: int) -> np.ndarray | None:
        """The shard's sample offsets, or None for a shard whose record has none (nothing to resync by)."""
        try:
            return self.offsets(shard)
        except (ValueError, KeyError, FileNotFoundError):
            return None

    def _pin(self, shard: int) -> ranged.Pin:
        if shard not in self._pins:
            self._pins[shard] = ranged.Pin(self.url(shard), self.shards[shard].bytes)
        return self._pins[shard]

    def _open(self, shard: int, lo: int, hi: int) -> io.BufferedReader:
        stream = self._warm.pop((shard, lo, hi), None)
        if stream is not None:
            return stream
        return ranged.open_range(self.url(shard), lo, hi, read_ahead=self.read_ahead, pin=self._pin(shard))

    def _skip_changed(self, shard: int, index: int, stop: int, why: str) -> Iterator[None]:
        """The rest of a piece of a shard found rewritten: warned and counted once per shard and run."""
        self._changed.add(shard)
        if self._first_loss(shard, -1):
            log.warning("skipping shard %s for the rest of this epoch (%d sample(s) of this piece, and any later "
                        "piece of it): %s", self.shards[shard].url, stop - index, why)
            self.on_bad_shard(self.shards[shard].url)
        for _ in range(stop - index):
            yield None

    def _stored_key(self, shard: int, offset: int) -> str:
        """The key a damaged sample's first header names, for the warning (the damaged byte may be in it)."""
        try:
            with ranged.open_range(self.url(shard), offset, offset + 512) as f:
                block = f.read(512)
        except CORRUPT:
            return "?"
        name = block[:100].split(b"\0", 1)[0]
        prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
        text = ((prefix + b"/" if prefix else b"") + name).decode("utf-8", "replace")
        return _key_of(text) or text or "?"

    def _first_loss(self, shard: int, index: int) -> bool:
        """Whether a loss from sample ``index`` of ``shard`` on is new in this run (so it is warned and counted)."""
        if (shard, index) in self._lost:
            return False
        self._lost.add((shard, index))
        return True

    def samples(self, shard: int, start: int, stop: int) -> Iterator[Sample | None]:
        """Samples ``start``..``stop``-1 of a shard, one range request; exactly ``stop - start`` items, None for
        those lost to corrupt data.

        A tar header that does not parse ends Python's tar reader as if the archive ended there. With the
        shard's recorded offsets that is one sample lost: the one the damage lies in (a sample missing a member
        is never passed on), and reading goes on at the next sample's offset, in the same stream. Without
        offsets (or past the end of an object shorter than recorded) the rest of the range is lost, as it always
        was, with one warning and one count."""
        info = self.shards[shard]
        index, last = start, None
        if shard in self._changed:
            yield from self._skip_changed(shard, index, stop, "it changed while this epoch read it")
            return
        lo, hi = self._bounds(shard, start, stop)
        try:
            with self._open(shard, lo, hi) as stream:
                at = lo  # where the current tar parse started
                while index < stop:
                    parse, reason = _TarParse(stream), ""
                    try:
                        for key, fields in parse:
                            yield self._sample(shard, index, key, fields)
                            index, last = index + 1, key
                            if index == stop:
                                break
                    except (FileNotFoundError, ranged.ObjectChanged):
                        raise  # the object is gone or another one: nothing to resync to
                    except CORRUPT as e:
                        reason = f"{type(e).__name__}: {e}"
                    if index == stop:
                        break
                    pending = parse.pending
                    # the range's last sample followed by the range's end or the archive's end marker is how a
                    # range ends: no record is needed. Any other header there did not parse, and it may be the
                    # sample's own next member: only the record can tell a whole sample from a cut one.
                    normal_end = (not reason and pending is not None and index + 1 == stop
                                  and parse.ends_cleanly(hi - at))
                    offsets = None if normal_end else self._recorded_offsets(shard)
                    if pending is not None:  # the sample being put together when the tar reader stopped
                        if normal_end:
                            whole = True
                        elif offsets is not None:
                            whole = at + parse.pending_end == int(offsets[index + 1])
                        else:
                            whole = not reason  # without offsets: passed on as webdataset does
                        if whole:
                            yield self._sample(shard, index, *pending)
                            index, last, pending = index + 1, pending[0], None
                            if index == stop:
                                break
                    end = min(hi, stream.raw.end)  # the object may be shorter than its record says
                    resume = None if offsets is None else int(offsets[index + 1])
                    if resume is None or resume > end or (index + 1 < stop and resume >= end):
                        if self._first_loss(shard, index):
                            log.warning("shard %s is unreadable from sample %d on (after key %s; %s); skipping %d "
                                        "sample(s)", info.url, index, last,
                                        reason or f"it ends after {index - start} of the {stop - start} samples "
                                        "asked", stop - index)
                            self.on_bad_shard(info.url)
                        for _ in range(stop - index):
                            yield None
                        return
                    if self._first_loss(shard, index):
                        damaged = pending[0] if pending is not None else self._stored_key(shard, int(offsets[index]))
                        log.warning("skipping sample %s (number %d) of shard %s: its tar data is damaged (%s); "
                                    "reading on at the next sample's recorded offset", damaged, index, info.url,
                                    reason or "a header does not parse")
                        self.on_bad_shard(info.url)
                    yield None
                    index += 1
                    if index < stop:
                        at = int(offsets[index])
                        stream.seek(at - lo)
        except ranged.ObjectChanged as e:  # what was read before came from the version this epoch pinned
            yield from self._skip_changed(shard, index, stop, str(e))
        except CORRUPT as e:  # the object itself is not there
            if self._first_loss(shard, index):
                log.warning("shard %s is unreadable from sample %d on (after key %s; %s); skipping %d sample(s)",
                            info.url, index, last, f"{type(e).__name__}: {e}", stop - index)
                self.on_bad_shard(info.url)
            for _ in range(stop - index):
                yield None

    def fetch(self, refs: Iterable[Ref]) -> dict[Ref, Sample | None]:
        """Scattered samples (a resumed shuffle buffer), near neighbours coalesced into one range request."""
        by_shard: dict[int, list[Ref]] = {}
        for ref in refs:
            by_shard.setdefault(ref.shard, []).append(ref)
        out: dict[Ref, Sample | None] = {}
        for shard, wanted in by_shard.items():
            offsets = self.offsets(shard)
            wanted.sort(key=lambda r: r.index)
            run = [wanted[0]]
            for ref in wanted[1:] + [None]:
                if ref is not None and offsets[ref.index] - offsets[run[-1].index + 1] <= COALESCE_GAP:
                    run.append(ref)
                    continue
                first, last = run[0].index, run[-1].index
                got = list(self.samples(shard, first, last + 1))
                for r in run:
                    out[r] = got[r.index - first]
                run = [ref]
        return out

    def _warm_up(self, piece: Piece, carry: bool = False) -> None:
        """Open a remote piece that is about to be opened and start fetching its first range (``carry``: by the
        next run, so it stays open when this one ends)."""
        url = self.url(piece.shard)
        if not remote.is_remote(url):
            return
        try:
            lo, hi = self._bounds(piece.shard, piece.start, piece.stop)
        except CORRUPT:
            return  # its record is unusable: opening it says so, in order
        if (piece.shard, lo, hi) in self._warm:
            return
        stream = ranged.open_range(url, lo, hi, read_ahead=self.read_ahead, pin=self._pin(piece.shard))
        stream.raw.prefetch(1)
        self._warm[piece.shard, lo, hi] = stream
        if carry:
            self._carry.add((piece.shard, lo, hi))

    @staticmethod
    def _first_pieces(events: Iterator[Event], emits: int | None) -> Iterator[Piece]:
        """The pieces of ``events`` in the order of their first read, within LOOKAHEAD_EVENTS events and before
        the ``emits``-th emit (integers only: no I/O)."""
        opened: dict[tuple[int, int], Piece] = {}
        seen = 0
        for event in itertools.islice(events, LOOKAHEAD_EVENTS):
            if isinstance(event, Emit):
                seen += 1
                if emits is not None and seen >= emits:
                    return
            elif isinstance(event, Open):
                opened[event.piece.shard, event.tag] = event.piece
            elif (event.ref.shard, event.ref.tag) in opened:
                yield opened.pop((event.ref.shard, event.ref.tag))

    def _warming(self, events: Iterator[Event], emits: int | None,
                 then: tuple[Iterator[Event], int] | None = None) -> Iterator[Event]:
        """``events`` unchanged, read LOOKAHEAD_EVENTS ahead (they are integers: no I/O) so that the pieces about
        to be read have their first range in flight, up to WARM_PIECES of them, before they are opened. A piece
        is warmed once its first read is in the window, and only if that read comes before the consumer's
        ``emits``-th emit: those are the pieces a read without read-ahead fetches too (an exact epoch's padding
        cycle opens pieces that the worker's quota never reads).

        ``then``, the next run's events and emits (the worker's next epoch): once the window holds this run's
        last expected emit, the first pieces of the next run are warmed too, with the room this run no longer
        needs, so the next epoch's first shards do not wait on the store either. They stay open past this run."""
        source = iter(events)
        ahead: deque[Piece] | None = None  # the next run's first pieces, once this run's end is in the window
        window: deque[Event] = deque()
        opened: dict[tuple[int, int], Piece] = {}  # opened in the window, first read not yet in it
        ready: deque[tuple[Read, Piece]] = deque()  # (the first read, its piece): to warm when there is room
        exhausted, seen = False, 0
        while True:
            while not exhausted and len(window) < LOOKAHEAD_EVENTS:
                event = next(source, None)
                if event is None:
                    exhausted = True
                    break
                window.append(event)
                if isinstance(event, Emit):
                    seen += 1
                elif isinstance(event, Open):
                    opened[event.piece.shard, event.tag] = event.piece
                elif (event.ref.shard, event.ref.tag) in opened:
                    piece = opened.pop((event.ref.shard, event.ref.tag))
                    if emits is None or seen < emits:
                        ready.append((event, piece))
            while ready and len(self._warm) < WARM_PIECES:
                self._warm_up(ready.popleft()[1])
            if then is not None and ahead is None and (exhausted or (emits is not None and seen >= emits)):
                ahead = deque(self._first_pieces(*then))
            while ahead and not ready and len(self._warm) < WARM_PIECES:
                self._warm_up(ahead.popleft(), carry=True)
            if not window:
                return
            event = window.popleft()
            if ready and ready[0][0] is event:  # reached before there was room to warm its piece up
                ready.popleft()
            yield event

    def run(self, events: Iterator[Event], position: Position | None = None,
            positives: "PositiveStore | None" = None, emits: int | None = None,
            then: tuple[Iterator[Event], int] | None = None) -> Iterator[tuple[Ref, Sample | None]]:
        """Carry out the events: read what they read, yield what they emit (None: lost to corrupt data).
        ``position`` (from data.order.advance) resumes a stream mid-way without re-reading consumed samples;
        ``emits``, the emits the consumer expects to take, only keeps read-ahead from fetching past them;
        ``then`` (the next run's events and emits) is only looked at, to warm the next run's first pieces."""
        held: dict[Ref, Sample | None] = {}
        self._lost, self._changed = set(), set()
        self._pins = {k: self._pins[k] for k in {key[0] for key in self._warm}}  # a new epoch pins afresh
        self._carry = set()  # what the previous run warmed for this one is used now or closed at its end
        streams: dict[tuple[int, int], tuple[Iterator[Sample | None], int]] = {}
        try:
            if position is not None:
                held.update(self.fetch(position.held))
                for (shard, tag), (piece, index) in position.open.items():
                    streams[shard, tag] = (self.samples(shard, index, piece.stop), piece.stop)
            for event in (self._warming(events, emits, then) if self.read_ahead else events):
                if isinstance(event, Emit):
                    ref = event.ref
                    yield ref, (positives.get(ref.index) if ref.shard == POSITIVE else held.pop(ref))
                elif isinstance(event, Read):
                    ref = event.ref
                    stream, stop = streams[ref.shard, ref.tag]
                    held[ref] = next(stream)
                    if ref.index + 1 == stop:
                        stream.close()
                        del streams[ref.shard, ref.tag]
                elif isinstance(event, Open):
                    piece = event.piece
                    streams[piece.shard, event.tag] = (self.samples(piece.shard, piece.start, piece.stop),
                                                       piece.stop)
        finally:
            # a stream that stops early (the worker's quota is met) leaves no request in flight behind it
            for stream, _ in streams.values():
                stream.close()
            for key in [k for k in self._warm if k not in self._carry]:
                self._warm.pop(key).close()

    def close(self) -> None:
        """Close what was warmed for a run that will not come (the stream stopped at an epoch's end)."""
        self._carry = set()
        while self._warm:
            self._warm.popitem()[1].close()


def _key_of(name: str) -> str | None:
    match = _KEY_EXT.match(name)
    return match.group(1) if match else None


class _TarParse:
    """Complete samples of a tar stream, grouped by key as webdataset's ``group_by_keys`` groups them (same member
    filter, lower-cased extensions, a repeated extension is an error), with what it knows when the stream stops:
    the sample it was putting together (``pending``) and where that sample's last member ended (``pending_end``,
    from the parse's start), which with the recorded offsets tells a whole sample from one cut by damage."""

    def __init__(self, stream: IO[bytes]):
        self.stream = _Recent(stream)
        self.pending: tuple[str, dict[str, bytes]] | None = None
        self.pending_end = 0

    def ends_cleanly(self, size: int) -> bool:
        """Whether the tar data stopped after the pending sample for the reason a range stops: ``size`` (the
        range's length from the parse's start) was reached, or the archive's end marker (a zero block) follows.
        The tar reader stops silently at those, and just as silently at a header that does not parse."""
        if self.pending_end == size:
            return True
        block = self.stream.block(self.pending_end)
        return len(block) == tarfile.BLOCKSIZE and not any(block)

    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        tar = tarfile.open(fileobj=self.stream, mode="r|*")
        for info in tar:
            name = info.name
            if not info.isreg() or name is None:
                continue
            if ("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name):
                continue
            data = tar.extractfile(info).read()
            tar.members = []
            end = info.offset_data + -(-info.size // 512) * 512
            match = _KEY_EXT.match(name)
            if not match:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if self.pending is not None and self.pending[0] != key:
                done, self.pending = self.pending, None
                yield done
            if self.pending is None:
                self.pending = (key, {})
            if ext in self.pending[1]:
                raise ValueError(f"{name}: duplicate file name in tar file {ext} {list(self.pending[1])}")
            self.pending[1][ext] = data
            self.pending_end = end


class _Recent:
    """A stream as the tar reader reads it (``read`` only, in its 10 KB records), keeping the last few records:
    the block it stopped at is among them, so telling the archive's end from a damaged header re-reads nothing."""

    KEEP = 4

    def __init__(self, stream: IO[bytes]):
        self.stream, self.pos = stream, 0
        self.records: deque[tuple[int, bytes]] = deque(maxlen=self.KEEP)

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if data:
            self.records.append((self.pos, data))
            self.pos += len(data)
        return data

    def block(self, at: int) -> bytes:
        """Bytes ``at``..``at`` + 512 from the parse's start, short if they were not read (or not all kept)."""
        if not self.records or at < self.records[0][0]:
            return b""
        first = self.records[0][0]
        return b"".join(data for _, data in self.records)[at - first:at - first + tarfile.BLOCKSIZE]
