"""`bgsplit experiment CONFIG`: a fair, tuned comparison of rare-class training methods.

settings x methods x seeds. Every method gets its hyper-parameters from the same shared grid (plus its own axes)
under the same budget of validation runs; the best point on the VALIDATION split is then trained with each final
seed and each final model is scored on the TEST split exactly once. The test split never takes part in selection.

The work that costs time (train one config, score it on one split) is a function passed in (``score``), so the
selection, pairing and resume logic is tested with a synthetic scorer and no training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.config import ConfigError, JobConfig, load_config

Score = Callable[[JobConfig, str], dict[str, Any]]
"""(config to train, evaluation set location) -> {"map": float, "ap": {...}}; trains once, scores once."""

BG_SPLIT = "bg-split"
BASELINE = "fine-tune"


@dataclass
class DataSpec:
    """How the Fashion-MNIST-BG sets are built (the demo's recipe: data.build.build_set)."""

    rare: list[str] = field(default_factory=lambda: ["3", "5", "6"])
    """Rare Fashion-MNIST class ids (labels 1..K in this order)."""
    background: int = 1485
    """Background images in every training set (the same images for every setting)."""
    settings: dict[str, int] = field(default_factory=lambda: {"99.6% bg": 2, "98.0% bg": 10})
    """Setting name -> positives per rare class in its training set."""
    holdout: int = 1000
    """Validation images carved out of the training source (selection only)."""
    test_images: int = 1500
    """Test images drawn from the Fashion-MNIST test split (scored once per final run)."""


@dataclass
class MethodSpec:
    overrides: list[str] = field(default_factory=list)
    """Dotted config overrides that define the method (e.g. loss.aux_weight=0)."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """The method's own hyper-parameter axes, added to the shared grid (same key: the method's values win)."""
    ablation_of: str = ""
    """An ablation: no tuning of its own, it trains with the point chosen for this (earlier) method plus its
    overrides, and is paired with it (e.g. soft aux targets against hard ones at the same LR and lambda)."""
    settings: list[str] = field(default_factory=list)
    """The settings it runs in (empty: all)."""


@dataclass
class ExperimentSpec:
    base: str = "configs/fmnist_bg.yaml"
    """Training config every run starts from (relative paths: to the experiment file, then the working dir)."""
    data: DataSpec = field(default_factory=DataSpec)
    overrides: list[str] = field(default_factory=list)
    """Overrides applied to every run before the method's."""
    methods: dict[str, MethodSpec] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Shared hyper-parameter axes (dotted key -> values) that every method is tuned over."""
    budget: int = 4
    """Validation runs per method: a larger grid is sampled down to this many points (fixed seed)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Final runs per setting x method, one per seed, each scored once on the test split."""
    tune_seed: int = 1000
    """run.seed of every tuning run, and the seed of the grid sampling."""


# ------------------------------------------------------------------------------------------------ spec loading


def _check_keys(values: Any, cls: type, where: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ConfigError(f"experiment key '{where or 'top level'}' must be a mapping, got {values!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown experiment key '{where}{key}': valid keys here are {', '.join(sorted(names))}")
    return values


def _axes(values: Any, where: str) -> dict[str, list[Any]]:
    if not isinstance(values, dict):
        raise ConfigError(f"experiment key '{where}' must map dotted config keys to lists of values")
    for key, options in values.items():
        if not isinstance(options, list) or not options:
            raise ConfigError(f"experiment key '{where}.{key}' must be a non-empty list of values, got {options!r}")
    return {str(k): list(v) for k, v in values.items()}


def _strings(values: Any, where: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"experiment key '{where}' must be a list of section.key=value strings, got {values!r}")
    return list(values)


def parse_spec(doc: dict[str, Any]) -> ExperimentSpec:
    """Build an ExperimentSpec from a YAML mapping; an unknown key is a one-line ConfigError naming it."""
    doc = _check_keys(doc or {}, ExperimentSpec, "")
    spec = ExperimentSpec()
    if "base" in doc:
        spec.base = str(doc["base"])
    if "data" in doc:
        data = _check_keys(doc["data"], DataSpec, "data.")
        spec.data = DataSpec(**{**dataclasses.asdict(DataSpec()), **data})
        spec.data.rare = [str(r) for r in spec.data.rare]
        if not isinstance(spec.data.settings, dict) or not spec.data.settings:
            raise ConfigError("experiment key 'data.settings' must map setting names to positives per class")
    if "overrides" in doc:
        spec.overrides = _strings(doc["overrides"], "overrides")
    if "grid" in doc:
        spec.grid = _axes(doc["grid"], "grid")
    methods = doc.get("methods") or {}
    if not isinstance(methods, dict) or not methods:
        raise ConfigError("experiment key 'methods' must map method names to {overrides: [...], grid: {...}}")
    for name, body in methods.items():
        body = _check_keys(body or {}, MethodSpec, f"methods.{name}.")
        method = MethodSpec(overrides=_strings(body.get("overrides", []), f"methods.{name}.overrides"),
                            grid=_axes(body.get("grid", {}), f"methods.{name}.grid"),
                            ablation_of=str(body.get("ablation_of", "")),
                            settings=_strings(body.get("settings", []), f"methods.{name}.settings"))
        if method.ablation_of and method.ablation_of not in spec.methods:
            raise ConfigError(f"methods.{name}.ablation_of names '{method.ablation_of}', which is not a method "
                              "listed before it")
        if method.ablation_of and method.grid:
            raise ConfigError(f"methods.{name} is an ablation: it reuses {method.ablation_of}'s chosen point and "
                              "takes no grid")
        of = spec.methods.get(method.ablation_of)
        if of is not None and of.settings and not set(method.settings or spec.data.settings) <= set(of.settings):
            raise ConfigError(f"methods.{name} runs in settings where {method.ablation_of} does not; give it "
                              f"settings: {of.settings}")
        unknown = [s for s in method.settings if s not in spec.data.settings]
        if unknown:
            raise ConfigError(f"methods.{name}.settings names {unknown}; the settings are "
                              f"{list(spec.data.settings)}")
        spec.methods[str(name)] = method
    for key in ("budget", "tune_seed"):
        if key in doc:
            if not isinstance(doc[key], int) or isinstance(doc[key], bool):
                raise ConfigError(f"experiment key '{key}' must be an integer, got {doc[key]!r}")
            setattr(spec, key, doc[key])
    if "seeds" in doc:
        if not isinstance(doc["seeds"], list) or not all(isinstance(s, int) for s in doc["seeds"]):
            raise ConfigError(f"experiment key 'seeds' must be a list of integers, got {doc['seeds']!r}")
        spec.seeds = list(doc["seeds"])
    if spec.budget < 1 or not spec.seeds:
        raise ConfigError("experiment needs budget >= 1 and at least one seed")
    return spec


def load_spec(path: str | Path) -> ExperimentSpec:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment file {p} does not exist; see configs/experiment_*.yaml")
    spec = parse_spec(yaml.safe_load(p.read_text()) or {})
    base = Path(spec.base)
    if not base.is_absolute() and not base.is_file() and (p.parent / base).is_file():
        spec.base = str(p.parent / base)
    return spec


def quick_spec(spec: ExperimentSpec) -> ExperimentSpec:
    """The smoke run: first setting, first two methods, two grid points, one seed, half-epoch runs."""
    first = next(iter(spec.data.settings.items()))
    methods = dict(list(spec.methods.items())[:2])
    return dataclasses.replace(
        spec, data=dataclasses.replace(spec.data, settings=dict([first]), holdout=300, test_images=500),
        methods=methods, budget=2, seeds=spec.seeds[:1], overrides=[*spec.overrides, "optim.epochs=0.5"])


# ------------------------------------------------------------------------------------------------ pure logic


def method_grid(shared: dict[str, list[Any]], own: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every point of the shared axes x the method's own axes (own values replace a shared axis of that key)."""
    axes = {**shared, **own}
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def _stable_int(*parts: Any) -> int:
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12], 16)


