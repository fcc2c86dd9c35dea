"""The interface every source implements, and the key rules they share.

Every dataset the project trains on (a folder tree, a CSV/JSONL manifest,
iNaturalist 2017, Fashion-MNIST, existing WebDataset shards) is reduced to the
same tiny interface, a :class:`Source`, so the shard builder never needs to
know which one it reads. A source only lists items and hands back the
*encoded* bytes as stored: no decoding or resizing happens here, so shards keep
the original pixels and the expensive work stays in one place (the builder).

Keys are webdataset keys, hence restricted to ``[A-Za-z0-9_-]``: a dot would
be read as an extension separator and a slash as a directory.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from data.sources.listing import Listing, SourceItem

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


@runtime_checkable
class Source(Protocol):
    """What the shard builder needs from a dataset, and nothing more.

    ``name`` is a spec string that :func:`open_source` accepts, so a shard's
    metadata records exactly how to reopen the data it was built from.
    """

    name: str

    def items(self) -> Listing:
        """Every item, as columns (data.sources.listing): the build selects on ``labels`` by index and writes
        ``take``-n slices, never a list of ``SourceItem`` objects."""
        ...

    def read(self, item: SourceItem) -> bytes: ...

    def class_names(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class SourceScheme:
    """How the specs of one scheme (the text before the first ``:``) open their source: an entry of
    data.sources.open.SOURCES, defined in the module of the source it opens."""

    form: str
    """The spec's form, as errors and ``--source``'s help show it (``folder:<root>``)."""
    open: Callable[..., Source]
    """``open(spec, rest, **kw)``: ``rest`` is the spec after ``scheme:``, ``spec`` the whole spec (for errors);
    keyword arguments go to the source's constructor."""
    bare: bool = False
    """The scheme alone is a spec (``fmnist:``, with an empty ``rest``); otherwise an empty ``rest`` is a bad spec."""
    unlabelled_pool: bool = False
    """A spec ending in ``#unlabelled`` opens the source with ``labelled=False`` (no label needed, flat folders
    allowed, no folder names in keys); where false, the suffix is accepted and the pool ignores the labels."""


class ListedOnce:
    """What the folder, manifest and WebDataset sources share: their listing (a bucket scan, a 10M-row file, every
    shard's tar headers: minutes at scale) is made on first use and kept, and their classes are the labels it found,
    by name. A subclass says how it lists (``_listing``)."""

    _items: Listing | None = None

    def items(self) -> Listing:
        if self._items is None:
            self._items = self._listing()
        return self._items

    def _listing(self) -> Listing:
        raise NotImplementedError

    def class_names(self) -> dict[str, str]:
        return {label: label for label in sorted(set(self.items().labels.names))}


def pool_key(rel: str) -> str:
    """The key of an image in an unlabelled pool: its file name, never its folders. A pool sorted into class
    folders would otherwise show the answer in every key on the review page; the short hash of the whole path
    keeps two ``a.jpg`` in different folders two keys."""
    name = rel.rsplit("/", 1)[-1]
    if name == rel:
        return make_key(rel)
    digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8]
    return f"{_BAD_KEY_CHARS.sub('_', name)}-{digest}"


def make_key(text: str) -> str:
    """Turn an arbitrary identifier into a webdataset-safe key.

    Replacing characters alone could merge distinct names ("a.b" and "a_b"),
    so any name that had to change gets a short hash of the original appended;
    names that were already safe are kept verbatim to stay readable.
    """
    cleaned = _BAD_KEY_CHARS.sub("_", text)
    if cleaned == text and cleaned:
        return cleaned
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned}-{digest}"


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS
