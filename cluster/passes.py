"""The heavy passes over a whole shard set as Ray tasks: `shards build`, `teacher-label`, `eval` and `mine` with
``--ray``.

Over millions of images one machine's process pool is the bottleneck; these run the very same per-shard work
as Ray tasks spread over the cluster (data.ingest.write_task for a build; for eval, teacher-label and mine the
``run`` of their trainer.shard_pass pass), while the driver only plans and publishes: the build's manifest, the
report, the label set's ``labels.json``, the candidates. Every task works on whole shards and publishes each one
whole, so a failed task is retried by Ray (``max_retries``) and a failed job re-run resumes from the shards
already done. Sources, shard sets and checkpoints must be reachable from every node (object storage, or a
shared file system).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m cluster.cli shards build --ray --source folder:s3://b/raw --rare 3,5 --out s3://b/sets/train
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cluster.ray_train import connect  # noqa: F401 - the one way to join a cluster, where the passes' callers look

log = logging.getLogger("bgsplit.cluster")

MAX_RETRIES = 3
"""Ray retries of a task whose worker died; the task's output is only published whole, so a retry is safe."""


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


# -- eval, teacher-label, mine ----------------------------------------------------------------------------------
def _run_group(p, shards: list[int]) -> tuple[list[int], Any]:
    """One Ray task: the pass's work on a group of shards, on the device this task was given."""
    import os

    from trainer.runtime import resolve_device

    os.environ["BGSPLIT_PROGRESS"] = "0"  # the driver reports the tasks; a line from each task would drown it
    return shards, p.run(shards, resolve_device("auto"))  # BGSPLIT_REQUIRE_GPU holds in a task too


def ray_pass(p, *, shards_per_task: int = 4, gpus_per_task: float = 0.0) -> Any:
    """Run a trainer.shard_pass pass as Ray tasks of a few whole shards each (data.plan.shard_groups, the split
    torchrun ranks use), at most two per cluster CPU in flight; the driver publishes. A task whose worker died is
    retried by Ray; a failed job re-run does only the shards without output (the pass's ``todo``)."""
    import ray

    from data.plan import shard_groups

    early = p.begin()
    if early is not None:
        return early
    counts = p.shard_counts()
    todo = p.todo(list(range(len(counts))))
    groups = [[todo[i] for i in g] for g in shard_groups([counts[s] for s in todo], shards_per_task)]
    remote = ray.remote(num_cpus=1, num_gpus=gpus_per_task, max_retries=MAX_RETRIES)(_run_group)
    handle = ray.put(p)  # one copy in the object store, not one per task
    parts: dict[int, tuple[list[int], Any]] = {}
    from data.progress import progress

    bar = progress(sum(counts[s] for s in todo), unit="img", desc=f"{p.name} by Ray tasks")

    def finished(r: tuple[list[int], Any]) -> None:
        parts[r[0][0]] = r
        bar.update(sum(counts[s] for s in r[0]))

    _in_flight(2 * _cluster_cpus(), lambda g: remote.remote(handle, g), groups, finished)
    bar.close()
    log.info("%s %d of %d shards in %d Ray tasks", p.name, len(todo), len(counts), len(groups))
    return p.publish([parts[g[0]] for g in groups])  # shard order, whatever order the tasks finished in
