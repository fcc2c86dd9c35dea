"""The heavy passes over a whole shard set as Ray tasks: `shards build`, `teacher-label`, `eval` and `mine` with
``--ray``.

Over millions of images one machine's process pool is the bottleneck; these run the very same per-shard work
(data.ingest.write_shard, trainer.teacher_label.label_shards, trainer.evaluate.predict) as Ray tasks spread over
the cluster, while the driver only plans and publishes: the build's manifest, the label set's ``labels.json``, the
evaluation report. Every task works on whole shards and publishes each one whole, so a failed task is retried
by Ray (``max_retries``) and a failed job re-run resumes from the shards already done. Sources, shard sets and
checkpoints must be reachable from every node (object storage, or a shared file system).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m trainer.cli shards build --ray --source folder:s3://b/raw --rare 3,5 --out s3://b/sets/train
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("bgsplit.cluster")

MAX_RETRIES = 3
"""Ray retries of a task whose worker died; the task's output is only published whole, so a retry is safe."""


def connect(address: str = "") -> None:
    """Join the cluster (``address``, RAY_ADDRESS under `ray job submit`) or start a one-machine one."""
    import ray

    if not ray.is_initialized():
        from cluster.launch import connect as connect_cluster

        connect_cluster(address)


def _in_flight(limit: int, submit: Callable[[Any], Any], items: list, on_result: Callable[[Any], None]) -> None:
    """Run ``submit(item)`` for every item with at most ``limit`` tasks pending; results in completion order."""
    import ray

    pending, rest = [], iter(items)
    for item in rest:
        pending.append(submit(item))
        if len(pending) >= limit:
            break
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        on_result(ray.get(done[0]))
        nxt = next(rest, None)
        if nxt is not None:
            pending.append(submit(nxt))


def _cluster_cpus() -> int:
    import ray

    return max(int(ray.cluster_resources().get("CPU", 1)), 1)


# -- shards build ----------------------------------------------------------------------------------------------
def ray_runner(tasks: list, source, *, progress=None, done=None) -> list:
    """A data.build runner: each planned shard is a Ray task (the source is reopened from its spec there)."""
    import ray

    from data.ingest import write_task

    remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(write_task)
    results = []

    def finished(result) -> None:
        results.append(result)
        if progress:
            progress(result.count + len(result.skipped), result.read_bytes)
        if done:
            done(result)

    _in_flight(2 * _cluster_cpus(), remote.remote, tasks, finished)
    return results


# -- teacher-label ---------------------------------------------------------------------------------------------
_TEACHERS: dict[tuple, Any] = {}


def _label_group(location: str, teacher: tuple[str, str], image_size: int, topk: int, shards: list[int],
                 batch_size: int, precision: str = "auto") -> int:
    import torch

    from data.shards import read_manifest
    from trainer.engine import autocast_dtype
    from trainer.models import build_teacher
    from trainer.teacher_label import label_shards, label_spec

    if teacher not in _TEACHERS:  # one load per worker process, however many groups it labels
        _TEACHERS[teacher] = build_teacher(*teacher)
    model = _TEACHERS[teacher]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = read_manifest(location)
    return label_shards(model, manifest, shards, label_spec(model, image_size, topk), batch_size=batch_size,
                        device=device, dtype=autocast_dtype(precision, device))


def ray_teacher_label(location: str, *, teacher: str, weights: str = "", image_size: int, topk: int = 5,
                      batch_size: int = 128, overwrite: bool = False, shards_per_task: int = 4,
                      gpus_per_task: float = 0.0, precision: str = "auto") -> str:
    """Label a set's shards in Ray tasks (a few shards each), then publish the label set; returns its URL."""
    import ray

    from data.shards import read_manifest
    from data.teacher_labels import finish_label_set, set_url
    from trainer.models import build_teacher
    from trainer.teacher_label import (
        is_complete,
        label_spec,
        shards_to_label,
        unpublish,
    )

    manifest = read_manifest(location)
    model = build_teacher(teacher, weights)  # for the weights digest that keys the label set
    spec = label_spec(model, image_size, topk)
    if is_complete(manifest, spec) and not overwrite:
        return set_url(manifest.root, spec)
    if overwrite:
        unpublish(manifest, spec)
    todo = shards_to_label(manifest, spec, overwrite=overwrite)
    groups = [todo[i:i + shards_per_task] for i in range(0, len(todo), shards_per_task)]
    remote = ray.remote(num_cpus=1, num_gpus=gpus_per_task, max_retries=MAX_RETRIES)(_label_group)
    labelled = []
    _in_flight(2 * _cluster_cpus(), lambda g: remote.remote(manifest.root, (teacher, weights), image_size, topk, g,
                                                            batch_size, precision), groups, labelled.append)
    log.info("labelled %d samples in %d shards with %d Ray tasks", sum(labelled), len(todo), len(groups))
    return finish_label_set(manifest, spec, model.num_classes, {"ray_tasks": len(groups)})


