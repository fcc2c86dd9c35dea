"""Loader throughput: images/s and MB/s of the training input pipeline (shard read, decode, random-resized crop,
flip, collate; data.loader.ShardStream + make_loader exactly as trainer/train.py builds them) over
local disk vs S3 (a SeaweedFS server on loopback), loader workers, and raw vs pre-resized shards.

The data are Fashion-MNIST images upscaled to 1000x800 with a colour tint and sensor-like noise, saved as JPEG
q95: decode cost and file size like full-size photos (~0.3 MB each). `bgsplit shards build`'s ingest
(data.build) turns them into two shard sets: "raw" (bytes as they are) and "resized" (short side 320, q90).

    .venv/bin/python bench/loader.py --quick                 # smoke check, under a minute
    .venv/bin/python bench/loader.py --images 4000 --workers 0,1,2,4 --seconds 20
    .venv/bin/python bench/loader.py --s3-latency-ms 50 --read-ahead-mb 0,32   # a real region's first-byte wait

``--s3-latency-ms N`` adds S3 cells read through bench/latency_proxy.py, which holds back the first byte of every
response by N ms (a loopback SeaweedFS answers in ~1 ms, a real S3 region in 20-80 ms); ``--read-ahead-mb``
lists the data.read_ahead_mb values the S3 cells run with (0: each range fetched when the decoder needs it).

MB/s counts shard bytes consumed (images/s x mean stored bytes per sample), the figure to hold against disk
or network bandwidth. Run it on a quiet machine: every cell competes with whatever else runs.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

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


def measure(manifest: Any, workers: int, seconds: float, batch_size: int, image_size: int,
            read_ahead_mb: float = 32.0) -> dict[str, Any]:
    """Batches per second after the first (worker start-up and first shard open are not throughput), over at
    least ``seconds`` and two batches; the stream runs epoch after epoch as in training."""
    from data import remote
    from data.loader import ShardStream, make_loader
    from data.config import LoaderConfig

    stream = ShardStream(manifest, LoaderConfig(image_size=image_size, batch_size=batch_size, num_workers=workers,
                                                read_ahead_mb=read_ahead_mb),
                         train=True, seed=0)
    if stream.batches_per_epoch() == 0:
        raise ValueError(f"{manifest.root} gives no batch of {batch_size}: use more --images")
    images = batches = skipped = delivered = 0
    fetched = -remote.STATS["bytes_read"]  # a worker process reports its own in the batches
    first: float | None = None
    for batch in make_loader(stream, workers):
        skipped += int(batch["skipped"].sum())
        fetched += batch.get("storage", {}).get("bytes_read", 0)
        if "image" not in batch:
            continue
        delivered += len(batch["key"])
        now = time.perf_counter()
        if first is None:
            first = now
            continue
        images, batches = images + len(batch["key"]), batches + 1
        if now - first >= seconds and batches >= 2:
            per_image = sum(s.bytes for s in manifest.shards) / manifest.count
            rate = images / (now - first)
            fetched += remote.STATS["bytes_read"]
            return {"img_s": rate, "mb_s": rate * per_image / (1 << 20), "batches": batches,
                    "seconds": now - first, "skipped": skipped, "bytes_per_image": per_image,
                    # object-store bytes fetched per image delivered, first batch included: read-ahead must not
                    # fetch what is never read (compare bytes_per_image)
                    "fetched_per_image": fetched / delivered}
    raise AssertionError("a training stream never ends")


def configurations(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration (storage, shards, workers, read-ahead, latency): the median of its repeats."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["storage"], c["shards"], c["workers"], c["read_ahead_mb"], c["latency_ms"]), []).append(c)
    rows = []
    for (storage_name, shards, w, ra, ms), group in groups.items():
        rates = sorted(c["img_s"] for c in group)
        rows.append({"storage": storage_name, "shards": shards, "workers": w, "read_ahead_mb": ra, "latency_ms": ms,
                     "img_s": float(np.median(rates)), "img_s_runs": rates,
                     "mb_s": float(np.median([c["mb_s"] for c in group])),
                     "fetched_per_image": float(np.median([c["fetched_per_image"] for c in group])),
                     "bytes_per_image": group[0]["bytes_per_image"]})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Per (read-ahead, shards, workers): local, S3 and S3 + latency img/s, their ratios to local, and S3 +
    latency over S3 (what the latency itself costs, apart from what serving S3 on this machine costs)."""
    local = {(c["shards"], c["workers"]): c["img_s"] for c in rows if c["storage"] == "local"}
    remote = {(c["read_ahead_mb"], c["latency_ms"], c["shards"], c["workers"]): c["img_s"]
              for c in rows if c["storage"] != "local"}
    latencies = sorted({c["latency_ms"] for c in rows if c["storage"] != "local"} - {0})
    lat = [f"S3 + {ms:g} ms" for ms in latencies]
    head = (["read-ahead MB", "shards", "workers", "local img/s", "S3 img/s"] + [f"{n} img/s" for n in lat]
            + ["S3/local"] + [f"{n} / local" for n in lat] + [f"{n} / S3" for n in lat])
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if h == "shards" else "---:" for h in head) + "|"]

    def ratio(value: float | None, base: float | None) -> str:
        return f"{value / base:.2f}" if value is not None and base else "-"

    for ra in sorted({c["read_ahead_mb"] for c in rows if c["storage"] != "local"}):
        for shards, w in sorted(local):
            base = local[shards, w]
            s3 = remote.get((ra, 0, shards, w))
            slow = [remote.get((ra, ms, shards, w)) for ms in latencies]
            cols = [f"{ra:g}", shards, str(w), f"{base:.1f}"] + [f"{v:.1f}" if v is not None else "-"
                                                                  for v in [s3, *slow]]
            cols += [ratio(v, base) for v in [s3, *slow]] + [ratio(v, s3) for v in slow]
            out.append("| " + " | ".join(cols) + " |")
    return "\n".join(out)


