"""WebDataset shard sets: the one training and evaluation format, and the manifest that makes a set usable.

A set is a folder (or object-store prefix) of ``<name>-<kind>-NNNNNN.tar`` shards, one completion record
``<name>-<kind>-NNNNNN.json`` per shard, its key index ``keys.npy``, its content index ``contents.npy`` and
``manifest.json``. Each shard is written
under a temporary name and published whole, then its record; the index and the manifest last: a crashed build
leaves no manifest and is never used.
Positives and background go to separate shards (same manifest) so a loader can re-sample the few positives
without copying them.

The record holds every sample's byte offset in its shard (and, for positive shards, every sample's label). With
it a loader reads any sample range with one byte-range request: a worker whose share starts mid-shard, or a
resumed worker, seeks instead of re-reading what came before; and re-sampled positives are fetched one by one.
Shards are written with webdataset's ``TarWriter`` (fixed metadata, so the same samples give the same bytes);
offsets come from the tar stream's own position, so long keys (extra PAX headers) cannot skew them.

Sample fields: ``<ext>`` the encoded image as stored, ``cls`` the main label (0 = background, 1..K),
``json`` {"label", "orig", "source_key"}; ``__key__`` is the stable sample key.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from data import hash_index, remote, storage

MANIFEST = "manifest.json"
FORMAT = "bgsplit-shards/2"
RECORD = "bgsplit-shard-done/2"
RECORD_READS_IN_FLIGHT = 16
"""Completion records read at once when a set is published or a build resumed (10k shards at 10M samples: one
at a time, 10k first-byte latencies of an object store)."""
LABELS_DIR = "teacher-labels"
"""Folder of a set's teacher label sets (see data.teacher_labels); removed when the set is rebuilt."""


def image_extension(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "img"


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "img")  # the members that hold a sample's image, the first one wins


def image_member(fields: dict[str, bytes]) -> bytes | None:
    """The one answer to "which member of a sample is its image": the first of ``IMAGE_EXTS`` it has (member
    names as the reader gives them, lower-cased), or None when it has none."""
    return next((fields[e] for e in IMAGE_EXTS if e in fields), None)


@dataclass
class ShardInfo:
    url: str
    """Shard file name relative to the manifest's folder; a shard kept from another set (`shards add-labels`) is
    held as its absolute path or URL here and written to manifest.json relative to the manifest's folder."""
    kind: str
    """'positive' or 'background'."""
    count: int
    bytes: int

    @property
    def record(self) -> str:
        return record_name(self.url)


@dataclass
class Manifest:
    """What a shard set holds; the only thing a loader needs to plan an epoch."""

    root: str
    rare_classes: list[str]
    class_names: list[str]
    shards: list[ShardInfo]
    counts: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    key_index: dict[str, Any] | None = None
    """{"file": "keys.npy", "count": n}: the set's sorted key hashes (``key_hashes``), written before the
    manifest; None for a set built by an older bgsplit, or one that keeps shards of such a set."""
    content_index: dict[str, Any] | None = None
    """{"file": "contents.npy", "count": n}: the set's sorted, unique content hashes (``content_hashes``: its
    images' source bytes), written with the key index; None for a set whose shard records predate them."""
    cwd_relative: bool = False
    """Read from a manifest of an older `shards add-labels`, which listed its parent's shards relative to the
    working directory it ran in: they were resolved against this process's working directory instead."""

    @property
    def num_classes(self) -> int:
        return len(self.rare_classes) + 1

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def background_fraction(self) -> float:
        return self.counts[0] / self.count if self.count else float("nan")

    def shard_urls(self, kind: str | None = None) -> list[str]:
        return [storage.join(self.root, s.url) for s in self.shards if kind is None or s.kind == kind]

    def of_kind(self, kind: str | None) -> list[ShardInfo]:
        return [s for s in self.shards if kind is None or s.kind == kind]

    def to_json(self) -> dict[str, Any]:
        shards = [{**s.__dict__, "url": _stored_url(self.root, s.url)} for s in self.shards]
        extra = {"shard_paths": SHARD_PATHS} if any(not _is_name(s.url) for s in self.shards) else {}
        return {
            "format": FORMAT,
            "rare_classes": self.rare_classes,
            "class_names": self.class_names,
            "num_classes": self.num_classes,
            "count": self.count,
            "counts": self.counts,
            "background_fraction": self.background_fraction,
            **extra,
            **({"key_index": self.key_index} if self.key_index else {}),
            **({"content_index": self.content_index} if self.content_index else {}),
            "shards": shards,
            "meta": self.meta,
        }


SHARD_PATHS = "relative-to-manifest"
"""Marks a manifest whose shards outside its folder are listed relative to that folder (or by absolute URL);
one without it that lists such shards was written by an older add-labels, relative to its working directory."""