# -- eval ------------------------------------------------------------------------------------------------------
def _predict_group(checkpoint: str, location: str, shards: list[int], image_size: int, batch_size: int,
                   precision: str = "auto"):
    import torch

    from data.shards import read_manifest
    from trainer.engine import autocast_dtype
    from trainer.evaluate import predict
    from trainer.models import load_student_from_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = load_student_from_checkpoint(checkpoint).to(device)
    return shards, predict(student, read_manifest(location), image_size, batch_size, device, shards=shards,
                           dtype=autocast_dtype(precision, device))


def ray_evaluate(checkpoint: str, location: str, out_dir: str, *, image_size: int, batch_size: int = 256,
                 shards_per_task: int = 4, gpus_per_task: float = 0.0, precision: str = "auto",
                 **report: Any) -> dict[str, Any]:
    """Score a set's shards in Ray tasks; the driver gathers the scores (K+1 floats a sample) and writes the
    same report as `bgsplit eval`. ``ranks`` (and ``ray_tasks``, its older name) counts the images each task
    scored, in shard order: a Ray pass has tasks, not ranks. Tasks take whole shards and a batch never spans
    two shards, so the scores are those of one process (at the same threads per process)."""
    import ray

    from data.shards import read_manifest
    from trainer.evaluate import merge_predictions, report_predictions

    manifest = read_manifest(location)
    groups = [list(range(i, min(i + shards_per_task, len(manifest.shards))))
              for i in range(0, len(manifest.shards), shards_per_task)]
    remote = ray.remote(num_cpus=1, num_gpus=gpus_per_task, max_retries=MAX_RETRIES)(_predict_group)
    parts: dict[int, tuple] = {}
    _in_flight(2 * _cluster_cpus(), lambda g: remote.remote(checkpoint, manifest.root, g, image_size, batch_size,
                                                            precision),
               groups, lambda r: parts.__setitem__(r[0][0], r[1]))
    ordered = [parts[g[0]] for g in groups]  # shard order, whatever order the tasks finished in
    per_task = [len(p[1]) for p in ordered]
    extra = {**(report.pop("extra", None) or {}), "ray_tasks": per_task, "ranks": per_task}
    return report_predictions(manifest, *merge_predictions(manifest, ordered), out_dir, image_size=image_size,
                              extra=extra, **report)


# -- mine -------------------------------------------------------------------------------------------------------
def _mine_group(job, fingerprint: str, shards: list[int]) -> dict[str, int]:
    from trainer.mine import score_shares

    return score_shares(job, fingerprint, shards)


def ray_mine(job, *, shards_per_task: int = 4, gpus_per_task: float = 0.0) -> dict[str, Any]:
    """`bgsplit mine --ray`: each task scores a few shares of the pool and publishes a part per share; a task whose
    worker died is retried (its finished shares are skipped), then the driver merges the parts and publishes."""
    import ray

    from data.shards import read_manifest
    from trainer.mine import checkpoint_facts, pool_identity, publish

    manifest = read_manifest(job.pool)
    checkpoint_id, class_names = checkpoint_facts(job.checkpoint)
    fingerprint = job.fingerprint(checkpoint_id, pool_identity(manifest))
    groups = [list(range(i, min(i + shards_per_task, len(manifest.shards))))
              for i in range(0, len(manifest.shards), shards_per_task)]
    remote = ray.remote(num_cpus=1, num_gpus=gpus_per_task, max_retries=MAX_RETRIES)(_mine_group)
    totals = {"scored": 0, "shares": 0, "reused": 0, "ray_tasks": len(groups)}

    def add(done: dict[str, int]) -> None:
        for k, v in done.items():
            totals[k] += v

    _in_flight(2 * _cluster_cpus(), lambda g: remote.remote(job, fingerprint, g), groups, add)
    return {**publish(job, fingerprint, manifest, class_names), "this_run": totals}
