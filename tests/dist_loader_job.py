"""Two gloo ranks read a deliberately uneven shard set and all_reduce once per batch (a hang if their step
counts differ). Run as a script by tests/test_distributed.py, under a timeout."""
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.loader import ShardStream, make_loader  # noqa: E402

from data.config import LoaderConfig
from data.shards import read_manifest  # noqa: E402


def run(rank: int, world: int, root: str, port: int, out: str, mode: str, policy: str, workers: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    stream = ShardStream(read_manifest(root), LoaderConfig(image_size=8, batch_size=4, mode=mode, pad_policy=policy,
                                                           num_workers=workers, shuffle_buffer_mb=0.01),
                         train=True, seed=0, rank=rank, world=world)
    stream.epochs = 2  # one loader pass over both epochs, as the trainer runs it
    steps, keys = [0, 0], []
    for batch in make_loader(stream, workers):
        if "image" not in batch:
            continue
        t = torch.ones(1)
        dist.all_reduce(t)  # every rank must get here the same number of times
        steps[batch["position"][0]] += 1
        keys.extend(batch["key"])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"steps": steps, "planned": stream.batches_per_epoch(), "keys": keys}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    root, port, out, mode, policy, workers = sys.argv[1:7]
    mp.spawn(run, args=(2, root, int(port), out, mode, policy, int(workers)), nprocs=2, join=True)
