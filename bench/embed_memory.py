"""The pool's embedding pass stays flat in memory as the pool grows (issue 32: "like eval").

Pools of growing size (Fashion-MNIST training images, 500 a shard, 1 image of each rare class among them) are embedded by the same pass `bgsplit mine
--positives` runs (trainer.embeddings.EmbedPass, one process, one thread), each in a fresh child process whose
peak resident memory is read at its end. Memory is set by the pass's chunk of shards (8 shards' rows at a time),
not by the pool, so the peak should not grow with it. The teacher runs at 32 px here so the largest pool this
machine embeds in minutes is as large as possible; the size changes a forward's time, not what is held per shard
(the rows are 1,280 fp16 numbers an image at any size).

    python bench/embed_memory.py --json bench/results/embed_memory/results.json [--sizes 2500,10000,40000]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _embed(pool: str, image_size: int, queue) -> None:
    import torch

    from trainer.embeddings import EmbedPass, default_location
    from trainer.scoring import ScoringConfig
    from trainer.shard_pass import run_pass

    torch.set_num_threads(1)
    p = EmbedPass(pool=pool, root=default_location(pool), arch="efficientnet_lite0", weights="DEFAULT",
                  scoring=ScoringConfig(image_size, 128))
    t0 = time.time()
    done = run_pass(p, device=torch.device("cpu"), rank=0, world=1)
    seconds = time.time() - t0
    stored = sum(f.stat().st_size for f in Path(p.cache.folder).iterdir())
    queue.put({"images": done["images"], "seconds": round(seconds, 1), "images_per_s": done["images"] / seconds,
               "bytes_per_image": stored / p.manifest.count,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="2500,10000,40000")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--work", default="")
    p.add_argument("--json", default="")
    args = p.parse_args()
    from data.build import BuildSpec, build_set
    from data.sources import FashionMNISTSource

    work = Path(args.work or tempfile.mkdtemp(prefix="embed_memory-"))
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        pool = str(work / f"pool-{n}")
        build_set(FashionMNISTSource("train"), BuildSpec("fmnist:train", ("3", "5", "6"), positives_per_class=1,
                                                         max_background=n, seed=7, max_count=500), pool)
        queue = mp.get_context("spawn").Queue()
        child = mp.get_context("spawn").Process(target=_embed, args=(pool, args.image_size, queue))
        child.start()
        row = {"pool_images": n, "image_size": args.image_size, "threads": 1, **queue.get()}
        child.join()
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
