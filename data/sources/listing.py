"""A source's items as columns, so that `shards build` can list ten million images in a few hundred MB.

A ``list[SourceItem]`` costs ~435 B an item in the build driver (an object and four strings each), ~5 GB at 10M.
Here the labels and splits are small integer codes into their tables, each ref a code for its prefix (the shard
URL of a WebDataset sample, the folder of a file) plus the rest, and the keys and ref rests front-coded text
(each string as what it shares with the one before and its own suffix): keys listed in order mostly repeat their
neighbour's (``raw-000123/000000456``, then ``...457``), so a 31-character key costs ~6 B and an item ~22 B.
Items are made on demand (``listing[i]``), and a selection is an index array into the one listing, so the driver
never holds a second copy of what it builds.
"""
from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, overload

import numpy as np


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One labelled image, as a source hands it out (a listing keeps its items as columns and makes these on
    demand).

    ``ref`` is opaque to callers: only the source that produced the item knows
    how to turn it into bytes, which is why :meth:`Source.read` takes the item.
    """

    key: str
    label: str
    split: str
    ref: str


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


# a code column's array typecode by the codes it must hold: 1 B an item until a table outgrows it
_WIDER = {"B": "H", "H": "I"}
_NUMPY = {"B": np.uint8, "H": np.uint16, "I": np.uint32}

# a block of front-coded strings starts with one stored whole, so any string is at most this many steps away
_BLOCK = 16
_GATHER = 1 << 14  # strings gathered at a time by TextColumn.take: ~25 MB of index arrays at most
_MAX_SHARED = 255  # a shared prefix's length is one byte; a longer one is cut (the rest goes into the suffix)


def _codes(column: array) -> np.ndarray:
    return np.frombuffer(column, dtype=_NUMPY[column.typecode]) if len(column) else np.zeros(0, np.uint8)


class TextBuilder:
    """Strings appended front-coded: each as the length of the prefix it shares with the string before and the
    rest (a sample's key repeats its shard's name, a WebDataset ref its offset's leading digits), one string in
    ``_BLOCK`` stored whole. Per string: a byte of prefix length, a byte or two of suffix length, the suffix."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.shared, self.lengths = array("B"), array("B")
        self.block_items, self.block_bytes = array("q"), array("q")  # where each block starts: item, byte
        self._last, self._left = b"", 0  # the string before, and how many more its block takes

    def __len__(self) -> int:
        return len(self.shared)

    def append(self, value: bytes) -> None:
        if self._left:  # inside a block: code against the string before (inlined: this runs once a string)
            self._left -= 1
            last = self._last
            m = min(len(last), len(value), _MAX_SHARED)
            shared = m - ((int.from_bytes(last[:m], "big") ^ int.from_bytes(value[:m], "big")).bit_length() + 7) // 8
        else:
            self._left = _BLOCK - 1
            self.block_items.append(len(self.shared))
            self.block_bytes.append(len(self.data))
            shared = 0
        rest = len(value) - shared
        if rest > 255 and self.lengths.typecode == "B":
            self.lengths = array("H", self.lengths)
        self.shared.append(shared)
        self.lengths.append(rest)
        self.data += value[shared:]
        self._last = value

    def absorb(self, other: TextBuilder) -> None:
        """Append ``other``'s strings (its first starts a block, so nothing of ours is re-coded)."""
        n, size = len(self.shared), len(self.data)
        self.block_items.extend(array("q", (n + i for i in other.block_items)))
        self.block_bytes.extend(array("q", (size + b for b in other.block_bytes)))
        if other.lengths.typecode == "H" and self.lengths.typecode == "B":
            self.lengths = array("H", self.lengths)
        self.lengths.frombytes(_codes(other.lengths).astype(_NUMPY[self.lengths.typecode]).tobytes())
        self.shared.extend(other.shared)
        self.data += other.data
        if len(other):
            self._last, self._left = other._last, other._left

    def build(self) -> TextColumn:
        """The columns viewed, not copied (a copy would double them at the driver's peak); the builder is spent."""
        view = np.frombuffer(self.data, np.uint8)
        return TextColumn(view, _codes(self.shared), _codes(self.lengths),
                          np.frombuffer(self.block_items, np.int64) if self.block_items else np.zeros(0, np.int64),
                          np.frombuffer(self.block_bytes, np.int64) if self.block_bytes else np.zeros(0, np.int64))


class TextColumn:
    """Front-coded strings (see :class:`TextBuilder`), read one by one, in order, or picked by index."""

    def __init__(self, data: np.ndarray, shared: np.ndarray, lengths: np.ndarray, block_items: np.ndarray,
                 block_bytes: np.ndarray):
        self.data, self.shared, self.lengths = data, shared, lengths
        self.block_items, self.block_bytes = block_items, block_bytes

    def __len__(self) -> int:
        return len(self.shared)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.data, self.shared, self.lengths, self.block_items, self.block_bytes))

    def _block(self, b: int, stop: int) -> Iterator[bytes]:
        """Block ``b``'s strings up to item ``stop`` (exclusive)."""
        start, pos = int(self.block_items[b]), int(self.block_bytes[b])
        shared, lengths = self.shared[start:stop].tolist(), self.lengths[start:stop].tolist()
        raw = self.data[pos:pos + sum(lengths)].tobytes()
        value, pos = b"", 0
        for keep, rest in zip(shared, lengths):
            value = value[:keep] + raw[pos:pos + rest]
            pos += rest
            yield value

    def __getitem__(self, i: int) -> bytes:
        b = int(np.searchsorted(self.block_items, i, side="right")) - 1
        *_, value = self._block(b, i + 1)
        return value

    def __iter__(self) -> Iterator[bytes]:
        ends = [*self.block_items[1:].tolist(), len(self)] if len(self.block_items) else []
        for b, stop in enumerate(ends):
            yield from self._block(b, stop)

    def take(self, indices: np.ndarray) -> TextColumn:
        """The strings at ``indices``, stored whole (what a shard task carries to its worker). Vectorised, because a
        task's items are spread over the whole listing: decoding each in Python would cost the driver ~0.1 s a
        10k-item task, minutes of a 10M build that 512 writers finish in a few."""
        idx = np.asarray(indices, dtype=np.int64)
        parts = [self._gather(idx[at:at + _GATHER]) for at in range(0, len(idx), _GATHER)]
        data = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint8)
        lengths = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint16)
        block_items = np.arange(0, len(idx), _BLOCK, dtype=np.int64)
        ends = np.cumsum(lengths, dtype=np.int64)
        block_bytes = np.concatenate([[0], ends])[block_items]
        return TextColumn(data, np.zeros(len(idx), np.uint8), lengths, block_items, block_bytes)

    def _gather(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bytes of the strings at ``idx`` end to end, and their lengths. String i is pieced together from its
        block: item j (from the block's start to i) supplies the positions from its shared prefix's end up to the
        shortest prefix any later item of the chain shares, and i itself its whole suffix."""
        if not len(idx):
            return np.zeros(0, np.uint8), np.zeros(0, np.uint16)
        blocks = np.searchsorted(self.block_items, idx, side="right") - 1
        items = self.block_items[blocks][:, None] + np.arange(_BLOCK)  # (strings, _BLOCK): each one's block
        chain = items <= idx[:, None]
        at = np.minimum(items, len(self) - 1)
        shared = np.where(chain, self.shared[at], 0).astype(np.int64)
        rest = np.where(chain, self.lengths[at], 0).astype(np.int64)
        starts = self.block_bytes[blocks][:, None] + np.cumsum(rest, axis=1) - rest  # each suffix in ``data``
        last = (idx - self.block_items[blocks])[:, None]
        total = np.take_along_axis(shared + rest, last, axis=1)
        later = np.where(chain, shared, np.iinfo(np.int64).max)
        later = np.concatenate([later[:, 1:], np.full((len(idx), 1), np.iinfo(np.int64).max)], axis=1)
        upto = np.minimum(np.minimum.accumulate(later[:, ::-1], axis=1)[:, ::-1], total)
        take = np.where(chain, np.maximum(upto - shared, 0), 0).ravel()
        ends = np.cumsum(take)
        pos = np.repeat(starts.ravel() - (ends - take), take) + np.arange(ends[-1] if len(ends) else 0)
        return self.data[pos], total.ravel().astype(np.uint16)


def _split_ref(ref: str) -> tuple[str, str]:
    """A ref's shared head and its own tail: before the first tab (a WebDataset sample's shard URL), else up to
    the last path separator (a file's folder)."""
    tab = ref.find("\t")
    cut = tab if tab >= 0 else max(ref.rfind("/"), ref.rfind(os.sep)) + 1
    return ref[:cut], ref[cut:]


class ListingBuilder:
    """Appends items into the columns as a source lists them; ``build`` hands back the Listing."""

    def __init__(self) -> None:
        self._keys, self._tails = TextBuilder(), TextBuilder()
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

    def append(self, key: str, label: str, split: str, ref: str) -> None:
        encoded = key.encode()
        head, tail = _split_ref(ref)
        tail_bytes = tail.encode()
        if len(encoded) >= 2 ** 16 or len(tail_bytes) >= 2 ** 16:
            raise ValueError(f"item key or path of {max(len(encoded), len(tail_bytes))} bytes ({key[:60]}...): "
                             "keys and paths must be shorter than 64 KB")
        self._keys.append(encoded)
        self._tails.append(tail_bytes)
        for table, value in (("head", head), ("label", label), ("split", split)):
            code = self._tables[table].get(value)
            if code is None:
                code = self._code(table, value)  # may widen the column: look it up after
            self._columns[table].append(code)

    def extend(self, items: Iterable[SourceItem]) -> None:
        for item in items:
            self.append(item.key, item.label, item.split, item.ref)

    def absorb(self, other: ListingBuilder) -> None:
        """Append ``other``'s items after ours, its codes renumbered into our tables (``other`` is unchanged). A shard
        listed in a thread goes into its own small builder this way, so the shards waiting in the listing window
        cost their columns (~20 B an item), not Python items (~400 B)."""
        self._keys.absorb(other._keys)
        self._tails.absorb(other._tails)
        for table, theirs in other._tables.items():
            ours = np.array([self._code(table, value) for value in theirs], dtype=np.uint32)  # by their code
            column = self._columns[table]
            if len(ours):
                column.frombytes(ours[_codes(other._columns[table])].astype(_NUMPY[column.typecode]).tobytes())

    def build(self) -> Listing:
        """The columns, viewed rather than copied; the builder is spent."""
        names = {t: list(codes) for t, codes in self._tables.items()}
        codes = {t: _codes(column) for t, column in self._columns.items()}
        return Listing(self._keys.build(), LabelCodes(codes["label"], names["label"]), codes["split"], names["split"],
                       codes["head"], names["head"], self._tails.build())


class Listing(Sequence[SourceItem]):
    """A source's items, in the source's order (see the module docstring). Immutable: a source hands out the same
    listing every time it is asked."""

    def __init__(self, keys: TextColumn, labels: LabelCodes, splits: np.ndarray, split_names: list[str],
                 heads: np.ndarray, head_names: list[str], tails: TextColumn):
        self._keys, self.labels = keys, labels
        self._splits, self._split_names = splits, split_names
        self._heads, self._head_names, self._tails = heads, head_names, tails

    @classmethod
    def from_items(cls, items: Iterable[SourceItem]) -> Listing:
        builder = ListingBuilder()
        builder.extend(items)
        return builder.build()

    def __len__(self) -> int:
        return len(self.labels)

    def key(self, i: int) -> str:
        return self._keys[i].decode()

    def _make(self, i: int, key: bytes, tail: bytes) -> SourceItem:
        return SourceItem(key=key.decode(), label=self.labels.names[self.labels.codes[i]], split=self._split_names[
            self._splits[i]], ref=self._head_names[self._heads[i]] + tail.decode())

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
        i %= n
        return self._make(i, self._keys[i], self._tails[i])

    def __iter__(self) -> Iterator[SourceItem]:
        return (self._make(i, key, tail) for i, (key, tail) in enumerate(zip(self._keys, self._tails)))

    def __eq__(self, other: object) -> bool:
        """Item by item, against another listing or a list of items (what a source listed before)."""
        if not isinstance(other, (Listing, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def take(self, indices: Sequence[int] | np.ndarray) -> Listing:
        """The items at ``indices``, as a listing of their own (what a shard task carries to its worker)."""
        idx = np.asarray(indices, dtype=np.int64)
        return Listing(self._keys.take(idx), self.labels.take(idx), self._splits[idx], self._split_names,
                       self._heads[idx], self._head_names, self._tails.take(idx))

    def nbytes(self) -> int:
        """Bytes the columns take (the tables aside): what the listing costs per item, times its length."""
        return self._keys.nbytes() + self._tails.nbytes() + sum(
            a.nbytes for a in (self.labels.codes, self._splits, self._heads))

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
        return np.fromiter((int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
                            for key in self._keys), dtype=np.uint64, count=len(self))
