"""Cached prefix views: the frozen prefix's activations of V augmented views of each training image, computed once.

With model.frozen_stages=N the stem and first N stages never change in a run, so their output on a given crop of a
given image is a fixed tensor. A study on a CPU trains tens of runs over one set at the teacher's resolution;
computing that prefix (and the teacher's targets, which depend only on the crop) once per view, and training the
upper stages and heads on the stored activations, one view per image per epoch, removes most of each step's cost.
View v of an image is the crop the online loader takes in epoch v with run.seed = views.seed, so a cached run and
an online one see the same pixels.

Cost: a view is C x H x W fp16 of stage N's output (EfficientNet-Lite0, N = 4 at 160 px: 80 x 10 x 10, 16 KB),
plus the teacher's top-k. 10 views of 1,491 images: 240 MB; of 1M images: 160 GB, and the build runs the prefix
10 times over the set. That is a CPU study's tool: on a GPU the online path with a frozen, shared prefix
(model.frozen_stages + teacher.share_prefix) is cheaper than reading the cache back.

Layout (never pickled): ``meta.json`` (the key, shapes, parts) and per building rank ``part-R.json`` (keys,
labels, views per image) with raw arrays ``part-R.prefix`` (fp16), ``part-R.idx`` (int16), ``part-R.prob``
(fp32). Parts are written under ``<cache>.partial`` and the folder is renamed once meta.json is in it: a cache is
never visible half-built, and an interrupted build keeps its finished parts (same key, same content).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from data import storage
from data.loader import SKIP_KINDS, LoaderState, set_samples
from data.plan import split_shards
from data.shards import Manifest, manifest_identity
from data.transforms import BadImage, sample_rng, train_transform
from trainer.runtime import run_cache

log = logging.getLogger(__name__)

VIEWS_VERSION = 1


def positive_views(cfg: Any) -> int:
    """Views of each positive image: re-sampling shows a positive many times an epoch, each time another crop."""
    return cfg.views.positive_count or 8 * cfg.views.count


def cache_folder(cfg: Any) -> str:
    return run_cache(cfg.views.cache_dir, cfg.run.out_dir, "views")


def cache_key(cfg: Any, student: torch.nn.Module, teacher: torch.nn.Module | None) -> dict[str, Any]:
    """Everything the stored arrays depend on: the set, the prefix (network, weights, N, input size and
    normalisation), the crops (size, scale, seed, counts) and the teacher's targets (weights, size, top-k)."""
    from data.teacher_labels import weights_digest

    n = cfg.model.frozen_stages
    modules = student.stages().prefix_modules(n)
    prefix_state = {f"{i}.{k}": v for i, m in enumerate(modules) for k, v in m.state_dict().items()}
    prefix_state.update({f"norm.{k}": v for k, v in student.normalize.state_dict().items()})
    return {"version": VIEWS_VERSION, "set": manifest_identity(cfg.data.train), "trunk": student.arch,
            "model.frozen_stages": n, "prefix_weights": weights_digest(prefix_state),
            "data.image_size": cfg.data.image_size, "data.min_crop_scale": cfg.data.min_crop_scale,
            "views.seed": cfg.views.seed, "views.count": cfg.views.count, "views.positive_count": positive_views(cfg),
            "teacher": None if teacher is None else {"name": cfg.teacher.name, "weights": teacher.digest(),
                                                     "image_size": teacher.image_size, "topk": cfg.teacher.topk}}


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def locate(cfg: Any, key: dict[str, Any]) -> str:
    """The cache's folder: ``views.cache_dir`` itself if it already holds a cache (which must be this key's: a
    one-line error names the first setting that differs), else ``<views.cache_dir>/<set>-<key hash>``."""
    base = cache_folder(cfg)
    meta = os.path.join(base, "meta.json")
    if os.path.exists(meta):
        saved = json.loads(Path(meta).read_text())["key"]
        for name in key:
            if saved.get(name) != key[name]:
                raise ValueError(f"views.cache_dir={base} holds views built with {name}={saved.get(name)!r}, this "
                                 f"run has {key[name]!r}: point views.cache_dir at a folder without a meta.json "
                                 f"(the cache is then built beneath it) or delete {base}")
        return base
    return os.path.join(base, f"{Path(cfg.data.train.rstrip('/')).name}-{_key_hash(key)}")


