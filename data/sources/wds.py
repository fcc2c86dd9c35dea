"""WebDataset tar shards written by other tools (webdataset's TarWriter or
ShardWriter, img2dataset, tarp, ...), local or on any fsspec store, as a source.

Listing streams each shard once, front to back, and remembers where every
sample's image bytes sit in its tar, so that ``read`` fetches one sample with a
single range read instead of downloading a whole shard per sample. webdataset's
iterators hand out member bytes but not their positions, so the listing reads
the tar with :mod:`tarfile` streaming (``mode="r|*"``) and records each image
member's ``offset_data``; what counts as a sample (the key/extension split, the
``__meta__`` members that are skipped) is still webdataset's own rule.

Spec: ``wds:PATTERN[#label=FIELD]``; PATTERN is a path, a URL or a brace
pattern (``s3://b/train-{000000..000999}.tar``, never a glob) and FIELD is

- ``cls`` (default): the ``.cls`` member, an ascii int or a string;
- ``txt`` or any other member name (``label``, ``class``...): that member's text;
- ``json:KEY``: ``KEY`` in the ``.json`` member, a dotted path reaching into
  nested objects (``json:annotation.category``); an int or a string.

Labels are strings, whatever the member held, as for every source.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import posixpath
import re
import tarfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from braceexpand import braceexpand

from data import remote, storage
from data.sources.base import IMAGE_EXTENSIONS, ListedOnce, SourceScheme, make_key
from data.sources.listing import Listing, ListingBuilder, SourceItem

__all__ = ["WebDatasetSource", "expand_pattern", "parse_label_field"]

log = logging.getLogger("bgsplit.sources")

STREAM_BLOCK_SIZE = 8 << 20
"""Read-ahead of one listing stream: large enough that an S3 shard is fetched in
a few big ranged GETs rather than one request per member."""

LIST_THREADS = 8
"""Shards listed at once; listing an object store is bound by one stream's
speed, not by the CPU, so a few streams side by side list several times faster."""

IMAGE_FIELDS = tuple(sorted(ext[1:] for ext in IMAGE_EXTENSIONS))
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator(skip_meta=...) default
_MEMBER_FIELD = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
_LABEL_HELP = "use cls, txt, another member name such as label, or json:KEY (dotted: json:annotation.category)"


def parse_label_field(field: str) -> tuple[str, tuple[str, ...]]:
    """Check a label field spec once, up front, so that a typo fails before a
    single shard is streamed: ``("member", (ext,))`` or ``("json", key path)``."""
    if not isinstance(field, str) or not field:
        raise ValueError(f"empty label field; {_LABEL_HELP}")
    if field.startswith("json:"):
        path = tuple(field[len("json:") :].split("."))
        if not all(part.strip() for part in path):
            raise ValueError(f"bad label field '{field}': the json key is empty; {_LABEL_HELP}")
        return "json", path
    member = field.lower()  # webdataset lower-cases member extensions
    if not _MEMBER_FIELD.match(member):
        raise ValueError(f"bad label field '{field}'; {_LABEL_HELP}")
    if member == "json":
        raise ValueError("label field 'json' names no key; use json:KEY, e.g. json:label")
    if member in IMAGE_FIELDS:
        raise ValueError(f"label field '{field}' is an image member; {_LABEL_HELP}")
    return "member", (member,)


def expand_pattern(pattern: str) -> list[str]:
    """Brace expansion only: globbing an object store would need a listing per
    pattern and silently accept gaps, while a brace range names every shard."""
    urls = [url for url in braceexpand(pattern) if url.strip()] if pattern.strip() else []
    if not urls:
        raise ValueError(
            f"WebDataset pattern '{pattern}' expands to no shards; "
            "give a path, a URL or a brace pattern like train-{000000..000099}.tar"
        )
    return urls


def _shard_stem(url: str) -> str:
    return posixpath.splitext(posixpath.basename(url.split("?", 1)[0] if remote.is_remote(url) else url))[0]


class _Sample:
    """The members of one sample seen so far while streaming its shard."""

    __slots__ = ("key", "fields", "image", "label")

    def __init__(self, key: str) -> None:
        self.key = key
        self.fields: list[str] = []
        self.image: tuple[int, int] | None = None
        self.label: bytes | None = None


class WebDatasetSource(ListedOnce):
    """Samples of existing WebDataset shards, in pattern order, then tar order.

    Keys are ``make_key("<shard stem>/<sample key>")``: two tools' shards both
    start at ``000000``, so the stem keeps keys unique across shards, and the
    hash ``make_key`` adds keeps them unique after slashes are replaced.
    """

    def __init__(self, pattern: str | os.PathLike[str], label_field: str = "cls",
                 list_threads: int = LIST_THREADS, labelled: bool = True) -> None:
        """``labelled=False`` (spec suffix ``#unlabelled``): a pool to mine, whose samples need no label member."""
        self.pattern = str(pattern)
        self.label_field = label_field
        self.labelled = labelled
        self._label_kind, self._label_path = parse_label_field(label_field)
        self.urls = expand_pattern(self.pattern)
        self.list_threads = max(1, int(list_threads))
        self.name = f"wds:{self.pattern}" if label_field == "cls" else f"wds:{self.pattern}#label={label_field}"
        if not labelled:
            self.name += "#unlabelled"

    def read(self, item: SourceItem) -> bytes:
        url, offset, size = self._parse_ref(item.ref)
        if remote.is_remote(url):
            fs, path = remote._fs(url)  # the store's options (retry policy) as everywhere else
            data = remote.with_retries(lambda: fs.cat_file(path, start=offset, end=offset + size),
                                        f"read {url} bytes {offset}+{size}")
        else:
            with storage.open_read(url) as f:
                f.seek(offset)
                data = f.read(size)
        if len(data) != size:
            raise ValueError(
                f"WebDataset shard {url} holds {len(data)} of the {size} bytes of '{item.key}' at offset {offset}; "
                "the shard changed since it was listed, list it again"
            )
        return data

    # ---------------------------------------------------------------- listing

    def _listing(self) -> Listing:
        self._check_shards_exist()
        builder = ListingBuilder()
        # a bounded window of shards in flight, each listed into its own columns in its thread (as Python items the
        # window would cost ~400 B a sample: ~50 MB for 16 shards of 10k samples, ~500 MB for shards of 100k)
        window: deque[Future] = deque()
        urls = iter(self.urls)
        with ThreadPoolExecutor(max_workers=min(self.list_threads, len(self.urls))) as pool:
            try:
                for url in itertools.islice(urls, 2 * self.list_threads):
                    window.append(pool.submit(self._list_shard_retrying, url))
                done = 0
                while window:
                    shard = window.popleft().result()
                    for url in itertools.islice(urls, 1):
                        window.append(pool.submit(self._list_shard_retrying, url))
                    builder.absorb(shard)
                    del shard
                    done += 1
                    log.info("listed WebDataset shard %d of %d (%d samples so far)", done, len(self.urls),
                             len(builder))
            except BaseException:
                for future in window:
                    future.cancel()
                raise
        items = builder.build()
        if not items:
            raise ValueError(f"no samples in the WebDataset shards {self.pattern}; are they empty?")
        items.check_unique_keys(f"WebDataset shards {self.pattern}")
        return items

    def _check_shards_exist(self) -> None:
        """All at once, before streaming: a gap at shard 900 of 1000 should not
        cost the time to stream the first 899."""
        missing = [url for url, ok in zip(self.urls, self._exist(self.urls)) if not ok]
        if missing:
            hint = "; globs are not expanded, use a brace pattern" if any(c in self.pattern for c in "*?[") else ""
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.urls)} WebDataset shards not found, the first: {missing[0]}; "
                f"check the pattern {self.pattern}{hint}"
            )

    @staticmethod
    def _exist(urls: list[str]) -> list[bool]:
        """One listing per folder on object stores instead of a HEAD per shard
        (http has no real listing, so there each URL is asked on its own)."""
        listed: dict[tuple[str, str], set[str]] = {}
        result = []
        for url in urls:
            scheme = url.split("://", 1)[0] if remote.is_remote(url) else ""
            if not scheme:
                result.append(os.path.isfile(url))
                continue
            if scheme in ("http", "https"):
                result.append(storage.exists(url))
                continue
            fs, path = remote._fs(url)
            parent = posixpath.dirname(path)
            if (scheme, parent) not in listed:
                try:
                    names = remote.with_retries(lambda: fs.ls(parent, detail=False, refresh=True), f"list {parent}")
                except FileNotFoundError:
                    names = []
                listed[scheme, parent] = {name.rstrip("/") for name in names}
            result.append(path.rstrip("/") in listed[scheme, parent])
        return result

    def _list_shard_retrying(self, url: str) -> ListingBuilder:
        # A dropped connection restarts the shard's stream from the start;
        # a bad sample (ValueError) is the data's fault and fails at once.
        if not remote.is_remote(url):
            return self._list_shard(url)
        return remote.with_retries(lambda: self._list_shard(url), f"list {url}")

    def _list_shard(self, url: str) -> ListingBuilder:
        from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

        if remote.is_remote(url):
            # block_size on fs.open, not fsspec.open: there it would go to the filesystem's constructor
            fs, path = remote._fs(url)
            stream = fs.open(path, "rb", block_size=STREAM_BLOCK_SIZE)
        else:
            stream = open(url, "rb")
        stem = _shard_stem(url)
        items = ListingBuilder()
        with stream:
            try:
                tar = tarfile.open(fileobj=stream, mode="r|*")
                compression = getattr(tar.fileobj, "comptype", "tar")
                if compression != "tar":
                    raise ValueError(
                        f"WebDataset shard {url} is {compression}-compressed; range reads need plain .tar shards, "
                        "decompress them first"
                    )
                sample: _Sample | None = None
                for member in tar:
                    tar.members = []  # streaming millions of members: keep no TarInfo around
                    name = member.name
                    if not member.isreg():
                        continue
                    if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
                        continue
                    if _SKIP_META.match(name):
                        continue
                    prefix, suffix = base_plus_ext(name)
                    if prefix is None:
                        continue
                    suffix = suffix.lower()
                    if sample is None or prefix != sample.key:
                        if sample is not None:
                            self._add(items, url, stem, sample)
                        sample = _Sample(prefix)
                    if suffix in sample.fields:
                        raise ValueError(
                            f"sample '{prefix}' in WebDataset shard {url} has two '{suffix}' members; "
                            "each field must appear once per sample"
                        )
                    sample.fields.append(suffix)
                    if sample.image is None and suffix in IMAGE_FIELDS:
                        sample.image = (member.offset_data, member.size)
                    if suffix == self._label_member:
                        extracted = tar.extractfile(member)
                        assert extracted is not None
                        sample.label = extracted.read()
                if sample is not None:
                    self._add(items, url, stem, sample)
            except tarfile.TarError as e:
                raise ValueError(
                    f"WebDataset shard {url} is not a readable tar ({e}); check it was fully written"
                ) from None
        return items

    @property
    def _label_member(self) -> str:
        return "json" if self._label_kind == "json" else self._label_path[0]

    def _add(self, items: ListingBuilder, url: str, stem: str, sample: _Sample) -> None:
        if sample.image is None:
            raise ValueError(
                f"sample '{sample.key}' in WebDataset shard {url} has no image (fields: {', '.join(sample.fields)}); "
                f"expected a {'/'.join(IMAGE_FIELDS)} member"
            )
        offset, size = sample.image
        items.append(make_key(f"{stem}/{sample.key}"), self._label(url, sample) if self.labelled else "", "",
                     f"{url}\t{offset}\t{size}")

    def _label(self, url: str, sample: _Sample) -> str:
        where = f"sample '{sample.key}' in WebDataset shard {url}"
        if sample.label is None:
            raise ValueError(
                f"{where} has no '{self._label_member}' field for label field '{self.label_field}' "
                f"(its fields: {', '.join(sample.fields)}); pick one with --label-field or #label=FIELD"
            )
        try:
            text = sample.label.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{where} has a '{self._label_member}' member that is not UTF-8 text") from None
        if self._label_kind == "json":
            label = self._json_label(where, text, sample)
        else:
            label = text.strip()
        if not label:
            raise ValueError(f"{where} has an empty label in '{self.label_field}'; every sample needs a label")
        return label

    def _json_label(self, where: str, text: str, sample: _Sample) -> str:
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"{where} has a .json member that is not valid JSON") from None
        dotted = ".".join(self._label_path)
        for depth, part in enumerate(self._label_path):
            if not isinstance(value, dict) or part not in value:
                at = ".".join(self._label_path[:depth]) or "the top level"
                keys = ", ".join(sorted(map(str, value))) if isinstance(value, dict) else f"a {type(value).__name__}"
                raise ValueError(
                    f"{where} has no json key '{dotted}' for label field '{self.label_field}' "
                    f"(its fields: {', '.join(sample.fields)}; json keys at {at}: {keys or 'none'})"
                )
            value = value[part]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(
                f"{where} has json key '{dotted}' = {json.dumps(value)[:60]}, a {type(value).__name__}; "
                "labels must be ints or strings"
            )
        return str(value).strip()

    def _parse_ref(self, ref: str) -> tuple[str, int, int]:
        url, _, tail = ref.partition("\t")
        offset, _, size = tail.partition("\t")
        if not url or not offset.isdigit() or not size.isdigit():
            raise ValueError(
                f"ref '{ref}' was not listed by a WebDataset source; read it with the source that listed it"
            )
        return url, int(offset), int(size)


def _open_wds(spec: str, rest: str, **kw: Any) -> WebDatasetSource:
    """A ``#label=FIELD`` suffix picks the label member, so the whole source fits in the one string a worker process
    reopens it from; ``label_field=`` may be passed instead, not both ways at once."""
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


WDS_SCHEME = SourceScheme("wds:<path|url|brace-pattern>[#label=cls|txt|json:KEY|<member>]", _open_wds,
                          unlabelled_pool=True)
