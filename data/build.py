"""`bgsplit shards build`: a source plus a rare-class choice in, a -BG shard set (and optionally a carved-out
validation set) out.

Re-running with the same arguments is a no-op when the manifest already records them, so the demo and CI can
call it unconditionally; after a crash it resumes, rewriting only the shards without a completion record for
this spec (see data.ingest, which also runs the shard writers in parallel).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from data import storage
from data.bg_construction import (BGSelection, few_validation_positives, main_labels_for,
                                  positives_for_background_fraction, select_bg, stratified_holdout)
from data.ingest import (Resize, ShardItems, ShardResult, ShardTask, estimate_sample_bytes, finished, plan_shards,
                         run_tasks, samples_per_shard, spec_hash)
from data.progress import progress as progress_bar
from data.settings import flag
from data.shards import (FORMAT, RECORD_READS_IN_FLIGHT, Manifest, ShardInfo, invalidate, manifest_url, read_manifest,
                         record_name, write_manifest)
from data.sources import SOURCES, Listing, Source, index_dtype, open_source, read_split_file, resolve_rare_classes

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
    """Images carved out of the source as a validation set, stratified (data.bg_construction.holdout_shares): each
    rare class gives its share of the source's class mix (at least 1), the background the rest. The carve-out
    depends on (holdout, holdout_positives_per_class, seed) only, so parts built with the same three are disjoint;
    a "rest" part whose class would be left fewer than ``positives_per_class`` is an error."""
    part: str = "all"
    subsample: int | None = None
    max_count: int = 10000
    max_bytes: int = 512 << 20
    resize_short_side: int | None = None
    """Re-encode images whose short side is longer to JPEG at this short side; None stores every image as is."""
    jpeg_quality: int = 90
    holdout_positives_per_class: int | None = None
    """With a holdout: take exactly this many images of every rare class instead of the class's share."""
    positives_seed: int | None = None
    """Seed of the draw of positives alone (None: ``seed``): another draw of a few positives beside the same
    background, carve-out and test set, so a comparison's interval covers which positives a user happened to have."""


def spec_doc(spec: BuildSpec) -> dict[str, Any]:
    """The spec as its manifest stores it; a field added later is left out at its default, so the sets built
    before it keep their identity (and the study results stored for them)."""
    doc = asdict(spec)
    if doc["positives_seed"] is None:
        del doc["positives_seed"]
    return doc


PREFIX = "shard"
SKIPPED_KEYS_IN_MANIFEST = 1000
"""Bad-image keys listed in the manifest (all of them are in the shards' completion records)."""


def rare_classes_from(split_file: str | None, rare: str | None, source: Source) -> list[str]:
    if bool(split_file) == bool(rare):
        raise ValueError("give the rare classes with exactly one of --split-file or --rare (comma separated ids or "
                         "names)")
    ids = read_split_file(split_file) if split_file else [r.strip() for r in rare.split(",") if r.strip()]
    labels = set(source.items().labels.names)
    return resolve_rare_classes(ids, labels, split_file or "--rare", source.class_names())


def _up_to_date(out: str, spec: BuildSpec) -> Manifest | None:
    url = manifest_url(out)
    if not storage.exists(url) or json.loads(storage.read_bytes(url)).get("format") != FORMAT:
        return None  # none, or one of an older format: rebuild
    manifest = read_manifest(out)
    return manifest if manifest.meta.get("build") == json.loads(json.dumps(spec_doc(spec))) else None


def _check(spec: BuildSpec) -> None:
    if spec.resize_short_side is not None and spec.resize_short_side < 1:
        raise ValueError(f"--resize-short-side must be a positive number of pixels, got {spec.resize_short_side}")
    if not 1 <= spec.jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be within 1..100, got {spec.jpeg_quality}")
    if spec.max_count < 1 or spec.max_bytes < 1:
        raise ValueError(f"--max-count and --max-mb must be positive, got {spec.max_count} and {spec.max_bytes} B")


