"""Score an evaluation shard set with the student's main head and report per-class AP, mAP and P@100.

The grid of top-scoring images re-reads only the shards holding those images instead of keeping every
evaluation image in memory, so the same code serves a 2,000-image demo and a 100,000-image iNat validation set.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from data import storage
from data.loader import ShardStream, make_loader
from data.shards import Manifest, iter_tar, read_manifest
from data.transforms import eval_transform
from trainer.metrics import evaluate
from trainer.report import PR_CURVES_PNG, TOP_SCORING_PNG, plot_pr_curves, plot_top_scoring_grid, write_report


@torch.no_grad()
def predict(student: torch.nn.Module, manifest: Manifest, image_size: int, batch_size: int, device: torch.device,
            num_workers: int = 0, resize_ratio: float = 1.15) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """softmax(main head) for every image of the set, with labels and keys, in shard order."""
    was_training = student.training
    student.eval()
    stream = ShardStream(manifest, train=False, image_size=image_size, batch_size=batch_size,
                         eval_resize_ratio=resize_ratio)
    probs, labels, keys = [], [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    for batch in make_loader(stream, num_workers):
        if "image" not in batch:
            continue
        with autocast:
            logits = student(batch["image"].to(device, non_blocking=True), with_aux=False)["main"]
        probs.append(logits.float().softmax(dim=1).cpu())
        labels.append(batch["label"])
        keys.extend(batch["key"])
    student.train(was_training)
    if not probs:
        raise ValueError(f"evaluation set {manifest.root} yielded no decodable images")
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), keys


def evaluate_student(student: torch.nn.Module, manifest: Manifest, image_size: int, batch_size: int,
                     device: torch.device, num_workers: int = 0, resize_ratio: float = 1.15) -> dict[str, Any]:
    probs, labels, _ = predict(student, manifest, image_size, batch_size, device, num_workers, resize_ratio)
    return evaluate(probs, labels, manifest.class_names)


def load_images(manifest: Manifest, wanted: set[str], image_size: int) -> dict[str, np.ndarray]:
    """Decode only the wanted keys (HxWx3 uint8, as evaluated), stopping once all are found."""
    found: dict[str, np.ndarray] = {}
    for url in manifest.shard_urls():
        with storage.open_read(url) as f:
            for key, fields in iter_tar(f):
                if key in wanted:
                    ext = next(e for e in fields if e not in ("cls", "json"))
                    found[key] = eval_transform(fields[ext], image_size).permute(1, 2, 0).numpy()
        if len(found) == len(wanted):
            break
    return found


def top_indices(probs: np.ndarray, per_class: int) -> list[int]:
    out: set[int] = set()
    for c in range(1, probs.shape[1]):
        out.update(np.argsort(-probs[:, c], kind="stable")[:per_class].tolist())
    return sorted(out)


def evaluate_to_report(student: torch.nn.Module, manifest_location: str, out_dir: str, *, image_size: int,
                       batch_size: int = 256, device: torch.device | None = None, num_workers: int = 0,
                       title: str = "bgsplit evaluation", per_class: int = 8, k: int = 100,
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-class AP, mAP, P@k, a PR-curve PNG, a grid of top-scoring images, report.json and report.md."""
    device = device or torch.device("cpu")
    manifest = read_manifest(manifest_location)
    probs, labels, keys = predict(student, manifest, image_size, batch_size, device, num_workers)
    results = evaluate(probs, labels, manifest.class_names, k=k)
    results.update({"eval_set": manifest.root, "background_fraction": float(np.mean(labels == 0)), **(extra or {})})
    os.makedirs(out_dir, exist_ok=True)
    plot_pr_curves(probs, labels, manifest.class_names, os.path.join(out_dir, PR_CURVES_PNG))
    images = load_images(manifest, {keys[i] for i in top_indices(probs, per_class)}, image_size)
    plot_top_scoring_grid(probs, labels, lambda i: images[keys[i]], manifest.class_names,
                          os.path.join(out_dir, TOP_SCORING_PNG), per_class=per_class)
    write_report(results, out_dir, title)
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        json.dump({"keys": keys, "labels": labels.tolist()}, f)
    return results
