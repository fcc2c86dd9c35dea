"""`bgsplit teacher-label`: run the frozen teacher once over a shard set and cache its top-k labels.

Labels are taken on the evaluation view (resize + centre crop), one per image, so the cache does not depend on
the augmentation seed; the authors' code used one random training crop instead. With a cache, training needs no
teacher forward at all, which on CPU (and for a ResNet-50 teacher on GPU, ~23% of the step) is the main saving.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from data import storage
from data.loader import ShardStream, make_loader
from data.shards import read_manifest
from data.teacher_cache import cache_name, write_cache
from trainer.models import Teacher
from trainer.task import teacher_topk


def label_shard_set(teacher: Teacher, location: str, *, image_size: int, topk: int = 5, batch_size: int = 128,
                    device: torch.device | None = None, num_workers: int = 0, overwrite: bool = False) -> str:
    """Write (or keep, when present and not ``overwrite``) the teacher cache of one shard set; returns its URL."""
    device = device or torch.device("cpu")
    manifest = read_manifest(location)
    url = storage.join(manifest.root, cache_name(teacher.arch, image_size, topk))
    if storage.exists(url) and not overwrite:
        return url
    stream = ShardStream(manifest, train=False, image_size=image_size, batch_size=batch_size)
    keys: list[str] = []
    indices, probs = [], []
    start = time.time()
    teacher = teacher.to(device)
    for batch in make_loader(stream, num_workers):
        if "image" not in batch:
            continue
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = teacher(batch["image"].to(device))
        idx, prob = teacher_topk(logits, topk)
        indices.append(idx.cpu().numpy())
        probs.append(prob.cpu().numpy())
        keys.extend(batch["key"])
    write_cache(url, keys, np.concatenate(indices), np.concatenate(probs),
                {"teacher": teacher.arch, "image_size": image_size, "topk": topk, "num_classes": teacher.num_classes,
                 "seconds": round(time.time() - start, 2)})
    return url