def _select(items: Listing, spec: BuildSpec) -> BGSelection:
    pool = np.arange(len(items), dtype=index_dtype(len(items)))
    if spec.holdout:
        rest, held = stratified_holdout(items.labels, list(spec.rare), spec.holdout, spec.seed,
                                        per_class=spec.holdout_positives_per_class,
                                        positives_per_class=spec.positives_per_class)
        pool = held if spec.part == "holdout" else rest
    if spec.subsample is not None and spec.subsample < len(pool):
        # a uniform subset keeps the source's class proportions (and so its background fraction)
        pool = np.sort(np.random.default_rng([spec.seed, 31]).choice(pool, spec.subsample, replace=False))
    sel = select_bg(items.labels.take(pool), list(spec.rare), positives_per_class=spec.positives_per_class,
                    background_fraction=spec.background_fraction, max_background=spec.max_background,
                    seed=spec.seed, positives_seed=spec.positives_seed)
    if spec.holdout and spec.part != "holdout":
        _warn_short(sel, spec)
    return BGSelection(indices=pool[sel.indices], main_labels=sel.main_labels, rare_classes=sel.rare_classes)


def _warn_short(sel: BGSelection, spec: BuildSpec) -> None:
    """Say exactly how many positives a training set beside a holdout got where it is short of its cap."""
    cap = spec.positives_per_class
    if spec.background_fraction is not None:
        cap = positives_for_background_fraction(sel.counts[0], len(spec.rare), spec.background_fraction)
    for k, name in enumerate(spec.rare, start=1):
        if cap is not None and sel.counts[k] < cap:
            log.warning("rare class '%s': %d training positives, fewer than the %d asked for (the holdout and "
                        "subsample left no more)", name, sel.counts[k], cap)