# ------------------------------------------------------------------------------------------------ the build


@torch.no_grad()
def _build_part(cfg: Any, manifest: Manifest, student: torch.nn.Module, teacher: torch.nn.Module | None,
                shared: int, shards: list[int], out: str, device: torch.device, batch: int = 64) -> dict[str, Any]:
    n = cfg.model.frozen_stages
    stages = student.stages()
    first = next(student.trunk.parameters())
    count, pos_count, size = cfg.views.count, positive_views(cfg), cfg.data.image_size
    keys: list[str] = []
    labels: list[int] = []
    nviews: list[int] = []
    skipped = 0
    shape: list[int] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        images = torch.stack(pending).to(device)
        pending.clear()
        prefix = stages.prefix(student.normalize(images, first.dtype), n)
        shape[:] = list(prefix.shape[1:])
        files["prefix"].write(prefix.to(torch.float16).cpu().numpy().tobytes())
        if teacher is not None:
            from trainer.task import teacher_topk

            logits = teacher.from_prefix(prefix, n) if shared else teacher(images)
            idx, prob = teacher_topk(logits, cfg.teacher.topk)
            files["idx"].write(idx.to(torch.int16).cpu().numpy().tobytes())
            files["prob"].write(prob.float().cpu().numpy().tobytes())

    with contextlib.ExitStack() as stack:  # each of the three appears whole, and only once every sample is in
        files = {s: stack.enter_context(storage.atomic_write(f"{out}.{s}")) for s in ("prefix", "idx", "prob")}
        for key, label, data, shard in set_samples(manifest, shards):
            if data is None:
                skipped += 1
                continue
            views = pos_count if label > 0 else count
            try:
                crops = [train_transform(data, size, sample_rng(cfg.views.seed, v, zlib.crc32(key.encode())),
                                         cfg.data.min_crop_scale) for v in range(views)]
            except BadImage as e:
                log.warning("views: skipping sample %s of shard %s: undecodable (%s)", key, shard, e)
                skipped += 1
                continue
            keys.append(key)
            labels.append(int(label))
            nviews.append(views)
            for crop in crops:
                pending.append(crop)
                if len(pending) == batch:
                    flush()
        if pending:
            flush()
    doc = {"keys": keys, "labels": labels, "nviews": nviews, "rows": int(sum(nviews)), "shape": shape,
           "skipped": skipped}
    storage.write_bytes(f"{out}.json", json.dumps(doc).encode())  # last: a part with its json is complete
    return doc


