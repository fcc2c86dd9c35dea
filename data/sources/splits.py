"""Rare-class split files and their check against a source's labels."""

from __future__ import annotations

import os

from data import storage


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
