"""Mining throughput: images/s scoring a pool with `bgsplit mine`, from local and S3 shards, over loader workers
and processes.

The pool is Fashion-MNIST's test split (10,000 real images) sharded twice, on local disk and in a SeaweedFS
bucket on loopback; the student is the demo recipe's EfficientNet-Lite0 at 64 px (scores do not depend on how
well it was trained, so a 2-step checkpoint serves). A cell scores the whole pool into a fresh output folder and
counts everything a user waits for: loading the checkpoint, reading, decoding, the forward passes, publishing
the parts, the merge, and the review outputs. ``procs`` > 1 runs that many ranks at once (as torchrun would),
each with its share of the shards and cpu_count / procs threads.

    python bench/mine.py --json artifacts/bench/mine.json [--images 10000] [--workers 0,1,2] [--procs 1,2]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _rank(job, rank: int, world: int, threads: int) -> None:
    import torch

    from data.plan import split_shards
    from data.shards import manifest_identity, read_manifest
    from trainer.mine import checkpoint_facts, score_shares

    torch.set_num_threads(threads)
    manifest = read_manifest(job.pool)
    score_shares(job, job.fingerprint(checkpoint_facts(job.checkpoint)[0], manifest_identity(manifest.root)),
                 split_shards([s.count for s in manifest.shards], rank, world))


def measure(job, procs: int) -> dict:
    """Wall time of one whole mine: ``procs`` ranks score their shares, then rank 0's merge and publish."""
    import torch

    from trainer.mine import mine

    start = time.time()
    threads = max(1, (os.cpu_count() or 1) // procs)
    if procs > 1:
        ctx = mp.get_context("spawn")
        workers = [ctx.Process(target=_rank, args=(job, r, procs, threads)) for r in range(procs)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
            if w.exitcode:
                raise RuntimeError(f"a scoring rank exited with {w.exitcode}")
    torch.set_num_threads(os.cpu_count() or 1)
    summary = mine(job)  # with procs > 1 every share is done: this is the merge and the outputs
    seconds = time.time() - start
    return {"img_s": summary["scored"] / seconds, "seconds": seconds, "images": summary["scored"],
            "shares": summary["shares"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--workers", default="0,1,2", help="loader workers (decoding processes) per rank")
    p.add_argument("--procs", default="1,2", help="ranks scoring at once")
    p.add_argument("--top", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", default=str(ROOT / "artifacts" / "bench" / "mine.json"))
    args = p.parse_args(argv)

    from s3_server import SeaweedS3

    from data.build import BuildSpec, build_set
    from data.sources import FashionMNISTSource
    from trainer.config import load_config
    from trainer.mine import MineJob
    from trainer.scoring import ScoringConfig
    from trainer.train import train

    scratch = Path(tempfile.mkdtemp(prefix="bgsplit-mine-bench-"))
    server = None
    t0 = time.time()
    try:
        server = SeaweedS3(scratch / "seaweedfs").start()
        os.environ.update(server.env)
        spec = BuildSpec("fmnist:test", (), subsample=args.images if args.images < 10000 else None, max_count=1000)
        src = FashionMNISTSource("test")
        pools = {"local": str(scratch / "pool"), "s3": f"s3://{server.bucket}/pool"}
        for location in pools.values():
            build_set(src, spec, location, progress=False)
        small = build_set(src, BuildSpec("fmnist:test", ("3",), subsample=200, max_count=100),
                          str(scratch / "small"), progress=False)
        cfg = load_config(ROOT / "configs" / "fmnist_bg.yaml", [
            f"data.train={small.root}", "data.val=", "data.test=", "run.max_steps=2", "run.progress=false",
            f"run.out_dir={scratch / 'run'}", "loss.aux_weight=0"])
        checkpoint = train(cfg)["checkpoint"]
        cells = []
        for storage_name, pool in pools.items():
            for procs in [int(x) for x in args.procs.split(",")]:
                for workers in [int(x) for x in args.workers.split(",")]:
                    if procs > 1 and workers > 0:
                        continue  # 2 cores: ranks x decoding processes would only measure oversubscription
                    out = scratch / f"out-{storage_name}-{procs}-{workers}"
                    job = MineJob(checkpoint=checkpoint, pool=pool, out=str(out), top=args.top,
                                  scoring=ScoringConfig(64, args.batch_size, workers, precision="auto"))
                    cell = {"storage": storage_name, "procs": procs, "workers": workers, **measure(job, procs)}
                    cells.append(cell)
                    print(f"  {storage_name:5s} procs={procs} workers={workers}: {cell['img_s']:7.1f} img/s "
                          f"({cell['images']} images, {cell['seconds']:.1f}s)", flush=True)
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        result = {"config": vars(args), "cpus": os.cpu_count(), "machine": platform.platform(), "device": device,
                  "cells": cells, "seconds_total": round(time.time() - t0, 1)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"results in {args.json} ({result['seconds_total']}s)")
    finally:
        if server is not None:
            server.stop()  # by its PID
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
