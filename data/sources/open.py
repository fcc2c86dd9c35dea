"""The ``--source`` spec string → a :class:`Source`.

Kept apart from the sources themselves so that none of them imports the
dispatcher that imports them.
"""

from __future__ import annotations

from typing import Any

from data.sources.base import Source
from data.sources.fmnist import FashionMNISTSource
from data.sources.folder import ImageFolderSource
from data.sources.inat import INatSource
from data.sources.manifest import ManifestSource
from data.sources.wds import WebDatasetSource


UNLABELLED = "#unlabelled"
"""Spec suffix for a pool to mine: no label needed, flat folders allowed, no folder names in keys."""

_SCHEMES = (
    "fmnist:<train|test>",
    "folder:<root>",
    "manifest:<file.csv|file.jsonl>",
    "inat:<ann.json>:<image_root>:<split>",
    "wds:<path|url|brace-pattern>[#label=cls|txt|json:KEY|<member>]",
)


def open_source(spec: str, **kw: Any) -> Source:
    """Build a source from a one-string spec, so configs and shard metadata can
    name a dataset without code.

    Specs: ``fmnist:train``, ``fmnist:test``, ``folder:/path``,
    ``manifest:/path.csv`` (or ``.jsonl``), ``inat:/ann.json:/image_root:split``.
    For ``inat`` the annotation path must end in ``.json`` (that is where the
    spec is cut, so URLs with ``://`` still work). ``wds:PATTERN`` reads
    existing WebDataset shards (``wds:s3://b/train-{000000..000999}.tar``)
    labelled by their ``.cls`` member; a ``#label=FIELD`` suffix picks another
    field (``txt``, any member name, or ``json:KEY`` with a dotted KEY), so the
    whole source fits in the one string a worker process reopens it from.
    Extra keyword arguments go to the source's constructor (e.g. ``root=`` for
    fmnist, ``split=`` for folder, ``label_field=`` for wds).
    """
    if spec.endswith(UNLABELLED):
        spec = spec[:-len(UNLABELLED)]
        if spec.partition(":")[0] in ("folder", "manifest", "wds"):
            kw["labelled"] = False  # fmnist and inat keys hold no class names: their labels are ignored by the pool
    scheme, sep, rest = spec.partition(":")
    if scheme == "fmnist":
        return FashionMNISTSource(split=rest or "train", **kw)
    if scheme == "folder" and rest:
        return ImageFolderSource(rest, **kw)
    if scheme == "manifest" and rest:
        return ManifestSource(rest, **kw)
    if scheme == "inat" and rest:
        return _open_inat(spec, rest, **kw)
    if scheme == "wds" and rest:
        return _open_wds(spec, rest, **kw)
    raise ValueError(f"bad source spec '{spec}'; valid forms: {', '.join(_SCHEMES)}")


def _open_inat(spec: str, rest: str, **kw: Any) -> INatSource:
    annotations, sep, tail = rest.partition(".json:")
    image_root, _, split = tail.rpartition(":")
    if not sep or not image_root or not split:
        raise ValueError(f"bad inat spec '{spec}'; use inat:<ann.json>:<image_root>:<split>")
    return INatSource(annotations + ".json", image_root, split, **kw)


def _open_wds(spec: str, rest: str, **kw: Any) -> WebDatasetSource:
    pattern, sep, field = rest.rpartition("#label=")
    if not sep:
        return WebDatasetSource(rest, **kw)
    if not pattern:
        raise ValueError(f"bad wds spec '{spec}'; use wds:<pattern>[#label=FIELD]")
    if kw.get("label_field", field) != field:
        raise ValueError(
            f"wds spec '{spec}' says label {field} but label_field={kw['label_field']} was passed; give it once"
        )
    kw.pop("label_field", None)
    return WebDatasetSource(pattern, label_field=field, **kw)
