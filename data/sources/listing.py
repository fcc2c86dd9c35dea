"""A source's items as columns, so that `shards build` can list ten million images in a few hundred MB.

A ``list[SourceItem]`` costs ~435 B an item in the build driver (an object and four strings each), ~5 GB at 10M.
Here the keys are one byte buffer with offsets, the labels and splits small integer codes into their tables,
and each ref a code for its prefix (the shard URL of a WebDataset sample, the folder of a file) plus the rest in
a second buffer: tens of bytes an item. Items are made on demand (``listing[i]``), and a selection is an index
array into the one listing, so the driver never holds a second copy of what it builds.
"""
from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, overload

import numpy as np

from data.sources.base import SourceItem


class LabelCodes(NamedTuple):
    """Labels as codes into ``names``: what a -BG selection reads (data.bg_construction), 1-4 B an item."""

    codes: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.codes)

    def take(self, indices: np.ndarray) -> LabelCodes:
        return LabelCodes(self.codes[indices], self.names)


def index_dtype(n: int) -> type:
    """Positions into a listing of ``n`` items in 4 bytes while they fit: the build driver's selection and shard
    tasks are index arrays as long as the source, so int64 would add 4 B a sample at its peak for nothing."""
    return np.int32 if n < 2 ** 31 else np.int64


def positions(mask: np.ndarray) -> np.ndarray:
    """``np.flatnonzero(mask)`` in :func:`index_dtype`."""
    return np.flatnonzero(mask).astype(index_dtype(len(mask)), copy=False)


def _offsets(lengths: array) -> np.ndarray:
    """[0, end_0, end_1, ...] from per-item byte lengths, in the narrowest unsigned type that holds the buffer,
    summed straight into it (a uint64 cumsum first would add 8 B an item at the driver's peak)."""
    view = np.frombuffer(lengths, dtype=np.uint16) if len(lengths) else np.zeros(0, np.uint16)
    dtype = np.uint32 if int(view.sum(dtype=np.uint64)) < 2 ** 32 else np.uint64
    out = np.zeros(len(view) + 1, dtype=dtype)
    np.cumsum(view, dtype=dtype, out=out[1:])
    return out


# a code column's array typecode by the codes it must hold: 1 B an item until a table outgrows it
_WIDER = {"B": "H", "H": "I"}
_NUMPY = {"B": np.uint8, "H": np.uint16, "I": np.uint32}


def _codes(column: array) -> np.ndarray:
    return np.frombuffer(column, dtype=_NUMPY[column.typecode]) if len(column) else np.zeros(0, np.uint8)