def sample_grid(points: list[dict[str, Any]], budget: int, seed: int, method: str) -> list[dict[str, Any]]:
    """At most ``budget`` grid points: all of a small grid, else a fixed-seed sample (grid order kept).

    The draw depends only on (seed, method, grid size), so it is the same on every rerun and machine."""
    if len(points) <= budget:
        return list(points)
    chosen = sorted(random.Random(_stable_int(seed, method, len(points))).sample(range(len(points)), budget))
    return [points[i] for i in chosen]


def point_overrides(point: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in point.items()]


def base_method(method: str, methods: Sequence[str], spec_methods: dict[str, MethodSpec] | None = None
                ) -> str | None:
    """The method a BG-split variant is paired with: 'X + bg-split' -> 'X', 'bg-split' -> 'fine-tune'; an
    ablation with the method it ablates."""
    if spec_methods is not None and spec_methods[method].ablation_of:
        return spec_methods[method].ablation_of
    if method == BG_SPLIT:
        base = BASELINE
    elif method.endswith(f" + {BG_SPLIT}"):
        base = method[: -len(f" + {BG_SPLIT}")]
    else:
        return None
    return base if base in methods else None


# two-sided 95% t quantiles t_{0.975, df}, df = 1..30 (scipy is not a dependency)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """t_{0.975} with ``df`` degrees of freedom: a table to 30, then the Cornish-Fisher expansion (error < 1e-3)."""
    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_difference(variant: dict[int, float], base: dict[int, float]) -> dict[str, Any]:
    """Mean of variant - base over the seeds both have, with a 95% t confidence interval (None for one seed)."""
    seeds = sorted(set(variant) & set(base))
    diffs = [variant[s] - base[s] for s in seeds]
    n = len(diffs)
    out: dict[str, Any] = {"seeds": seeds, "diffs": diffs, "n": n, "mean": None, "ci95": None}
    if n == 0:
        return out
    mean = sum(diffs) / n
    out["mean"] = mean
    if n > 1:
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        half = t_quantile_975(n - 1) * sd / math.sqrt(n)
        out["ci95"] = [mean - half, mean + half]
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


