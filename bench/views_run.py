"""A 30-epoch BG-split run at the teacher's resolution on cached prefix views, against the online frozen+shared path.

The set is the long study's (configs/experiment_fmnist_long.yaml: Fashion-MNIST-BG, 1,491 training images at 99.6%
background), built under --out if missing. Rows:
  views    views.count=V: the cache's build (once per set and prefix) and the whole run on it, timed apart
  online   the same run without views (frozen prefix shared with the teacher): --online-epochs timed, and the
           whole run's time projected from its rate
plus what a view costs on disk and what that makes of a 1M-image set. No validation during the runs: the step alone.

    .venv/bin/python bench/views_run.py --json bench/results/views_run/results.json     # ~15 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run(cfg, label: str) -> dict:
    from trainer.train import Trainer

    start = time.perf_counter()
    trainer = Trainer.build(cfg)
    built = time.perf_counter() - start
    start = time.perf_counter()
    summary = trainer.fit()
    seconds = time.perf_counter() - start
    images = summary["steps"] * cfg.data.batch_size
    row = {"mode": label, "image_size": cfg.data.image_size, "frozen_stages": cfg.model.frozen_stages,
           "views": cfg.views.count, "epochs": round(summary["epochs"], 3), "steps": summary["steps"],
           "build_s": round(built, 1), "train_s": round(seconds, 1), "img_s": round(images / seconds, 1)}
    if cfg.views.count:
        folder = trainer.stream.views.folder
        size = sum(f.stat().st_size for f in Path(folder).iterdir())
        rows = int(trainer.stream.views.nviews.sum())
        row.update(cache_mb=round(size / 2**20, 1), views_stored=rows, kb_per_view=round(size / rows / 1024, 2),
                   per_1m_images_gb_at_10_views=round(size / rows * 10 * 1e6 / 2**30, 1))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="artifacts/bench/views_run")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--frozen-stages", type=int, default=4)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--epochs", type=float, default=30)
    p.add_argument("--online-epochs", type=float, default=1, help="epochs of the online run actually timed")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    from cluster.experiment_spec import load_spec
    from cluster.experiment_data import build_sets
    from trainer.config import load_config

    spec = load_spec(str(ROOT / "configs" / "experiment_fmnist_long.yaml"))
    sets = build_sets(os.path.join(args.out, "data"), spec.data)
    train = sets[next(iter(spec.data.settings))]
    base = [f"data.train={train}", "data.val=", "data.test=", f"data.image_size={args.image_size}",
            f"teacher.image_size={args.image_size}", f"model.frozen_stages={args.frozen_stages}",
            "run.progress=false", "run.log_every=47", *spec.overrides]
    cache = os.path.join(args.out, "views")
    shutil.rmtree(cache, ignore_errors=True)  # the build is part of what is measured
    rows = []
    cfg = load_config(str(ROOT / "configs" / "fmnist_bg.yaml"),
                      [*base, f"optim.epochs={args.epochs}", f"views.count={args.views}", f"views.cache_dir={cache}",
                       f"run.out_dir={os.path.join(args.out, 'run-views')}"])
    rows.append(_run(cfg, "views"))
    cfg = load_config(str(ROOT / "configs" / "fmnist_bg.yaml"),
                      [*base, f"optim.epochs={args.epochs}", f"run.out_dir={os.path.join(args.out, 'run-online')}",
                       f"run.max_steps={int(args.online_epochs * 47)}"])
    online = _run(cfg, "online frozen+shared")
    whole = args.epochs * 1491 / online["img_s"]
    online["projected_run_s"] = round(whole, 1)
    rows.append(online)
    rows[0]["speedup_vs_online"] = round(online["projected_run_s"] / rows[0]["train_s"], 2)
    for row in rows:
        print(json.dumps(row), flush=True)
    print(f"\n{args.epochs:g} epochs at {args.image_size} px, frozen_stages {args.frozen_stages}: views "
          f"{rows[0]['build_s'] / 60:.1f} min to build + {rows[0]['train_s'] / 60:.1f} min to train; online "
          f"{online['projected_run_s'] / 60:.1f} min (projected); a view {rows[0]['kb_per_view']} KB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": vars(args), "cpus": os.cpu_count(),
                                               "machine": platform.platform(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
