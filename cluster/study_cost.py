"""What a study will cost on this machine, said before its first run and corrected as runs finish.

A newcomer's comparison at 160 px was 28 trainings, ~3 h on an idle 2-core machine, and printed nothing for five
minutes (issue 36). The estimate is a model of each planned run (set-up + steps x a step's seconds + images it
scores x a forward's seconds, + the one-time caches its set builds) whose rates come from a short calibration: a
few real training steps of the study's own configuration on its own training set, at its own size. Each finished
run then rescales the rest of its kind by what runs really took against what the model said, so what the model
leaves out (a probe-initialised head's fit, image decoding while scoring) is learnt from the first runs.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data import storage

CALIBRATION_STEPS = 8
"""Training steps of the calibration run; the first two (workers starting, first allocations) are not timed."""


@dataclass(frozen=True)
class RunShape:
    """One planned run, as far as its time goes."""

    setting: str
    method: str
    phase: str
    """tune or final."""
    kind: str
    """train (minutes) or probe (seconds)."""
    steps: int = 0
    batch: int = 0
    image_size: int = 0
    """The size its scored images are forwarded at."""
    scored: int = 0
    """Images forwarded to score it: its evaluation set, the curve's validation passes, WiSE-FT's, a probe's
    features the first time a set is seen at a size (cached after)."""
    builds_views: bool = False
    """The first trained run on a set builds the set's cached prefix views (views.count > 0)."""
    logistic: bool = False
    """A probe run that solves a logistic regression (a kNN fit is a lookup)."""
    stored: bool = False
    """A result file is already where this run writes it (an earlier invocation): reused if nothing changed."""
    overrides: tuple[str, ...] = ()
    """A trained run's method and grid overrides (what the calibration trains)."""
    aux: bool = False
    """A trained run with the auxiliary loss: the teacher runs in its steps."""

    @property
    def key(self) -> tuple[str, str, str]:
        return self.setting, self.method, self.phase


@dataclass
class Rates:
    """Seconds this machine takes, measured by ``calibrate`` on the study's own configuration."""

    image_size: int
    batch: int
    setup_s: float
    """Building a run: teacher and student, loader, loading the set's cached views."""
    step_s: float
    """One optimiser step at ``batch`` (median of the timed steps, data loading included)."""
    forward_s: float
    """Scoring one image at ``image_size`` (the student's forward pass, fp32, no gradients)."""
    views_s: float = 0.0
    """Building one training set's cached prefix views (0: the study trains online)."""
    fit_s: float = 0.0
    """One logistic probe fit on a training set's features."""
    seconds: float = 0.0
    """What the calibration itself took."""

    def forward(self, image_size: int) -> float:
        return self.forward_s * (image_size / self.image_size) ** 2


def predict(shape: RunShape, rates: Rates) -> float:
    """The model's seconds for one run."""
    scoring = shape.scored * rates.forward(shape.image_size or rates.image_size)
    if shape.kind == "probe":
        return scoring + (rates.fit_s if shape.logistic else 0.0)
    steps = shape.steps * rates.step_s * (shape.batch or rates.batch) / rates.batch
    return rates.setup_s + steps + scoring + (rates.views_s if shape.builds_views else 0.0)


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@dataclass
class Progress:
    """The study's cost as it goes: the plan and its estimate before the first run, then a line per finished run
    with the runs done, the runs to do (a stored run found reused leaves the count) and the time left.

    Without rates (a study scored by a stand-in, or one nothing could calibrate) every run of a kind is predicted
    alike, so the time left is each kind's measured mean times its runs to do, and unknown until a trained run
    has been timed."""

    shapes: list[RunShape]
    rates: Rates | None = None
    log: Callable[[str], None] = print
    done: int = 0
    reused: int = 0
    actual: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "probe": 0.0})
    """Seconds the finished runs of each kind took..."""
    modelled: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "probe": 0.0})
    """...and what the model said they would: the ratio rescales the runs to do."""

    def __post_init__(self) -> None:
        self.left: dict[tuple[str, str, str], list[float]] = {}
        self.kinds: dict[tuple[str, str, str], str] = {}
        for s in self.shapes:
            self.left.setdefault(s.key, []).append(predict(s, self.rates) if self.rates else 1.0)
            self.kinds[s.key] = s.kind

    def to_do(self) -> int:
        return sum(len(v) for v in self.left.values())

    def seconds_left(self) -> float | None:
        """None while trained runs are to do and neither a calibration nor a timed trained run says their cost."""
        total = 0.0
        for kind in ("train", "probe"):
            predicted = sum(sum(v) for key, v in self.left.items() if self.kinds[key] == kind)
            if not predicted:
                continue
            if self.modelled[kind]:
                total += predicted * self.actual[kind] / self.modelled[kind]
            elif self.rates is not None:
                total += predicted
            elif kind == "train":
                return None
            # a probe fit not yet timed and no rates: seconds each beside trained runs' minutes, counted 0
        return total

    def start(self) -> None:
        by = {(kind, phase): 0 for kind in ("train", "probe") for phase in ("tune", "final")}
        for s in self.shapes:
            by[s.kind, s.phase] += 1
        stored = sum(s.stored for s in self.shapes)
        self.log(f"plan: {len(self.shapes)} runs: {by['train', 'tune']} tuning and {by['train', 'final']} final "
                 f"training runs, {by['probe', 'tune'] + by['probe', 'final']} probe fits (seconds each)"
                 + (f"; {stored} found stored by an earlier invocation, reused unless their config or data "
                    "changed" if stored else ""))
        if self.rates is None:
            self.log("  the time left is printed from the first trained run on")
            return
        r = self.rates
        fresh = sum(predict(s, r) for s in self.shapes if not s.stored)
        views = f", cached views {duration_text(r.views_s)} a training set" if r.views_s else ""
        self.log(f"  estimate: about {duration_text(fresh)} on this machine for the {len(self.shapes) - stored} "
                 f"runs not stored (measured in {r.seconds:.0f} s: a training step {r.step_s:.2f} s at batch "
                 f"{r.batch} and {r.image_size} px, scoring {1000 * r.forward_s:.1f} ms an image, set-up "
                 f"{r.setup_s:.0f} s a run{views}); corrected by every run that finishes")

    def record(self, rec: dict[str, Any]) -> None:
        key = (rec["setting"], rec["method"], rec["phase"])
        kind = self.kinds.get(key, "train")
        waiting = self.left.get(key) or []
        predicted = waiting.pop(0) if waiting else 0.0
        if rec.get("reused"):
            self.reused += 1
        else:
            self.done += 1
            if predicted:
                self.actual[kind] += float(rec["seconds"])
                self.modelled[kind] += predicted
        left = self.seconds_left()
        when = (f"about {duration_text(left)} left" if left is not None else
                "time left known after the first trained run")
        reused = f", {self.reused} reused" if self.reused else ""
        self.log(f"  [{self.done} run(s) done{reused}, {self.to_do()} to do: {when}]")


