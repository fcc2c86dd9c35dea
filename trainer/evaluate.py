"""Score an evaluation shard set with the student's main head and report per-class AP, mAP and P@100.

The grid of top-scoring images fetches only those images again, by (shard, sample index) with byte-range reads,
instead of keeping every evaluation image in memory, so the same code serves a 2,000-image demo and a
100,000-image iNat validation set.

Data-parallel ranks (training's validation, `bgsplit eval` under torchrun) each score a share of whole shards
and gather the scores; they are put back in manifest order before any metric is computed, and a batch never
spans two shards (data.loader), so every forward pass holds the same images whatever the world and the report
is the same to the last digit for 1 or N ranks. On CPU that holds at the same threads per process (oneDNN
picks its blocking by batch size and thread count, so a batch of 7 at 1 and at 2 threads can differ in the last
bit); on GPU, cuDNN's benchmark mode (run.cudnn_benchmark) picks kernels by timing, so there only to float
tolerance.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from data.loader import IMAGE_EXTS, ShardStream, make_loader
from data.order import Ref
from data.reader import ShardReader
from data.shards import Manifest, read_manifest
from data.transforms import eval_transform
from trainer.metrics import evaluate
from trainer.report import PR_CURVES_PNG, TOP_SCORING_PNG, plot_pr_curves, plot_top_scoring_grid, write_report


Predictions = tuple[np.ndarray, np.ndarray, list[str], list[tuple[str, int]]]
"""fp32 softmax scores [N, K+1], labels [N], keys and (shard URL, sample index) references, row for row."""


def eval_shards(counts: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s share of an evaluation set of ``world`` ranks: whole shards (manifest indices, in order).

    Whole shards because a batch never spans two shards, so each forward pass holds the same images whatever the
    world. A shard goes to the rank whose equal stretch of the N samples holds the shard's middle: shares are
    contiguous and differ from N / world by less than the largest shard, and when there are more ranks than
    shards some ranks get none (they still take part in the gather). Pure, so it is tested on simulated worlds.
    """
    if world < 1:
        raise ValueError(f"a world of {world} ranks cannot evaluate: give at least 1 rank")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} ranks")
    sizes = np.asarray(counts, dtype=np.int64)
    if (sizes < 0).any():
        raise ValueError(f"shard sample counts must not be negative, got {list(counts)}: check the manifest")
    n = int(sizes.sum())
    if n == 0:
        raise ValueError("the evaluation set's manifest lists no samples: rebuild it with `bgsplit shards build`")
    starts = np.cumsum(sizes) - sizes
    owners = np.minimum((2 * starts + sizes) * world // (2 * n), world - 1)
    return np.flatnonzero(owners == rank).tolist()


def planned_batches(counts: Sequence[int], shards: Sequence[int], batch_size: int) -> int:
    """Batches the loader gives for these shards at most (fewer only if images fail to decode): batches are cut
    per shard, so this follows from the manifest alone."""
    return sum(-(-int(counts[s]) // batch_size) for s in shards)


@torch.no_grad()
def predict(student: torch.nn.Module, manifest: Manifest, image_size: int, batch_size: int, device: torch.device,
            num_workers: int = 0, resize_ratio: float = 1.15, shards: list[int] | None = None, *,
            dtype: torch.dtype | None = None, steps: int | None = None) -> Predictions:
    """softmax(main head) for every image of the set (or of the given shards, possibly none), with labels, keys
    and (shard, index) references.

    ``dtype`` is the forward pass's autocast dtype (trainer.engine.autocast_dtype); None runs fp32, the reference
    numbers. The softmax is fp32 either way, so rankings are not cut to bf16's 8 bits of mantissa.

    ``steps`` (ZeRO-3): run exactly that many forward passes, those past this process's own batches on a
    one-image dummy batch whose output is dropped. Each forward gathers the partitioned weights layer by layer
    from every rank, so a rank that stopped early would leave the others waiting in the gather; the count comes
    from the manifest (``planned_batches``), so no collective is needed per batch to agree on it.
    """
    was_training = student.training
    student.eval()
    probs, labels, keys, refs = [], [], [], []
    done = 0
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    if shards is None or shards:
        stream = ShardStream(manifest, train=False, image_size=image_size, batch_size=batch_size,
                             eval_resize_ratio=resize_ratio, shards=shards)
        for batch in make_loader(stream, num_workers):
            if "image" not in batch:
                continue
            if steps is not None and done == steps:
                raise RuntimeError(f"evaluation set {manifest.root} gave more than the {steps} batches planned from "
                                   "its manifest: the manifest's shard counts are wrong; rebuild the set")
            with autocast:
                logits = student(batch["image"].to(device, non_blocking=True), with_aux=False)["main"]
            probs.append(logits.float().softmax(dim=1))  # stays on the device: no sync per batch
            labels.append(batch["label"])
            keys.extend(batch["key"])
            refs.extend((url, int(i)) for url, i in batch["ref"])  # the DataLoader makes tuples lists
            done += 1
    if steps is not None and done < steps:
        dummy = torch.zeros((1, 3, image_size, image_size), dtype=torch.uint8, device=device)
        for _ in range(steps - done):
            with autocast:
                student(dummy, with_aux=False)
    student.train(was_training)
    if not probs:
        return np.zeros((0, manifest.num_classes), np.float32), np.zeros(0, np.int64), [], []
    return torch.cat(probs).cpu().numpy(), torch.cat(labels).numpy(), keys, refs


def merge_predictions(manifest: Manifest, parts: Sequence[Predictions]) -> Predictions:
    """Scores computed in pieces (ranks, Ray tasks, loader workers) in one order, manifest shard order then sample
    index, so AP, whose ties and summation follow the input order, does not depend on how the work was split."""
    probs = np.concatenate([p[0] for p in parts])
    if not len(probs):
        raise ValueError(f"evaluation set {manifest.root} yielded no decodable images: check its shards")
    labels = np.concatenate([p[1] for p in parts])
    keys = [k for p in parts for k in p[2]]
    refs = [r for p in parts for r in p[3]]
    shard_index = {s.url: i for i, s in enumerate(manifest.shards)}
    order = np.lexsort((np.array([i for _, i in refs]), np.array([shard_index[u] for u, _ in refs])))
    return probs[order], labels[order], [keys[i] for i in order], [refs[i] for i in order]


def predict_shared(student: torch.nn.Module, manifest: Manifest, image_size: int, batch_size: int,
                   device: torch.device, *, rank: int = 0, world: int = 1, num_workers: int = 0,
                   resize_ratio: float = 1.15, dtype: torch.dtype | None = None, lockstep: bool = False
                   ) -> tuple[Predictions, list[int]]:
    """The whole set's scores on every rank (in manifest order) and how many images each rank scored; each rank
    scores only its ``eval_shards``. A collective: every rank of the process group calls it. ``lockstep``: the
    same number of forward passes on every rank (ZeRO-3, see ``predict``)."""
    if world > 1 and not (dist.is_initialized() and dist.get_world_size() == world):
        raise ValueError(f"scoring over {world} ranks needs their process group: start it with torchrun "
                         "(trainer.runtime.init_distributed) or run with world=1")
    counts = [s.count for s in manifest.shards]
    steps = None
    if lockstep:
        steps = max(planned_batches(counts, eval_shards(counts, r, world), batch_size) for r in range(world))
    local = predict(student, manifest, image_size, batch_size, device, num_workers, resize_ratio,
                    eval_shards(counts, rank, world), dtype=dtype, steps=steps)
    parts: list[Any] = [local]
    if world > 1:
        # every rank gets every part (K+1 floats, a label, a key a sample): all ranks then agree on the
        # result, or all raise the same error, instead of rank 0 failing while the others go on to a collective
        parts = [None] * world
        dist.all_gather_object(parts, local)
    return merge_predictions(manifest, parts), [len(p[1]) for p in parts]


def evaluate_student(student: torch.nn.Module, manifest: Manifest, image_size: int, batch_size: int,
                     device: torch.device, num_workers: int = 0, resize_ratio: float = 1.15, *,
                     dtype: torch.dtype | None = None, rank: int = 0, world: int = 1,
                     lockstep: bool = False) -> dict[str, Any]:
    """trainer.metrics.evaluate of the whole set, plus ``ranks`` (images each rank scored); the same dict on every
    rank (a collective when world > 1)."""
    (probs, labels, _, _), ranks = predict_shared(student, manifest, image_size, batch_size, device, rank=rank,
                                                  world=world, num_workers=num_workers, resize_ratio=resize_ratio,
                                                  dtype=dtype, lockstep=lockstep)
    return {**evaluate(probs, labels, manifest.class_names), "ranks": ranks}


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
                       extra: dict[str, Any] | None = None, dtype: torch.dtype | None = None, rank: int = 0,
                       world: int = 1) -> dict[str, Any] | None:
    """Per-class AP, mAP, P@k, a PR-curve PNG, a grid of top-scoring images, report.json and report.md.

    With ``world`` > 1 (a collective) every rank scores its share and rank 0 alone writes the report and returns
    it; the others return None. ``ranks`` in the report: images each rank scored."""
    device = device or torch.device("cpu")
    manifest = read_manifest(manifest_location)
    predictions, ranks = predict_shared(student, manifest, image_size, batch_size, device, rank=rank, world=world,
                                        num_workers=num_workers, dtype=dtype)
    if rank != 0:
        return None
    return report_predictions(manifest, *predictions, out_dir, image_size=image_size, title=title,
                              per_class=per_class, k=k, extra={**(extra or {}), "ranks": ranks})


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