def build_views(cfg: Any, manifest: Manifest, student: torch.nn.Module, teacher: torch.nn.Module | None,
                shared: int, device: torch.device, rank: int = 0, world: int = 1) -> str:
    """Build (or find) the cache for this run; every rank builds its whole shards' part, rank 0 publishes.
    The student's prefix runs in eval mode; its mode is restored."""
    key = cache_key(cfg, student, teacher)
    folder = locate(cfg, key)
    if os.path.exists(os.path.join(folder, "meta.json")):
        log.info("views: using the cache at %s", folder)
        return folder
    partial = folder + ".partial"
    os.makedirs(partial, exist_ok=True)
    part = os.path.join(partial, f"part-{rank:05d}")
    if not os.path.exists(part + ".json"):
        log.info("views: building %d views an image (%d a positive) of %s at %d px into %s", cfg.views.count,
                 positive_views(cfg), cfg.data.train, cfg.data.image_size, folder)
        was_training = student.training
        student.eval()
        try:
            _build_part(cfg, manifest, student, teacher, shared,
                        split_shards([s.count for s in manifest.shards], rank, world), part, device)
        finally:
            student.train(was_training)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        parts = [f"part-{r:05d}" for r in range(world)]
        missing = [p for p in parts if not os.path.exists(os.path.join(partial, p + ".json"))]
        if missing:
            raise FileNotFoundError(f"views: rank 0 cannot see {missing[0]}.json in {partial}: views.cache_dir must be "
                                    "a folder every rank shares (one node), or train without views.count")
        docs = [json.loads(Path(partial, p + ".json").read_text()) for p in parts]
        shape = next((d["shape"] for d in docs if d["shape"]), [])
        meta = {"key": key, "parts": parts, "rows": [d["rows"] for d in docs], "shape": shape,
                "images": sum(len(d["keys"]) for d in docs), "skipped": sum(d["skipped"] for d in docs),
                "teacher": teacher is not None, "topk": cfg.teacher.topk if teacher is not None else 0}
        storage.write_bytes(os.path.join(partial, "meta.json"), json.dumps(meta).encode())
        if os.path.exists(folder):  # a finished cache from a concurrent build: keep it, drop ours
            shutil.rmtree(partial, ignore_errors=True)
        else:
            os.replace(partial, folder)
    if world > 1:
        torch.distributed.barrier()
    return folder


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class Views:
    """A loaded cache: per image (over all parts, in part order) its key, label, first row and view count; the
    arrays memory-mapped, so a cache larger than RAM trains at the page cache's pace."""

    folder: str
    keys: list[str]
    labels: np.ndarray
    first_row: np.ndarray
    nviews: np.ndarray
    prefix: list[np.memmap]
    idx: list[np.memmap | None]
    prob: list[np.memmap | None]
    part_start: np.ndarray
    """Global row where each part begins."""
    skipped: int

    def rows(self, global_rows: np.ndarray) -> dict[str, torch.Tensor]:
        part = np.searchsorted(self.part_start, global_rows, side="right") - 1
        out: dict[str, list[np.ndarray]] = {"prefix": [], "teacher_idx": [], "teacher_prob": []}
        order = np.argsort(part, kind="stable")
        for p in np.unique(part):
            local = global_rows[part == p] - self.part_start[p]
            out["prefix"].append(np.asarray(self.prefix[p][local]))
            if self.idx[p] is not None:
                out["teacher_idx"].append(np.asarray(self.idx[p][local]))
                out["teacher_prob"].append(np.asarray(self.prob[p][local]))
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        result = {"prefix": torch.from_numpy(np.concatenate(out["prefix"])[back]).float()}
        if out["teacher_idx"]:
            result["teacher_idx"] = torch.from_numpy(np.concatenate(out["teacher_idx"])[back].astype(np.int64))
            result["teacher_prob"] = torch.from_numpy(np.concatenate(out["teacher_prob"])[back])
        return result


def load_views(folder: str) -> Views:
    meta = json.loads(Path(folder, "meta.json").read_text())
    shape, k = tuple(meta["shape"]), meta["topk"]
    keys: list[str] = []
    labels, nviews, prefix, idx, prob = [], [], [], [], []
    for part, rows in zip(meta["parts"], meta["rows"]):
        doc = json.loads(Path(folder, part + ".json").read_text())
        keys += doc["keys"]
        labels.append(np.asarray(doc["labels"], dtype=np.int64))
        nviews.append(np.asarray(doc["nviews"], dtype=np.int64))
        base = os.path.join(folder, part)
        if rows == 0:
            prefix.append(np.zeros((0, *shape), np.float16))
            idx.append(None if not meta["teacher"] else np.zeros((0, k), np.int16))
            prob.append(None if not meta["teacher"] else np.zeros((0, k), np.float32))
            continue
        prefix.append(np.memmap(base + ".prefix", dtype=np.float16, mode="r", shape=(rows, *shape)))
        idx.append(np.memmap(base + ".idx", dtype=np.int16, mode="r", shape=(rows, k)) if meta["teacher"] else None)
        prob.append(np.memmap(base + ".prob", dtype=np.float32, mode="r", shape=(rows, k)) if meta["teacher"]
                    else None)
    nv = np.concatenate(nviews) if nviews else np.zeros(0, np.int64)
    first = np.concatenate([[0], np.cumsum(nv)[:-1]]).astype(np.int64) if len(nv) else nv
    return Views(folder, keys, np.concatenate(labels) if labels else np.zeros(0, np.int64), first, nv, prefix, idx,
                 prob, np.concatenate([[0], np.cumsum(meta["rows"])[:-1]]).astype(np.int64), int(meta["skipped"]))


