"""Why does the aux loss let go? Trace the BG-split regulariser through the first steps of the demo's recipe.

Issue 10 observed, in the demo's BG-split run, an aux loss of ~4.2 nats over the first 20 steps although the aux
head starts as a copy of the teacher's classifier (0.23 nats in eval mode). This script trains the demo's recipe
(Fashion-MNIST-BG 99%, EfficientNet-Lite0 student and online teacher, 64 px, seed 0) for a few dozen steps under
variants and records, per step, the aux loss the optimiser sees (train mode) and, every ``--probe-every`` steps,
the aux loss in eval mode on a fixed probe batch (how far the trunk's features moved from the teacher's):

- ``recipe``: the demo's config as shipped;
- ``no-dropout``: the student's dropout (0.2 before the heads) and drop-connect (0.2, stochastic depth) off;
- ``trunk-lr/10``: the trunk at a tenth of the heads' LR (a new main head trains fast, the trunk slowly);
- ``lambda=1``: the aux weight at 1 instead of 0.1;
- ``main-off``: the main loss removed (aux only): what the aux loss alone does to the trunk;
- ``no-dropout+trunk-lr/10``: both;
- ``bn-train``: BatchNorm in train mode (batch statistics) instead of the recipe's frozen statistics.

Measurement, not a test: `python bench/aux_study.py --json artifacts/bench/aux_study.json` (~6 min on 2 cores;
the demo's data must exist: `bgsplit demo --prepare-only`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.losses import aux_hard  # noqa: E402
from trainer.train import Trainer  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "no-dropout": {"overrides": ["model.dropout=false"]},
    "trunk-lr/10": {"overrides": ["optim.trunk_lr_mult=0.1"]},
    "lambda=1": {"overrides": ["loss.aux_weight=1.0"]},
    "main-off": {"main_off": True},
    "no-dropout+trunk-lr/10": {"overrides": ["model.dropout=false", "optim.trunk_lr_mult=0.1"]},
    "bn-train": {"overrides": ["model.freeze_bn_stats=false"]},
}


@torch.no_grad()
def probe_aux(trainer: Trainer, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Aux loss in eval mode (no dropout, running BN statistics) against the teacher's top-1 on fixed images."""
    was = trainer.student.training
    trainer.student.eval()
    loss = float(aux_hard(trainer.student(images)["aux"], targets[:, None]))
    trainer.student.train(was)
    return loss


def run_variant(name: str, spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from data.loader import make_loader

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "fmnist_bg.yaml",
                      [f"data.train={args.data}/train-99.6-bg", "data.val=", f"run.out_dir={args.out_dir}/{name}",
                       "run.seed=0", "run.progress=false", *spec.get("overrides", [])])
    trainer = Trainer.build(cfg)
    if spec.get("main_off"):
        trainer.task.main_loss = lambda logits, labels, epoch: logits.sum() * 0.0
    batches = iter(make_loader(trainer.stream, 0))
    probe = next(batches)
    probe_images = probe["image"]
    probe_targets = trainer.teacher(probe_images).argmax(1)
    row: dict[str, Any] = {"variant": name, "steps": [], "train_aux": [], "main": [], "probe_steps": [],
                           "probe_aux": []}
    start = time.time()
    for step in range(args.steps + 1):
        if step % args.probe_every == 0:
            row["probe_steps"].append(step)
            row["probe_aux"].append(round(probe_aux(trainer, probe_images, probe_targets), 4))
        if step == args.steps:
            break
        out = trainer.train_step([next(batches)])
        row["steps"].append(step + 1)
        row["train_aux"].append(round(float(out["aux_loss"]), 4))
        row["main"].append(round(float(out["main_loss"]), 4))
    row["seconds"] = round(time.time() - start, 1)
    first = row["train_aux"][:20]
    row["train_aux_first20"] = round(sum(first) / len(first), 3)
    row["train_aux_last10"] = round(sum(row["train_aux"][-10:]) / 10, 3)
    print(f"{name:24s} train aux: first 20 {row['train_aux_first20']:.2f}, last 10 {row['train_aux_last10']:.2f}; "
          f"probe (eval mode) {' '.join(f'{v:.2f}' for v in row['probe_aux'])}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT / "artifacts" / "demo" / "data"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--probe-every", type=int, default=10)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out-dir", default="/tmp/bgsplit-aux-study")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = [run_variant(name, VARIANTS[name], args) for name in args.variants.split(",")]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