# ------------------------------------------------------------------------------------------------ runs and cache


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text.replace(" + ", "+").replace("+", "-plus-"))


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def manifest_identity(location: str) -> str:
    """Hash of a set's manifest.json (a rebuilt set gets a new identity); '' for no set."""
    if not location:
        return ""
    from data import storage
    from data.shards import manifest_url

    return hashlib.sha256(storage.read_bytes(manifest_url(location))).hexdigest()[:16]


@dataclass
class Runner:
    """Runs one (config, evaluation set) pair, or reuses its stored result when nothing that affects it changed."""

    score: Score
    code: str
    log: Callable[[str], None] = print

    def run(self, cfg: JobConfig, eval_set: str, record: dict[str, Any]) -> dict[str, Any]:
        key = {"config": cfg.to_dict(), "code": self.code, "eval_set": eval_set,
               "data": {"train": manifest_identity(cfg.data.train), "val": manifest_identity(cfg.data.val),
                        "eval": manifest_identity(eval_set)}}
        path = Path(cfg.run.out_dir) / "experiment_result.json"
        record = {**record, "run_dir": cfg.run.out_dir}
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                return {**record, **stored["result"], "reused": True}
        # not reusable: a checkpoint left by an earlier config or a killed attempt must not outlive its result
        shutil.rmtree(Path(cfg.run.out_dir) / "checkpoints", ignore_errors=True)
        start = time.time()
        scored = self.score(cfg, eval_set)
        result = {"map": float(scored["map"]), "ap": scored.get("ap", {}), "seconds": time.time() - start,
                  "overrides": record.get("overrides", [])}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "result": result}, indent=1, default=str))
        os.replace(tmp, path)  # a killed experiment never leaves a half-written result to be reused
        return {**record, **result, "reused": False}