# ------------------------------------------------------------------------------------------------ the order


def view_epoch(labels: np.ndarray, nviews: np.ndarray, *, seed: int, epoch: int, sampling: str,
               positive_fraction: float, batch_size: int, rank: int = 0, world: int = 1
               ) -> tuple[np.ndarray, np.ndarray]:
    """(images, views) this rank trains on in ``epoch``, in order: a pure function of its arguments.

    natural: every image once, in a seeded permutation, its view ``epoch mod nviews``. balanced: every background
    image once plus positive_fraction / (1 - positive_fraction) as many positive draws (classes in equal shares,
    images drawn uniformly within a class), each a random view; shuffled together. The epoch is padded by
    wrapping to a multiple of world x batch_size (every rank runs the same step count) and dealt to ranks round
    robin."""
    rng = np.random.default_rng([seed, epoch, 7919])
    n = len(labels)
    if sampling == "balanced":
        background = np.flatnonzero(labels == 0)
        classes = [np.flatnonzero(labels == c) for c in np.unique(labels[labels > 0])]
        draws = int(round(len(background) * positive_fraction / (1.0 - positive_fraction)))
        per_class = rng.integers(0, len(classes), draws) if classes else np.zeros(0, np.int64)
        positives = np.array([classes[c][rng.integers(0, len(classes[c]))] for c in per_class], dtype=np.int64)
        images = np.concatenate([background, positives])
        views = np.concatenate([epoch % nviews[background], rng.integers(0, nviews[positives])]) if len(positives) \
            else epoch % nviews[background]
        order = rng.permutation(len(images))
        images, views = images[order], views[order]
    else:
        images = rng.permutation(n)
        views = epoch % nviews[images]
    unit = world * batch_size
    total = -(-len(images) // unit) * unit
    wrap = np.arange(total) % max(len(images), 1)
    images, views = images[wrap], views[wrap]
    return images[rank::world], views[rank::world]


class ViewStream(IterableDataset):
    """The training stream over cached views: the same batches-and-position contract as ``ShardStream`` (the
    Trainer resumes it by ``LoaderState``), read in the training process (no loader workers: a batch is a gather
    from memory-mapped arrays)."""

    def __init__(self, views: Views, cfg: Any, *, seed: int, rank: int = 0, world: int = 1):
        super().__init__()
        self.views, self.cfg, self.seed, self.rank, self.world = views, cfg, seed, rank, world
        self.start = LoaderState()

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return view_epoch(self.views.labels, self.views.nviews, seed=self.seed, epoch=epoch,
                          sampling=self.cfg.data.sampling, positive_fraction=self.cfg.data.positive_fraction,
                          batch_size=self.cfg.data.batch_size, rank=self.rank, world=self.world)

    def batches_per_epoch(self) -> int:
        return len(self._epoch(0)[0]) // self.cfg.data.batch_size

    def describe_epoch(self) -> str:
        v = self.views
        return (f"cached views at {v.folder}: {len(v.keys):,} images, {int(v.nviews.sum()):,} "
                f"views ({self.cfg.views.count} an image, {positive_views(self.cfg)} a positive), "
                f"{self.cfg.data.sampling} sampling, {self.world} rank(s) x {self.batches_per_epoch()} batches of "
                f"{self.cfg.data.batch_size} an epoch")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        bs = self.cfg.data.batch_size
        epoch, skip = self.start.epoch, self.start.batches
        zero = torch.zeros(len(SKIP_KINDS), dtype=torch.long)
        while True:
            images, views = self._epoch(epoch)
            for b in range(skip, len(images) // bs):
                sel = images[b * bs:(b + 1) * bs]
                batch = self.views.rows(self.views.first_row[sel] + views[b * bs:(b + 1) * bs])
                batch.update(label=torch.from_numpy(self.views.labels[sel]), key=[self.views.keys[i] for i in sel],
                             skipped=zero.clone(), skipped_by_shard={}, position=(epoch, 0, (b + 1) * bs))
                yield batch
            epoch, skip = epoch + 1, 0

