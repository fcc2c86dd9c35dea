"""Score an evaluation shard set with the student's main head and report per-class AP, mAP and P@100.

The grid of top-scoring images fetches only those images again, by (shard, sample index) with byte-range reads,
instead of keeping every evaluation image in memory, so the same code serves a 2,000-image demo and a
100,000-image iNat validation set.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from data.loader import IMAGE_EXTS, ShardStream, make_loader
from data.order import Ref
from data.reader import ShardReader
from data.shards import Manifest, read_manifest
from data.transforms import eval_transform
from trainer.metrics import evaluate
from trainer.report import PR_CURVES_PNG, TOP_SCORING_PNG, plot_pr_curves, plot_top_scoring_grid, write_report


@torch.no_grad()
def predict(student: torch.nn.Module, manifest: Manifest, image_size: int, batch_size: int, device: torch.device,
            num_workers: int = 0, resize_ratio: float = 1.15, shards: list[int] | None = None
            ) -> tuple[np.ndarray, np.ndarray, list[str], list[tuple[str, int]]]:
    """softmax(main head) for every image of the set (or of the given shards), with labels, keys and (shard,
    index) references."""
    was_training = student.training
    student.eval()
    stream = ShardStream(manifest, train=False, image_size=image_size, batch_size=batch_size,
                         eval_resize_ratio=resize_ratio, shards=shards)
    probs, labels, keys, refs = [], [], [], []
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
        refs.extend((url, int(i)) for url, i in batch["ref"])  # the DataLoader makes tuples lists
    student.train(was_training)
    if not probs:
        raise ValueError(f"evaluation set {manifest.root} yielded no decodable images")
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), keys, refs


def evaluate_student(student: torch.nn.Module, manifest: Manifest, image_size: int, batch_size: int,
                     device: torch.device, num_workers: int = 0, resize_ratio: float = 1.15) -> dict[str, Any]:
    probs, labels, _, _ = predict(student, manifest, image_size, batch_size, device, num_workers, resize_ratio)
    return evaluate(probs, labels, manifest.class_names)


def load_images(manifest: Manifest, wanted: list[tuple[str, int]], image_size: int
                ) -> dict[tuple[str, int], np.ndarray]:
    """Decode only the wanted (shard, index) samples (HxWx3 uint8, as evaluated)."""
    shard_index = {s.url: i for i, s in enumerate(manifest.shards)}
    fetched = ShardReader(manifest, manifest.shards).fetch(Ref(shard_index[url], i, 0) for url, i in wanted)
    found = {}
    for ref, sample in fetched.items():
        if sample is not None:
            ext = next(e for e in IMAGE_EXTS if e in sample.fields)
            image = eval_transform(sample.fields[ext], image_size).permute(1, 2, 0).numpy()
            found[manifest.shards[ref.shard].url, ref.index] = image
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
    predictions = predict(student, manifest, image_size, batch_size, device, num_workers)
    return report_predictions(manifest, *predictions, out_dir, image_size=image_size, title=title,
                              per_class=per_class, k=k, extra=extra)


def report_predictions(manifest: Manifest, probs: np.ndarray, labels: np.ndarray, keys: list[str],
                       refs: list[tuple[str, int]], out_dir: str, *, image_size: int, title: str = "bgsplit evaluation",
                       per_class: int = 8, k: int = 100, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report of scores however they were computed (one process, or shards scored on a Ray cluster)."""
    results = evaluate(probs, labels, manifest.class_names, k=k)
    results.update({"eval_set": manifest.root, "background_fraction": float(np.mean(labels == 0)), **(extra or {})})
    os.makedirs(out_dir, exist_ok=True)
    plot_pr_curves(probs, labels, manifest.class_names, os.path.join(out_dir, PR_CURVES_PNG))
    images = load_images(manifest, [refs[i] for i in top_indices(probs, per_class)], image_size)
    plot_top_scoring_grid(probs, labels, lambda i: images[refs[i]], manifest.class_names,
                          os.path.join(out_dir, TOP_SCORING_PNG), per_class=per_class)
    write_report(results, out_dir, title)
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        json.dump({"keys": keys, "labels": labels.tolist()}, f)
    return results
