"""Where raw labelled images come from, before they are packed into shards.

Every dataset the project trains on (a folder tree, a CSV/JSONL manifest,
iNaturalist 2017, Fashion-MNIST) is reduced to the same tiny interface, a
:class:`Source`, so the shard builder never needs to know which one it reads.
A source only lists items and hands back the *encoded* bytes as stored: no
decoding or resizing happens here, so shards keep the original pixels and the
expensive work stays in one place (the builder).

Keys are webdataset keys, hence restricted to ``[A-Za-z0-9_-]``: a dot would
be read as an extension separator and a slash as a directory.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, runtime_checkable

import numpy as np

from data import storage

__all__ = [
    "SourceItem",
    "Source",
    "ImageFolderSource",
    "ManifestSource",
    "INatSource",
    "FashionMNISTSource",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "make_key",
    "read_split_file",
    "resolve_rare_classes",
    "open_source",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

DEFAULT_FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class SourceItem:
    """One labelled image, small enough to list millions of them in memory.

    ``ref`` is opaque to callers: only the source that produced the item knows
    how to turn it into bytes, which is why :meth:`Source.read` takes the item.
    """

    key: str
    label: str
    split: str
    ref: str


@runtime_checkable
class Source(Protocol):
    """What the shard builder needs from a dataset, and nothing more.

    ``name`` is a spec string that :func:`open_source` accepts, so a shard's
    metadata records exactly how to reopen the data it was built from.
    """

    name: str

    def items(self) -> list[SourceItem]: ...

    def read(self, item: SourceItem) -> bytes: ...

    def class_names(self) -> dict[str, str]: ...


# --------------------------------------------------------------------------
# small helpers


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


def _check_unique_keys(items: list[SourceItem], where: str) -> None:
    """Duplicate keys would silently overwrite samples inside a shard."""
    seen: set[str] = set()
    for item in items:
        if item.key in seen:
            raise ValueError(f"duplicate key '{item.key}' in {where}; every image must appear once")
        seen.add(item.key)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------
# image folder


class ImageFolderSource:
    """``root/<class>/<file>`` trees, the layout most ad-hoc datasets ship in.

    Files are found recursively below each class folder (like torchvision's
    ImageFolder) and sorted, so two runs over the same tree produce the same
    item order and therefore byte-identical shards.
    """

    def __init__(self, root: str | os.PathLike[str], split: str = "") -> None:
        self.root = str(root)
        self.split = split
        self.name = f"folder:{self.root}"
        self._items: list[SourceItem] | None = None

    def items(self) -> list[SourceItem]:
        if self._items is None:
            self._items = self._scan()
        return list(self._items)

    def read(self, item: SourceItem) -> bytes:
        return storage.read_bytes(item.ref)

    def class_names(self) -> dict[str, str]:
        return {label: label for label in sorted({item.label for item in self.items()})}

    def _scan(self) -> list[SourceItem]:
        relpaths = self._list_relpaths()
        items = [self._item(rel) for rel in relpaths if "/" in rel]
        if not items:
            raise ValueError(
                f"no images found in image folder {self.root}; expected root/<class>/<file> "
                f"with extensions {'/'.join(sorted(IMAGE_EXTENSIONS))}"
            )
        _check_unique_keys(items, f"image folder {self.root}")
        return items

    def _item(self, rel: str) -> SourceItem:
        label = rel.split("/", 1)[0]
        return SourceItem(
            key=make_key(rel),
            label=label,
            split=self.split,
            ref=posixpath.join(self.root, rel) if storage.is_remote(self.root) else os.path.join(self.root, rel),
        )

    def _list_relpaths(self) -> list[str]:
        """Relative POSIX paths of all image files, sorted for determinism."""
        if storage.is_remote(self.root):
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


# --------------------------------------------------------------------------
# manifest (CSV / JSONL)


class ManifestSource:
    """A list of ``path,label[,split]`` rows, for data whose folders do not
    encode the label (or that mixes splits in one tree).

    ``.csv`` files need a header row; ``.jsonl``/``.json`` files hold one
    object per line. Relative paths are resolved against ``root`` or, by
    default, the manifest's own folder so a manifest can travel with its data.
    """

    def __init__(self, path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> None:
        self.path = str(path)
        self.root = str(root) if root is not None else self._parent(self.path)
        self.name = f"manifest:{self.path}"
        self._items: list[SourceItem] | None = None

    def items(self) -> list[SourceItem]:
        if self._items is None:
            self._items = self._load()
        return list(self._items)

    def read(self, item: SourceItem) -> bytes:
        return storage.read_bytes(item.ref)

    def class_names(self) -> dict[str, str]:
        return {label: label for label in sorted({item.label for item in self.items()})}

    @staticmethod
    def _parent(path: str) -> str:
        return posixpath.dirname(path) if storage.is_remote(path) else os.path.dirname(os.path.abspath(path))

    def _load(self) -> list[SourceItem]:
        rows = self._rows()
        items = [self._item(row) for row in rows]
        if not items:
            raise ValueError(f"manifest {self.path} has no rows; add path,label lines")
        _check_unique_keys(items, f"manifest {self.path}")
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
        for column in ("path", "label"):
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
            for column in ("path", "label"):
                if column not in row:
                    raise ValueError(
                        f"missing column '{column}' on line {lineno} of manifest {self.path}; "
                        "every object needs path and label"
                    )
            rows.append(row)
        return rows

    def _item(self, row: dict[str, Any]) -> SourceItem:
        rel = str(row["path"] or "").strip()
        if not rel or not str(row["label"] or "").strip():
            raise ValueError(f"empty path or label in row {row} of manifest {self.path}; fill both columns")
        split = row.get("split")
        return SourceItem(
            key=make_key(rel),
            label=str(row["label"]).strip(),
            split="" if split is None else str(split).strip(),
            ref=self._resolve(rel),
        )

    def _resolve(self, rel: str) -> str:
        if storage.is_remote(rel) or os.path.isabs(rel):
            return rel
        if storage.is_remote(self.root):
            return posixpath.join(self.root, rel)
        return os.path.join(self.root, rel)


# --------------------------------------------------------------------------
# iNaturalist 2017


class INatSource:
    """iNaturalist 2017 via its COCO-style annotation JSON (``train2017.json``,
    ``val2017.json``), the dataset the Background Splitting paper evaluates on.

    Labels are the category ids as strings because the split files name
    classes by id; images without an annotation (the unlabelled test set) are
    skipped since they cannot be trained or evaluated on.
    """

    def __init__(
        self,
        annotations_json: str | os.PathLike[str],
        image_root: str | os.PathLike[str],
        split: str,
    ) -> None:
        self.annotations_json = str(annotations_json)
        self.image_root = str(image_root)
        self.split = split
        self.name = f"inat:{self.annotations_json}:{self.image_root}:{split}"
        self._items: list[SourceItem] | None = None
        self._names: dict[str, str] | None = None

    def items(self) -> list[SourceItem]:
        if self._items is None:
            self._load()
        assert self._items is not None
        return list(self._items)

    def read(self, item: SourceItem) -> bytes:
        return storage.read_bytes(item.ref)

    def class_names(self) -> dict[str, str]:
        if self._names is None:
            self._load()
        assert self._names is not None
        return dict(self._names)

    def _load(self) -> None:
        if not storage.exists(self.annotations_json):
            raise FileNotFoundError(
                f"iNat annotations not found: {self.annotations_json}; "
                "pass the train2017.json/val2017.json path"
            )
        data = json.loads(storage.read_bytes(self.annotations_json).decode("utf-8"))
        for field in ("images", "annotations", "categories"):
            if field not in data:
                raise ValueError(
                    f"missing key '{field}' in iNat annotations {self.annotations_json}; "
                    "expected COCO-style JSON"
                )
        self._names = {str(cat["id"]): str(cat.get("name", cat["id"])) for cat in data["categories"]}
        labels = self._labels_by_image(data["annotations"])
        items = [self._item(image, labels[image["id"]]) for image in data["images"] if image["id"] in labels]
        if not items:
            raise ValueError(f"no annotated images in iNat annotations {self.annotations_json}; use a train/val JSON")
        _check_unique_keys(items, f"iNat annotations {self.annotations_json}")
        self._items = items

    def _labels_by_image(self, annotations: Iterable[dict[str, Any]]) -> dict[Any, str]:
        """iNat has exactly one species per image; two different ones would
        make the label ambiguous, so refuse rather than pick one."""
        labels: dict[Any, str] = {}
        for ann in annotations:
            label = str(ann["category_id"])
            previous = labels.setdefault(ann["image_id"], label)
            if previous != label:
                raise ValueError(
                    f"image {ann['image_id']} has two categories ({previous}, {label}) in {self.annotations_json}; "
                    "expected one label per image"
                )
        return labels

    def _item(self, image: dict[str, Any], label: str) -> SourceItem:
        file_name = str(image["file_name"])
        if storage.is_remote(self.image_root):
            ref = posixpath.join(self.image_root, file_name)
        else:
            ref = os.path.join(self.image_root, file_name)
        return SourceItem(
            key=make_key(f"inat-{self.split}-{image['id']}"),
            label=label,
            split=self.split,
            ref=ref,
        )


# --------------------------------------------------------------------------
# Fashion-MNIST


_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_FMNIST_PREFIX = {"train": "train", "test": "t10k"}


def _open_idx(path: str) -> bytes:
    raw = storage.read_bytes(path)
    return gzip.decompress(raw) if path.endswith(".gz") else raw


def _parse_idx_images(path: str) -> np.ndarray:
    data = _open_idx(path)
    if len(data) < 16:
        raise ValueError(f"truncated idx image file {path}; re-install or re-download it")
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != _IDX_IMAGES_MAGIC:
        raise ValueError(
            f"bad magic {magic} in idx image file {path} (expected {_IDX_IMAGES_MAGIC}); "
            "is it a labels file?"
        )
    if len(data) != 16 + count * rows * cols:
        raise ValueError(
            f"idx image file {path} has {len(data) - 16} pixel bytes, header says {count}x{rows}x{cols}; "
            "re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def _parse_idx_labels(path: str) -> np.ndarray:
    data = _open_idx(path)
    if len(data) < 8:
        raise ValueError(f"truncated idx label file {path}; re-install or re-download it")
    magic, count = struct.unpack(">II", data[:8])
    if magic != _IDX_LABELS_MAGIC:
        raise ValueError(
            f"bad magic {magic} in idx label file {path} (expected {_IDX_LABELS_MAGIC}); "
            "is it an images file?"
        )
    if len(data) != 8 + count:
        raise ValueError(f"idx label file {path} has {len(data) - 8} labels, header says {count}; re-download it")
    return np.frombuffer(data, dtype=np.uint8, offset=8)


class FashionMNISTSource:
    """Fashion-MNIST from the idx files of the Debian ``dataset-fashion-mnist``
    package (or torchvision's raw download), our offline stand-in for iNat.

    ``invert=True`` stores ``255 - x``: the raw data is a light object on black,
    while an ImageNet-pretrained teacher has seen product photos as a dark
    object on a white background, so inverting gives it familiar inputs.

    Decoded arrays are loaded lazily once and cached on the object, because
    ``read`` is called per item and re-decompressing 26 MB each time would
    dominate shard building.
    """

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike[str] = DEFAULT_FMNIST_ROOT,
        invert: bool = True,
        download: bool = False,
    ) -> None:
        if split not in _FMNIST_PREFIX:
            raise ValueError(f"unknown Fashion-MNIST split '{split}'; use 'train' or 'test'")
        self.split = split
        self.root = str(root)
        self.invert = invert
        self.download = download
        self.name = f"fmnist:{split}"
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    def items(self) -> list[SourceItem]:
        labels = self.labels()
        width = max(5, len(str(len(labels))))
        return [
            SourceItem(
                key=f"fmnist-{self.split}-{index:0{width}d}",
                label=str(int(label)),
                split=self.split,
                ref=f"{self.split}:{index}",
            )
            for index, label in enumerate(labels)
        ]

    def read(self, item: SourceItem) -> bytes:
        from PIL import Image

        pixels = self.pixels(self._index(item.ref))
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")  # 2-D uint8 gives mode "L"
        return buffer.getvalue()

    def class_names(self) -> dict[str, str]:
        return {str(index): name for index, name in enumerate(FASHION_MNIST_CLASSES)}

    def labels(self) -> np.ndarray:
        """All labels as a uint8 array; cheaper than ``items()`` for histograms."""
        self._load()
        assert self._labels is not None
        return self._labels

    def pixels(self, index: int) -> np.ndarray:
        """One 28x28 uint8 image, already inverted if ``invert`` is set."""
        self._load()
        assert self._images is not None
        raw = self._images[index]
        return 255 - raw if self.invert else raw.copy()

    def _index(self, ref: str) -> int:
        split, _, number = ref.partition(":")
        if split != self.split or not number.isdigit():
            raise ValueError(
                f"ref '{ref}' does not belong to Fashion-MNIST split '{self.split}'; "
                "read it with the source that listed it"
            )
        index = int(number)
        if index >= len(self.labels()):
            raise ValueError(
                f"ref '{ref}' is out of range ({len(self.labels())} images); "
                "read it with the source that listed it"
            )
        return index

    def _load(self) -> None:
        if self._images is not None:
            return
        images_path, labels_path = self._find_files()
        images = _parse_idx_images(images_path)
        labels = _parse_idx_labels(labels_path)
        if len(images) != len(labels):
            raise ValueError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
                "re-download them"
            )
        self._images, self._labels = images, labels

    def _find_files(self) -> tuple[str, str]:
        found = self._search()
        if found is None and self.download:
            self._download()
            found = self._search()
        if found is None:
            prefix = _FMNIST_PREFIX[self.split]
            raise FileNotFoundError(
                f"Fashion-MNIST {prefix}-images-idx3-ubyte.gz not found under {self.root}; "
                "run `apt-get install dataset-fashion-mnist` or pass download=True"
            )
        return found

    def _search(self) -> tuple[str, str] | None:
        """Accept both the Debian layout (files in root) and torchvision's
        (root/FashionMNIST/raw), gzipped or not."""
        prefix = _FMNIST_PREFIX[self.split]
        for folder in (self.root, os.path.join(self.root, "FashionMNIST", "raw")):
            for suffix in (".gz", ""):
                images = os.path.join(folder, f"{prefix}-images-idx3-ubyte{suffix}")
                labels = os.path.join(folder, f"{prefix}-labels-idx1-ubyte{suffix}")
                if os.path.isfile(images) and os.path.isfile(labels):
                    return images, labels
        return None

    def _download(self) -> None:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root=self.root, train=self.split == "train", download=True)


# --------------------------------------------------------------------------
# rare-class split files


def read_split_file(path: str | os.PathLike[str]) -> list[str]:
    """Read the class ids that a rare-class experiment uses, in file order.

    The order matters: it defines the model's label indices (1..N, 0 being
    background), so duplicates are an error instead of being silently merged.
    """
    path = str(path)
    if not storage.exists(path):
        raise FileNotFoundError(f"split file not found: {path}; check the path (shipped splits live in data/splits/)")
    ids: list[str] = []
    seen: set[str] = set()
    for line in storage.read_bytes(path).decode("utf-8").splitlines():
        for token in line.split("#", 1)[0].split():
            if token in seen:
                raise ValueError(f"duplicate class id '{token}' in split file {path}; list each class once")
            seen.add(token)
            ids.append(token)
    if not ids:
        raise ValueError(f"split file {path} lists no class ids; add one id per line")
    return ids


def resolve_rare_classes(split_ids: list[str], source_labels: set[str], what: str) -> list[str]:
    """Check a split against the labels a source actually has.

    A split from one dataset applied to another would otherwise train on
    classes with zero positives and report meaningless metrics.
    """
    labels = set(source_labels)
    seen: set[str] = set()
    for class_id in split_ids:
        if class_id not in labels:
            raise ValueError(
                f"unknown class id '{class_id}' in {what}: not among the {len(labels)} classes of the source; "
                "check the split file matches the dataset"
            )
        if class_id in seen:
            raise ValueError(f"duplicate class id '{class_id}' in {what}; list each class once")
        seen.add(class_id)
    return list(split_ids)


# --------------------------------------------------------------------------
# factory


_SCHEMES = (
    "fmnist:<train|test>",
    "folder:<root>",
    "manifest:<file.csv|file.jsonl>",
    "inat:<ann.json>:<image_root>:<split>",
)


def open_source(spec: str, **kw: Any) -> Source:
    """Build a source from a one-string spec, so configs and shard metadata can
    name a dataset without code.

    Specs: ``fmnist:train``, ``fmnist:test``, ``folder:/path``,
    ``manifest:/path.csv`` (or ``.jsonl``), ``inat:/ann.json:/image_root:split``.
    For ``inat`` the annotation path must end in ``.json`` (that is where the
    spec is cut, so URLs with ``://`` still work). Extra keyword arguments go
    to the source's constructor (e.g. ``root=`` for fmnist, ``split=`` for folder).
    """
    scheme, sep, rest = spec.partition(":")
    if scheme == "fmnist":
        return FashionMNISTSource(split=rest or "train", **kw)
    if scheme == "folder" and rest:
        return ImageFolderSource(rest, **kw)
    if scheme == "manifest" and rest:
        return ManifestSource(rest, **kw)
    if scheme == "inat" and rest:
        return _open_inat(spec, rest, **kw)
    raise ValueError(f"bad source spec '{spec}'; valid forms: {', '.join(_SCHEMES)}")


def _open_inat(spec: str, rest: str, **kw: Any) -> INatSource:
    annotations, sep, tail = rest.partition(".json:")
    image_root, _, split = tail.rpartition(":")
    if not sep or not image_root or not split:
        raise ValueError(f"bad inat spec '{spec}'; use inat:<ann.json>:<image_root>:<split>")
    return INatSource(annotations + ".json", image_root, split, **kw)
