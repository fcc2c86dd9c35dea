"""`bgsplit teacher-label`: run the frozen teacher once over a shard set and store its top-k labels in the set.

Labels are taken on the evaluation view (resize + centre crop), one per image, so they do not depend on the
augmentation seed; the authors' code used one random training crop instead. With cached labels, training needs
no teacher forward at all, which on CPU (and for a ResNet-50 teacher on GPU, ~23% of the step) is the main saving.

The work is whole shards: each labelled shard is published as one file (data.teacher_labels), so a killed run
resumes where it stopped, and any number of processes can share a set (torchrun ranks or Ray tasks: the one
split of trainer.shard_pass). The label set becomes usable when ``labels.json`` is written,
once every shard has its file.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data import storage
from data.loader import ShardStream, make_loader
from data.config import LoaderConfig
from data.shards import Manifest, read_manifest
from data.progress import progress as progress_bar
from data.teacher_labels import META, LabelSpec, finish_label_set, labelled_shards, set_url, write_shard_labels
from trainer.models import Teacher, build_teacher
from trainer.scoring import ScoringConfig
from trainer.shard_pass import cached_model, run_pass
from trainer.task import teacher_topk

log = logging.getLogger("bgsplit.teacher_label")


def label_spec(teacher: Teacher, image_size: int, topk: int) -> LabelSpec:
    return LabelSpec(teacher.arch, image_size, topk, teacher.digest())


def is_complete(manifest: Manifest, spec: LabelSpec) -> bool:
    return storage.exists(storage.join(set_url(manifest.root, spec), META))


def unpublish(manifest: Manifest, spec: LabelSpec) -> None:
    """Before an overwrite: the old label set stops being usable before any of its shards is rewritten."""
    storage.remove(storage.join(set_url(manifest.root, spec), META))


def label_shards(teacher: Teacher, manifest: Manifest, shards: list[int], spec: LabelSpec, *, batch_size: int = 128,
                 device: torch.device | None = None, num_workers: int = 0, dtype: torch.dtype | None = None,
                 progress: bool = True) -> int:
    """Label the given shards, writing each one's file as soon as its last sample is scored; returns how many
    samples were labelled. ``progress``: a bar on a terminal, a line every ~10 s elsewhere (data.progress)."""
    if not shards:
        return 0
    device = device or torch.device("cpu")
    teacher = teacher.prepare(device, dtype, channels_last=device.type == "cuda")
    stream = ShardStream(manifest, LoaderConfig(image_size=spec.image_size, batch_size=batch_size),
                         train=False, shards=shards)
    open_: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # shard -> (indices, probs, filled)
    expected = {s.url: s.count for s in manifest.shards}
    done = 0
    bar = progress_bar(sum(manifest.shards[s].count for s in shards), unit="img", desc="teacher-label",
                       enabled=progress)
    for batch in make_loader(stream, num_workers):
        if "image" not in batch:
            continue
        bar.update(len(batch["ref"]))
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = teacher(batch["image"].to(device, non_blocking=True))
        idx, prob = (t.cpu().numpy() for t in teacher_topk(logits.float(), spec.topk))
        for row, (shard, index) in enumerate(batch["ref"]):
            if shard not in open_:
                n = expected[shard]
                open_[shard] = (np.zeros((n, spec.topk), np.int16), np.zeros((n, spec.topk), np.float16),
                                np.zeros(n, bool))
            indices, probs, filled = open_[shard]
            indices[index], probs[index], filled[index] = idx[row], prob[row], True
            if filled.all():
                write_shard_labels(manifest.root, spec, shard, indices, probs)
                del open_[shard]
                done += len(filled)
    bar.close()
    for shard, (_, _, filled) in open_.items():
        # a sample that could not be decoded has no label: the shard stays unlabelled and the set incomplete
        raise ValueError(f"shard {shard} of {manifest.root}: {int((~filled).sum())} of {len(filled)} samples could "
                         "not be decoded, so it has no teacher labels; rebuild the set with `bgsplit shards build`")
    return done


@dataclass
class LabelPass:
    """Label a set's shards with the teacher and publish the label set (trainer.shard_pass). The teacher is
    ``teacher`` (this process) or built from ``arch`` / ``weights`` wherever the work runs."""

    location: str
    scoring: ScoringConfig
    """Its size names the label set (data.teacher_labels.LabelSpec). Its resize is not used: a spec names none, so
    every label set's images are cut at the loader's default (1.15)."""
    topk: int = 5
    arch: str = ""
    weights: str = ""
    teacher: Teacher | None = field(default=None, repr=False)
    overwrite: bool = False
    name: str = "labelled"

    def __post_init__(self) -> None:
        self.manifest = read_manifest(self.location)
        if self.teacher is None:
            self.teacher = build_teacher(self.arch, self.weights)  # here too: its weights' digest keys the set
        self.spec = label_spec(self.teacher, self.scoring.image_size, self.topk)
        self.token = uuid.uuid4().hex

    def __getstate__(self) -> dict[str, Any]:
        if not self.arch:
            raise ValueError("a teacher given as a model labels in its own process; give its name and weights to "
                             "label in Ray tasks")
        return {**self.__dict__, "teacher": None}  # each worker builds its own, once (cached_model)

    @property
    def url(self) -> str:
        return set_url(self.manifest.root, self.spec)

    def shard_counts(self) -> list[int]:
        return [s.count for s in self.manifest.shards]

    def todo(self, shards: list[int]) -> list[int]:
        done = set() if self.overwrite else labelled_shards(self.manifest, self.spec)
        return [i for i in shards if self.manifest.shards[i].url not in done]

    def begin(self) -> str | None:
        """A complete label set is kept (its URL ends the pass) unless ``overwrite``, which first unpublishes it."""
        if not self.overwrite:
            return self.url if is_complete(self.manifest, self.spec) else None
        unpublish(self.manifest, self.spec)
        return None

    def run(self, shards: list[int], device: torch.device) -> int:
        teacher = self.teacher or cached_model(self.token, lambda: build_teacher(self.arch, self.weights))
        return label_shards(teacher, self.manifest, shards, self.spec, batch_size=self.scoring.batch_size,
                            device=device, num_workers=self.scoring.num_workers, dtype=self.scoring.dtype(device))

    def publish(self, parts: list[tuple[list[int], int]]) -> str:
        finish_label_set(self.manifest, self.spec, self.teacher.num_classes if self.teacher else 0,
                         {"labelled": sum(n for _, n in parts), "parts": len(parts)})
        return self.url


def label_shard_set(teacher: Teacher, location: str, scoring: ScoringConfig, *, topk: int = 5,
                    device: torch.device | None = None, overwrite: bool = False) -> str:
    """Label a set in this process (or as one rank of torchrun's group), then publish it; returns its URL. A re-run
    labels only the shards without a file; a complete set is left as it is unless ``overwrite``."""
    p = LabelPass(location=location, scoring=scoring, topk=topk, teacher=teacher, overwrite=overwrite)
    url = run_pass(p, device=device, everywhere=True)
    return url