def train_and_score(cfg: JobConfig, eval_set: str, keep_checkpoint: bool = True) -> dict[str, Any]:
    """The real scorer: train ``cfg`` from scratch, score its final student on ``eval_set`` once."""
    from data.shards import read_manifest
    from trainer.evaluate import evaluate_student
    from trainer.train import Trainer

    trainer = Trainer.build(cfg)
    trainer.fit()
    result = evaluate_student(trainer.student, read_manifest(eval_set), cfg.data.image_size, 128, trainer.device,
                              0, cfg.data.eval_resize_ratio)
    if not keep_checkpoint:  # tuning runs are never loaded again: 27 MB each is too much to keep x100
        shutil.rmtree(Path(cfg.run.out_dir) / "checkpoints", ignore_errors=True)
    return {"map": result["map"], "ap": result["ap"]}


def default_score(cfg: JobConfig, eval_set: str) -> dict[str, Any]:
    """train_and_score, keeping the checkpoints of final runs only (run_setting puts them under final-*/)."""
    return train_and_score(cfg, eval_set, keep_checkpoint=f"{os.sep}final-" in cfg.run.out_dir)


# ------------------------------------------------------------------------------------------------ the experiment


def job_config(spec: ExperimentSpec, train: str, out_dir: str, seed: int, overrides: list[str]) -> JobConfig:
    # data.val stays empty: the one evaluation of a run is done by the scorer, on the split the phase allows
    return load_config(spec.base, [f"data.train={train}", "data.val=", "data.test=", f"run.out_dir={out_dir}",
                                   f"run.seed={seed}", "run.progress=false", "run.resume=", *spec.overrides,
                                   *overrides])