# ------------------------------------------------------------------------------------------------ calibration


def _cache_key(cfg: Any) -> dict[str, Any]:
    """What the rates depend on: the configuration's time-relevant sections, this host and its thread count."""
    doc = cfg.to_dict()
    return {"data": {k: doc["data"][k] for k in ("train", "image_size", "batch_size", "num_workers", "sampling")},
            "model": doc["model"], "teacher": doc["teacher"], "views": doc["views"], "loss": doc["loss"],
            "engine": doc["engine"], "run": {k: doc["run"][k] for k in ("device", "precision")},
            "host": socket.gethostname(), "threads": os.environ.get("OMP_NUM_THREADS") or os.cpu_count()}


def calibrate(make: Callable[[list[str]], Any], folder: str, log: Callable[[str], None] = print,
              steps: int = CALIBRATION_STEPS) -> Rates:
    """A few real steps of ``make([])`` (a tuning run's config; ``make(overrides)`` is it with more overrides) in
    ``folder``/calibration, then its forward pass and one logistic fit timed; stored as ``folder``/calibration.json and reused by a resumed study on the same host
    and configuration. The views it builds are the study's own cache, so the first run does not build them again."""
    import numpy as np
    import torch

    from trainer.train import Trainer

    cfg = make([])
    path = Path(folder, "calibration.json")
    key = _cache_key(cfg)
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return Rates(**stored["rates"])
    log(f"measuring this machine: {steps} training steps of the study's configuration at {cfg.data.image_size} px "
        "(the estimate comes from them)")
    started = time.time()
    run_dir = os.path.join(folder, "calibration")
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"run.out_dir={run_dir}", f"run.max_steps={steps}", "run.log_every=1", "run.eval_every=0",
                 "run.checkpoint_every=0", "run.progress=false", "run.resume=", "data.val=",
                 "model.head_init=random"]
    short = make(overrides)
    t = time.time()
    trainer = Trainer.build(short)
    first_build = time.time() - t
    trainer.fit()
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in rows if r.get("images_per_s")]
    timed = rates[2:] or rates
    step_s = cfg.data.batch_size / statistics.median(timed)
    student = trainer.student.eval()
    x = torch.randn(min(64, cfg.data.batch_size), 3, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        student(x)
        t = time.time()
        student(x)
        forward_s = (time.time() - t) / len(x)
    views_s = 0.0
    if cfg.views.count:  # built by the first build, loaded by the second: the difference is building them
        t = time.time()
        Trainer.build(make([*overrides, f"run.out_dir={run_dir}-2"]))
        setup_s = time.time() - t
        views_s = max(first_build - setup_s, 0.0)
        shutil.rmtree(run_dir + "-2", ignore_errors=True)
    else:
        setup_s = first_build
    n = trainer.manifest.count
    counts = np.asarray(trainer.manifest.counts)
    labels = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(0)
    from trainer.probe import Features, ProbeParams, fit_logistic

    t = time.time()
    fit_logistic(Features(rng.standard_normal((n, 1280)).astype(np.float32), labels, trainer.manifest.class_names),
                 ProbeParams(C=1e-3, class_weight="balanced"))
    fit_s = time.time() - t
    shutil.rmtree(run_dir, ignore_errors=True)
    measured = Rates(cfg.data.image_size, cfg.data.batch_size, setup_s, step_s, forward_s, views_s, fit_s,
                     time.time() - started)
    storage.write_bytes(str(path), json.dumps({"key": key, "rates": asdict(measured)}, indent=1,
                                              default=str).encode())
    return measured