def _is_name(url: str) -> bool:
    """A plain file name: a shard in the manifest's own folder."""
    return not remote.is_remote(url) and "/" not in url and os.sep not in url


def _local_in_remote(root: str, url: str) -> bool:
    """An absolute local path listed by a set on an object store (an older add-labels wrote them): only readable on
    the machine that has that path, and joining it to the root's URL would not find it there either."""
    return remote.is_remote(root) and not remote.is_remote(url) and os.path.isabs(url)


def _stored_url(root: str, url: str) -> str:
    """How manifest.json lists a shard: a shard of the set's own folder by name, one elsewhere relative to the
    manifest's folder when both are local or under the same bucket, by its absolute URL otherwise."""
    if _is_name(url) or _local_in_remote(root, url):
        return url
    full = storage.join(root, url)
    return storage.relative(full, root) or storage.absolute(full)


def _resolved_url(root: str, url: str, marked: bool) -> tuple[str, bool]:
    """A listed shard as this process reads it: its name, or the absolute location of one outside the set's folder
    (so joining it to the root, wherever the root was given from, finds it); True for a working-directory-relative
    path of an older manifest."""
    if _is_name(url):
        return url, False
    if _local_in_remote(root, url):
        return os.path.normpath(url), False
    if marked or remote.is_remote(url) or os.path.isabs(url):
        return storage.absolute(storage.join(root, url)), False
    return os.path.abspath(url), True


def manifest_url(location: str) -> str:
    return location if location.endswith(".json") else storage.join(location, MANIFEST)


def manifest_identity(location: str) -> str:
    """Hash of a set's manifest (what it holds: its shards, counts and build spec; not how long the build took, nor
    its key and content indexes, which follow from the shards and which older sets lack), so a set rebuilt from the
    same spec (byte-identical shards) keeps its identity and whatever is cached or stored for it (study results,
    probe features), and a set built differently gets another; '' for no set."""
    if not location:
        return ""
    doc = json.loads(storage.read_bytes(manifest_url(location)))
    meta = {k: v for k, v in doc.get("meta", {}).items() if not k.endswith("_seconds")}  # timings vary by rebuild
    doc.pop("key_index", None)
    doc.pop("content_index", None)
    key = json.dumps({**doc, "meta": meta}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:10] + "m"


def read_manifest(location: str) -> Manifest:
    """Load a set's manifest from its folder/prefix or the manifest path itself."""
    if not location:
        raise FileNotFoundError("no shard set given: set data.train / data.test (a folder holding manifest.json)")
    url = manifest_url(location)
    if not storage.exists(url):
        raise FileNotFoundError(f"shard manifest {url} does not exist: build the set with `bgsplit shards build`"
                                " (a set without a manifest is incomplete)")
    doc = json.loads(storage.read_bytes(url))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{url} is not a bgsplit shard manifest of this version (format {doc.get('format')!r}, "
                         f"want {FORMAT}): rebuild the set with `bgsplit shards build`")
    root = storage.dirname(url)
    shards, cwd_relative = [], False
    for s in doc["shards"]:
        resolved, legacy = _resolved_url(root, s["url"], doc.get("shard_paths") == SHARD_PATHS)
        shards.append(ShardInfo(**{**s, "url": resolved}))
        cwd_relative |= legacy
    if not shards:
        raise ValueError(f"shard manifest {url} lists no shards: rebuild the set with `bgsplit shards build`")
    return Manifest(root=root, rare_classes=list(doc["rare_classes"]), class_names=list(doc["class_names"]),
                    shards=shards, counts=list(doc["counts"]), meta=doc.get("meta", {}), cwd_relative=cwd_relative,
                    key_index=doc.get("key_index"), content_index=doc.get("content_index"))


def missing_shards(manifest: Manifest) -> list[tuple[ShardInfo, str]]:
    """The listed shards whose tar or completion record is not there, each with the absolute location of the first
    missing object of it; one listing per folder, not a request per shard (shards kept from a parent set live in
    its folder)."""
    listings: dict[str, set[str]] = {}
    missing = []
    for s in manifest.shards:
        for name in (s.url, s.record):
            url = storage.join(manifest.root, name)
            folder = storage.dirname(url)
            if folder not in listings:
                listings[folder] = set(storage.listdir(folder))
            if url[len(folder):].lstrip("/" + os.sep) not in listings[folder]:
                missing.append((s, storage.absolute(url)))
                break
    return missing


