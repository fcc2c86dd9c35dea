"""The positives re-sampling draws from: every positive of a set addressable by row, so data.sampling=balanced can
show each rare class equally often without holding images in every loader worker."""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os

import numpy as np

from data import ranged, remote, storage
from data.config import cache_root
from data.reader import CORRUPT, Sample
from data.shards import Manifest, ShardInfo, iter_tar, read_record
from data.teacher_labels import TeacherLabels

log = logging.getLogger("bgsplit.data")


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
        if not remote.is_remote(url):
            return url
        # keyed by the set's whole manifest, not its URL: a set rebuilt in place gets a fresh copy
        identity = json.dumps([self.manifest.root, self.manifest.to_json()], sort_keys=True).encode()
        folder = os.path.join(cache_root(), hashlib.sha1(identity).hexdigest()[:16])
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, info.url)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one copy per node, however many ranks start at once
            if not os.path.exists(path) or os.path.getsize(path) != info.bytes:
                with storage.atomic_write(path) as f, ranged.open_range(url, 0, info.bytes) as src:
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
