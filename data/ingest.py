"""Shard writing for `bgsplit shards build`: a planned shard is a self-contained task, run in-process or in a pool.

The plan (which samples go to which shard) is fixed before anything is written, so shards can be written in
any order by any number of processes and a re-run can tell which ones are already finished. A shard counts as
finished only once its completion record ``<shard>.json`` exists next to it, written after the tar and holding
the hash of the build spec and of the shard's planned samples: a tar without one (a crash between the two
writes) or with another spec's record (a stale set) is rewritten.

Every source image is checked on the way in (``decode_rgb``: corrupt files and decompression bombs are skipped,
counted per shard and named), and optionally re-encoded smaller, so the loader's expensive decode of full-size
photos happens once, here, instead of every epoch.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from queue import Empty
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from data import storage
from data.hash_index import content_hash
from data.shards import RECORD, TarShard, make_record, record_name, sample_fields, shard_name, tar_bytes
from data.sources import Listing, Source, SourceItem, open_source, positions
from data.transforms import BadImage, decode_rgb

READ_AHEAD = 8
"""Source reads in flight per shard writer: object-store GETs are latency-bound, so overlap them."""
PROBE = 32
"""Images read to estimate the bytes a sample takes, and so the samples per shard."""

Progress = Callable[[int, int], None]
"""Called with (images done, source bytes read) since the last call."""


@dataclass(frozen=True)
class Resize:
    """Pre-resize: images whose short side exceeds ``short_side`` are re-encoded as JPEG at ``quality``."""

    short_side: int | None = None
    quality: int = 90


def prepare_image(data: bytes, resize: Resize) -> bytes:
    """The bytes to store for one source image; raises ``BadImage`` for anything the loader could not decode.

    Images at or below the target size keep their exact bytes (re-encoding would only lose quality)."""
    if resize.short_side is not None:
        width, height = _size(data)
        if min(width, height) > resize.short_side:
            return _shrink(data, width, height, resize)
    decode_rgb(data, draft=(1, 1))  # smallest DCT scale: fast, and still reads every block, so truncation shows
    return data


def _shrink(data: bytes, width: int, height: int, resize: Resize) -> bytes:
    scale = resize.short_side / min(width, height)
    size = (round(width * scale), round(height * scale))
    size = (resize.short_side, size[1]) if width <= height else (size[0], resize.short_side)  # exact short side
    # decode at no less than twice the target (as Image.thumbnail does), then a proper filter for the rest
    img = decode_rgb(data, draft=(2 * size[0], 2 * size[1]))
    out = io.BytesIO()
    img.resize(size, Image.LANCZOS).save(out, format="JPEG", quality=resize.quality)
    return out.getvalue()


def _size(data: bytes) -> tuple[int, int]:
    """From the header alone; the pixel limit is enforced by ``decode_rgb``, which always runs after this."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data)).size
    except Exception as e:  # PIL raises many types for bad data, bomb errors included
        raise BadImage(f"{type(e).__name__}: {e}") from None


class ShardItems:
    """Planned samples (a shard's, or a whole selection's): indices into the source's one listing and their main
    labels. In the build driver that is ~6 B a sample beside the listing, not a copy of the items; pickled to a
    worker process or Ray task, it carries its own samples as a small listing of their own."""

    def __init__(self, listing: Listing, indices: np.ndarray, labels: np.ndarray):
        indices = np.asarray(indices)
        # the selection's index type is kept (4 B a sample in the driver); only a non-integer empty list becomes int64
        self.listing, self.indices = listing, indices if indices.dtype.kind in "iu" else indices.astype(np.int64)
        self.labels = np.asarray(labels).astype(np.int16 if len(labels) == 0 or labels.max() < 2 ** 15 else np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[SourceItem, int]]:
        return ((self.listing[int(i)], int(label)) for i, label in zip(self.indices, self.labels))

    def subset(self, at: np.ndarray) -> ShardItems:
        return ShardItems(self.listing, self.indices[at], self.labels[at])

    def __reduce__(self) -> tuple[Any, ...]:
        return ShardItems, (self.listing.take(self.indices), np.arange(len(self.indices)), self.labels)


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: everything a worker process needs, cheap to pickle (items are references)."""

    root: str
    name: str
    kind: str
    source: str
    """Spec string a worker process reopens the source from (``open_source``)."""
    items: ShardItems
    """(item, main label) in shard order."""
    num_classes: int
    spec_hash: str
    resize: Resize

    @property
    def url(self) -> str:
        return storage.join(self.root, self.name)

    @property
    def record_url(self) -> str:
        return storage.join(self.root, record_name(self.name))

    @property
    def digest(self) -> str:
        """Identifies the planned samples, so a record from another plan never vouches for this shard."""
        h = hashlib.sha1()
        for item, label in self.items:
            h.update(f"{item.key}\t{label}\t{item.label}\n".encode())
        return h.hexdigest()


@dataclass
class ShardResult:
    """What a finished shard holds; also the content of its completion record."""

    name: str
    kind: str
    count: int
    bytes: int
    counts: list[int]
    """Samples per main label."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(key, reason) of the source images left out as undecodable."""
    read_bytes: int = 0
    reused: bool = False


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps({"record": RECORD, "spec": spec}, sort_keys=True).encode()).hexdigest()


