"""The one executor of shard passes (trainer.shard_pass): the split, publishing once, and a failure on one rank
reaching every rank instead of leaving the others in a collective."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from s3_server import free_port
from data.plan import shard_groups, split_shards
from trainer.shard_pass import PassError, run_pass


@dataclass
class Toy:
    """Sums sample counts per share; ``fail_on``: the shard whose work raises; ``done``: shards already output."""

    counts: list[int]
    fail_on: int = -1
    done: set[int] = field(default_factory=set)
    finished: str | None = None
    published: list = field(default_factory=list)
    name: str = "summed"

    def shard_counts(self) -> list[int]:
        return self.counts

    def todo(self, shards: list[int]) -> list[int]:
        return [s for s in shards if s not in self.done]

    def begin(self) -> str | None:
        return self.finished

    def run(self, shards: list[int], device: torch.device) -> int:
        if self.fail_on in shards:
            raise ValueError(f"shard {self.fail_on} is corrupt")
        return sum(self.counts[s] for s in shards)

    def publish(self, parts):
        self.published.append(parts)
        return {"parts": parts}


CPU = torch.device("cpu")


def test_one_process_runs_what_is_left_and_publishes_once():
    toy = Toy([3, 1, 2], done={1})
    assert run_pass(toy, device=CPU, rank=0, world=1) == {"parts": [([0, 2], 5)]}
    assert len(toy.published) == 1
    finished = Toy([3, 1, 2], finished="already there")
    assert run_pass(finished, device=CPU, rank=0, world=1) == "already there" and not finished.published
    with pytest.raises(ValueError, match="shard 2 is corrupt"):  # one process: the error itself, not a relay
        run_pass(Toy([3, 1, 2], fail_on=2), device=CPU, rank=0, world=1)


def test_a_world_without_its_process_group_is_refused():
    with pytest.raises(ValueError, match="needs their process group"):
        run_pass(Toy([3, 1]), device=CPU, rank=1, world=2)


def test_ray_task_groups_are_whole_shards_balanced_by_samples():
    counts = [10, 1, 1, 1, 10, 1, 1, 1, 10]
    groups = shard_groups(counts, 3)
    assert sorted(s for g in groups for s in g) == list(range(len(counts)))
    assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)  # contiguous: shard order is group order
    assert groups == [split_shards(counts, i, 3) for i in range(3)]
    assert shard_groups([5], 4) == [[0]] and shard_groups([], 4) == []
    with pytest.raises(ValueError, match="at least 1"):
        shard_groups(counts, 0)


def _rank(rank: int, world: int, port: int, out: str, fail_on: int, everywhere: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    toy = Toy([4, 4, 4, 4], fail_on=fail_on)
    try:
        result = run_pass(toy, device=CPU, rank=rank, world=world, everywhere=everywhere)
        outcome = {"result": result, "published": len(toy.published)}
    except PassError as e:
        outcome = {"error": str(e), "published": len(toy.published)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("fail_on,everywhere", [(-1, False), (-1, True), (3, False)])
def test_two_ranks_split_publish_on_rank_0_and_share_a_failure(tmp_path, fail_on, everywhere):
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path), fail_on, everywhere), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    if fail_on >= 0:  # rank 1 holds shard 3: both ranks raise its error, nobody publishes
        assert all(r["error"] == "rank 1: shard 3 is corrupt" and r["published"] == 0 for r in ranks)
        return
    want = {"parts": [[[0, 1], 8], [[2, 3], 8]]}  # rank order is shard order
    assert ranks[0] == {"result": want, "published": 1}
    assert ranks[1] == {"result": want if everywhere else None, "published": 0}


def _finished_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    toy = Toy([4, 4], finished="already there")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"result": run_pass(toy, device=CPU, rank=rank, world=world)}, f)
    dist.destroy_process_group()


def test_an_output_that_exists_ends_the_pass_on_every_rank_and_only_rank_0_returns_it(tmp_path):
    """Under torchrun a finished label set is printed once, by rank 0, not once per rank."""
    mp.spawn(_finished_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["result"] for r in range(2)] == \
        ["already there", None]
