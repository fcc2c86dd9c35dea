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
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from data import storage
from data.loader import ShardStream, make_loader
from data.order import Ref
from data.plan import split_shards
from data.reader import ShardReader
from data.shards import Manifest, image_member, read_manifest
from data.transforms import eval_transform
from trainer.metrics import evaluate
from trainer.runtime import resolve_device
from trainer.scoring import ScoringConfig
from trainer.shard_pass import WholeSetPass, cached_model, run_pass
from trainer.report import PR_CURVES_PNG, TOP_SCORING_PNG, plot_pr_curves, plot_top_scoring_grid, write_report


Predictions = tuple[np.ndarray, np.ndarray, list[str], list[tuple[str, int]]]
"""fp32 softmax scores [N, K+1], labels [N], keys and (shard URL, sample index) references, row for row."""


def planned_batches(counts: Sequence[int], shards: Sequence[int], batch_size: int) -> int:
    """Batches the loader gives for these shards at most (fewer only if images fail to decode): batches are cut
    per shard, so this follows from the manifest alone."""
    return sum(-(-int(counts[s]) // batch_size) for s in shards)


@torch.no_grad()
def predict(student: torch.nn.Module, manifest: Manifest, scoring: ScoringConfig, device: torch.device,
            shards: list[int] | None = None, *, steps: int | None = None,
            progress: Callable[[int], None] | None = None) -> Predictions:
    """softmax(main head) for every image of the set (or of the given shards, possibly none), with labels, keys
    and (shard, index) references.

    ``scoring.precision`` sets the forward pass's autocast (trainer.engine.autocast_dtype); "fp32" gives the
    reference numbers. The softmax is fp32 either way, so rankings are not cut to bf16's 8 bits of mantissa.

    ``steps`` (ZeRO-3): run exactly that many forward passes, those past this process's own batches on a
    one-image dummy batch whose output is dropped. Each forward gathers the partitioned weights layer by layer
    from every rank, so a rank that stopped early would leave the others waiting in the gather; the count comes
    from the manifest (``planned_batches``), so no collective is needed per batch to agree on it.

    ``progress(n)`` is told the images of each batch (a command's progress line; validation passes none).
    """
    was_training = student.training
    student.eval()
    probs, labels, keys, refs = [], [], [], []
    done = 0
    dtype = scoring.dtype(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    if shards is None or shards:
        stream = ShardStream(manifest, scoring.loader(), train=False, shards=shards)
        for batch in make_loader(stream, scoring.num_workers):
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
            if progress is not None:
                progress(len(batch["key"]))
    if steps is not None and done < steps:
        dummy = torch.zeros((1, 3, scoring.image_size, scoring.image_size), dtype=torch.uint8, device=device)
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


@dataclass
class EvalPass(WholeSetPass):
    """Score a set with the student's main head (trainer.shard_pass): metrics, or with ``report_dir`` the report.

    The student is ``student`` (training's validation: the live model, this process only) or rebuilt from
    ``checkpoint`` wherever the work runs (ranks, Ray tasks). ``lockstep`` (ZeRO-3): every rank runs the same
    number of forward passes, see ``predict``."""

    location: str
    scoring: ScoringConfig
    checkpoint: str = ""
    student: torch.nn.Module | None = field(default=None, repr=False)
    report_dir: str = ""
    title: str = "bgsplit evaluation"
    extra: dict[str, Any] = field(default_factory=dict)
    lockstep_world: int = 0
    """With ZeRO-3, the world: each rank's forward count is the largest share's batch count."""
    keep_predictions: bool = False
    """Also return the merged scores, labels, keys and references (``predictions``)."""
    name: str = "scored"

    def __post_init__(self) -> None:
        if self.student is None and not self.checkpoint:
            raise ValueError("an evaluation needs a student or a checkpoint to score with")
        self.manifest = read_manifest(self.location)
        self.token = uuid.uuid4().hex  # this pass's model cache key, the same in every Ray task of it

    def __getstate__(self) -> dict[str, Any]:
        if self.student is not None:  # a live model stays in its process: Ray tasks rebuild from the checkpoint
            raise ValueError("an evaluation of an in-memory student runs in its own process; give a checkpoint "
                             "to run it as Ray tasks")
        return self.__dict__

    def run(self, shards: list[int], device: torch.device) -> Predictions:
        student = self.student
        if student is None:
            from trainer.models import load_student_from_checkpoint

            student = cached_model(self.token, lambda: load_student_from_checkpoint(self.checkpoint).to(device))
        steps = None
        if self.lockstep_world:
            counts = self.shard_counts()
            steps = max(planned_batches(counts, split_shards(counts, r, self.lockstep_world), self.scoring.batch_size)
                        for r in range(self.lockstep_world))
        from data.progress import progress

        bar = progress(sum(self.manifest.shards[s].count for s in shards), unit="img", desc="eval",
                       enabled=bool(self.report_dir))  # a command's evaluation, not training's validation
        try:
            return predict(student, self.manifest, self.scoring, device, shards, steps=steps, progress=bar.update)
        finally:
            bar.close()

    def publish(self, parts: list[tuple[list[int], Predictions]]) -> dict[str, Any]:
        ranks = [len(p[1]) for _, p in parts]
        predictions = merge_predictions(self.manifest, [p for _, p in parts])
        if self.report_dir:
            results = report_predictions(self.manifest, *predictions, self.report_dir,
                                         image_size=self.scoring.image_size, title=self.title,
                                         extra={**self.extra, "ranks": ranks})
        else:
            results = {**evaluate(predictions[0], predictions[1], self.manifest.class_names), "ranks": ranks}
        if self.keep_predictions:
            results["predictions"] = predictions
        return results


def evaluate_student(student: torch.nn.Module, manifest: Manifest | str, scoring: ScoringConfig,
                     device: torch.device, *, rank: int = 0, world: int = 1, lockstep: bool = False,
                     keep_predictions: bool = False) -> dict[str, Any]:
    """trainer.metrics.evaluate of the whole set, plus ``ranks`` (images each rank scored); the same dict on every
    rank (a collective when world > 1: each rank scores its share, rank 0 alone gathers the scores)."""
    location = manifest if isinstance(manifest, str) else manifest.root
    p = EvalPass(location, scoring, student=student, lockstep_world=world if lockstep else 0,
                 keep_predictions=keep_predictions)
    return run_pass(p, device=device, rank=rank, world=world, everywhere=True)


def load_images(manifest: Manifest, wanted: list[tuple[str, int]], image_size: int
                ) -> dict[tuple[str, int], np.ndarray]:
    """Decode only the wanted (shard, index) samples (HxWx3 uint8, as evaluated)."""
    shard_index = {s.url: i for i, s in enumerate(manifest.shards)}
    fetched = ShardReader(manifest, manifest.shards).fetch(Ref(shard_index[url], i, 0) for url, i in wanted)
    found = {}
    for ref, sample in fetched.items():
        if sample is not None:
            image = eval_transform(image_member(sample.fields), image_size).permute(1, 2, 0).numpy()
            found[manifest.shards[ref.shard].url, ref.index] = image
    return found


def top_indices(probs: np.ndarray, per_class: int) -> list[int]:
    out: set[int] = set()
    for c in range(1, probs.shape[1]):
        out.update(np.argsort(-probs[:, c], kind="stable")[:per_class].tolist())
    return sorted(out)


def evaluate_to_report(student: torch.nn.Module | None, location: str, out_dir: str, scoring: ScoringConfig, *,
                       device: torch.device | None = None, checkpoint: str = "", title: str = "bgsplit evaluation",
                       extra: dict[str, Any] | None = None, rank: int | None = None,
                       world: int | None = None) -> dict[str, Any] | None:
    """Per-class AP, mAP, P@k, a PR-curve PNG, a grid of top-scoring images, report.json and report.md, from
    ``student`` or (each rank rebuilding it) ``checkpoint``.

    Under torchrun every rank scores its share and rank 0 alone writes the report and returns it; the others
    return None. ``ranks`` in the report: images each rank scored."""
    p = EvalPass(location, scoring, checkpoint=checkpoint, student=student, report_dir=out_dir, title=title,
                 extra=dict(extra or {}))
    if device is None:  # a given student is scored where it lives; a checkpoint on the best device there is
        device = next(student.parameters()).device if student is not None else resolve_device("auto")
    return run_pass(p, device=device, rank=rank, world=world)


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
    storage.write_bytes(os.path.join(out_dir, "scores.json"),
                        json.dumps({"keys": keys, "labels": labels.tolist()}).encode())
    return results
