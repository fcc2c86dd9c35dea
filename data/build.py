"""`bgsplit shards build`: a source plus a rare-class choice in, a -BG shard set (and optionally a carved-out
validation set) out.

Re-running with the same arguments is a no-op when the manifest already records them, so the demo and CI can
call it unconditionally.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from data import storage
from data.bg_construction import BGSelection, select_bg, split_holdout
from data.shards import Manifest, manifest_url, read_manifest, write_shard_set
from data.sources import Source, SourceItem, open_source, read_split_file, resolve_rare_classes

log = logging.getLogger("bgsplit.data")


@dataclass(frozen=True)
class BuildSpec:
    """Everything that determines a built set; stored in its manifest to make rebuilds idempotent."""

    source: str
    rare: tuple[str, ...]
    positives_per_class: int | None = None
    background_fraction: float | None = None
    max_background: int | None = None
    seed: int = 0
    holdout: int = 0
    part: str = "all"
    subsample: int | None = None
    max_count: int = 10000
    max_bytes: int = 512 << 20


def rare_classes_from(split_file: str | None, rare: str | None, source: Source) -> list[str]:
    if bool(split_file) == bool(rare):
        raise ValueError("give the rare classes with exactly one of --split-file or --rare (comma separated ids)")
    ids = read_split_file(split_file) if split_file else [r.strip() for r in rare.split(",") if r.strip()]
    labels = {item.label for item in source.items()}
    return resolve_rare_classes(ids, labels, split_file or "--rare")


def _samples(source: Source, items: list[SourceItem], selection: BGSelection) -> Iterator:
    for index, label in zip(selection.indices, selection.main_labels):
        item = items[int(index)]
        yield item.key, source.read(item), int(label), item.label


def _up_to_date(out: str, spec: BuildSpec) -> Manifest | None:
    if not storage.exists(manifest_url(out)):
        return None
    manifest = read_manifest(out)
    return manifest if manifest.meta.get("build") == json.loads(json.dumps(asdict(spec))) else None


def build_set(source: Source, spec: BuildSpec, out: str, *, progress: bool = True) -> Manifest:
    """Write one -BG set for ``spec`` (``part`` picks the holdout or the rest of the source)."""
    existing = _up_to_date(out, spec)
    if existing is not None:
        log.info("%s is up to date (%d images); skipping", out, existing.count)
        return existing
    items = source.items()
    pool = np.arange(len(items))
    if spec.holdout:
        rest, held = split_holdout(len(items), spec.holdout, spec.seed)
        pool = held if spec.part == "holdout" else rest
    if spec.subsample is not None and spec.subsample < len(pool):
        # a uniform subset keeps the source's class proportions (and so its background fraction)
        pool = np.sort(np.random.default_rng([spec.seed, 31]).choice(pool, spec.subsample, replace=False))
    labels = [items[i].label for i in pool]
    sel = select_bg(labels, list(spec.rare), positives_per_class=spec.positives_per_class,
                    background_fraction=spec.background_fraction, max_background=spec.max_background,
                    seed=spec.seed)
    sel = BGSelection(indices=pool[sel.indices], main_labels=sel.main_labels, rare_classes=sel.rare_classes)
    names = source.class_names()
    class_names = ["background"] + [names.get(r, r) for r in spec.rare]
    print(f"{out}: {sel.describe()}", flush=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sel.indices), unit="img", desc="shards", leave=False)
    manifest = write_shard_set(out, _samples(source, items, sel), rare_classes=list(spec.rare),
                               class_names=class_names, max_count=spec.max_count, max_bytes=spec.max_bytes,
                               meta={"build": asdict(spec)}, progress=bar.update if bar else None)
    if bar:
        bar.close()
    return manifest


def build_command(source_spec: str, out: str, *, split_file: str | None = None, rare: str | None = None,
                  positives_per_class: int | None = None, background_fraction: float | None = None,
                  max_background: int | None = None, subsample: int | None = None, seed: int = 0, holdout: int = 0,
                  holdout_out: str | None = None, max_count: int = 10000,
                  max_bytes: int = 512 << 20) -> dict[str, Manifest]:
    """The CLI's entry: the training (or evaluation) set, plus the carved-out validation set if asked."""
    source = open_source(source_spec)
    rare_ids = tuple(rare_classes_from(split_file, rare, source))
    if holdout and not holdout_out:
        raise ValueError("--holdout needs --holdout-out (where to write the validation set)")
    spec = BuildSpec(source_spec, rare_ids, positives_per_class, background_fraction, max_background, seed,
                     holdout, "rest", subsample, max_count, max_bytes)
    built = {"main": build_set(source, spec, out)}
    if holdout:
        val_spec = BuildSpec(source_spec, rare_ids, seed=seed, holdout=holdout, part="holdout", max_count=max_count,
                             max_bytes=max_bytes)
        built["holdout"] = build_set(source, val_spec, holdout_out)
    return built
