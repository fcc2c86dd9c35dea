"""Reading samples out of shards with byte-range requests, following the order of data.order.

A worker reads only what its plan gives it: a piece that starts mid-shard is one range request from that
sample's byte offset (from the shard's completion record), and a resumed worker fetches just the samples its
shuffle buffer held, coalescing neighbours into a few ranges, instead of re-reading the epoch so far. The
object store's outages are waited out by data.storage; what is skipped here is only corrupt data (a malformed
or truncated tar, a shard object gone missing), counted against its shard and named in a warning.

Re-sampled positives are read from one node-local copy of the positive shards (the page cache is shared by
every process on the node), one sample at a time by offset: no worker holds positives in memory.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import tarfile
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from data import storage
from data.order import POSITIVE, Emit, Event, Open, Position, Read, Ref
from data.shards import Manifest, ShardInfo, iter_tar, read_record
from data.teacher_labels import TeacherLabels

log = logging.getLogger("bgsplit.data")

CORRUPT = (tarfile.TarError, EOFError, ValueError, FileNotFoundError)
"""What counts as bad data in a shard (skipped and counted); every other error, outages included, is raised."""
COALESCE_GAP = 1 << 20
"""Held samples of one shard closer than this are fetched in one range request (the gap is read and dropped)."""


class Sample(NamedTuple):
    key: str
    fields: dict[str, bytes]
    teacher: tuple[np.ndarray, np.ndarray] | None
    shard: str
    """Shard file name, so a skip is counted against it."""


class ShardReader:
    """Samples of a list of shards (the plan's shard indices refer to it), with their teacher labels."""

    def __init__(self, manifest: Manifest, shards: list[ShardInfo], labels: TeacherLabels | None = None,
                 on_bad_shard: Callable[[str], None] = lambda name: None):
        self.manifest, self.shards, self.labels = manifest, shards, labels
        self.on_bad_shard = on_bad_shard

    def url(self, shard: int) -> str:
        return storage.join(self.manifest.root, self.shards[shard].url)

    @functools.lru_cache(maxsize=16)
    def offsets(self, shard: int) -> np.ndarray:
        return np.asarray(read_record(self.manifest, self.shards[shard])["offsets"], dtype=np.int64)

    def _sample(self, shard: int, index: int, key: str, fields: dict[str, bytes]) -> Sample:
        info = self.shards[shard]
        teacher = self.labels.rows(info.url, index) if self.labels is not None else None
        return Sample(key, fields, teacher, info.url)

    def samples(self, shard: int, start: int, stop: int) -> Iterator[Sample | None]:
        """Samples ``start``..``stop``-1 of a shard, one range request; exactly ``stop - start`` items, None for
        those lost to corrupt data."""
        info = self.shards[shard]
        if start == 0 and stop == info.count:
            lo, hi = 0, info.bytes  # the whole shard: no record needed
        else:
            offsets = self.offsets(shard)
            lo, hi = int(offsets[start]), int(offsets[stop])
        want, got, reason, last = stop - start, 0, "", None
        try:
            with storage.open_range(self.url(shard), lo, hi) as stream:
                for key, fields in iter_tar(stream):
                    if got == want:
                        break
                    yield self._sample(shard, start + got, key, fields)
                    got, last = got + 1, key
        except CORRUPT as e:
            reason = f"{type(e).__name__}: {e}"
        if got < want:
            log.warning("shard %s is unreadable from sample %d on (after key %s; %s); skipping %d sample(s)",
                        info.url, start + got, last, reason or f"it ends after {got} of the {want} samples asked",
                        want - got)
            self.on_bad_shard(info.url)
            for _ in range(want - got):
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

    def run(self, events: Iterator[Event], position: Position | None = None,
            positives: "PositiveStore | None" = None) -> Iterator[tuple[Ref, Sample | None]]:
        """Carry out the events: read what they read, yield what they emit (None: lost to corrupt data).
        ``position`` (from data.order.advance) resumes a stream mid-way without re-reading consumed samples."""
        held: dict[Ref, Sample | None] = {}
        streams: dict[tuple[int, int], tuple[Iterator[Sample | None], int]] = {}
        if position is not None:
            held.update(self.fetch(position.held))
            for (shard, tag), (piece, index) in position.open.items():
                streams[shard, tag] = (self.samples(shard, index, piece.stop), piece.stop)
        for event in events:
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
                streams[piece.shard, event.tag] = (self.samples(piece.shard, piece.start, piece.stop), piece.stop)
        for stream, _ in streams.values():
            stream.close()


def cache_dir() -> str:
    return os.environ.get("BGSPLIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "bgsplit")


class PositiveStore:
    """Every positive of a set, addressable by row, read from a local file by offset.

    Remote positive shards are copied once per node into ``BGSPLIT_CACHE_DIR`` (default ~/.cache/bgsplit), under
    a lock so concurrent ranks on a node make one copy; a local set is read in place. Per process this holds only
    a table of (shard, offset, size, class) per positive: positives are few by definition, and the bytes stay in
    the shared page cache instead of in every worker."""

    def __init__(self, manifest: Manifest, labels: TeacherLabels | None = None):
        self.manifest = manifest
        self.shards = manifest.of_kind("positive")
        if not self.shards:
            raise ValueError(f"sampling 'balanced' needs positive shards; {manifest.root} has none")
        rows = []
        for i, info in enumerate(self.shards):
            record = read_record(manifest, info)
            offsets = np.asarray(record["offsets"], dtype=np.int64)
            for j, label in enumerate(record["labels"]):
                rows.append((i, j, offsets[j], offsets[j + 1] - offsets[j], label))
        table = np.array(rows, dtype=np.int64).reshape(-1, 5)
        self.shard_of, self.index_of, self.offset, self.size, self.label = table.T
        # their teacher labels too, once: fetched per positive they would evict the background shards' labels
        self.teacher = None
        if labels is not None:
            parts = [labels.shard(info.url) for info in self.shards]
            self.teacher = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        self.paths = [self._local(info) for info in self.shards]
        self._files: dict[int, int] = {}
        self._pid = os.getpid()

    def pools(self) -> list[np.ndarray]:
        """Rows of each rare class that has positives (re-sampling draws each class equally often)."""
        classes = range(1, self.manifest.num_classes)
        return [p for p in (np.flatnonzero(self.label == c) for c in classes) if len(p)]

    def _local(self, info: ShardInfo) -> str:
        url = storage.join(self.manifest.root, info.url)
        if not storage.is_remote(url):
            return url
        # keyed by the set's whole manifest, not its URL: a set rebuilt in place gets a fresh copy
        identity = json.dumps([self.manifest.root, self.manifest.to_json()], sort_keys=True).encode()
        folder = os.path.join(cache_dir(), hashlib.sha1(identity).hexdigest()[:16])
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, info.url)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one copy per node, however many ranks start at once
            if not os.path.exists(path) or os.path.getsize(path) != info.bytes:
                with storage.atomic_write(path) as f, storage.open_range(url, 0, info.bytes) as src:
                    while chunk := src.read(8 << 20):
                        f.write(chunk)
        return path

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked loader worker opens its own descriptors
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self._files[shard]

    def get(self, row: int) -> Sample | None:
        shard, index = int(self.shard_of[row]), int(self.index_of[row])
        info = self.shards[shard]
        data = os.pread(self._fd(shard), int(self.size[row]), int(self.offset[row]))
        try:
            key, fields = next(iter_tar(io.BytesIO(data)))
        except (StopIteration, *CORRUPT) as e:
            log.warning("positive %d of shard %s is unreadable (%s); skipping it", index, info.url, e)
            return None
        teacher = (self.teacher[0][row], self.teacher[1][row]) if self.teacher is not None else None
        return Sample(key, fields, teacher, info.url)