def samples_per_shard(sample_bytes: float, max_count: int, max_bytes: int) -> int:
    """Shard size as a fixed sample count, so the plan is known before any shard is written."""
    if sample_bytes <= 0:
        return max_count
    return max(1, min(max_count, int(max_bytes // sample_bytes)))


def estimate_sample_bytes(source: Source, items: ShardItems, resize: Resize) -> float:
    """Mean tar bytes of a sample over up to ``PROBE`` evenly spaced items, as they would be stored."""
    if not len(items):
        return 0.0
    step = max(1, len(items) // PROBE)
    sizes = []
    for item, label in items.subset(np.arange(0, len(items), step)[:PROBE]):
        try:
            image = prepare_image(source.read(item), resize)
        except BadImage:
            continue
        sizes.append(tar_bytes(sample_fields(item.key, image, label, item.label)))
    return sum(sizes) / len(sizes) if sizes else 0.0


def plan_shards(items: ShardItems, *, per_shard: int, root: str, source: str, prefix: str,
                num_classes: int, spec_hash: str, resize: Resize, seed: int = 0) -> list[ShardTask]:
    """Positives and background in separate shards (the loader re-samples positives on their own), ``per_shard``
    samples a shard: a pure function of the selection and the seed.

    Each kind is put in a seeded random order first. Sources list in path order, which is class order, so cutting
    shards in source order would give shards of a few classes each, and a loader reading one or two shards at a
    time would build batches of a handful of classes. After the shuffle every shard is a uniform sample of the
    set, whichever shards a worker reads."""
    tasks = []
    for kind in ("positive", "background"):
        mine = positions((items.labels > 0) == (kind == "positive"))
        np.random.default_rng([seed, 0x5EED, kind == "positive"]).shuffle(mine)  # = mine[permutation], no copy
        for index, start in enumerate(range(0, len(mine), per_shard)):
            tasks.append(ShardTask(root=root, name=shard_name(prefix, kind, index), kind=kind, source=source,
                                   items=items.subset(mine[start:start + per_shard]), num_classes=num_classes,
                                   spec_hash=spec_hash, resize=resize))
    return tasks


def finished(task: ShardTask, present: set[str]) -> ShardResult | None:
    """The shard's result if a completion record for this very spec and plan is there (``present``: the names
    listed in the set's folder, one listing instead of a request per shard)."""
    if task.name not in present or record_name(task.name) not in present:
        return None
    try:
        doc = json.loads(storage.read_bytes(task.record_url))
    except (OSError, ValueError):
        return None
    if (doc.get("format") != RECORD or doc.get("spec") != task.spec_hash or doc.get("plan") != task.digest
            or len(doc.get("offsets", ())) != doc.get("count", -1) + 1):
        return None
    return ShardResult(**{k: doc[k] for k in ("name", "kind", "count", "bytes", "counts")},
                       skipped=[tuple(s) for s in doc["skipped"]], reused=True)


def _read_ahead(source: Source, items: ShardItems) -> Iterator[tuple[SourceItem, int, bytes]]:
    """Source bytes in shard order, with up to ``READ_AHEAD`` reads in flight."""
    for (item, label), data in storage.in_flight(lambda pair: source.read(pair[0]), items, READ_AHEAD):
        yield item, label, data


def write_shard(task: ShardTask, source: Source, progress: Progress | None = None) -> ShardResult:
    """Write one shard (streamed to a temporary file, published whole), then its completion record."""
    result = ShardResult(name=task.name, kind=task.kind, count=0, bytes=0, counts=[0] * task.num_classes)
    pending_images, pending_bytes, last = 0, 0, time.monotonic()
    labels: list[int] = []
    contents: list[int] = []  # of the source bytes: a re-encoded image keeps its source's hash
    with storage.atomic_write(task.url) as f:
        tar = TarShard(f)
        for item, label, raw in _read_ahead(source, task.items):
            result.read_bytes += len(raw)
            pending_images, pending_bytes = pending_images + 1, pending_bytes + len(raw)
            try:
                image = prepare_image(raw, task.resize)
            except BadImage as e:
                result.skipped.append((item.key, str(e)))
            else:
                tar.add(item.key, sample_fields(item.key, image, label, item.label))
                labels.append(label)
                contents.append(content_hash(raw))
                result.count += 1
                result.counts[label] += 1
            if progress and time.monotonic() - last > 0.2:
                progress(pending_images, pending_bytes)
                pending_images, pending_bytes, last = 0, 0, time.monotonic()
        offsets = tar.close()
        result.bytes = f.tell()
    record = make_record(name=result.name, kind=result.kind, count=result.count, size=result.bytes,
                         counts=result.counts, offsets=offsets, labels=labels, keys=tar.keys, skipped=result.skipped,
                         spec=task.spec_hash, plan=task.digest, contents=contents)
    storage.write_bytes(task.record_url, json.dumps(record).encode())
    if progress and pending_images:
        progress(pending_images, pending_bytes)
    return result


# -- the process pool -------------------------------------------------------------------------------------------
_SOURCES: dict[str, Source] = {}
_QUEUE: Any = None


def _init_worker(queue: Any, environ: dict[str, str]) -> None:
    global _QUEUE
    _QUEUE = queue
    os.environ.update(environ)  # the forkserver's environment dates from its start: bring credentials up to date
    queue.cancel_join_thread()  # progress messages are disposable: never let one block a worker's exit


def write_task(task: ShardTask, progress: Progress | None = None) -> ShardResult:
    """Write one planned shard in whatever process runs it (a pool worker, a Ray task)."""
    if task.source not in _SOURCES:  # reopened once per process: listing is the parent's job, reads need none
        _SOURCES[task.source] = open_source(task.source)
    return write_shard(task, _SOURCES[task.source], progress)


def _work(task: ShardTask) -> ShardResult:
    return write_task(task, lambda n, b: _QUEUE.put((n, b)))


def _drain(queue: Any, progress: Progress | None) -> None:
    while True:
        try:
            n, b = queue.get_nowait()
        except Empty:
            return
        if progress:
            progress(n, b)


def run_tasks(tasks: list[ShardTask], source: Source, *, workers: int, progress: Progress | None = None,
              done: Callable[[ShardResult], None] | None = None) -> list[ShardResult]:
    """Write ``tasks`` in-process (``workers`` <= 1, or a single task) or in a pool of ``workers`` processes.

    On the first failure no new shard starts, the ones being written are finished (their work is kept for the
    re-run), and the error is raised."""
    results: list[ShardResult] = []
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            results.append(write_shard(task, source, progress))
            if done:
                done(results[-1])
        return results
    # forkserver: workers fork from a clean single-threaded server (no s3fs event-loop thread copied), whose
    # preload imports torch and PIL once instead of in every worker
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["data.ingest"])
    queue = ctx.Queue()
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker,
                             initargs=(queue, dict(os.environ))) as pool:
        pending = {pool.submit(_work, task) for task in tasks}
        try:
            while pending:
                finished_now, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(queue, progress)
                for future in finished_now:
                    results.append(future.result())
                    if done:
                        done(results[-1])
        except BrokenProcessPool:
            raise RuntimeError("a shard-build worker process died (out of memory?); re-run the same command to "
                               "resume, or use fewer --workers") from None
        finally:
            for future in pending:
                future.cancel()
    _drain(queue, progress)
    queue.close()
    return results
