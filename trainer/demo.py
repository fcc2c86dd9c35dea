"""`bgsplit demo`: fine-tuning vs Background Splitting vs an imbalance baseline (and its BG-split combination)
on Fashion-MNIST-BG, at a >=99% and a ~98% background training set, over several seeds, on CPU in minutes.

Hyper-parameters come from configs/fmnist_bg.yaml and were chosen on the validation set carved out of the
training images (see the README); the test split is only ever scored, once per run, here.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.build import BuildSpec, build_set
from data.shards import read_manifest
from data.sources import FashionMNISTSource
from trainer.checkpoint import load_student_from_checkpoint
from trainer.config import JobConfig, load_config
from trainer.evaluate import evaluate_student, evaluate_to_report
from trainer.metrics import summarize
from trainer.models import build_teacher
from trainer.report import methods_table_markdown, methods_table_text
from trainer.teacher_label import label_shard_set
from trainer.train import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fmnist_bg.yaml"


@dataclass(frozen=True)
class DemoSpec:
    rare: tuple[str, ...] = ("3", "5", "6")
    """Dress, Sandal, Shirt: one easy, one medium, one hard class against the other seven."""
    settings: tuple[tuple[str, int], ...] = (("99.0% bg", 5), ("98.0% bg", 10))
    """(name, positives per rare class) over the same background images."""
    background: int = 1485
    holdout: int = 1000
    test_images: int = 1500
    methods: dict[str, list[str]] = field(default_factory=lambda: {
        "fine-tune": ["loss.aux_weight=0"],
        "bg-split": [],
        "re-sample": ["loss.aux_weight=0", "data.sampling=balanced"],
        "re-sample + bg-split": ["data.sampling=balanced"],
    })


def prepare_data(root: str, spec: DemoSpec, teacher_size: int, cache_teacher: bool) -> dict[str, str]:
    """Build the shard sets (idempotent) and, for cached-teacher configs, cache the teacher's labels on each."""
    src_train, src_test = FashionMNISTSource("train"), FashionMNISTSource("test")
    sets: dict[str, str] = {}
    for name, positives in spec.settings:
        out = os.path.join(root, f"train-{name.split('%')[0].replace('.', '')[:2]}")
        build_set(src_train, BuildSpec("fmnist:train", spec.rare, positives_per_class=positives,
                                       max_background=spec.background, holdout=spec.holdout, part="rest"),
                  out, progress=False)
        sets[name] = out
    sets["val"] = os.path.join(root, "val")
    build_set(src_train, BuildSpec("fmnist:train", spec.rare, holdout=spec.holdout, part="holdout"), sets["val"],
              progress=False)
    sets["test"] = os.path.join(root, "test")
    build_set(src_test, BuildSpec("fmnist:test", spec.rare, subsample=spec.test_images), sets["test"],
              progress=False)
    if cache_teacher:
        teacher = build_teacher("efficientnet_lite0", "", teacher_size)
        for location in sets.values():
            label_shard_set(teacher, location, image_size=teacher_size, topk=5)
    return sets


def run_config(train: str, out_dir: str, seed: int, overrides: list[str]) -> JobConfig:
    # validation is left out of the timed runs (data.val=""): the test split is scored once at the end
    return load_config(CONFIG, [f"data.train={train}", "data.val=", f"run.out_dir={out_dir}", f"run.seed={seed}",
                                "run.progress=false", *overrides])


def code_fingerprint() -> str:
    """Hash of bgsplit's own source: a cached run result is reused only if neither config nor code changed."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for path in sorted([*root.glob("data/*.py"), *root.glob("trainer/*.py"), CONFIG]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def train_and_test(cfg: JobConfig, test: str) -> dict[str, Any]:
    """Train one run and score its final model on the test split; cached by the run's config and code."""
    result_path = Path(cfg.run.out_dir) / "test_result.json"
    if result_path.exists():
        cached = json.loads(result_path.read_text())
        if cached.get("config") == cfg.to_dict() and cached.get("code") == code_fingerprint():
            return cached
    start = time.time()
    trainer = Trainer.build(cfg)
    summary = trainer.fit()
    test_eval = evaluate_student(trainer.student, read_manifest(test), cfg.data.image_size, 128, trainer.device)
    result = {"config": cfg.to_dict(), "code": code_fingerprint(), "test_map": test_eval["map"],
              "test_ap": test_eval["ap"], "seconds": time.time() - start, "checkpoint": summary["checkpoint"],
              "steps": summary["steps"]}
    result_path.write_text(json.dumps(result, indent=1))
    return result


def _slug(method: str) -> str:
    return method.replace(" + ", "+").replace(" ", "-")


def run_demo(out: str = "artifacts/demo", *, quick: bool = False, seeds: int = 3, prepare_only: bool = False,
             spec: DemoSpec | None = None) -> dict[str, Any]:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    spec = spec or DemoSpec()
    if quick:
        spec = DemoSpec(rare=spec.rare, settings=spec.settings[:1], background=spec.background, holdout=300,
                        test_images=500, methods={k: [*spec.methods[k], "optim.epochs=0.5"]
                                                  for k in ("fine-tune", "bg-split")})
        seeds = 1
    base = load_config(CONFIG)
    started = time.time()
    sets = prepare_data(os.path.join(out, "data"), spec, base.teacher.image_size, base.teacher.mode == "cached")
    print(f"data ready in {time.time() - started:.0f}s: {', '.join(sets.values())}", flush=True)
    if prepare_only:
        return {"sets": sets}
    rows, runs = [], []
    for setting, _ in spec.settings:
        for method, overrides in spec.methods.items():
            maps = []
            for seed in range(seeds):
                run_dir = os.path.join(out, "runs", Path(sets[setting]).name, _slug(method), f"seed{seed}")
                cfg = run_config(sets[setting], run_dir, seed, overrides)
                result = train_and_test(cfg, sets["test"])
                maps.append(result["test_map"])
                runs.append({"setting": setting, "method": method, "seed": seed, **result})
                print(f"  {setting:9s} {method:22s} seed {seed}: test mAP {100 * result['test_map']:5.1f}"
                      f"  ({result['seconds']:.0f}s)", flush=True)
            rows.append({"setting": setting, "method": method, "maps": maps})
    report_dir = os.path.join(out, "report")
    extreme = spec.settings[0][0]
    for method in spec.methods:
        first = next(r for r in runs if r["setting"] == extreme and r["method"] == method and r["seed"] == 0)
        student = load_student_from_checkpoint(first["checkpoint"])
        evaluate_to_report(student, sets["test"], os.path.join(report_dir, _slug(method)),
                           image_size=base.data.image_size, title=f"Fashion-MNIST-BG {extreme}, {method}, seed 0")
    summary = {"rows": [{**r, "mean": summarize(r["maps"])[0], "std": summarize(r["maps"])[1]} for r in rows],
               "runs": [{k: v for k, v in r.items() if k != "config"} for r in runs],
               "spec": {"rare": spec.rare, "settings": spec.settings, "seeds": seeds, "config": str(CONFIG)},
               "seconds": time.time() - started}
    results_path = os.path.join(out, "results.json")
    with open(results_path, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("# bgsplit demo: test mAP on Fashion-MNIST-BG\n\n" + methods_table_markdown(rows) + "\n")
    print()
    print(methods_table_text(rows))
    print()
    print(f"results: {results_path} (and results.md)")
    print(f"reports and plots: {report_dir}/<method>/report.md, pr_curves.png, top_scoring.png")
    print(f"total {time.time() - started:.0f}s")
    return summary
