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


def resolve_rare_classes(split_ids: list[str], source_labels: set[str], what: str,
                         names: dict[str, str] | None = None) -> list[str]:
    """Check a split against the labels a source actually has; a class may also be given by its name (a
    numbered source's ``class_names()``: Fashion-MNIST's "Dress" for "3"), and comes back as the label.

    A split from one dataset applied to another would otherwise train on
    classes with zero positives and report meaningless metrics.
    """
    labels = set(source_labels)
    names = {label: str(n) for label, n in (names or {}).items() if label in labels and str(n) != label}
    by_name = {n.lower(): label for label, n in names.items()}
    out: list[str] = []
    for class_id in split_ids:
        label = class_id if class_id in labels else by_name.get(class_id.lower())
        if label is None:
            raise ValueError(unknown_class(class_id, labels, names, what))
        if label in out:
            raise ValueError(f"duplicate class id '{class_id}' in {what}; list each class once")
        out.append(label)
    return out


def unknown_class(class_id: str, labels: set[str], names: dict[str, str], what: str) -> str:
    """The one-line error for a class the source lacks: the valid ids (and names) and the closest one."""
    import difflib

    ordered = sorted(labels, key=lambda x: (len(x), x))
    near = difflib.get_close_matches(class_id, [*ordered, *names.values()], n=1, cutoff=0.6)
    shown = ", ".join(f"{label} ({names[label]})" if label in names else label for label in ordered[:30])
    more = f", ... ({len(ordered) - 30} more)" if len(ordered) > 30 else ""
    fix = ("check the split file matches the dataset" if what.endswith(".txt") or "split" in what
           else "give ids or names from that list")
    return (f"unknown class id '{class_id}' in {what}: {f'did you mean {near[0]!r}? ' if near else ''}not among the "
            f"{len(labels)} classes of the source ({shown}{more}); {fix}")
