"""The ``--source`` spec string → a :class:`Source`, through ``SOURCES``: scheme → how its specs open.

Each entry is defined in the module of the source it opens, and listed here, so that none of them imports the
dispatcher that imports them. A new source is its module, with its entry, and one line in ``SOURCES``.
"""

from __future__ import annotations

from typing import Any

from data.sources.base import Source, SourceScheme
from data.sources.fmnist import FMNIST_SCHEME
from data.sources.folder import FOLDER_SCHEME
from data.sources.inat import INAT_SCHEME
from data.sources.manifest import MANIFEST_SCHEME
from data.sources.wds import WDS_SCHEME


UNLABELLED = "#unlabelled"
"""Spec suffix for a pool to mine: no label needed, flat folders allowed, no folder names in keys."""

SOURCES: dict[str, SourceScheme] = {
    "fmnist": FMNIST_SCHEME,
    "folder": FOLDER_SCHEME,
    "manifest": MANIFEST_SCHEME,
    "inat": INAT_SCHEME,
    "wds": WDS_SCHEME,
}
"""Spec scheme (the text before the first ``:``) -> how its specs open; ``open_source`` reads nothing else."""


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
    unlabelled = spec.endswith(UNLABELLED)
    if unlabelled:
        spec = spec[:-len(UNLABELLED)]
    scheme, _, rest = spec.partition(":")
    entry = SOURCES.get(scheme)
    if entry is None or not (rest or entry.bare):
        raise ValueError(f"bad source spec '{spec}'; valid forms: {', '.join(s.form for s in SOURCES.values())}")
    if unlabelled and entry.unlabelled_pool:
        kw["labelled"] = False  # fmnist and inat keys hold no class names: their labels are ignored by the pool
    return entry.open(spec, rest, **kw)
