"""CSV / JSONL manifests of ``path,label[,split]`` rows."""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from typing import Any

from data import remote, storage
from data.sources.base import ListedOnce, SourceScheme, make_key, pool_key
from data.sources.listing import Listing, SourceItem


class ManifestSource(ListedOnce):
    """A list of ``path,label[,split]`` rows, for data whose folders do not
    encode the label (or that mixes splits in one tree).

    ``.csv`` files need a header row; ``.jsonl``/``.json`` files hold one
    object per line. Relative paths are resolved against ``root`` or, by
    default, the manifest's own folder so a manifest can travel with its data.
    """

    def __init__(self, path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None,
                 labelled: bool = True) -> None:
        """``labelled=False`` (spec suffix ``#unlabelled``): a pool to mine; the label column may be absent and
        keys hold file names only (``pool_key``), so folder names in the paths stay off the review page."""
        self.path = str(path)
        self.root = str(root) if root is not None else self._parent(self.path)
        self.labelled = labelled
        self.name = f"manifest:{self.path}" + ("" if labelled else "#unlabelled")

    def read(self, item: SourceItem) -> bytes:
        return storage.read_bytes(item.ref)

    @staticmethod
    def _parent(path: str) -> str:
        return posixpath.dirname(path) if remote.is_remote(path) else os.path.dirname(os.path.abspath(path))

    def _listing(self) -> Listing:
        items = Listing.from_items(self._item(row) for row in self._rows())
        if not items:
            raise ValueError(f"manifest {self.path} has no rows; add path,label lines")
        items.check_unique_keys(f"manifest {self.path}")
        return items

    def _rows(self) -> list[dict[str, Any]]:
        if not storage.exists(self.path):
            raise FileNotFoundError(f"manifest not found: {self.path}; check the path")
        text = storage.read_bytes(self.path).decode("utf-8-sig")
        suffix = posixpath.splitext(self.path.lower())[1]
        if suffix == ".csv":
            return self._csv_rows(text)
        if suffix in (".jsonl", ".json"):
            return self._jsonl_rows(text)
        raise ValueError(f"manifest {self.path} has unknown extension '{suffix}'; use .csv or .jsonl")

    def _csv_rows(self, text: str) -> list[dict[str, Any]]:
        reader = csv.DictReader(io.StringIO(text))
        header = [name.strip() for name in (reader.fieldnames or [])]
        for column in self._columns:
            if column not in header:
                raise ValueError(
                    f"missing column '{column}' in manifest {self.path}; "
                    "the header needs path,label[,split]"
                )
        reader.fieldnames = header
        return [row for row in reader if any((value or "").strip() for value in row.values())]

    def _jsonl_rows(self, text: str) -> list[dict[str, Any]]:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(
                    f"invalid JSON on line {lineno} of manifest {self.path}; "
                    "write one object per line"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"line {lineno} of manifest {self.path} is not a JSON object; "
                    f"write {{\"path\": ..., \"label\": ...}}"
                )
            for column in self._columns:
                if column not in row:
                    raise ValueError(
                        f"missing column '{column}' on line {lineno} of manifest {self.path}; "
                        "every object needs path and label"
                    )
            rows.append(row)
        return rows

    @property
    def _columns(self) -> tuple[str, ...]:
        return ("path", "label") if self.labelled else ("path",)

    def _item(self, row: dict[str, Any]) -> SourceItem:
        rel = str(row["path"] or "").strip()
        label = str(row.get("label") or "").strip() if self.labelled else ""
        if not rel or (self.labelled and not label):
            raise ValueError(f"empty path or label in row {row} of manifest {self.path}; fill both columns")
        split = row.get("split")
        return SourceItem(
            key=make_key(rel) if self.labelled else pool_key(rel),
            label=label,
            split="" if split is None else str(split).strip(),
            ref=self._resolve(rel),
        )

    def _resolve(self, rel: str) -> str:
        if remote.is_remote(rel) or os.path.isabs(rel):
            return rel
        if remote.is_remote(self.root):
            return posixpath.join(self.root, rel)
        return os.path.join(self.root, rel)


MANIFEST_SCHEME = SourceScheme("manifest:<file.csv|file.jsonl>", lambda spec, rest, **kw: ManifestSource(rest, **kw),
                               unlabelled_pool=True)
