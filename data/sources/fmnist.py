"""Fashion-MNIST from its idx files, the offline stand-in for iNat."""

from __future__ import annotations

import gzip
import io
import os
import struct
from typing import Any

import numpy as np

from data import storage
from data.sources.base import SourceScheme
from data.sources.listing import Listing, ListingBuilder, SourceItem

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
        self._listing: Listing | None = None

    def items(self) -> Listing:
        if self._listing is None:
            labels = self.labels()
            width = max(5, len(str(len(labels))))
            builder = ListingBuilder()
            for index, label in enumerate(labels):
                builder.append(f"fmnist-{self.split}-{index:0{width}d}", str(int(label)), self.split,
                               f"{self.split}:{index}")
            self._listing = builder.build()
        return self._listing

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


def _open_fmnist(spec: str, rest: str, **kw: Any) -> FashionMNISTSource:
    """``fmnist:train``, ``fmnist:test``; the scheme alone is the training split."""
    return FashionMNISTSource(split=rest or "train", **kw)


FMNIST_SCHEME = SourceScheme("fmnist:<train|test>", _open_fmnist, bare=True)
