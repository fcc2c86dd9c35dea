"""iNaturalist 2017 from its COCO-style annotation JSON."""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any, Iterable

from data import remote, storage
from data.sources.base import SourceScheme, make_key
from data.sources.listing import Listing, SourceItem


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
        self._items: Listing | None = None
        self._names: dict[str, str] | None = None

    def items(self) -> Listing:
        if self._items is None:
            self._load()
        assert self._items is not None
        return self._items

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
        items = Listing.from_items(self._item(image, labels[image["id"]]) for image in data["images"]
                                   if image["id"] in labels)
        if not items:
            raise ValueError(f"no annotated images in iNat annotations {self.annotations_json}; use a train/val JSON")
        items.check_unique_keys(f"iNat annotations {self.annotations_json}")
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
        if remote.is_remote(self.image_root):
            ref = posixpath.join(self.image_root, file_name)
        else:
            ref = os.path.join(self.image_root, file_name)
        return SourceItem(
            key=make_key(f"inat-{self.split}-{image['id']}"),
            label=label,
            split=self.split,
            ref=ref,
        )


def _open_inat(spec: str, rest: str, **kw: Any) -> INatSource:
    """The annotation path must end in ``.json``: that is where the spec is cut, so URLs with ``://`` still work."""
    annotations, sep, tail = rest.partition(".json:")
    image_root, _, split = tail.rpartition(":")
    if not sep or not image_root or not split:
        raise ValueError(f"bad inat spec '{spec}'; use {INAT_SCHEME.form}")
    return INatSource(annotations + ".json", image_root, split, **kw)


INAT_SCHEME = SourceScheme("inat:<ann.json>:<image_root>:<split>", _open_inat)
