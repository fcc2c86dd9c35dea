"""Chaos bench: the faults a long cluster run meets, each against the same short training run, and what each cost.

One training run (Fashion-MNIST shards on a loopback SeaweedFS, resnet18 from scratch at 32 px, one process,
checkpoints every few steps to a local run folder) is run once clean, then once per fault:

- damaged_headers: one byte changed in one member header of one sample of every shard;
- throttling: a proxy in front of the store answers the first shard reads 503 SlowDown (Retry-After 0.2 s);
- shard_rewritten: a shard is rewritten in place (other content and size) once the run has a checkpoint;
- disk_full: the second checkpoint's state.pt meets ENOSPC (injected at storage._sync); the run stops with its one
  line and the same command with run.resume=auto finishes it.

A killed Ray head needs a Ray cluster; tests/test_killed_head.py runs it (slow), not this bench.

Per fault: survived (the planned steps were reached, by the run itself or by its resume), steps lost (trained,
then thrown away: between the last checkpoint and the stop), samples skipped (summary.json's counts), throttling
answers counted, and wall time added over the clean run (one run each: +-30% on shared cores).

    OMP_NUM_THREADS=1 .venv/bin/python bench/faults.py --json bench/results/faults/results.json
"""
from __future__ import annotations

import argparse
import errno
import io
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from loader import endpoint  # noqa: E402  (bench/loader.py: s3fs pointed at a proxy for a block)


def _config(train: str, out: str, steps: int, every: int, *extra: str):
    from trainer.config import load_config

    return load_config(None, [f"data.train={train}", "data.val=", "data.image_size=32", "data.batch_size=16",
                              "data.shuffle_buffer_mb=0.1", "data.num_workers=0", "model.trunk=resnet18",
                              "model.weights=NONE", "loss.aux_weight=0", "teacher.mode=cached", "optim.lr=0.01",
                              "optim.warmup_epochs=0", f"run.max_steps={steps}", f"run.checkpoint_every={every}",
                              "run.log_every=1", "run.progress=false", "run.device=cpu", "run.precision=fp32",
                              f"run.out_dir={out}", *extra])


def _run(cfg) -> tuple[dict[str, Any] | None, str, float]:
    """(summary or None, the error line, seconds) of one training run in this process."""
    from data import remote
    from trainer.train import train

    remote.STATS.update(dict.fromkeys(remote.STATS, 0))  # the summary's counts are this run's own
    start = time.time()
    try:
        return train(cfg), "", time.time() - start
    except (ValueError, OSError) as e:  # what the CLI would print as its one line
        return None, f"{type(e).__name__}: {e}", time.time() - start


def _last_logged(out: str) -> int:
    path = Path(out, "metrics.jsonl")
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line] if path.exists() else []
    return max(steps, default=0)


def _row(fault: str, summary, error: str, seconds: float, base: float, steps: int, lost: int = 0,
         note: str = "") -> dict[str, Any]:
    skipped = (summary or {}).get("skipped") or {}
    io_counts = (summary or {}).get("storage") or {}
    return {"fault": fault, "survived": bool(summary and summary["steps"] == steps), "steps": (summary or {}).get(
        "steps"), "steps_lost": lost, "samples_skipped": sum(skipped.values()), "skipped": skipped,
        "throttled": io_counts.get("throttled", 0), "retries": io_counts.get("retries", 0),
        "wall_s": round(seconds, 1), "wall_added_s": round(seconds - base, 1), "error": error, "note": note}


def _copy_set(src: str, dst: str) -> str:
    from data import storage

    for name in storage.listdir(src):
        storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))
    return dst


def _damage_every_shard(root: str) -> int:
    """One byte of the first member header of sample 5 of every shard (the issue's case); returns how many."""
    from data import storage
    from data.shards import read_manifest, read_record

    m = read_manifest(root)
    for info in m.shards:
        url = storage.join(root, info.url)
        blob = bytearray(storage.read_bytes(url))
        blob[read_record(m, info)["offsets"][5] + 2] ^= 0x5A  # its name field
        storage.write_bytes(url, bytes(blob))
    return len(m.shards)