def run_setting(spec: ExperimentSpec, setting: str, sets: dict[str, str], out: str, runner: Runner
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tune every method on the validation split, then train the seeds with the chosen point, score test once."""
    runs: list[dict[str, Any]] = []
    chosen: dict[str, Any] = {}
    for method, mspec in spec.methods.items():
        if mspec.settings and setting not in mspec.settings:
            continue
        mdir = os.path.join(out, "runs", _slug(setting), _slug(method))
        if mspec.ablation_of:
            of = chosen[mspec.ablation_of]
            best = {"point": of["point"], "overrides": [*of["overrides"], *mspec.overrides]}
            chosen[method] = {**of, "ablation_of": mspec.ablation_of, "tuning_runs": 0}
            points = []
        else:
            grid = method_grid(spec.grid, mspec.grid)
            points = sample_grid(grid, spec.budget, spec.tune_seed, method)
        tuned = []
        for point in points:
            overrides = [*mspec.overrides, *point_overrides(point)]
            cfg = job_config(spec, sets[setting], os.path.join(mdir, f"tune-{_hash(overrides)}"), spec.tune_seed,
                             overrides)
            rec = runner.run(cfg, sets["val"], {"setting": setting, "method": method, "phase": "tune",
                                                "split": "val", "seed": spec.tune_seed, "point": point,
                                                "overrides": overrides})
            runner.log(f"  {setting:9s} {method:24s} tune {point}: val mAP {100 * rec['map']:5.1f} "
                       f"({rec['seconds']:.0f}s{', reused' if rec['reused'] else ''})")
            runs.append(rec)
            tuned.append(rec)
        if tuned:
            best = max(tuned, key=lambda r: r["map"])  # first best in grid order on a tie
            chosen[method] = {"point": best["point"], "overrides": best["overrides"], "val_map": best["map"],
                              "grid_size": len(grid), "tuning_runs": len(points), "budget": spec.budget}
        for seed in spec.seeds:
            cfg = job_config(spec, sets[setting], os.path.join(mdir, f"final-{_hash(best['overrides'])}",
                                                               f"seed{seed}"), seed, best["overrides"])
            rec = runner.run(cfg, sets["test"], {"setting": setting, "method": method, "phase": "final",
                                                 "split": "test", "seed": seed, "point": best["point"],
                                                 "overrides": best["overrides"]})
            runner.log(f"  {setting:9s} {method:24s} seed {seed}: test mAP {100 * rec['map']:5.1f} "
                       f"({rec['seconds']:.0f}s{', reused' if rec['reused'] else ''})")
            runs.append(rec)
    return runs, chosen


def summarize_runs(spec: ExperimentSpec, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Test mAP mean/std per setting x method and the paired BG-split differences, from the final runs only."""
    table, pairs = [], []
    finals = [r for r in runs if r["phase"] == "final"]
    for setting in spec.data.settings:
        by_method = {m: {r["seed"]: r["map"] for r in finals if r["setting"] == setting and r["method"] == m}
                     for m in spec.methods}
        for method, maps in by_method.items():
            if maps:
                mean, std = mean_std(list(maps.values()))
                table.append({"setting": setting, "method": method, "mean": mean, "std": std, "n": len(maps),
                              "maps": [maps[s] for s in sorted(maps)]})
        for method in spec.methods:
            base = base_method(method, list(spec.methods), spec.methods)
            if base is not None and by_method[method] and by_method[base]:
                pairs.append({"setting": setting, "variant": method, "base": base,
                              **paired_difference(by_method[method], by_method[base])})
    return {"table": table, "pairs": pairs}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def results_markdown(spec: ExperimentSpec, summary: dict[str, Any], chosen: dict[str, Any], runs: list[dict],
                     seconds: float) -> str:
    lines = ["# bgsplit experiment: tuned comparison on Fashion-MNIST-BG", "",
             (f"Hyper-parameters chosen on the validation split (budget {spec.budget} runs per method, run.seed "
              f"{spec.tune_seed}); each final model scored once on the test split; seeds {spec.seeds}. "
              "mAP in points."), "", "## Test mAP (mean ± std over seeds)", "",
             "| setting | method | test mAP | seeds |", "| --- | --- | ---: | ---: |"]
    for row in summary["table"]:
        lines.append(f"| {row['setting']} | {row['method']} | {_pct(row['mean'])} ± {_pct(row['std'])} | "
                     f"{row['n']} |")
    lines += ["", "## BG-split variant minus its base method (paired by seed, 95% t interval)", "",
              "| setting | variant | base | mean diff | 95% CI | seeds |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for p in summary["pairs"]:
        ci = "n/a (one seed)" if p["ci95"] is None else f"[{_pct(p['ci95'][0])}, {_pct(p['ci95'][1])}]"
        lines.append(f"| {p['setting']} | {p['variant']} | {p['base']} | {_pct(p['mean'])} | {ci} | {p['n']} |")
    lines += ["", "## Chosen hyper-parameters (best validation mAP)", "",
              "| setting | method | chosen | val mAP | runs used / grid size |", "| --- | --- | --- | ---: | ---: |"]
    for setting, methods in chosen.items():
        for method, c in methods.items():
            point = ", ".join(f"{k}={v}" for k, v in c["point"].items()) or "(no axes)"
            if c.get("ablation_of"):
                point = f"{c['ablation_of']}'s: {point}"
            lines.append(f"| {setting} | {method} | {point} | {_pct(c['val_map'])} | "
                         f"{c['tuning_runs']} / {c['grid_size']} |")
    trained = [r for r in runs if not r["reused"]]
    lines += ["", "## Wall time", "",
              (f"{seconds:.0f} s in all; {len(runs)} runs ({len(trained)} trained now, "
               f"{len(runs) - len(trained)} reused); {sum(r['seconds'] for r in runs):.0f} s of training + scoring "
               f"over all runs (mean {sum(r['seconds'] for r in runs) / max(len(runs), 1):.0f} s a run)."), "",
              "![test mAP per method](plot.png)", ""]
    return "\n".join(lines)


def plot_results(summary: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in summary["table"]))
    methods = list(dict.fromkeys(r["method"] for r in summary["table"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(methods) * max(len(settings), 1)), 4))
    width = 0.8 / max(len(settings), 1)
    for i, setting in enumerate(settings):
        rows = {r["method"]: r for r in summary["table"] if r["setting"] == setting}
        xs = [j + (i - (len(settings) - 1) / 2) * width for j, m in enumerate(methods) if m in rows]
        ax.bar(xs, [100 * rows[m]["mean"] for m in methods if m in rows], width,
               yerr=[100 * rows[m]["std"] for m in methods if m in rows], capsize=3, label=setting)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=20, ha="right")
    ax.set_ylabel("test mAP (mean ± std over seeds)")
    ax.legend(title="training set")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepare_sets(root: str, data: DataSpec) -> dict[str, str]:
    """Build the training set of each setting, the validation set and the test set (idempotent)."""
    from data.build import BuildSpec, build_set
    from data.sources import FashionMNISTSource

    src_train, src_test = FashionMNISTSource("train"), FashionMNISTSource("test")
    sets: dict[str, str] = {}
    for name, positives in data.settings.items():
        sets[name] = os.path.join(root, f"train-{_slug(name)}")
        build_set(src_train, BuildSpec("fmnist:train", tuple(data.rare), positives_per_class=positives,
                                       max_background=data.background, holdout=data.holdout, part="rest"),
                  sets[name], progress=False)
    sets["val"] = os.path.join(root, "val")
    build_set(src_train, BuildSpec("fmnist:train", tuple(data.rare), holdout=data.holdout, part="holdout"),
              sets["val"], progress=False)
    sets["test"] = os.path.join(root, "test")
    build_set(src_test, BuildSpec("fmnist:test", tuple(data.rare), subsample=data.test_images), sets["test"],
              progress=False)
    return sets


