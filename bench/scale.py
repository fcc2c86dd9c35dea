"""The data path at growing sizes: does memory or speed move with the number of samples?

For each size N it generates N small synthetic JPEGs (48 px, a few hundred bytes, 10 classes) as class-sorted
WebDataset shards, as another tool would leave them; builds a bgsplit set from them with `bgsplit shards build
--source wds:...` (the global shuffle included); labels it with a cheap stand-in teacher (a small fixed-seed
conv net with 1,000 outputs, run by the real `teacher-label` code in 2 processes, each its share of the shards);
and streams one training epoch with cached labels as 2 ranks x 2 loader workers (separate processes, the real
ShardStream + DataLoader). Every process's RSS is sampled every 0.1 s.

    .venv/bin/python bench/scale.py --sizes 10000,100000,1000000 --json artifacts/bench/scale.json
    .venv/bin/python bench/scale.py --sizes 2000 --quick        # a smoke run
    .venv/bin/python bench/scale.py --sizes 100000 --s3         # source, set and labels on a loopback SeaweedFS

One row per size: samples, build_img_s, label_img_s, loader_img_s (images per second over both ranks, first
batch to last), peak_rss_mb (the largest RSS of any streaming process: rank mains and loader workers),
rank_rss_mb / worker_rss_mb (the largest of each kind), build_rss_mb / label_rss_mb (those phases' largest
process). A phase's own processes report their peak just before they exit (interpreter teardown adds ~100 MB
for half a second, measured, which is not the data path); their subprocesses are sampled.
metadata_bytes_per_sample is the manifest, completion records and label files over N; plan_waste_fraction the
plan's padding. The training path must be flat in N; the build driver holds the source listing, which is O(N).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402

CLASSES = 10
RARE = "3"
PER_RAW_SHARD = 10_000
POOL = 512
"""Distinct encoded images per class, reused with different keys: generation stays cheap at 1M samples."""


# -- generation --------------------------------------------------------------------------------------------------
def _pool(px: int) -> list[list[bytes]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    pools = []
    for c in range(CLASSES):
        base = np.array([25 * c, 255 - 20 * c, (90 * c) % 256], dtype=np.float32)
        images = []
        for _ in range(POOL):
            pixels = (base + rng.normal(0, 40, (px, px, 3))).clip(0, 255).astype(np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="JPEG", quality=75)
            images.append(out.getvalue())
        pools.append(images)
    return pools


def generate(raw: str, n: int, px: int) -> str:
    """Class-sorted WebDataset shards (``cls`` field), like an image-folder export; returns the brace pattern."""
    import webdataset

    from data import storage

    shards = -(-n // PER_RAW_SHARD)
    pattern = storage.join(raw, f"raw-{{000000..{shards - 1:06d}}}.tar")
    done = storage.join(raw, "done.json")
    if storage.exists(done) and json.loads(storage.read_bytes(done)) == {"n": n, "px": px}:
        return pattern
    pools = _pool(px)
    for s in range(shards):
        buf = io.BytesIO()
        with webdataset.TarWriter(buf, encoder=False) as tar:
            for i in range(s * PER_RAW_SHARD, min(n, (s + 1) * PER_RAW_SHARD)):
                c = i * CLASSES // n  # sorted by class, as a folder listing is
                tar.write({"__key__": f"c{c}_{i:08d}", "jpg": pools[c][i % POOL], "cls": str(c).encode()})
        storage.write_bytes(storage.join(raw, f"raw-{s:06d}.tar"), buf.getvalue())
    storage.write_bytes(done, json.dumps({"n": n, "px": px}).encode())
    return pattern


# -- measuring processes -----------------------------------------------------------------------------------------
class RssSampler:
    """Peak RSS of a process tree, sampled every 0.1 s, per pid, with each process's role."""

    def __init__(self, roles: dict[int, str]):
        self.roles = dict(roles)
        self.peak: dict[int, float] = {}
        self.kind: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for pid, role in list(self.roles.items()):
                try:
                    root = psutil.Process(pid)
                    tree = [(root, role)] + [(c, f"{role}-child") for c in root.children(recursive=True)]
                except psutil.Error:
                    continue
                for proc, kind in tree:
                    try:
                        rss = proc.memory_info().rss / (1 << 20)
                    except psutil.Error:
                        continue
                    self.peak[proc.pid] = max(self.peak.get(proc.pid, 0.0), rss)
                    self.kind[proc.pid] = kind
            self._stop.wait(0.1)

    def stop(self) -> dict[str, float]:
        """Largest peak per kind of process."""
        self._stop.set()
        self._thread.join()
        out: dict[str, float] = {}
        for pid, rss in self.peak.items():
            out[self.kind[pid]] = max(out.get(self.kind[pid], 0.0), rss)
        return out