def check_objects(manifest: Manifest) -> None:
    """Refuse a set whose listed shards or records are not all there, in one line that counts the shards, names
    the first missing object and the fix for the set's kind: training on it would silently lose those samples, or
    fail hours in. Training and `bgsplit shards plan` both call it."""
    missing = missing_shards(manifest)
    if not missing:
        return
    shard, first = missing[0]
    lacking = " or lack their completion record" if any(u.endswith(".json") for _, u in missing) else ""
    head = (f"shard set {storage.absolute(manifest.root)} lists {len(missing)} shard(s) that are missing{lacking} "
            f"(first: {first})")
    if "parent" not in manifest.meta:
        raise FileNotFoundError(f"{head}: rebuild it with `bgsplit shards build` (a re-run rewrites only what is "
                                "missing)")
    again = "re-run `bgsplit shards add-labels` with a new --out"
    if _is_name(shard.url):
        raise FileNotFoundError(f"{head}: the shards this labelled version added are gone; {again}")
    if manifest.cwd_relative:
        raise FileNotFoundError(f"{head}: this labelled version was written by an older `bgsplit shards add-labels`, "
                                "which listed its parent's shards relative to the directory it ran in; run from "
                                f"that directory, or {again} (the parent's shards are then listed relative to the "
                                "new set's folder)")
    raise FileNotFoundError(f"{head}: this labelled version lists its parent's shards where they are, without a "
                            f"copy; restore the parent set at {storage.dirname(first)}, "
                            f"or {again} from a parent that exists")


def sample_fields(key: str, image: bytes, label: int, orig: str) -> dict[str, bytes]:
    """The one definition of a sample's tar members (see the module docstring)."""
    return {
        image_extension(image): image,
        "cls": str(label).encode(),
        "json": json.dumps({"label": label, "orig": orig, "source_key": key}).encode(),
    }


def tar_bytes(fields: dict[str, bytes]) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member plus its data padded to 512."""
    return sum(512 + -(-len(data) // 512) * 512 for data in fields.values())


def shard_name(prefix: str, kind: str, index: int) -> str:
    return f"{prefix}-{kind}-{index:06d}.tar"


def record_name(shard: str) -> str:
    return shard.rsplit(".", 1)[0] + ".json"


def read_record(manifest: Manifest, shard: ShardInfo) -> dict[str, Any]:
    """A shard's completion record: counts, the samples' byte offsets (``count`` + 1 of them, the last one the
    end of the last sample) and, for positive shards, the samples' labels."""
    url = storage.join(manifest.root, shard.record)
    doc = json.loads(storage.read_bytes(url))
    offsets = doc.get("offsets")
    if doc.get("format") != RECORD or offsets is None or len(offsets) != shard.count + 1:
        raise ValueError(f"completion record {url} does not match its shard ({shard.count} samples in the manifest):"
                         " rebuild the set with `bgsplit shards build`")
    return doc


class TarShard:
    """One shard being written: webdataset's TarWriter over a file object, plus each sample's byte offset."""

    def __init__(self, fileobj: IO[bytes]):
        import webdataset

        # fixed metadata (mtime, owner): the same samples always give byte-identical shards
        self._writer = webdataset.TarWriter(fileobj, encoder=False, mtime=0, user="bgsplit", group="bgsplit",
                                            format="PAX_FORMAT")
        self.offsets: list[int] = []
        self.keys: list[str] = []

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        self.offsets.append(self._writer.tarstream.offset)
        self.keys.append(key)
        self._writer.write({"__key__": key, **fields})

    def close(self) -> list[int]:
        """Finish the tar; returns the offsets with the end of the last sample appended."""
        end = self._writer.tarstream.offset
        self._writer.close()
        return self.offsets + [end]


def make_record(*, name: str, kind: str, count: int, size: int, counts: list[int], offsets: list[int],
                labels: list[int] | None, keys: list[str], skipped: list[tuple[str, str]] = (),
                contents: Iterable[int] | None = None, **extra: Any) -> dict[str, Any]:
    """``keys`` go in as their hashes (base64 of little-endian uint64, ~11 B a sample), from which the manifest's
    writer makes the set's key index without reading a shard; ``contents`` (``content_hash`` of each sample, in
    order) likewise make its content index."""
    record = {"format": RECORD, "name": name, "kind": kind, "count": count, "bytes": size, "counts": counts,
              "skipped": [list(s) for s in skipped], "offsets": offsets,
              "key_hashes": hash_index.encode_hashes(hash_index.key_hashes(keys)),
              **({"content_hashes": hash_index.encode_hashes(contents)} if contents is not None else {}), **extra}
    if kind == "positive":
        record["labels"] = labels
    return record


def invalidate(root: str) -> None:
    """Make a set unusable before it is rewritten: drop its manifest and the teacher labels of the old samples.
    Shards stay, so a resumed build can keep the finished ones."""
    storage.remove(manifest_url(root))
    storage.remove(storage.join(root, LABELS_DIR), recursive=True)


