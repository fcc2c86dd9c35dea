"""Image folder trees (``root/<class>/<file>``), local or on an object store."""

from __future__ import annotations

import os
import posixpath

from data import remote, storage
from data.sources.base import IMAGE_EXTENSIONS, ListedOnce, SourceScheme, _is_image_name, make_key, pool_key
from data.sources.listing import Listing, SourceItem


class ImageFolderSource(ListedOnce):
    """``root/<class>/<file>`` trees, the layout most ad-hoc datasets ship in.

    Files are found recursively below each class folder (like torchvision's
    ImageFolder) and sorted, so two runs over the same tree produce the same
    item order and therefore byte-identical shards.
    """

    def __init__(self, root: str | os.PathLike[str], split: str = "", labelled: bool = True) -> None:
        """``labelled=False`` (spec suffix ``#unlabelled``): a pool to mine. Images at the root count too (a flat
        folder is the usual pool), folder names are neither labels nor part of keys (``pool_key``)."""
        self.root = str(root)
        self.split = split
        self.labelled = labelled
        self.name = f"folder:{self.root}" + ("" if labelled else "#unlabelled")

    def read(self, item: SourceItem) -> bytes:
        return storage.read_bytes(item.ref)

    def _listing(self) -> Listing:
        relpaths = self._list_relpaths()
        items = Listing.from_items(self._item(rel) for rel in relpaths if "/" in rel or not self.labelled)
        if not items:
            layout = "root/<class>/<file>" if self.labelled else "images anywhere under the root"
            flat = (f" ({len(relpaths)} image(s) lie directly in the root: as a pool to mine, a flat folder is "
                    "fine)") if relpaths else ""
            raise ValueError(f"no images found in image folder {self.root}; expected {layout} with extensions "
                             f"{'/'.join(sorted(IMAGE_EXTENSIONS))}{flat}")
        items.check_unique_keys(f"image folder {self.root}")
        return items

    def _item(self, rel: str) -> SourceItem:
        return SourceItem(
            key=make_key(rel) if self.labelled else pool_key(rel),
            label=rel.split("/", 1)[0] if self.labelled else "",
            split=self.split,
            ref=posixpath.join(self.root, rel) if remote.is_remote(self.root) else os.path.join(self.root, rel),
        )

    def _list_relpaths(self) -> list[str]:
        """Relative POSIX paths of all image files, sorted for determinism."""
        if remote.is_remote(self.root):
            return self._list_remote()
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder root not found: {self.root}; pass an existing directory")
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if _is_image_name(name):
                    rel = os.path.relpath(os.path.join(dirpath, name), self.root)
                    found.append(rel.replace(os.sep, "/"))
        return sorted(found)

    def _list_remote(self) -> list[str]:
        import fsspec

        fs, base = fsspec.core.url_to_fs(self.root)
        if not fs.isdir(base):
            raise FileNotFoundError(f"image folder root not found: {self.root}; pass an existing directory")
        base = base.rstrip("/")
        return sorted(
            path[len(base) + 1 :]
            for path in fs.find(base)
            if _is_image_name(posixpath.basename(path))
        )


FOLDER_SCHEME = SourceScheme("folder:<root>", lambda spec, rest, **kw: ImageFolderSource(rest, **kw),
                             unlabelled_pool=True)