def run_phase(args: list[str], env: dict[str, str], roles: int = 1) -> tuple[float, dict[str, float], list[dict]]:
    """Run ``roles`` copies of a bench phase (``--rank`` 0..roles-1) in parallel; wall time, peak RSS by kind
    (``main``: the phase processes' own peak before exit; ``children``: their subprocesses, sampled), and each
    copy's result."""
    procs = [subprocess.Popen([sys.executable, __file__, *args, "--rank", str(r), "--ranks", str(roles)],
                              env=env, stdout=subprocess.PIPE, text=True) for r in range(roles)]
    sampler = RssSampler({p.pid: "main" for p in procs})
    start = time.perf_counter()
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - start
    peaks = sampler.stop()
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"bench phase {args[:2]} failed ({p.returncode}):\n{out[-2000:]}")
    results = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    peaks = {"main": max(r["rss_mb"] for r in results), "children": peaks.get("main-child", 0.0)}
    return wall, peaks, results


# -- phases, each in its own process ------------------------------------------------------------------------------
def stand_in_teacher():
    """A cheap teacher with the real interface: uint8 images in, 1,000 logits out."""
    import torch
    from torch import nn

    from trainer.models import Teacher

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Teacher("bench-stand-in", trunk, nn.Linear(32, 1000), 1000, ((127.0,) * 3, (128.0,) * 3), 0)


