"""`bgsplit teacher-label`: run the frozen teacher once over a shard set and store its top-k labels in the set.

Labels are taken on the evaluation view (resize + centre crop), one per image, so they do not depend on the
augmentation seed; the authors' code used one random training crop instead. With cached labels, training needs
no teacher forward at all, which on CPU (and for a ResNet-50 teacher on GPU, ~23% of the step) is the main saving.

The work is whole shards: each labelled shard is published as one file (data.teacher_labels), so a killed run
resumes where it stopped, and any number of processes can share a set: rank r of W labels shards r, r+W, ...
(under torchrun, or as Ray tasks: cluster.passes). The label set becomes usable when ``labels.json`` is written,
once every shard has its file.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from data import storage
from data.loader import ShardStream, make_loader
from data.shards import Manifest, read_manifest
from data.teacher_labels import META, LabelSpec, finish_label_set, labelled_shards, set_url, write_shard_labels
from trainer.models import Teacher
from trainer.task import teacher_topk

log = logging.getLogger("bgsplit.teacher_label")


def label_spec(teacher: Teacher, image_size: int, topk: int) -> LabelSpec:
    return LabelSpec(teacher.arch, image_size, topk, teacher.digest())


def is_complete(manifest: Manifest, spec: LabelSpec) -> bool:
    return storage.exists(storage.join(set_url(manifest.root, spec), META))


def unpublish(manifest: Manifest, spec: LabelSpec) -> None:
    """Before an overwrite: the old label set stops being usable before any of its shards is rewritten."""
    storage.remove(storage.join(set_url(manifest.root, spec), META))


def shards_to_label(manifest: Manifest, spec: LabelSpec, *, rank: int = 0, world: int = 1,
                    overwrite: bool = False) -> list[int]:
    """This rank's share of the shards (indices into the manifest) that still need labels."""
    done = set() if overwrite else labelled_shards(manifest, spec)
    return [i for i, s in enumerate(manifest.shards) if i % world == rank and s.url not in done]


def label_shards(teacher: Teacher, manifest: Manifest, shards: list[int], spec: LabelSpec, *, batch_size: int = 128,
                 device: torch.device | None = None, num_workers: int = 0, dtype: torch.dtype | None = None) -> int:
    """Label the given shards, writing each one's file as soon as its last sample is scored; returns how many
    samples were labelled."""
    if not shards:
        return 0
    device = device or torch.device("cpu")
    teacher = teacher.prepare(device, dtype, channels_last=device.type == "cuda")
    stream = ShardStream(manifest, train=False, image_size=spec.image_size, batch_size=batch_size, shards=shards)
    open_: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # shard -> (indices, probs, filled)
    expected = {s.url: s.count for s in manifest.shards}
    done = 0
    for batch in make_loader(stream, num_workers):
        if "image" not in batch:
            continue
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
    for shard, (_, _, filled) in open_.items():
        # a sample that could not be decoded has no label: the shard stays unlabelled and the set incomplete
        raise ValueError(f"shard {shard} of {manifest.root}: {int((~filled).sum())} of {len(filled)} samples could "
                         "not be decoded, so it has no teacher labels; rebuild the set with `bgsplit shards build`")
    return done


def label_shard_set(teacher: Teacher, location: str, *, image_size: int, topk: int = 5, batch_size: int = 128,
                    device: torch.device | None = None, num_workers: int = 0, overwrite: bool = False,
                    rank: int = 0, world: int = 1, barrier=lambda: None, dtype: torch.dtype | None = None) -> str:
    """Label this rank's share of a set, then (rank 0, after ``barrier``) publish the label set; returns its URL.

    A re-run labels only the shards without a file; a complete set is left as it is unless ``overwrite``."""
    manifest = read_manifest(location)
    spec = label_spec(teacher, image_size, topk)
    if is_complete(manifest, spec) and not overwrite:
        return set_url(manifest.root, spec)
    if overwrite and rank == 0:
        unpublish(manifest, spec)
    barrier()
    start = time.time()
    todo = shards_to_label(manifest, spec, rank=rank, world=world, overwrite=overwrite)
    n = label_shards(teacher, manifest, todo, spec, batch_size=batch_size, device=device, num_workers=num_workers,
                     dtype=dtype)
    log.info("rank %d of %d labelled %d samples in %d shards (%.1f s)", rank, world, n, len(todo),
             time.time() - start)
    barrier()
    if rank == 0:
        finish_label_set(manifest, spec, teacher.num_classes, {"seconds": round(time.time() - start, 2)})
    barrier()
    return set_url(manifest.root, spec)
