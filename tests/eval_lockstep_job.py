"""Two gloo ranks score a shard set whose shares are 5 batches and 1 batch, with ``lockstep``, through a model
whose every forward is a collective (as under ZeRO-3, where each forward gathers the partitioned weights from
all ranks). Run as a script by tests/test_eval_distributed.py, under a timeout: without lockstep it hangs."""
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.shards import read_manifest  # noqa: E402
from trainer.evaluate import evaluate_student  # noqa: E402
from trainer.scoring import ScoringConfig  # noqa: E402


class Gathering(nn.Module):
    """A student whose weight is all-reduced in every forward: a rank that runs fewer forwards than the
    others leaves them waiting in it."""

    def __init__(self, classes: int, world: int):
        super().__init__()
        torch.manual_seed(0)  # the same weights on every rank
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, classes)
        self.world, self.collective, self.forwards = world, True, 0

    def forward(self, x: torch.Tensor, with_aux: bool = False) -> dict[str, torch.Tensor]:
        self.forwards += 1
        w = self.fc.weight.detach().clone()
        if self.collective:
            dist.all_reduce(w)  # the same weight on every rank, so the sum over ranks / world is exact
            w = w / self.world
        h = self.conv(x.float() / 255).mean((2, 3))
        return {"main": h @ w.T + self.fc.bias}


def run(rank: int, world: int, root: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    manifest = read_manifest(root)
    model = Gathering(manifest.num_classes, world)
    together = evaluate_student(model, manifest, ScoringConfig(8, 8), torch.device("cpu"), rank=rank, world=world,
                                lockstep=True, keep_predictions=True)
    (probs, labels, keys, _), ranks = together["predictions"], together["ranks"]
    forwards = model.forwards
    model.collective = False
    alone, _, alone_keys, _ = evaluate_student(model, manifest, ScoringConfig(8, 8), torch.device("cpu"),
                                               keep_predictions=True)["predictions"]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"forwards": forwards, "ranks": ranks, "keys": keys, "alone_keys": alone_keys,
                   "same_scores": bool((probs == alone).all()), "labels": labels.tolist()}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    root, port, out = sys.argv[1:4]
    mp.spawn(run, args=(2, root, int(port), out), nprocs=2, join=True)