def phase_build(a: argparse.Namespace) -> dict[str, Any]:
    """Build the set; report how far the driver's RSS rose over what it held after its imports, sampled every
    10 ms. Its lifetime peak (``rss_mb``) is often the imports' own transient, which moved by ~130 MB between
    identical runs here, more than a 1M listing costs: the rise, not the RSS slope between sizes, is the driver's
    cost a sample."""
    from data.build import BuildRequest, build_command
    import data.sources.wds  # noqa: F401 - imported before the base: the source's code is not a per-sample cost

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    base, peak, done = rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    build_command(BuildRequest(f"wds:{a.pattern}", a.set, rare=RARE, positives_per_class=max(1, a.n // 100),
                               max_count=10_000, workers=a.build_workers), progress=False)
    done.set()
    sampler.join()
    return {"driver_added_mb": max(peak[0], rss_mb()) - base}


def phase_label(a: argparse.Namespace) -> None:
    """Rank ``a.rank`` of ``a.ranks`` labels its share (the executor's split), waits on a barrier of files as
    torchrun's ranks would in their gather, and rank 0 publishes."""
    import torch

    from data.plan import split_shards
    from trainer.scoring import ScoringConfig
    from trainer.teacher_label import LabelPass

    torch.set_num_threads(1)
    flags = Path(a.scratch) / "label-barrier"
    flags.mkdir(parents=True, exist_ok=True)
    rounds = {"n": 0}

    def barrier() -> None:
        rounds["n"] += 1
        (flags / f"{rounds['n']}-{a.rank}").touch()
        while len([p for p in flags.iterdir() if p.name.startswith(f"{rounds['n']}-")]) < a.ranks:
            time.sleep(0.05)

    p = LabelPass(location=a.set, scoring=ScoringConfig(a.px, 256), topk=5, teacher=stand_in_teacher())
    share = p.todo(split_shards(p.shard_counts(), a.rank, a.ranks))
    part = (share, p.run(share, torch.device("cpu")))
    barrier()
    if a.rank == 0:
        p.publish([part])


def phase_stream(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from data.loader import ShardStream, make_loader

    from data.config import LoaderConfig
    from data.shards import read_manifest
    from data.teacher_labels import TeacherLabels
    from trainer.teacher_label import label_spec

    torch.set_num_threads(1)
    manifest = read_manifest(a.set)
    labels = TeacherLabels(manifest, label_spec(stand_in_teacher(), a.px, 5))
    stream = ShardStream(manifest, LoaderConfig(image_size=32, batch_size=a.batch, num_workers=a.workers,
                                                shuffle_buffer_mb=16),
                         train=True, seed=0, rank=a.rank, world=a.ranks, teacher_labels=labels)
    stream.epochs = a.epochs
    images, first, last = 0, None, None
    for batch in make_loader(stream, a.workers):
        if "image" not in batch:
            continue
        now = time.perf_counter()
        first = first or now
        last = now
        images += len(batch["key"])
    return {"images": images, "seconds": (last or 0) - (first or 0)}


def own_peak_rss_mb() -> float:
    """This process's peak RSS so far, read before it exits: interpreter teardown adds a spike of ~100 MB
    (measured) that has nothing to do with the data path."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(phase, a: argparse.Namespace) -> None:
    result = phase(a) or {}
    print(json.dumps({**result, "rss_mb": own_peak_rss_mb()}))


PHASES = {"build": phase_build, "label": phase_label, "stream": phase_stream}


# -- one size -----------------------------------------------------------------------------------------------------
def metadata_bytes(set_url: str) -> int:
    from data import storage
    from data.shards import LABELS_DIR, read_manifest

    m = read_manifest(set_url)
    total = len(storage.read_bytes(storage.join(set_url, "manifest.json")))
    for s in m.shards:
        total += len(storage.read_bytes(storage.join(set_url, s.record)))
    if m.key_index:  # the key index (8 B a key) is metadata too
        total += len(storage.read_bytes(storage.join(set_url, m.key_index["file"])))
    labels = storage.join(set_url, LABELS_DIR)
    for name in storage.listdir(labels):
        for f in storage.listdir(storage.join(labels, name)):
            total += len(storage.read_bytes(storage.join(labels, name, f)))
    return total


def measure(n: int, root: str, scratch: Path, a: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    from data import storage
    from data.plan import padding_report
    from data.shards import read_manifest

    t0 = time.perf_counter()
    pattern = generate(storage.join(root, f"raw-{n}"), n, a.px)
    gen_s = time.perf_counter() - t0
    set_url = storage.join(root, f"set-{n}")
    storage.remove(set_url, recursive=True)
    common = ["--n", str(n), "--px", str(a.px), "--set", set_url, "--scratch", str(scratch)]
    build_s, build_rss, (built,) = run_phase(["--phase", "build", "--pattern", pattern, "--build-workers",
                                              str(a.build_workers), *common], env)
    m = read_manifest(set_url)
    row = {"samples": m.count, "source_samples": n, "shards": len(m.shards), "generate_s": round(gen_s, 1),
           "build_img_s": round(n / build_s, 1), "build_rss_mb": round(max(build_rss.values()), 1),
           "build_driver_added_mb": round(built["driver_added_mb"], 1),
           "build_driver_bytes_per_sample": round(built["driver_added_mb"] * 2 ** 20 / n, 1),
           "metadata_bytes_per_sample": round(metadata_bytes(set_url) / m.count, 1),
           "set_bytes_per_sample": round(m.bytes / m.count, 1)}
    if a.phases == "build":  # the build driver's memory alone (its listing is what grows with N)
        if not a.keep:
            storage.remove(set_url, recursive=True)
        return row
    shutil.rmtree(scratch / "label-barrier", ignore_errors=True)
    label_s, label_rss, _ = run_phase(["--phase", "label", *common], env, roles=a.ranks)
    stream_s, stream_rss, outs = run_phase(["--phase", "stream", "--workers", str(a.workers), "--batch",
                                            str(a.batch), "--epochs", str(a.epochs), *common], env, roles=a.ranks)
    ranks = outs
    images = sum(r["images"] for r in ranks)
    plan = padding_report([s.count for s in m.shards], world=a.ranks, workers=a.workers, batch_size=a.batch,
                          policy="pad")
    row.update({"label_img_s": round(m.count / label_s, 1),
           "loader_img_s": round(images / max(r["seconds"] for r in ranks), 1), "epochs": a.epochs,
           "streamed_images": images,
           "peak_rss_mb": round(max(stream_rss.values()), 1), "rank_rss_mb": round(stream_rss["main"], 1),
           "worker_rss_mb": round(stream_rss["children"], 1),
           "label_rss_mb": round(max(label_rss.values()), 1),
           "plan_waste_fraction": plan["waste_fraction"], "plan_steps": plan["steps"],
           "seconds": {"build": round(build_s, 1), "label": round(label_s, 1), "stream": round(stream_s, 1)}})
    if not a.keep:
        storage.remove(set_url, recursive=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    cols = [("samples", "samples"), ("build_img_s", "build img/s"), ("label_img_s", "label img/s"),
            ("loader_img_s", "loader img/s"), ("rank_rss_mb", "rank RSS MB"), ("worker_rss_mb", "worker RSS MB"),
            ("build_rss_mb", "build RSS MB"), ("metadata_bytes_per_sample", "metadata B/sample"),
            ("plan_waste_fraction", "plan waste")]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---:|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("–" if k not in r else f"{r[k]:,}" if isinstance(r[k], int)
                                       else f"{r[k]:,.4g}" for k, _ in cols) + " |")
    return "\n".join(lines)


def projection(rows: list[dict[str, Any]], key: str, to: int = 10_000_000) -> float | None:
    """Linear fit of ``key`` over the two largest sizes, evaluated at ``to`` samples."""
    if len(rows) < 2:
        return None
    a, b = rows[-2], rows[-1]
    slope = (b[key] - a[key]) / (b["samples"] - a["samples"])
    return round(b[key] + slope * (to - b["samples"]), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--s3", action="store_true", help="source, set and labels on a loopback SeaweedFS")
    p.add_argument("--json", default=str(ROOT / "artifacts" / "bench" / "scale.json"))
    p.add_argument("--data", default=str(ROOT / "artifacts" / "bench" / "scale"), help="local data folder")
    p.add_argument("--px", type=int, default=48)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--build-workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1, help="training epochs to stream: equal batch counts across "
                   "sizes separate growth with the data from allocator warm-up")
    p.add_argument("--keep", action="store_true", help="keep the built sets")
    p.add_argument("--phases", default="all", choices=["all", "build"],
                   help="build: generate and build only (the build driver's memory per sample)")
    p.add_argument("--quick", action="store_true", help="smaller batches, for a smoke run")
    # internal: one phase in this process
    for flag in ("--phase", "--pattern", "--set", "--scratch"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--n", "--rank"):
        p.add_argument(flag, type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.phase:
        run(PHASES[a.phase], a)
        return 0
    if a.quick:
        a.batch = 32
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    scratch = Path(tempfile.mkdtemp(prefix="bgsplit-scale-"))
    server = None
    try:
        if a.s3:
            from s3_server import SeaweedS3

            server = SeaweedS3(scratch / "seaweedfs").start()
            os.environ.update(server.env)
            env.update(server.env)
            root = f"s3://{server.bucket}/scale"
        else:
            root = a.data
            Path(root).mkdir(parents=True, exist_ok=True)
        rows = []
        for n in (int(s) for s in a.sizes.split(",")):
            row = measure(n, root, scratch, a, env)
            rows.append(row)
            print(json.dumps(row), flush=True)
        print()
        print(table(rows))
        for key in ("peak_rss_mb", "build_rss_mb", "loader_img_s"):
            if key in rows[-1]:
                print(f"{key} projected to 10M samples (slope of the two largest sizes): {projection(rows, key)}")
        if len(rows) > 1:
            slope = (rows[-1]["build_rss_mb"] - rows[-2]["build_rss_mb"]) * 2 ** 20 / (
                rows[-1]["samples"] - rows[-2]["samples"])
            print(f"build driver: {slope:.0f} B a sample (RSS slope of the two largest sizes)")
        if len(rows) > 1:
            rise = (rows[-1]["build_driver_added_mb"] - rows[-2]["build_driver_added_mb"]) * 2 ** 20 / (
                rows[-1]["source_samples"] - rows[-2]["source_samples"])
            print(f"build driver: {rise:.0f} B a source sample (slope of its RSS rise over the two largest sizes)")
        for row in rows:
            print(f"build driver at {row['samples']:,} samples: its RSS rose {row['build_driver_added_mb']} MB over "
                  f"its imports, {row['build_driver_bytes_per_sample']} B a source sample")
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1))
        meta = {"storage": "s3" if a.s3 else "local", "ranks": a.ranks, "workers": a.workers, "batch": a.batch,
                "px": a.px, "cpus": os.cpu_count(), "machine": platform.platform()}
        print(f"results in {a.json}: {json.dumps(meta)}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