def run_experiment(spec: ExperimentSpec, out: str, *, score: Score | None = None, code: str | None = None,
                   sets: dict[str, str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tune, train and score every setting x method; write results.json, results.md and plot.png under ``out``.

    ``score`` (default: really train and evaluate), ``code`` (default: the source fingerprint) and ``sets``
    (default: build the Fashion-MNIST-BG sets under out/data) are parameters so tests can fake them."""
    started = time.time()
    if code is None:
        from trainer.demo import code_fingerprint
        code = code_fingerprint()
    if sets is None:
        sets = prepare_sets(os.path.join(out, "data"), spec.data)
    runner = Runner(score or default_score, code, log)
    runs: list[dict[str, Any]] = []
    chosen: dict[str, Any] = {}
    for setting in spec.data.settings:
        setting_runs, chosen[setting] = run_setting(spec, setting, sets, out, runner)
        runs += setting_runs
    summary = summarize_runs(spec, runs)
    seconds = time.time() - started
    doc = {"spec": dataclasses.asdict(spec), "code": code, "sets": sets, "runs": runs, "chosen": chosen,
           **summary, "seconds": seconds}
    os.makedirs(out, exist_ok=True)
    Path(out, "results.json").write_text(json.dumps(doc, indent=1, default=str))
    Path(out, "results.md").write_text(results_markdown(spec, summary, chosen, runs, seconds))
    plot_results(summary, os.path.join(out, "plot.png"))
    log(f"results: {out}/results.json, results.md, plot.png ({seconds:.0f}s)")
    return doc


def experiment_command(config: str, out: str, quick: bool = False) -> dict[str, Any]:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    spec = load_spec(config)
    return run_experiment(quick_spec(spec) if quick else spec, out)


def experiment_cli(args: Any) -> None:
    """`bgsplit experiment CONFIG [--out DIR] [--quick]` (trainer.cli's handler)."""
    experiment_command(args.config, args.out, args.quick)
