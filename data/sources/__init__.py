"""Where raw labelled images come from, before they are packed into shards.

One module per source (see :mod:`data.sources.base` for the interface they
share); this package re-exports the names the rest of the project imports, so
callers keep writing ``from data.sources import ...``.
"""

from data.sources.base import IMAGE_EXTENSIONS, Source, make_key
from data.sources.fmnist import FASHION_MNIST_CLASSES, FashionMNISTSource
from data.sources.folder import ImageFolderSource
from data.sources.inat import INatSource
from data.sources.listing import LabelCodes, Listing, ListingBuilder, SourceItem, index_dtype, positions
from data.sources.manifest import ManifestSource
from data.sources.open import SOURCES, open_source
from data.sources.splits import read_split_file, resolve_rare_classes
from data.sources.wds import WebDatasetSource

__all__ = [
    "SourceItem",
    "Listing",
    "ListingBuilder",
    "LabelCodes",
    "index_dtype",
    "positions",
    "Source",
    "ImageFolderSource",
    "ManifestSource",
    "INatSource",
    "FashionMNISTSource",
    "WebDatasetSource",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "make_key",
    "read_split_file",
    "resolve_rare_classes",
    "open_source",
    "SOURCES",
]
