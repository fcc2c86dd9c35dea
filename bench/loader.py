"""Loader throughput: images/s and MB/s of the training input pipeline (shard read, decode, random-resized crop,
flip, collate; data.loader.ShardStream + make_loader exactly as trainer/train.py builds them) over
local disk vs S3 (a SeaweedFS server on loopback), loader workers, and raw vs pre-resized shards.

The data are Fashion-MNIST images upscaled to 1000x800 with a colour tint and sensor-like noise, saved as JPEG
q95: decode cost and file size like full-size photos (~0.3 MB each). `bgsplit shards build`'s ingest
(data.build) turns them into two shard sets: "raw" (bytes as they are) and "resized" (short side 320, q90).

    .venv/bin/python bench/loader.py --quick                 # smoke check, under a minute
    .venv/bin/python bench/loader.py --images 4000 --workers 0,1,2,4 --seconds 20

MB/s counts shard bytes consumed (images/s x mean stored bytes per sample), the figure to hold against disk
or network bandwidth. Run it on a quiet machine: every cell competes with whatever else runs.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402

RARE = ("1", "8")
PHOTO_SIZE = (1000, 800)
_FMNIST: Any = None


def _photo(index: int) -> tuple[str, bytes]:
    """One synthetic "photo": runs in a forked pool, so the parent's loaded Fashion-MNIST is shared."""
    from PIL import Image

    rng = np.random.default_rng([7, index])
    grey = Image.fromarray(_FMNIST.pixels(index)).resize(PHOTO_SIZE, Image.BICUBIC)
    tint = rng.uniform(0.6, 1.0, size=3)
    pixels = np.asarray(grey, dtype=np.float32)[..., None] * tint
    pixels += rng.normal(0.0, 6.0, size=pixels.shape)
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=95)
    return f"{int(_FMNIST.labels()[index])}/fm-{index:06d}.jpg", out.getvalue()


def make_photos(folder: Path, count: int, workers: int) -> None:
    """root/<label>/<file>.jpg, an image folder like any photo dataset; files already there are kept."""
    global _FMNIST
    from data.sources import FashionMNISTSource

    _FMNIST = FashionMNISTSource("train")
    _FMNIST.labels()
    missing = [i for i in range(count)
               if not (folder / str(int(_FMNIST.labels()[i])) / f"fm-{i:06d}.jpg").exists()]
    if not missing:
        return
    with ProcessPoolExecutor(max(1, workers), mp_context=mp.get_context("fork")) as pool:
        for rel, data in pool.map(_photo, missing, chunksize=16):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)


def build_sets(photos: Path, dest: str, shard_mb: float, workers: int) -> dict[str, Any]:
    from data.build import BuildSpec, build_set
    from data.sources import ImageFolderSource

    common: dict[str, Any] = dict(source=f"folder:{photos}", rare=RARE, max_bytes=int(shard_mb * (1 << 20)))
    specs = {"raw": BuildSpec(**common), "resized": BuildSpec(**common, resize_short_side=320, jpeg_quality=90)}
    source = ImageFolderSource(photos)
    return {name: build_set(source, spec, f"{dest}/{name}", progress=False, workers=workers)
            for name, spec in specs.items()}


def measure(manifest: Any, workers: int, seconds: float, batch_size: int, image_size: int) -> dict[str, Any]:
    """Batches per second after the first (worker start-up and first shard open are not throughput), over at
    least ``seconds`` and two batches; the stream runs epoch after epoch as in training."""
    from data.loader import ShardStream, make_loader

    stream = ShardStream(manifest, train=True, image_size=image_size, batch_size=batch_size, seed=0,
                         workers=workers)
    if stream.batches_per_epoch() == 0:
        raise ValueError(f"{manifest.root} gives no batch of {batch_size}: use more --images")
    images = batches = skipped = 0
    first: float | None = None
    for batch in make_loader(stream, workers):
        skipped += int(batch["skipped"].sum())
        if "image" not in batch:
            continue
        now = time.perf_counter()
        if first is None:
            first = now
            continue
        images, batches = images + len(batch["key"]), batches + 1
        if now - first >= seconds and batches >= 2:
            per_image = sum(s.bytes for s in manifest.shards) / manifest.count
            rate = images / (now - first)
            return {"img_s": rate, "mb_s": rate * per_image / (1 << 20), "batches": batches,
                    "seconds": now - first, "skipped": skipped, "bytes_per_image": per_image}
    raise AssertionError("a training stream never ends")


