"""What a `probe.kind=logistic` fit costs at scale (trainer/probe_model.py): the fit on one process over every
positive and ``probe.max_background`` background rows, and the background sampler over a 10M-key set.

At 10M training images the feature pass keeps every positive and a key-hash sample of the background, so the fit
sees at most ``max_background`` background rows whatever the set's size; this bench fits synthetic features shaped
like EfficientNet-Lite0's (bench/probe_solver.py's generator: 1,280-d, 3 rare classes of 30 positives) at growing
row counts, each fit in its own process (the features drawn in another) so its peak resident memory is the
fit's, and times ``keep_background`` over 10M keys (the sampler every rank runs on its share).

    .venv/bin/python bench/probe_fit.py --json bench/results/probe_fit/results.json   # ~10 min on 2 cores

The committed results' sampler row ran at the earlier default cap of 200k (rate 0.02); the cap is 100k now.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak) of this process from /proc, in MB: per address space, so unlike
    ru_maxrss it does not carry the parent's peak across fork and exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def one_fit(path: str, C: float, class_weight: str) -> dict:
    """Load the features at ``path`` and fit once: this process's peak RSS over its RSS after the imports is the
    fit's memory (features included), since the features were drawn in another process."""
    import numpy as np

    from trainer.probe import Features, ProbeParams, fit_logistic

    base = _status_mb("VmRSS")
    with np.load(path, allow_pickle=False) as f:
        feats = Features(f["features"], f["labels"], ["background", "rare1", "rare2", "rare3"])
    start = time.perf_counter()
    model = fit_logistic(feats, ProbeParams(C=C, class_weight=class_weight))
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    return {"rows": int(len(feats.labels)), "features_mb": round(feats.features.nbytes / 2 ** 20, 1),
            "fit_s": round(seconds, 2), "iterations": model["iterations"], "converged": model["converged"],
            "fit_peak_mb": round(peak - base, 1)}


def draw(rows: int, path: str) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import numpy as np
    from probe_solver import synthetic_features

    feats = synthetic_features(rows + 90, 1280, rare=3, per_rare=30, seed=0)
    np.savez(path, features=feats.features, labels=feats.labels)


def sampler(keys: int) -> dict:
    from trainer.probe_model import background_rate, keep_background

    from trainer.config import ProbeConfig

    rate = background_rate(10_000_000, ProbeConfig().max_background)  # a 10M-image set at the default cap
    names = [f"shard-{i // 1000:06d}/img-{i:08d}" for i in range(keys)]
    start = time.perf_counter()
    kept = int(keep_background(names, rate).sum())
    seconds = time.perf_counter() - start
    return {"keys": keys, "rate": rate, "kept": kept, "seconds": round(seconds, 2),
            "keys_per_s": round(keys / seconds)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[25_000, 50_000, 100_000])
    ap.add_argument("--C", type=float, default=1e-4)
    ap.add_argument("--class-weight", default="balanced")
    ap.add_argument("--keys", type=int, default=10_000_000)
    ap.add_argument("--json", default="")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # a child: one fit, JSON on stdout
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_fit(args.one, args.C, args.class_weight)))
        return 0
    rows = []
    for n in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "features.npz")
            draw(n, path)
            out = subprocess.run([sys.executable, __file__, "--one", path, "--C", str(args.C), "--class-weight",
                                  args.class_weight], capture_output=True, text=True, check=True)
        row = {"config": f"fit {n} background rows", "C": args.C, "class_weight": args.class_weight,
               **json.loads(out.stdout.strip().splitlines()[-1])}
        print(json.dumps(row), flush=True)
        rows.append(row)
    row = {"config": f"keep_background over {args.keys} keys", **sampler(args.keys)}
    print(json.dumps(row), flush=True)
    rows.append(row)
    if args.json:
        doc = {"bench": "probe_fit", "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "command": "python bench/probe_fit.py " + " ".join(argv or sys.argv[1:]), "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json).with_suffix(".partial")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