def _rewrite_when_checkpointed(root: str, out: str, shard: int, stop: threading.Event) -> threading.Thread:
    """Rewrite one shard in place (other content, another size) once the run wrote its first checkpoint."""
    from data import storage
    from data.shards import read_manifest, read_record
    from trainer.checkpoint import latest_checkpoint

    def rewrite() -> None:
        while latest_checkpoint(out) is None and not stop.is_set():
            time.sleep(0.05)
        m = read_manifest(root)
        info = m.shards[shard]
        url = storage.join(root, info.url)
        blob = bytearray(storage.read_bytes(url))
        blob[read_record(m, info)["offsets"][-1] - 600] ^= 0xFF  # other content, and another size, as a rebuild
        storage.write_bytes(url, bytes(blob + b"\0" * 1024))

    thread = threading.Thread(target=rewrite, daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="planned steps of each run")
    p.add_argument("--every", type=int, default=10, help="checkpoint interval, steps")
    p.add_argument("--images", type=int, default=640, help="Fashion-MNIST training images (shards of 40)")
    p.add_argument("--json", default="", help="write the rows here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    import torch

    torch.set_num_threads(1)
    from data import storage
    from data.build import BuildSpec, build_set
    from data.sources import FashionMNISTSource
    from s3_server import SeaweedS3
    from throttle_proxy import ThrottleProxy

    scratch = Path(tempfile.mkdtemp(prefix="bgsplit-faults-"))
    server = SeaweedS3(scratch / "seaweedfs").start()
    rows: list[dict[str, Any]] = []
    try:
        os.environ.update(server.env)
        clean = f"s3://{server.bucket}/faults/train"
        build_set(FashionMNISTSource("train"), BuildSpec("fmnist:train", ("1", "8"), positives_per_class=16,
                                                         max_background=a.images - 32, seed=0, max_count=40),
                  clean, progress=False)

        def run(name: str, train: str, *extra: str):
            out = str(scratch / "runs" / name)
            return out, _config(train, out, a.steps, a.every, *extra)

        _run(run("warm-up", clean)[1])  # imports and first-run costs, so the clean figure is a fair baseline
        out, cfg = run("clean", clean)
        summary, error, base = _run(cfg)
        rows.append(_row("none (clean run)", summary, error, base, base, a.steps))

        damaged = _copy_set(clean, f"s3://{server.bucket}/faults/damaged")
        n = _damage_every_shard(damaged)
        out, cfg = run("damaged", damaged)
        summary, error, took = _run(cfg)
        rows.append(_row("damaged_headers", summary, error, took, base, a.steps,
                         note=f"{n} samples damaged (one per shard), skipped once per epoch read "
                              f"({a.steps * 16 / (a.images):.2f} epochs)"))

        with ThrottleProxy(server.endpoint.split("://", 1)[1], 30, 503, 0.2, match=".tar",
                           log=str(scratch / "throttled.log")) as proxy, endpoint(proxy.endpoint):
            out, cfg = run("throttled", clean)
            summary, error, took = _run(cfg)
            rows.append(_row("throttling", summary, error, took, base, a.steps,
                             note=f"the proxy answered {proxy.throttled()} shard reads 503 SlowDown, Retry-After 0.2"))

        rewritten = _copy_set(clean, f"s3://{server.bucket}/faults/rewritten")
        out, cfg = run("rewritten", rewritten)
        stop = threading.Event()
        thread = _rewrite_when_checkpointed(rewritten, out, 0, stop)
        summary, error, took = _run(cfg)
        stop.set()
        thread.join()
        rows.append(_row("shard_rewritten", summary, error, took, base, a.steps,
                         note="shard 0 rewritten in place after the first checkpoint"))

        out, cfg = run("disk_full", clean)
        real, saves = storage._sync, []

        def full(f, path):
            if os.path.basename(path).startswith(".state.pt."):
                saves.append(path)
                if len(saves) == 2:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(f, path)

        storage._sync = full
        try:
            failed, error, took = _run(cfg)
        finally:
            storage._sync = real
        stopped_at, kept = _last_logged(out), a.every  # the first checkpoint is the one that stays
        _, resume_cfg = run("disk_full", clean, "run.resume=auto")
        summary, _, took2 = _run(resume_cfg)
        rows.append(_row("disk_full", summary, error, took + took2, base, a.steps, lost=stopped_at - kept,
                         note=f"stopped at step {stopped_at} with one line; resumed from step {kept}"))
    finally:
        server.stop()
    for r in rows:
        print(f"{r['fault']:>18}: survived {r['survived']}, steps lost {r['steps_lost']}, samples skipped "
              f"{r['samples_skipped']}, throttled {r['throttled']}, retries {r['retries']}, wall {r['wall_s']} s "
              f"({r['wall_added_s']:+} s){'; ' + r['note'] if r['note'] else ''}"
              f"{'; error: ' + r['error'] if r['error'] else ''}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"bench": "faults", "steps": a.steps, "checkpoint_every": a.every,
                                            "images": a.images, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