def _take_text(buffer: np.ndarray, offsets: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The strings at ``indices`` as a new (buffer, offsets) pair, without a Python loop over them."""
    starts, ends = offsets[indices].astype(np.int64), offsets[indices + 1].astype(np.int64)
    lengths = ends - starts
    new = np.zeros(len(indices) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new[1:])
    # each output byte's source position: its string's start plus its place within the string
    pos = np.repeat(starts - new[:-1], lengths) + np.arange(new[-1])
    out_offsets = new.astype(np.uint32) if new[-1] < 2 ** 32 else new.astype(np.uint64)
    return buffer[pos], out_offsets


def _split_ref(ref: str) -> tuple[str, str]:
    """A ref's shared head and its own tail: before the first tab (a WebDataset sample's shard URL), else up to
    the last path separator (a file's folder)."""
    tab = ref.find("\t")
    cut = tab if tab >= 0 else max(ref.rfind("/"), ref.rfind(os.sep)) + 1
    return ref[:cut], ref[cut:]


class ListingBuilder:
    """Appends items into the columns as a source lists them; ``build`` hands back the Listing."""

    def __init__(self) -> None:
        # per-item lengths (2 B) rather than offsets (8 B) while listing: the builder's peak is the driver's peak
        self._keys, self._key_lengths = bytearray(), array("H")
        self._tails, self._tail_lengths = bytearray(), array("H")
        self._tables: dict[str, dict[str, int]] = {"label": {}, "split": {}, "head": {}}
        self._columns = {table: array("B") for table in self._tables}

    def __len__(self) -> int:
        return len(self._columns["label"])

    def _code(self, table: str, value: str) -> int:
        codes = self._tables[table]
        code = codes.get(value)
        if code is None:
            code = codes[value] = len(codes)
            column = self._columns[table]
            if code == 2 ** (8 * column.itemsize):  # widened once per size: 1 B an item while tables are small
                self._columns[table] = array(_WIDER[column.typecode], column)
        return code

    def _append_code(self, table: str, value: str) -> None:
        code = self._code(table, value)
        self._columns[table].append(code)

    def append(self, key: str, label: str, split: str, ref: str) -> None:
        encoded = key.encode()
        head, tail = _split_ref(ref)
        tail_bytes = tail.encode()
        if len(encoded) >= 2 ** 16 or len(tail_bytes) >= 2 ** 16:
            raise ValueError(f"item key or path of {max(len(encoded), len(tail_bytes))} bytes ({key[:60]}...): "
                             "keys and paths must be shorter than 64 KB")
        self._keys += encoded
        self._key_lengths.append(len(encoded))
        self._append_code("head", head)
        self._tails += tail_bytes
        self._tail_lengths.append(len(tail_bytes))
        self._append_code("label", label)
        self._append_code("split", split)

    def extend(self, items: Iterable[SourceItem]) -> None:
        for item in items:
            self.append(item.key, item.label, item.split, item.ref)

    def absorb(self, other: ListingBuilder) -> None:
        """Append ``other``'s items after ours, its codes renumbered into our tables (``other`` is unchanged). A shard
        listed in a thread goes into its own small builder this way, so the shards waiting in the listing window
        cost their columns (~60 B an item), not Python items (~400 B)."""
        self._keys += other._keys
        self._key_lengths.extend(other._key_lengths)
        self._tails += other._tails
        self._tail_lengths.extend(other._tail_lengths)
        for table, theirs in other._tables.items():
            ours = np.array([self._code(table, value) for value in theirs], dtype=np.uint32)  # by their code
            column = self._columns[table]
            if len(ours):
                column.frombytes(ours[_codes(other._columns[table])].astype(_NUMPY[column.typecode]).tobytes())

    def build(self) -> Listing:
        """The columns, viewed rather than copied (a copy would double the keys at the driver's peak); the builder
        is spent. Each lengths column is dropped once its offsets exist, so no two transients meet."""
        names = {t: list(codes) for t, codes in self._tables.items()}
        key_offsets = _offsets(self._key_lengths)
        self._key_lengths = array("H")
        tail_offsets = _offsets(self._tail_lengths)
        self._tail_lengths = array("H")
        codes = {t: _codes(column) for t, column in self._columns.items()}
        return Listing(np.frombuffer(self._keys, np.uint8), key_offsets, LabelCodes(codes["label"], names["label"]),
                       codes["split"], names["split"], codes["head"], names["head"],
                       np.frombuffer(self._tails, np.uint8), tail_offsets)


class Listing(Sequence[SourceItem]):
    """A source's items, in the source's order (see the module docstring). Immutable: a source hands out the same
    listing every time it is asked."""

    def __init__(self, keys: np.ndarray, key_offsets: np.ndarray, labels: LabelCodes, splits: np.ndarray,
                 split_names: list[str], heads: np.ndarray, head_names: list[str], tails: np.ndarray,
                 tail_offsets: np.ndarray):
        self._keys, self._key_offsets, self.labels = keys, key_offsets, labels
        self._splits, self._split_names = splits, split_names
        self._heads, self._head_names, self._tails, self._tail_offsets = heads, head_names, tails, tail_offsets

    @classmethod
    def from_items(cls, items: Iterable[SourceItem]) -> Listing:
        builder = ListingBuilder()
        builder.extend(items)
        return builder.build()

    def __len__(self) -> int:
        return len(self.labels)

    def key(self, i: int) -> str:
        return self._keys[self._key_offsets[i]:self._key_offsets[i + 1]].tobytes().decode()

    def _item(self, i: int) -> SourceItem:
        tail = self._tails[self._tail_offsets[i]:self._tail_offsets[i + 1]].tobytes().decode()
        return SourceItem(key=self.key(i), label=self.labels.names[self.labels.codes[i]],
                          split=self._split_names[self._splits[i]], ref=self._head_names[self._heads[i]] + tail)

    @overload
    def __getitem__(self, i: int) -> SourceItem: ...

    @overload
    def __getitem__(self, i: slice) -> Listing: ...

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"item {i} of a listing of {n}")
        return self._item(i % n)

    def __iter__(self) -> Iterator[SourceItem]:
        return (self._item(i) for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        """Item by item, against another listing or a list of items (what a source listed before)."""
        if not isinstance(other, (Listing, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def take(self, indices: Sequence[int] | np.ndarray) -> Listing:
        """The items at ``indices``, as a listing of their own (what a shard task carries to its worker)."""
        idx = np.asarray(indices, dtype=np.int64)
        keys, key_offsets = _take_text(self._keys, self._key_offsets, idx)
        tails, tail_offsets = _take_text(self._tails, self._tail_offsets, idx)
        return Listing(keys, key_offsets, self.labels.take(idx), self._splits[idx], self._split_names,
                       self._heads[idx], self._head_names, tails, tail_offsets)

    def nbytes(self) -> int:
        """Bytes the columns take (the tables aside): what the listing costs per item, times its length."""
        return sum(a.nbytes for a in (self._keys, self._key_offsets, self.labels.codes, self._splits, self._heads,
                                      self._tails, self._tail_offsets))

    def check_unique_keys(self, where: str) -> None:
        """Duplicate keys would silently overwrite samples inside a shard. Compared by 8-byte hashes sorted in place
        (~9 B an item while checking: at 10M an argsort and its gathers would add ~33 B, the driver's peak); the
        few hashes seen twice are traced back to their items by a second pass and confirmed on the keys."""
        if len(self) < 2:
            return
        hashes = self._key_hashes()
        hashes.sort()
        repeated = hashes[1:][hashes[1:] == hashes[:-1]]
        del hashes
        if not len(repeated):
            return
        hashes = self._key_hashes()  # only on a duplicate (an error) or a 64-bit hash collision
        seen: set[str] = set()
        for i in np.flatnonzero(np.isin(hashes, repeated)):  # in listing order: the first repeat is named
            key = self.key(int(i))
            if key in seen:
                raise ValueError(f"duplicate key '{key}' in {where}; every image must appear once")
            seen.add(key)

    def _key_hashes(self) -> np.ndarray:
        return np.fromiter((int.from_bytes(hashlib.blake2b(self._keys[self._key_offsets[i]:self._key_offsets[
            i + 1]].tobytes(), digest_size=8).digest(), "little") for i in range(len(self))), dtype=np.uint64,
            count=len(self))
