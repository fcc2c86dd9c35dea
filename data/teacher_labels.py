"""Cached teacher labels, kept inside the shard set: one small file per shard, rows in the shard's sample order.

A label set lives in ``<set>/teacher-labels/<teacher>-<size>px-top<k>-<digest>/``: ``<shard stem>.npz`` per
shard (top-k class indices as int16, probabilities as fp16: 4 bytes a class, 20 bytes a sample at k=5) and
``labels.json``, written last, which makes the set usable. A loader reads the file of the shard it is reading
and indexes it by sample position, so no process holds labels for the whole set and nothing is looked up by key:
memory does not grow with the number of samples.

The folder name carries a digest of the teacher's weights, not only its name: labels made by other weights of
the same architecture (another checkpoint, V1 vs V2) are refused in one line instead of silently training the
aux head towards another teacher. ``labels.json`` also records the shard list it labelled, so labels of an
earlier build of the set are refused too (a rebuild also deletes them: data.shards.invalidate).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from data import storage
from data.shards import LABELS_DIR, Manifest

FORMAT = "bgsplit-teacher-labels/1"
META = "labels.json"


def weights_digest(state: dict) -> str:
    """A short hash of a state dict's names, dtypes, shapes and values (CPU copies; done once per run)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class LabelSpec:
    """What a label set is made of; the folder name is derived from it."""

    teacher: str
    image_size: int
    topk: int
    weights: str
    """weights_digest of the teacher."""

    @property
    def name(self) -> str:
        return f"{self.teacher}-{self.image_size}px-top{self.topk}-{self.weights}"

    def describe(self) -> str:
        return f"{self.teacher} at {self.image_size}px, top-{self.topk}, weights {self.weights}"


def set_url(root: str, spec: LabelSpec) -> str:
    return storage.join(root, LABELS_DIR, spec.name)


def labels_name(shard_url: str) -> str:
    """A shard's label file name: its file name's stem, so shards a set keeps from a parent set (listed by their
    full URL) get their labels in this set's label folder too."""
    return shard_url.replace(os.sep, "/").rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".npz"


def shard_labels_url(root: str, spec: LabelSpec, shard_url: str) -> str:
    return storage.join(set_url(root, spec), labels_name(shard_url))


def _shard_list(manifest: Manifest) -> dict[str, int]:
    return {s.url: s.count for s in manifest.shards}


def write_shard_labels(root: str, spec: LabelSpec, shard_url: str, indices: np.ndarray, probs: np.ndarray) -> None:
    """One shard's labels, published whole (a killed labeller leaves the shard unlabelled, never half)."""
    if indices.shape != probs.shape or indices.ndim != 2 or indices.shape[1] != spec.topk:
        raise ValueError(f"teacher labels for {shard_url}: indices {indices.shape} and probabilities "
                         f"{probs.shape} must both be [samples, {spec.topk}]")
    buf = io.BytesIO()
    np.savez(buf, indices=indices.astype(np.int16), probs=probs.astype(np.float16))
    storage.write_bytes(shard_labels_url(root, spec, shard_url), buf.getvalue())


def labelled_shards(manifest: Manifest, spec: LabelSpec) -> set[str]:
    """Shards whose label file is already there (one listing): a re-run labels only the rest."""
    present = set(storage.listdir(set_url(manifest.root, spec)))
    return {s.url for s in manifest.shards if labels_name(s.url) in present}


def finish_label_set(manifest: Manifest, spec: LabelSpec, num_classes: int, extra: dict | None = None) -> str:
    """Write ``labels.json`` once every shard has its file; returns the set's URL."""
    missing = [s.url for s in manifest.shards if s.url not in labelled_shards(manifest, spec)]
    if missing:
        raise FileNotFoundError(f"teacher labels {set_url(manifest.root, spec)} lack {len(missing)} shard(s) (first:"
                                f" {missing[0]}): re-run `bgsplit teacher-label` to label them")
    meta = {"format": FORMAT, **asdict(spec), "num_classes": num_classes, "shards": _shard_list(manifest),
            **(extra or {})}
    url = set_url(manifest.root, spec)
    storage.write_bytes(storage.join(url, META), json.dumps(meta, indent=1).encode())
    return url


def available(root: str) -> list[str]:
    """Names of the complete label sets of a shard set."""
    base = storage.join(root, LABELS_DIR)
    return [n for n in storage.listdir(base) if storage.exists(storage.join(base, n, META))]


class TeacherLabels:
    """Read side of one label set: per-shard rows, a few shards cached per process."""

    def __init__(self, manifest: Manifest, spec: LabelSpec):
        self.root, self.spec = manifest.root, spec
        self.url = set_url(manifest.root, spec)
        meta_url = storage.join(self.url, META)
        if not storage.exists(meta_url):
            raise FileNotFoundError(self._missing_message(manifest))
        meta = json.loads(storage.read_bytes(meta_url))
        if meta.get("format") != FORMAT or meta.get("topk") != spec.topk:
            raise ValueError(f"teacher labels {self.url} are not of format {FORMAT} with top-{spec.topk}: re-run "
                             "`bgsplit teacher-label --overwrite`")
        if meta.get("shards") != _shard_list(manifest):
            raise ValueError(f"teacher labels {self.url} were made for another build of {manifest.root} (its shard "
                             "list differs): re-run `bgsplit teacher-label --overwrite` on this set")
        self.num_classes = int(meta["num_classes"])

    def _missing_message(self, manifest: Manifest) -> str:
        sets = available(manifest.root)
        fix = (f"run `bgsplit teacher-label --data {manifest.root} --teacher {self.spec.teacher} --image-size "
               f"{self.spec.image_size} --topk {self.spec.topk}` with this teacher, or set teacher.mode=online")
        same = [n for n in sets if n.rsplit("-", 1)[0] == self.spec.name.rsplit("-", 1)[0]]
        if same:
            return (f"teacher labels in {manifest.root} were made by other weights of {self.spec.teacher} ({same[0]};"
                    f" this teacher's weights are {self.spec.weights}): {fix}")
        found = f"it has {', '.join(sets)}" if sets else "it has none"
        return f"no teacher labels for {self.spec.describe()} in {manifest.root} ({found}): {fix}"

    @functools.lru_cache(maxsize=8)
    def shard(self, shard_url: str) -> tuple[np.ndarray, np.ndarray]:
        """(indices int16 [n, k], probabilities fp16 [n, k]) of one shard, in sample order."""
        with np.load(io.BytesIO(storage.read_bytes(shard_labels_url(self.root, self.spec, shard_url)))) as doc:
            return doc["indices"], doc["probs"]

    def rows(self, shard_url: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        indices, probs = self.shard(shard_url)
        if index >= len(indices):
            raise ValueError(f"teacher labels of {shard_url} hold {len(indices)} rows, sample {index} asked: re-run "
                             "`bgsplit teacher-label --overwrite`")
        return indices[index], probs[index]