def iter_records(manifest: Manifest) -> Iterator[dict[str, Any]]:
    """Every listed shard's completion record as stored (unchecked: see ``read_record``), in the manifest's order,
    ``RECORD_READS_IN_FLIGHT`` read at once."""
    urls = (storage.join(manifest.root, shard.record) for shard in manifest.shards)
    for _, data in storage.in_flight(storage.read_bytes, urls, RECORD_READS_IN_FLIGHT):
        yield json.loads(data)


def write_manifest(manifest: Manifest) -> None:
    """Written last, after the key index: its presence is what marks a set as complete."""
    manifest.key_index, manifest.content_index = hash_index.write_indexes(manifest.root, iter_records(manifest))
    storage.write_bytes(manifest_url(manifest.root), json.dumps(manifest.to_json(), indent=1).encode())


class _ShardSink:
    """Writes one kind of sample into numbered shards, closing a shard at ``max_count`` or ``max_bytes``."""

    def __init__(self, root: str, prefix: str, kind: str, max_count: int, max_bytes: int, num_classes: int):
        self.root, self.prefix, self.kind = root, prefix, kind
        self.max_count, self.max_bytes, self.num_classes = max_count, max_bytes, num_classes
        self.done: list[ShardInfo] = []
        self._buffer = io.BytesIO()
        self._tar: TarShard | None = None
        self._labels: list[int] = []
        self._contents: list[int] = []

    def write(self, key: str, fields: dict[str, bytes], label: int, content: int) -> None:
        if self._tar is None:
            self._buffer = io.BytesIO()
            self._tar, self._labels, self._contents = TarShard(self._buffer), [], []
        self._tar.add(key, fields)
        self._labels.append(label)
        self._contents.append(content)
        if len(self._labels) >= self.max_count or self._buffer.tell() >= self.max_bytes:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        offsets = self._tar.close()
        name = shard_name(self.prefix, self.kind, len(self.done))
        data = self._buffer.getvalue()
        counts = [self._labels.count(c) for c in range(self.num_classes)]
        storage.write_bytes(storage.join(self.root, name), data)
        record = make_record(name=name, kind=self.kind, count=len(self._labels), size=len(data), counts=counts,
                             offsets=offsets, labels=self._labels, keys=self._tar.keys, contents=self._contents)
        storage.write_bytes(storage.join(self.root, record_name(name)), json.dumps(record).encode())
        self.done.append(ShardInfo(url=name, kind=self.kind, count=len(self._labels), bytes=len(data)))
        self._tar = None


def write_shard_set(root: str, samples: Iterable[tuple[str, bytes, int, str]], *, rare_classes: list[str],
                    class_names: list[str], prefix: str = "shard", max_count: int = 10000,
                    max_bytes: int = 512 << 20, meta: dict[str, Any] | None = None,
                    progress: Callable[[int], None] | None = None) -> Manifest:
    """Write (key, encoded image, main label, original label) samples, in the given order, into a shard set;
    manifest last. For small in-memory sets (tests, tools); `bgsplit shards build` is the scalable path.

    An existing manifest at ``root`` is removed first, so a set being rebuilt is unusable until complete.
    """
    invalidate(root)
    num_classes = len(rare_classes) + 1
    sinks = {kind: _ShardSink(root, prefix, kind, max_count, max_bytes, num_classes)
             for kind in ("positive", "background")}
    counts = [0] * num_classes
    seen: set[str] = set()
    start = time.time()
    for key, image, label, orig in samples:
        if key in seen:
            raise ValueError(f"duplicate sample key '{key}': source keys must be unique")
        if not 0 <= label <= len(rare_classes):
            raise ValueError(f"sample '{key}' has main label {label}, outside 0..{len(rare_classes)}")
        seen.add(key)
        sinks["positive" if label else "background"].write(key, sample_fields(key, image, label, orig), label,
                                                           hash_index.content_hash(image))
        counts[label] += 1
        if progress:
            progress(1)
    for sink in sinks.values():
        sink.close()
    shards = sinks["positive"].done + sinks["background"].done
    if not shards:
        raise ValueError(f"no samples to write to {root}: the selection is empty")
    manifest = Manifest(root=root, rare_classes=list(rare_classes), class_names=list(class_names),
                        shards=shards, counts=counts,
                        meta={**(meta or {}), "build_seconds": round(time.time() - start, 3)})
    write_manifest(manifest)
    return manifest


def iter_tar(stream: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar stream's members by key into samples (webdataset's tar iterator and key grouping).

    Raises tarfile.ReadError (or ValueError) on a truncated or malformed tar."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    members = ({**m, "__url__": ""} for m in tar_file_iterator(stream))
    for sample in group_by_keys(members):
        key = sample.pop("__key__")
        sample.pop("__url__", None)
        yield key, sample
