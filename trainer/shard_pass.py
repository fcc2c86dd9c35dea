"""A pass over a shard set's whole shards (evaluation, teacher labels, mining), and how one process or every rank
of a torchrun job runs it; cluster/passes.py runs the same pass as Ray tasks.

A pass says three things once: how big its shards are (``shard_counts``, for the split), which of a share still
need doing (``todo``: a re-run skips shards whose output is already published), the work on a group of shards
(``run``, anywhere: this process, a rank, a Ray task) and how the results become the pass's output (``publish``,
once, on rank 0 or the Ray driver). ``begin`` is rank 0's or the driver's step before any work (unpublish before
an overwrite); a result from it ends the pass at once (the output already exists). Everything else (the split,
the device, gathering to the publisher, errors on one rank reaching all) is the executor's, so eval, mine and
teacher-label cannot drift apart on it.

The split is data.plan.split_shards, the same for ranks and Ray tasks, over every shard of the set, never over
what is left to do: each rank sees the set's state at a different moment, and a split of "what is left" would
differ between ranks.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import torch
import torch.distributed as dist

from data.plan import split_shards
from trainer.runtime import broadcast, init_distributed, resolve_device

log = logging.getLogger("bgsplit.pass")


class PassError(ValueError):
    """One rank's failure, raised on every rank: the CLI prints it in one line (the failing rank logged the
    traceback)."""


class ShardPass(Protocol):
    name: str
    """What the pass does, for the log ("labelled", "scored")."""

    def shard_counts(self) -> list[int]: ...

    def todo(self, shards: list[int]) -> list[int]: ...

    def begin(self) -> Any | None: ...

    def run(self, shards: list[int], device: torch.device) -> Any:
        """The work on these shards; its result travels to the publisher (pickled across ranks and Ray tasks), so
        it is small or bounded (scores of an evaluation set, counts)."""

    def publish(self, parts: list[tuple[list[int], Any]]) -> Any:
        """(shards, result) of every share or task, in shard order."""


class WholeSetPass:
    """The defaults of a pass over every shard of ``self.manifest`` with nothing to skip or prepare (eval, a
    probe's features): a subclass says only its ``run`` and ``publish``."""

    manifest: Any

    def shard_counts(self) -> list[int]:
        return [s.count for s in self.manifest.shards]

    def todo(self, shards: list[int]) -> list[int]:
        return shards

    def begin(self) -> None:
        return None


_CACHE: dict[tuple[str, str], Any] = {}


def cached_model(token: str, build, what: str = "model") -> Any:
    """One model (or other costly input: ``what``) per process per pass (``token``: a pass's random id, pickled
    into each of its Ray tasks): a Ray worker runs many tasks of one pass and must not load the model for each,
    while the next pass, even of a checkpoint rewritten at the same URL, loads afresh. Only the current pass's
    entries are kept: a process serves one pass at a time."""
    if (token, what) not in _CACHE:
        for key in [k for k in _CACHE if k[0] != token]:
            del _CACHE[key]
        _CACHE[token, what] = build()
    return _CACHE[token, what]


def run_pass(p: ShardPass, *, device: torch.device | None = None, rank: int | None = None,
             world: int | None = None, everywhere: bool = False) -> Any | None:
    """Run ``p`` in this process, or as one rank of the process group (torchrun's, joined here if not yet).

    Rank 0 publishes and returns the output; the other ranks return None, or with ``everywhere`` the same output
    (training's validation: every rank decides on the best checkpoint, so every rank needs the figure). An error
    on any rank, in its work or in the publish, is raised on every rank, so none waits in a collective that the
    failed rank will never reach."""
    device = device or resolve_device("auto")
    if rank is None or world is None:
        rank, world = init_distributed(device)
    if world > 1 and not (dist.is_initialized() and dist.get_world_size() == world):
        raise ValueError(f"a pass over {world} ranks needs their process group: start it with torchrun "
                         "(trainer.runtime.init_distributed) or run with world=1")
    early = _everyone(lambda: p.begin() if rank == 0 else None, world)
    if early is not None:
        return early if rank == 0 or everywhere else None
    start = time.time()
    share = p.todo(split_shards(p.shard_counts(), rank, world))
    part, error = None, None
    try:
        part = (share, p.run(share, device))
    except Exception as e:  # noqa: BLE001 - it reaches every rank below, and is raised on every rank
        if world == 1:
            raise
        log.exception("rank %d of %d: %s failed", rank, world, p.name)
        error = f"rank {rank}: {e}"
    log.info("rank %d of %d %s %d shard(s) (%.1f s)", rank, world, p.name, len(share), time.time() - start)
    parts = _gather_to_first((part, error), world)  # rank order is shard order: the split is contiguous
    outcome: tuple[Any, str | None] = (None, None)
    if rank == 0:
        outcome = (None, next((e for _, e in parts if e), None))
        if outcome[1] is None:
            try:
                outcome = (p.publish([pt for pt, _ in parts]), None)
            except Exception as e:  # noqa: BLE001
                if world == 1:
                    raise
                outcome = (None, str(e))
    if world > 1:
        told = broadcast(outcome if everywhere else (None, outcome[1]))  # rank 0's, on every rank
        if rank != 0:
            outcome = told
    result, failed = outcome
    if failed:
        raise PassError(failed)
    return result if rank == 0 or everywhere else None


def _everyone(step, world: int) -> Any:
    """Rank 0's ``step()`` result (or its error) on every rank."""
    result, error = None, None
    try:
        result = step()
    except Exception as e:  # noqa: BLE001
        if world == 1:
            raise
        error = str(e)
    if world > 1:
        result, error = broadcast((result, error))
    if error:
        raise PassError(error)
    return result


def _gather_to_first(value: Any, world: int) -> list[Any]:
    """Every rank's value on rank 0 only (the others get an empty list): the publisher alone holds them all, so
    at 10M images a rank holds its own scores, not the set's."""
    if world == 1:
        return [value]
    out: list[Any] | None = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out or []