class _Bar:
    """Progress over images (a bar on a terminal, a line every ~10 s in a log: data.progress), with the source's
    MB/s read (what an object store or disk is asked for)."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.read, self.start = 0, time.monotonic()
        self.bar = progress_bar(total, initial=initial, unit="img", desc=desc, enabled=enabled)

    def __call__(self, images: int, read_bytes: int) -> None:
        self.read += read_bytes
        mb_s = self.read / (1 << 20) / max(time.monotonic() - self.start, 1e-6)
        self.bar.set_postfix_str(f"{mb_s:.1f} MB/s read", refresh=False)
        self.bar.update(images)

    def close(self) -> None:
        self.bar.close()


def _warn_skipped(result: ShardResult) -> None:
    for key, reason in result.skipped:
        log.warning("skipping source image %s (shard %s): undecodable (%s)", key, result.name, reason)


def _remove_leftovers(out: str, tasks: list[ShardTask]) -> None:
    """Shards of an earlier, larger plan and temporary files of a killed run: never in the new manifest."""
    planned = {t.name for t in tasks} | {record_name(t.name) for t in tasks}
    ours = re.compile(rf"^{re.escape(PREFIX)}-(positive|background)-\d{{6}}\.(tar|json)$")
    for name in storage.listdir(out):
        if (ours.match(name) and name not in planned) or (name.startswith(".") and name.endswith(".partial")):
            storage.remove(storage.join(out, name))


Runner = Callable[..., list[ShardResult]]
"""Writes planned shards: ``runner(tasks, source, progress=..., done=...)``; data.ingest.run_tasks (a local
process pool) by default, cluster.passes.ray_runner on a Ray cluster."""


def build_set(source: Source, spec: BuildSpec, out: str, *, progress: bool = True, workers: int = 0,
              runner: Runner | None = None) -> Manifest:
    """Write one -BG set for ``spec`` (``part`` picks the holdout or the rest of the source).

    ``workers`` > 1 writes shards in that many processes, each reopening the source from ``spec.source`` (so
    ``source`` must be what that spec opens); otherwise everything runs here, with ``source`` as given."""
    existing = _up_to_date(out, spec)
    if existing is not None:
        log.info("%s is up to date (%d images); skipping", out, existing.count)
        return existing
    _check(spec)
    if (workers > 1 or runner is not None) and source.name != spec.source:
        raise ValueError(f"source {source.name!r} is not the spec's {spec.source!r}: worker processes reopen the "
                         "source from the spec; pass the matching source or workers=0")
    start = time.time()
    items = source.items()
    sel = _select(items, spec)
    chosen = ShardItems(items, sel.indices, sel.main_labels)  # indices into the one listing, not copies
    summary = sel.describe()
    del sel
    if not len(chosen):
        raise ValueError(f"no samples to write to {out}: the selection is empty")
    print(f"{out}: {summary}", flush=True)
    resize = Resize(spec.resize_short_side, spec.jpeg_quality)
    per_shard = samples_per_shard(estimate_sample_bytes(source, chosen, resize), spec.max_count, spec.max_bytes)
    tasks = plan_shards(chosen, per_shard=per_shard, root=out, source=spec.source, prefix=PREFIX,
                        num_classes=len(spec.rare) + 1, spec_hash=spec_hash(spec_doc(spec)), resize=resize,
                        seed=spec.seed)
    del chosen  # the tasks hold their own index arrays
    invalidate(out)
    present = set(storage.listdir(out))
    done = storage.in_flight(lambda t: finished(t, present), tasks, RECORD_READS_IN_FLIGHT)
    results = {t.name: r for t, r in done if r is not None}
    todo = [t for t in tasks if t.name not in results]
    bar = _Bar(progress, sum(len(t.items) for t in tasks), sum(len(t.items) for t in tasks if t.name in results),
               "shards build")
    try:
        run = runner or functools.partial(run_tasks, workers=workers)
        for r in run(todo, source, progress=bar, done=_warn_skipped):
            results[r.name] = r
    finally:
        bar.close()
    names = source.class_names()
    class_names = ["background"] + [names.get(r, r) for r in spec.rare]
    manifest = _manifest(out, spec, class_names, tasks, results, start, per_shard)
    _remove_leftovers(out, tasks)
    write_manifest(manifest)
    bad = manifest.meta["skipped"]["bad_images"]
    print(f"{out}: {manifest.count} images in {len(manifest.shards)} shards ({len(tasks) - len(todo)} kept from "
          f"an earlier run), {bad} undecodable source images skipped, {time.time() - start:.1f}s", flush=True)
    return manifest


def _manifest(out: str, spec: BuildSpec, class_names: list[str], tasks: list[ShardTask],
              results: dict[str, ShardResult], start: float, per_shard: int) -> Manifest:
    counts = [0] * (len(spec.rare) + 1)
    shards, skipped = [], []
    for task in tasks:  # plan order: positives, then background, each by index
        r = results[task.name]
        counts = [a + b for a, b in zip(counts, r.counts)]
        skipped += [key for key, _ in r.skipped]
        if r.count:  # a shard whose images were all undecodable stays out
            shards.append(ShardInfo(url=task.name, kind=task.kind, count=r.count, bytes=r.bytes))
    if not shards:
        raise ValueError(f"no decodable image among the {sum(len(t.items) for t in tasks)} selected from "
                         f"{spec.source}: check the source files")
    meta: dict[str, Any] = {"build": spec_doc(spec), "build_seconds": round(time.time() - start, 3),
                            "samples_per_shard": per_shard,
                            "skipped": {"bad_images": len(skipped), "keys": skipped[:SKIPPED_KEYS_IN_MANIFEST]}}
    return Manifest(root=out, rare_classes=list(spec.rare), class_names=class_names, shards=shards, counts=counts,
                    meta=meta)


@dataclass(frozen=True)
class BuildRequest:
    """What `bgsplit shards build` is asked for. Each field is one command-line flag (``--`` + the name with dashes;
    data.settings.add_flags makes it from the field's type, default and metadata; no default: required), so a flag
    is defined once and reaches the build by name. ``specs`` turns it into the BuildSpec of each set it writes."""

    source: str = field(metadata=flag(
        " | ".join(s.form for s in SOURCES.values()) + " (wds: existing WebDataset shards); paths local or s3://"))
    out: str = field(metadata=flag("output folder or fsspec URL"))
    label_field: str | None = field(default=None, metadata=flag(
        "wds: sources: the member holding the label: cls (default), txt, json:KEY (dotted path allowed) or another "
        "member name"))
    split_file: str | None = field(default=None, metadata=flag(
        "rare class ids, one per line (data/splits/*.txt for iNat-BG)"))
    rare: str | None = field(default=None, metadata=flag(
        "rare classes, comma separated (instead of --split-file): names for named sources (folder names, manifest "
        "labels, iNat names: Dress,Sandal) or ids for numbered ones (Fashion-MNIST: 3,5,6)"))
    positives_per_class: int | None = field(default=None, metadata=flag(
        "cap positives per rare class (training sets)"))
    background_fraction: float | None = field(default=None, metadata=flag(
        "or: cap positives to reach this background fraction"))
    max_background: int | None = field(default=None, metadata=flag(
        "random subset of the background (debugging sizes)"))
    seed: int = field(default=0, metadata=flag("seed of every random choice of the build"))
    holdout: int = field(default=0, metadata=flag(
        "carve this many source images out as a validation set, stratified: each rare class gives its share of the "
        "source's mix (at least 1; an error, naming the fix, if fewer than --positives-per-class are left to train "
        "on), the background the rest"))
    holdout_positives_per_class: int | None = field(default=None, metadata=flag(
        "with --holdout: take exactly this many images of every rare class instead of its share (a steadier "
        "validation AP where a class's share of a huge source is 1)"))
    holdout_out: str | None = field(default=None, metadata=flag("where to write the validation set"))
    subsample: int | None = field(default=None, metadata=flag(
        "uniform random subset of the source (keeps class proportions)"))
    max_count: int = field(default=10000, metadata=flag("samples per shard at most"))
    max_mb: float = field(default=512.0, metadata=flag(
        "target shard size in MB (samples per shard estimated from a probe of the images)"))
    resize_short_side: int | None = field(default=None, metadata=flag(
        "re-encode images whose short side is longer to JPEG at this size (never upscales)"))
    jpeg_quality: int = field(default=90, metadata=flag("JPEG quality of re-encoded images"))
    workers: int = field(default=0, metadata=flag(
        "shard-writing processes (default min(8, CPUs); 0 or 1: in this process); --workers is the old name",
        flags=("--writers", "--workers"), default=min(8, os.cpu_count() or 1)))

    def source_spec(self) -> str:
        """The source as the shard writers reopen it: a wds: label field is part of it."""
        if not self.label_field:
            return self.source
        if not self.source.startswith("wds:"):
            raise ValueError(f"--label-field applies to wds: sources (WebDataset shards), not to {self.source!r}")
        return f"{self.source}#label={self.label_field}"

    def specs(self, rare_ids: tuple[str, ...]) -> dict[str, tuple[BuildSpec, str]]:
        """The set(s) to write: the main one ("rest" of a carve-out, or all), and the carved-out validation set."""
        if self.holdout and not self.holdout_out:
            raise ValueError("--holdout needs --holdout-out (where to write the validation set)")
        if self.holdout_positives_per_class is not None and not self.holdout:
            raise ValueError("--holdout-positives-per-class needs --holdout (the validation set's size)")
        shape = dict(max_count=self.max_count, max_bytes=int(self.max_mb * (1 << 20)),
                     resize_short_side=self.resize_short_side, jpeg_quality=self.jpeg_quality,
                     holdout_positives_per_class=self.holdout_positives_per_class)
        source = self.source_spec()
        out = {"main": (BuildSpec(source, rare_ids, self.positives_per_class, self.background_fraction,
                                  self.max_background, self.seed, self.holdout, "rest", self.subsample, **shape),
                        self.out)}
        if self.holdout:
            out["holdout"] = (BuildSpec(source, rare_ids, seed=self.seed, holdout=self.holdout, part="holdout",
                                        **shape), self.holdout_out)
        return out


def build_command(request: BuildRequest, *, runner: Runner | None = None,
                  progress: bool = True) -> dict[str, Manifest]:
    """The CLI's entry: the training (or evaluation) set, plus the carved-out validation set if asked."""
    source = open_source(request.source_spec())
    rare_ids = tuple(rare_classes_from(request.split_file, request.rare, source))
    built = {name: build_set(source, spec, out, progress=progress, workers=request.workers, runner=runner)
             for name, (spec, out) in request.specs(rare_ids).items()}
    if "holdout" in built:
        _warn_few_validation(built["holdout"], source, rare_ids, request.positives_per_class)
    return built


def _warn_few_validation(val: Manifest, source: Source, rare: tuple[str, ...], positives_per_class: int | None
                         ) -> None:
    """A carve-out that leaves some class only a few validation images builds fine and then picks methods by
    noise: say so after the build, with the flag value that holds more."""
    sizes = np.bincount(main_labels_for(source.items().labels, list(rare)), minlength=len(rare) + 1)
    for k, name in enumerate(val.class_names[1:], start=1):
        line = few_validation_positives(name, val.counts[k], int(sizes[k]), positives_per_class)
        if line is not None:
            log.warning("%s: %s", val.root, line)
