"""WebDataset shard sets: the one training and evaluation format, and the manifest that makes a set usable.

A set is a folder (or object-store prefix) of ``<name>-<kind>-NNNNNN.tar`` shards plus ``manifest.json``. Each
shard is written under a temporary name and renamed whole; the manifest is written last, so a crashed build
leaves no manifest and is never used. Positives and background go to separate shards (same manifest) so a
loader can re-sample the few positives without copying them. `bgsplit shards build` also leaves a small
completion record ``<name>-<kind>-NNNNNN.json`` beside each shard (see data.ingest); loaders ignore it.

Sample fields: ``<ext>`` the encoded image as stored, ``cls`` the main label (0 = background, 1..K),
``json`` {"label", "orig", "source_key"}; ``__key__`` is the stable sample key.
"""
from __future__ import annotations

import io
import json
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from data import storage

MANIFEST = "manifest.json"
FORMAT = "bgsplit-shards/1"


def image_extension(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "img"


@dataclass
class ShardInfo:
    url: str
    """Shard file name relative to the manifest's folder."""
    kind: str
    """'positive' or 'background'."""
    count: int
    bytes: int


@dataclass
class Manifest:
    """What a shard set holds; the only thing a loader needs to plan an epoch."""

    root: str
    rare_classes: list[str]
    class_names: list[str]
    shards: list[ShardInfo]
    counts: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.rare_classes) + 1

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def background_fraction(self) -> float:
        return self.counts[0] / self.count if self.count else float("nan")

    def shard_urls(self, kind: str | None = None) -> list[str]:
        return [storage.join(self.root, s.url) for s in self.shards if kind is None or s.kind == kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "rare_classes": self.rare_classes,
            "class_names": self.class_names,
            "num_classes": self.num_classes,
            "count": self.count,
            "counts": self.counts,
            "background_fraction": self.background_fraction,
            "shards": [s.__dict__ for s in self.shards],
            "meta": self.meta,
        }


def manifest_url(location: str) -> str:
    return location if location.endswith(".json") else storage.join(location, MANIFEST)


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
        raise ValueError(f"{url} is not a bgsplit shard manifest (format {doc.get('format')!r}, want {FORMAT})")
    shards = [ShardInfo(**s) for s in doc["shards"]]
    if not shards:
        raise ValueError(f"shard manifest {url} lists no shards: rebuild the set with `bgsplit shards build`")
    return Manifest(root=storage.dirname(url), rare_classes=list(doc["rare_classes"]),
                    class_names=list(doc["class_names"]), shards=shards, counts=list(doc["counts"]),
                    meta=doc.get("meta", {}))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: the same samples always give byte-identical shards
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def sample_fields(key: str, image: bytes, label: int, orig: str) -> dict[str, bytes]:
    """The one definition of a sample's tar members (see the module docstring)."""
    return {
        image_extension(image): image,
        "cls": str(label).encode(),
        "json": json.dumps({"label": label, "orig": orig, "source_key": key}).encode(),
    }


def add_sample(tar: tarfile.TarFile, key: str, fields: dict[str, bytes]) -> None:
    for ext, data in fields.items():
        _add(tar, f"{key}.{ext}", data)


def tar_bytes(fields: dict[str, bytes]) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member plus its data padded to 512."""
    return sum(512 + -(-len(data) // 512) * 512 for data in fields.values())


def shard_name(prefix: str, kind: str, index: int) -> str:
    return f"{prefix}-{kind}-{index:06d}.tar"


def invalidate(root: str) -> None:
    """Make a set unusable before it is rewritten: drop its manifest and the teacher caches that label the old
    samples. Shards stay, so a resumed build can keep the finished ones."""
    storage.remove(manifest_url(root))
    for name in storage.listdir(root):
        if name.startswith("teacher-") and name.endswith(".npz"):
            storage.remove(storage.join(root, name))


def write_manifest(manifest: Manifest) -> None:
    """Written last: its presence is what marks a set as complete."""
    storage.write_bytes(manifest_url(manifest.root), json.dumps(manifest.to_json(), indent=1).encode())


class _ShardSink:
    """Writes one kind of sample into numbered shards, closing a shard at ``max_count`` or ``max_bytes``."""

    def __init__(self, root: str, prefix: str, kind: str, max_count: int, max_bytes: int):
        self.root, self.prefix, self.kind = root, prefix, kind
        self.max_count, self.max_bytes = max_count, max_bytes
        self.done: list[ShardInfo] = []
        self._buffer = io.BytesIO()
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if self._tar is None:
            self._buffer = io.BytesIO()
            self._tar = tarfile.open(fileobj=self._buffer, mode="w")
        add_sample(self._tar, key, fields)
        self._count += 1
        if self._count >= self.max_count or self._buffer.tell() >= self.max_bytes:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = shard_name(self.prefix, self.kind, len(self.done))
        data = self._buffer.getvalue()
        storage.write_bytes(storage.join(self.root, name), data)
        self.done.append(ShardInfo(url=name, kind=self.kind, count=self._count, bytes=len(data)))
        self._tar, self._count = None, 0


def write_shard_set(root: str, samples: Iterable[tuple[str, bytes, int, str]], *, rare_classes: list[str],
                    class_names: list[str], prefix: str = "shard", max_count: int = 10000,
                    max_bytes: int = 512 << 20, meta: dict[str, Any] | None = None,
                    progress: Callable[[int], None] | None = None) -> Manifest:
    """Write (key, encoded image, main label, original label) samples into a shard set; manifest last.

    An existing manifest at ``root`` is removed first, so a set being rebuilt is unusable until complete.
    """
    invalidate(root)
    sinks = {kind: _ShardSink(root, prefix, kind, max_count, max_bytes) for kind in ("positive", "background")}
    counts = [0] * (len(rare_classes) + 1)
    seen: set[str] = set()
    start = time.time()
    for key, image, label, orig in samples:
        if key in seen:
            raise ValueError(f"duplicate sample key '{key}': source keys must be unique")
        if not 0 <= label <= len(rare_classes):
            raise ValueError(f"sample '{key}' has main label {label}, outside 0..{len(rare_classes)}")
        seen.add(key)
        sinks["positive" if label else "background"].write(key, sample_fields(key, image, label, orig))
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


def iter_tar(stream) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar stream's members by key into samples; raises tarfile.ReadError on a truncated tar."""
    current: str | None = None
    fields: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            if len(data) != member.size:
                raise tarfile.ReadError(f"truncated member {member.name}: {len(data)} of {member.size} bytes")
            if key != current and current is not None:
                yield current, fields
                fields = {}
            current = key
            fields[ext] = data
    if current is not None:
        yield current, fields