def table(cells: list[dict[str, Any]]) -> str:
    local = {(c["shards"], c["workers"]): c["img_s"] for c in cells if c["storage"] == "local"}
    rows = ["| source | shards | workers | img/s | MB/s | S3/local |", "|---|---|---|---:|---:|---:|"]
    for c in cells:
        base = local.get((c["shards"], c["workers"]))
        ratio = f"{c['img_s'] / base:.2f}" if c["storage"] == "s3" and base else "-"
        rows.append(f"| {c['storage']} | {c['shards']} | {c['workers']} | {c['img_s']:.1f} | {c['mb_s']:.1f} | "
                    f"{ratio} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="synthetic photos to generate and shard")
    p.add_argument("--workers", default="0,1,2", help="loader worker counts to measure, comma separated")
    p.add_argument("--seconds", type=float, default=15.0, help="measuring time per cell, after the first batch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--shard-mb", type=float, default=64.0, help="target shard size of the built sets")
    p.add_argument("--build-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--data", help="keep generated photos and local shard sets here (reused by the next run)")
    p.add_argument("--json", "--out", dest="out", default=str(ROOT / "artifacts" / "bench" / "loader.json"),
                   help="results JSON")
    p.add_argument("--quick", action="store_true", help="a smoke check: 128 images, workers 0,1, 1 s a cell")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.workers, args.seconds, args.shard_mb = 128, "0,1", 1.0, 6.0
    workers = [int(w) for w in args.workers.split(",")]

    from s3_server import SeaweedS3

    scratch = Path(tempfile.mkdtemp(prefix="bgsplit-bench-"))
    data = Path(args.data) if args.data else scratch / "data"
    server = None
    try:
        t0 = time.time()
        make_photos(data / "photos", args.images, args.build_workers)
        print(f"{args.images} photos in {data / 'photos'} ({time.time() - t0:.0f}s)", flush=True)
        server = SeaweedS3(scratch / "seaweedfs").start()
        os.environ.update(server.env)
        sets = {"local": build_sets(data / "photos", str(data / "shards"), args.shard_mb, args.build_workers),
                "s3": build_sets(data / "photos", f"s3://{server.bucket}/bench", args.shard_mb,
                                 args.build_workers)}
        cells = []
        for storage_name, built in sets.items():
            for shards, manifest in built.items():
                for w in workers:
                    cell = {"storage": storage_name, "shards": shards, "workers": w,
                            **measure(manifest, w, args.seconds, args.batch_size, args.image_size)}
                    cells.append(cell)
                    print(f"  {storage_name:5s} {shards:7s} workers={w}: {cell['img_s']:7.1f} img/s "
                          f"{cell['mb_s']:7.1f} MB/s", flush=True)
        print()
        print(table(cells))
        result = {"config": vars(args), "cpus": os.cpu_count(),
                  "machine": platform.platform(), "python": platform.python_version(),
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                  "sets": {f"{s}/{k}": {"images": m.count, "shards": len(m.shards),
                                        "bytes": sum(x.bytes for x in m.shards)}
                           for s, built in sets.items() for k, m in built.items()},
                  "cells": cells, "seconds_total": round(time.time() - t0, 1)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"\nresults in {args.out} ({result['seconds_total']}s)")
    finally:
        if server is not None:
            server.stop()  # by its PID
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