@contextlib.contextmanager
def endpoint(url: str):
    """Point s3fs at ``url`` for a block (loader workers fork with it); its cached clients keep their endpoint, so
    the cache is cleared on the way in and out."""
    import s3fs

    before = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = url
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        os.environ["AWS_ENDPOINT_URL"] = before
        s3fs.S3FileSystem.clear_instance_cache()


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
    p.add_argument("--s3-latency-ms", type=float, default=0.0,
                   help="also read S3 through a proxy that delays every response's first byte this long (0: no)")
    p.add_argument("--read-ahead-mb", default="32", help="data.read_ahead_mb values of the S3 cells, comma separated")
    p.add_argument("--repeats", type=int, default=1, help="sweeps over all cells; the table shows each one's median")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.workers, args.seconds, args.shard_mb = 128, "0,1", 1.0, 6.0
    workers = [int(w) for w in args.workers.split(",")]
    # s3fs clients dropped when a cell switches endpoint (and those a forked worker inherits) report their unclosed
    # aiohttp sessions when collected: true, harmless here, and a screenful per cell
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    read_aheads = [float(r) for r in args.read_ahead_mb.split(",")]

    from latency_proxy import LatencyProxy
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
        proxy = None
        if args.s3_latency_ms > 0:
            proxy = LatencyProxy(server.endpoint.split("://", 1)[1], args.s3_latency_ms).start()

        def run_cell(storage_name: str, shards: str, w: int, read_ahead: float | None, latency: float,
                     repeat: int) -> None:
            manifest = sets["local" if storage_name == "local" else "s3"][shards]
            with endpoint(proxy.endpoint) if latency else contextlib.nullcontext():
                cell = {"storage": storage_name, "shards": shards, "workers": w, "read_ahead_mb": read_ahead,
                        "latency_ms": latency, "repeat": repeat,
                        **measure(manifest, w, args.seconds, args.batch_size, args.image_size,
                                  32.0 if read_ahead is None else read_ahead)}
            cells.append(cell)
            ra = "-" if read_ahead is None else f"{read_ahead:g}"
            print(f"  {storage_name:9s} read-ahead {ra:>3s} MB {shards:7s} workers={w}: "
                  f"{cell['img_s']:7.1f} img/s {cell['mb_s']:7.1f} MB/s", flush=True)

        # the configurations of one set and worker count run back to back, and the whole sweep --repeats times
        # (the table takes medians), so that a slow minute of the machine or of the store falls on all of them
        try:
            for repeat in range(args.repeats):
                for shards in sets["local"]:
                    for w in workers:
                        run_cell("local", shards, w, None, 0.0, repeat)  # read-ahead is for remote shards only
                        for read_ahead in read_aheads:
                            run_cell("s3", shards, w, read_ahead, 0.0, repeat)
                            if proxy is not None:
                                run_cell(f"s3+{args.s3_latency_ms:g}ms", shards, w, read_ahead,
                                         args.s3_latency_ms, repeat)
        finally:
            if proxy is not None:
                proxy.stop()  # by its PID
        rows = configurations(cells)
        print()
        print(table(rows))
        result = {"config": vars(args), "cpus": os.cpu_count(),
                  "machine": platform.platform(), "python": platform.python_version(),
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                  "sets": {f"{s}/{k}": {"images": m.count, "shards": len(m.shards),
                                        "bytes": sum(x.bytes for x in m.shards)}
                           for s, built in sets.items() for k, m in built.items()},
                  "rows": rows, "table": table(rows), "cells": cells, "seconds_total": round(time.time() - t0, 1)}
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
