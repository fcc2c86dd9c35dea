"""Which images two shard sets share, and which of a pool's images a set holds: the one leak check, used by the
experiment (validation and test against training) and by `mine --exclude` (candidates against training).

By content where the sets record it: each set's content index (data.hash_index.CONTENT_INDEX, the hashes of its
images' source bytes, written by `shards build` / `add-labels`). File names repeat across folders (IMG_0001.jpg in
every camera export, photos/x/x-0000.png beside photos-test/x/x-0000.png) where bytes do not, so the same name
with other bytes is no leak, and the same bytes under another name is one. A set built before content hashes is
compared by key (its key index, or its keys read from its shards), and every set in the same comparison with it,
with a warning that says to rebuild it.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from data import storage
from data.hash_index import key_hashes, read_content_index, read_key_index, record_hashes
from data.shards import Manifest, ShardInfo, iter_tar, read_manifest, read_record

log = logging.getLogger("bgsplit.data")

CONTENT, KEY = "content", "key"
REBUILD = ("rebuild it with `bgsplit shards build` into a new folder (a rebuild into the same folder with the same "
           "flags keeps the old set) to compare by content")


@dataclass(frozen=True)
class SetHashes:
    """One set's sorted, unique hashes of one kind (``by``: CONTENT or KEY)."""

    location: str
    by: str
    hashes: np.ndarray


def _keys_in(manifest: Manifest, shard: ShardInfo) -> Iterator[str]:
    """A shard's sample keys in order, read from its bytes (as far as they are asked for): the one way this module
    reads keys where no index or record holds their hashes."""
    with storage.open_read(storage.join(manifest.root, shard.url)) as stream:
        for key, _ in iter_tar(stream):
            yield key


def keys_of(locations: Iterable[str]) -> set[str]:
    """Every sample key of these shard sets (a pass over their shards' bytes: the fallback of ``key_index_of`` for
    a set built before key indexes; meant for training and validation sets, not for a pool of millions)."""
    keys: set[str] = set()
    for location in locations:
        manifest = read_manifest(location)
        for shard in manifest.shards:
            keys.update(_keys_in(manifest, shard))
    return keys


def key_index_of(location: str, manifest: Manifest | None = None) -> np.ndarray:
    """The set's sorted key hashes: its key index, or its keys read from its shards (a set built before key
    indexes), with a warning."""
    manifest = manifest or read_manifest(location)
    index = read_key_index(manifest)
    if index is None:
        log.warning("%s has no key index (built by an older bgsplit): reading its keys from its shards; rebuild it "
                    "with `bgsplit shards build` into a new folder to read 8 bytes a key instead", location)
        index = np.unique(key_hashes(keys_of([location])))
    return index


def comparable(locations: Iterable[str], *, names: dict[str, str] | None = None) -> dict[str, SetHashes]:
    """Every set's hashes, all of one kind: content where every set has a content index, else keys for all (a
    content hash and a key hash never match), with a warning naming the sets without one (``names``: how to
    name a location in it, e.g. by its experiment key)."""
    locations = list(dict.fromkeys(locations))
    manifests = {loc: read_manifest(loc) for loc in locations}
    contents = {loc: read_content_index(m) for loc, m in manifests.items()}
    lacking = [loc for loc, index in contents.items() if index is None]
    if not lacking:
        return {loc: SetHashes(loc, CONTENT, index) for loc, index in contents.items()}
    shown = ", ".join((names or {}).get(loc, loc) for loc in lacking[:3]) + (", ..." if len(lacking) > 3 else "")
    log.warning("%s record%s no content hashes (built by an older bgsplit): the leak check compares file names, "
                "so the same name with other bytes counts as shared; %s", shown, "s" if len(lacking) == 1 else "",
                REBUILD.replace("rebuild it", "rebuild each"))
    return {loc: SetHashes(loc, KEY, key_index_of(loc, m)) for loc, m in manifests.items()}


def shared(a: SetHashes, b: SetHashes) -> np.ndarray:
    """The hashes both sets hold (sorted); the two must be of one kind (``comparable``)."""
    if a.by != b.by:
        raise ValueError(f"{a.location} is hashed by {a.by} and {b.location} by {b.by}: compare sets of one kind")
    return np.intersect1d(a.hashes, b.hashes, assume_unique=True)


def contains(index: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """One bool per hash: is it in ``index`` (sorted), by binary search."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if not hashes.size or not index.size:
        return np.zeros(hashes.shape, dtype=bool)
    at = np.minimum(np.searchsorted(index, hashes), index.size - 1)
    return index[at] == hashes


def first_sample(location: str, hashes: np.ndarray, by: str) -> str | None:
    """The key of the first sample of the set at ``location`` whose hash is in ``hashes``: what an error names.
    Its shards' records say which sample (the shard itself is read up to it); a set whose records predate the
    hashes is read whole."""
    manifest = read_manifest(location)
    field = "content_hashes" if by == CONTENT else "key_hashes"
    for shard in manifest.shards:
        found = record_hashes(read_record(manifest, shard), field)
        if found is None and by == KEY:
            found = key_hashes(list(_keys_in(manifest, shard)))
        if found is None:
            return None
        hits = np.flatnonzero(contains(hashes, found))
        if hits.size:
            key = next(itertools.islice(_keys_in(manifest, shard), int(hits[0]), None), None)
            if key is not None:
                return key
    return None
