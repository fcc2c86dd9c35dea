"""A shard set's hash indexes: every sample's key and image content as a 64-bit hash, sorted in one file each.

A set's key index (``keys.npy``) and content index (``contents.npy``) answer "is this sample in that set?" with
one read of 8 B a sample, where the set's keys or images would otherwise be read from every shard: mining
excludes the training set's keys from a pool, and the leak check compares sets by their images' source bytes
(file names repeat across folders where bytes do not). Each shard's completion record carries its samples'
hashes (``encode_hashes``, read back by ``record_hashes``), so publishing a set builds both indexes from the
records alone, without reading a shard.

Its own module because the hashing, the record field and the index files are one design apart from the shard
format; data.shards writes the records and the manifest and calls down into it. The index readers take any
object with a Manifest's ``root``, ``key_index`` and ``content_index`` (IndexedSet), so this module imports
nothing of data.shards.
"""
from __future__ import annotations

import base64
import hashlib
import io
import logging
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from data import storage

log = logging.getLogger("bgsplit.data")

KEY_INDEX = "keys.npy"
CONTENT_INDEX = "contents.npy"


class IndexedSet(Protocol):
    """What the index readers take of a set's manifest (a data.shards.Manifest): its folder and its indexes'
    entries, {"file": ..., "count": n} or None."""

    root: str
    key_index: dict[str, Any] | None
    content_index: dict[str, Any] | None


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    """Each key's first 8 bytes of BLAKE2b as a uint64, in order: what a set's key index holds.

    Two different keys share a hash with probability 2^-64, so checking n pool keys against an index of m keys
    wrongly drops one with probability about n * m / 2^64: ~5e-6 for 10M against 10M."""
    return np.array([_hash64(k.encode()) for k in keys], dtype=np.uint64)


def content_hash(image: bytes) -> int:
    """An image's first 8 bytes of BLAKE2b over its source bytes, as they were read (before any re-encoding), so
    the same file built with or without --resize-short-side has one hash. A leak check compares these: file names
    repeat across folders (IMG_0001.jpg in every camera export) where bytes do not."""
    return _hash64(image)


def encode_hashes(hashes: Iterable[int] | np.ndarray) -> str:
    """Per-sample hashes as a completion record holds them: base64 of little-endian uint64, ~11 B a sample
    (``record_hashes`` reads them back)."""
    return base64.b64encode(np.asarray(list(hashes) if not isinstance(hashes, np.ndarray) else hashes,
                                       dtype=np.uint64).astype("<u8").tobytes()).decode()


def record_hashes(record: dict[str, Any], field: str) -> np.ndarray | None:
    """A record's per-sample hashes (``key_hashes`` or ``content_hashes``), in sample order; None when the record
    predates them."""
    if field not in record:
        return None
    return np.frombuffer(base64.b64decode(record[field]), dtype="<u8").astype(np.uint64, copy=False)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` sorting ``values`` in place: publishing a set peaks at ~24 B a key (the saved file's copies
    included) where np.unique's copies made it ~34, on a driver that still holds the source listing (10M keys:
    ~100 MB less)."""
    values.sort()
    if values.size < 2:
        return values
    keep = np.empty(values.size, dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def _save_index(root: str, file: str, parts: list[np.ndarray]) -> dict[str, Any]:
    index = np.concatenate(parts).astype(np.uint64, copy=False) if parts else np.zeros(0, np.uint64)
    parts.clear()  # the caller's list: its arrays go before the sort, not after the save
    index = _sorted_unique(index)
    buf, count = io.BytesIO(), int(index.size)
    np.save(buf, index, allow_pickle=False)
    del index  # before the file's bytes are copied out of the buffer
    storage.write_bytes(storage.join(root, file), buf.getvalue())
    return {"file": file, "count": count}


def write_indexes(root: str, records: Iterable[dict[str, Any]]
                  ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The key index (``keys.npy``) and content index (``contents.npy``) in the set's folder ``root``: each the
    sorted, unique hashes of every shard's completion record in ``records``. Either is None, and no file, when a
    record predates it (a set keeping an older set's shards)."""
    keys: list[np.ndarray] | None = []
    contents: list[np.ndarray] | None = []
    for doc in records:
        k, c = record_hashes(doc, "key_hashes"), record_hashes(doc, "content_hashes")
        if k is None:
            keys = None
        elif keys is not None:
            keys.append(k)
        if c is None:
            contents = None
        elif contents is not None:
            contents.append(c)
    # one at a time: ~24 B a key at the peak, as with the key index alone
    key_index = _save_index(root, KEY_INDEX, keys) if keys is not None else None
    content_index = _save_index(root, CONTENT_INDEX, contents) if contents is not None else None
    return key_index, content_index


def _read_index(root: str, index_doc: dict[str, Any] | None, what: str) -> np.ndarray | None:
    if not index_doc:
        return None
    url = storage.join(root, index_doc["file"])
    try:
        index = np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)
    except (OSError, ValueError) as e:
        log.warning("%s index %s is unreadable (%s): %s", what, url, e, _INSTEAD[what])
        return None
    if index.dtype != np.uint64 or index.ndim != 1 or index.size != index_doc.get("count"):
        log.warning("%s index %s does not match its manifest: %s", what, url, _INSTEAD[what])
        return None
    return index


_INSTEAD = {"key": "reading the set's keys from its shards instead",
            "content": "comparing the set by its keys instead"}


def read_key_index(manifest: IndexedSet) -> np.ndarray | None:
    """The set's sorted key hashes (8 B a key, one read), or None for a set without a usable index."""
    return _read_index(manifest.root, manifest.key_index, "key")


def read_content_index(manifest: IndexedSet) -> np.ndarray | None:
    """The set's sorted, unique content hashes (8 B an image, one read), or None for a set without a usable one."""
    return _read_index(manifest.root, manifest.content_index, "content")
