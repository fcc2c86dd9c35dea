"""`bgsplit experiment CONFIG`: a fair, tuned comparison of rare-class training methods.

settings x methods x seeds. Every method gets its hyper-parameters from the same shared grid (plus its own axes)
under the same budget of validation runs; the best point on the VALIDATION split is then trained with each final
seed and each final model is scored on the TEST split exactly once. The test split never takes part in selection.

The work that costs time (train one config, score it on one split) is a function passed in (``score``), so the
selection, pairing and resume logic is tested with a synthetic scorer and no training.

This module is the driver: the plan of every run, each setting's two phases, the command. Its parts: the spec
(experiment_spec), each run's config (experiment_configs), the grid and statistics (experiment_stats), the run store
and its reuse (experiment_store) with the typed rows of results.json (experiment_records), the real scorers
(experiment_scorers), the summary (experiment_summary) and the pages, plots and configs written for a reader
(experiment_report); the sets are experiment_data's, the cost estimate study_cost's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.experiment_configs import best_config, check_configs, job_config, probe_training, smoke_header
from cluster.experiment_data import check_sets, locate_sets
from cluster.experiment_data import slug as _slug
from cluster.experiment_records import Choice, RunRecord
from cluster.experiment_report import (plot_curves, plot_results, results_markdown, write_best, write_recommended,
                                      write_reports)
from cluster.experiment_scorers import FeatureProbe, default_score
from cluster.experiment_spec import METHOD_KINDS, ExperimentSpec, MethodSpec, load_spec, quick_left_out, quick_spec
from cluster.experiment_stats import method_grid, point_overrides, sample_grid
from cluster.experiment_store import Execute, ProbeScore, Runner, Score, code_fingerprint, load_scores, run_hash
from cluster.experiment_summary import summarize_runs, validation_positives
from cluster.study_cost import Progress, RunShape, calibrate
from data import storage
from data.shards import read_manifest
from trainer.config import load_config


def plan_runs(spec: ExperimentSpec) -> dict[str, dict[str, int]]:
    """Runs the study asks for, by method kind and phase, reused ones included: {"train": {"tune": n, "final": n},
    "probe": {...}}. A trained run costs minutes and a probe fit seconds, so a count that mixes them says nothing of
    the time."""
    counts = {kind: {"tune": 0, "final": 0} for kind in METHOD_KINDS}
    for shape in run_shapes(spec):
        counts[shape.kind][shape.phase] += 1
    return counts


def run_shapes(spec: ExperimentSpec, sets: dict[str, str] | None = None, out: str = "") -> list[RunShape]:
    """Every run the study makes, as run_setting makes them, with what its time depends on: steps, images scored,
    caches it builds first, whether a result is stored where it writes (sizes only when ``sets`` are given)."""
    sizes: dict[str, int] = {}

    def count(name: str) -> int:
        if sets is None:
            return 0
        if name not in sizes:
            sizes[name] = read_manifest(sets[name]).count
        return sizes[name]

    def stored(folder: str) -> bool:
        return bool(out) and any(Path(out).glob(os.path.join(folder, "experiment_result.json")))

    shapes: list[RunShape] = []
    featured: set[tuple[str, int]] = set()  # (set, size) whose features are cached by then
    for setting in spec.data.settings:
        active = {m: ms for m, ms in spec.methods.items() if not ms.settings or setting in ms.settings}
        mdirs = {m: os.path.join("runs", _slug(setting), _slug(m)) for m in active}
        for method, mspec in active.items():  # probes first, as run_setting
            if mspec.kind != "probe":
                continue
            from trainer.probe import probe_params

            grid = method_grid({}, mspec.grid)
            fits = [(p, [*mspec.overrides, *point_overrides(p)]) for p in (grid if len(grid) > 1 else [])]
            for phase, (point, overrides) in [*(("tune", f) for f in fits),
                                               ("final", (grid[0], [*mspec.overrides, *point_overrides(grid[0])]))]:
                params = probe_params(overrides)
                evaluated = "val" if phase == "tune" else "test"
                new = [n for n in (setting, evaluated) if (n, params.image_size) not in featured]
                featured.update((n, params.image_size) for n in new)
                folder = os.path.join(mdirs[method], f"tune-{run_hash(overrides)}" if phase == "tune" else "final-*")
                shapes.append(RunShape(setting, method, phase, "probe", image_size=params.image_size,
                                       scored=sum(count(n) for n in new), logistic=params.kind == "logistic",
                                       stored=stored(folder)))
        built = False
        for method, mspec in active.items():
            if mspec.kind == "probe":
                continue
            points = _tuning_points(spec, method, mspec)
            final = points[0][1] if points else [*mspec.overrides,
                                                 *point_overrides(method_grid(spec.grid, mspec.grid)[0])]
            for phase, seed, overrides in [*(("tune", spec.tune_seed, o) for _, o in points),
                                           *(("final", seed, final) for seed in spec.seeds)]:
                folder = (os.path.join(mdirs[method], f"tune-{run_hash(overrides)}") if phase == "tune" else
                          os.path.join(mdirs[method], "final-*", f"seed{seed}"))
                if sets is None:
                    shapes.append(RunShape(setting, method, phase, "train"))
                    continue
                cfg = job_config(spec, sets[setting], os.path.join(out, folder), seed, overrides, val=sets["val"],
                                 curve_every=spec.curve_every if phase == "final" else 0.0, study_dir=out)
                per_epoch = max(count(setting) // cfg.data.batch_size // cfg.optim.grad_accum, 1)
                scored = count("val" if phase == "tune" else "test")
                if phase == "final" and spec.curve_every:
                    scored += count("val") * (int(cfg.optim.epochs / spec.curve_every) + 1)
                if cfg.model.head_init == "probe":  # the trunk's features (cached per set), WiSE-FT's sweep
                    new = [n for n in (setting, "val") if (n, -cfg.data.image_size) not in featured]
                    featured.update((n, -cfg.data.image_size) for n in new)
                    scored += sum(count(n) for n in new) + (5 * count("val") if phase == "final" else 0)
                shapes.append(RunShape(setting, method, phase, "train",
                                       steps=math.ceil(cfg.optim.epochs * per_epoch),
                                       batch=cfg.data.batch_size * cfg.optim.grad_accum,
                                       image_size=cfg.data.image_size, scored=scored,
                                       builds_views=bool(cfg.views.count) and not built, stored=stored(folder),
                                       overrides=tuple(overrides), aux=cfg.loss.aux_weight > 0))
                built = built or bool(cfg.views.count)
    return shapes


def calibration_overrides(shapes: list[RunShape]) -> tuple[str, list[str]] | None:
    """The setting and overrides the calibration trains: a BG-split tuning run where the study has one (the teacher's
    forward makes it the dearest step), else its first trained run; None when every trained run is stored."""
    trained = [s for s in shapes if s.kind == "train"]
    if not trained or all(s.stored for s in trained):
        return None
    pick = next((s for s in trained if s.aux), trained[0])
    return pick.setting, list(pick.overrides)


def run_setting(spec: ExperimentSpec, setting: str, sets: dict[str, str], out: str, runner: Runner,
                full: ExperimentSpec | None = None) -> tuple[list[RunRecord], dict[str, Choice]]:
    """Tune every method on the validation split, then train the seeds with the chosen points, score test once.

    Each phase is one batch of independent runs (parallel trials on a cluster). Final runs go seed by seed across
    the methods, so a long study stopped part-way (and resumed in a later session) already has paired seeds of
    every method, not every seed of the first methods only."""
    runs: list[RunRecord] = []
    chosen: dict[str, Choice] = {}
    active = {m: ms for m, ms in spec.methods.items() if not ms.settings or setting in ms.settings}
    mdirs = {m: os.path.join(out, "runs", _slug(setting), _slug(m)) for m in active}
    points = {m: _tuning_points(spec, m, ms) for m, ms in active.items() if ms.kind == "train"}
    batch = [(job_config(spec, sets[setting], os.path.join(mdirs[m], f"tune-{run_hash(overrides)}"), spec.tune_seed,
                         overrides, val=sets["val"], study_dir=out),
              sets["val"], RunRecord(setting, m, "tune", spec.tune_seed, point, overrides))
             for m, pts in points.items() for point, overrides in pts]
    for method, mspec in active.items():  # probes first: seconds each, and a floor to read the rest against
        if mspec.kind == "probe":
            probe_runs, chosen[method] = _tune_probe(spec, setting, method, mspec, sets, mdirs[method], runner)
            runs += probe_runs
            training = probe_training(chosen[method].overrides)
            chosen[method].best_config = write_best(
                out, setting, method, best_config(spec, sets, setting, method, training),
                "best validation mAP" if chosen[method].tuning_runs else "its only point", fits=training[0])
    tuned = runner.run_many(batch)
    runs += tuned
    for method, mspec in active.items():
        if mspec.kind == "probe":
            continue
        chosen[method] = _choose(spec, method, mspec, [r for r in tuned if r.method == method], chosen)
        how = ("best validation mAP" if chosen[method].tuning_runs else
               f"ablation: the point of {mspec.ablation_of}" if mspec.ablation_of else "its only point")
        smoke = smoke_header(spec, full, sets[setting], chosen[method].overrides) if full is not None else ""
        chosen[method].best_config = write_best(
            out, setting, method, best_config(spec, sets, setting, method, chosen[method].overrides), how, smoke)
    finals = []
    for seed in spec.seeds:
        for method, c in chosen.items():
            fdir = os.path.join(mdirs[method], f"final-{run_hash(c.overrides)}")
            base = RunRecord(setting, method, "final", seed, c.point, c.overrides)
            if spec.methods[method].kind == "probe":
                if seed == spec.seeds[0]:  # deterministic: one fit stands for every seed
                    from trainer.probe import probe_params

                    runs.append(runner.run_probe(probe_params(c.overrides), sets[setting], sets["test"], fdir,
                                                 dataclasses.replace(base, deterministic=True)))
                continue
            finals.append((job_config(spec, sets[setting], os.path.join(fdir, f"seed{seed}"), seed, c.overrides,
                                      val=sets["val"], curve_every=spec.curve_every, study_dir=out),
                           sets["test"], base))
    runs += runner.run_many(finals)
    return runs, chosen


def _tuning_points(spec: ExperimentSpec, method: str, mspec: MethodSpec) -> list[tuple[dict[str, Any], list[str]]]:
    """A trained method's validation runs: its sample of the shared grid x its own axes; none for an ablation
    (it takes the chosen point of the method it ablates) or a grid of one point (nothing to choose)."""
    grid = method_grid(spec.grid, mspec.grid)
    if mspec.ablation_of or len(grid) == 1:
        return []
    return [(p, [*mspec.overrides, *point_overrides(p)]) for p in sample_grid(grid, spec.budget, spec.tune_seed,
                                                                               method)]


def _choose(spec: ExperimentSpec, method: str, mspec: MethodSpec, tuned: list[RunRecord],
            chosen: dict[str, Choice]) -> Choice:
    grid = method_grid(spec.grid, mspec.grid)
    if mspec.ablation_of:
        of = chosen[mspec.ablation_of]
        return dataclasses.replace(of, overrides=[*of.overrides, *mspec.overrides], ablation_of=mspec.ablation_of,
                                   tuning_runs=0)
    if not tuned:
        return Choice(grid[0], [*mspec.overrides, *point_overrides(grid[0])], None, 1, 0, spec.budget)
    best = max(tuned, key=lambda r: r.map)  # first best in grid order on a tie
    return Choice(best.point, best.overrides, best.map, len(grid), len(tuned), spec.budget)


def _tune_probe(spec: ExperimentSpec, setting: str, method: str, mspec: MethodSpec, sets: dict[str, str],
                mdir: str, runner: Runner) -> tuple[list[RunRecord], Choice]:
    """A probe, tuned over its own axes only on validation (the shared grid is for trained methods). A fit on
    cached features costs seconds, so the whole grid is searched, not a budget's sample of it: a stronger
    baseline, which can only shrink a trained method's margin over it."""
    from trainer.probe import probe_params

    grid = method_grid({}, mspec.grid)
    tuned = [runner.run_probe(probe_params(overrides), sets[setting], sets["val"],
                              os.path.join(mdir, f"tune-{run_hash(overrides)}"),
                              RunRecord(setting, method, "tune", spec.tune_seed, point, overrides))
             for point in (grid if len(grid) > 1 else [])
             for overrides in [[*mspec.overrides, *point_overrides(point)]]]
    if not tuned:
        return [], Choice(grid[0], [*mspec.overrides, *point_overrides(grid[0])], None, len(grid), 0, spec.budget,
                          deterministic=True)
    best = max(tuned, key=lambda r: r.map)
    return tuned, Choice(best.point, best.overrides, best.map, len(grid), len(tuned), spec.budget,
                         deterministic=True)


def run_experiment(spec: ExperimentSpec, out: str, *, score: Score | None = None, code: str | None = None,
                   sets: dict[str, str] | None = None, log: Callable[[str], None] = print,
                   probe: ProbeScore | None = None, keep_results: bool = False,
                   execute: Execute | None = None, full: ExperimentSpec | None = None) -> dict[str, Any]:
    """Tune, train and score every setting x method; write results.json, results.md, plot.png (and curves.png,
    best/<setting>/<method>.yaml) under ``out``.

    ``score`` (default: really train and evaluate), ``probe`` (default: fit on the teacher's cached features),
    ``code`` (default: the source fingerprint) and ``sets`` (default: the spec's sets, or build them under
    out/data, then check them) are parameters so tests can fake them; ``execute`` runs each phase's batch of
    trials (default: one after another here; cluster.trials.tune_executor: Ray Tune trials). ``full``: the spec
    ``spec`` was cut down from by --quick (its best/ configs then say what the full study's would set)."""
    started = time.time()
    code = code or code_fingerprint()
    settings = list(spec.data.settings)
    data = None
    if sets is None:
        sets = locate_sets(os.path.join(out, "data"), spec.data)
        data = check_sets(sets, settings)
    check_configs(spec, sets)
    if probe is None and any(m.kind == "probe" for m in spec.methods.values()):
        base = load_config(spec.base, spec.overrides)
        probe = FeatureProbe(base.teacher.name, base.teacher.weights, os.path.join(out, "features"),
                             base.data.eval_resize_ratio)
    shapes = run_shapes(spec, sets if score is None else None, out)  # a stand-in scorer's sets hold no images
    rates, calibrated = None, calibration_overrides(shapes)
    if score is None and execute is None and calibrated is not None:  # trials on a cluster: not this machine's rates
        setting, overrides = calibrated
        rates = calibrate(lambda extra: job_config(spec, sets[setting], out, spec.tune_seed, [*overrides, *extra],
                                                   val=sets["val"], study_dir=out), out, log)
    progress = Progress(shapes, rates, log)
    progress.start()
    runner = Runner(score or default_score, code, log, probe, keep_results, execute, progress)
    records: list[RunRecord] = []
    choices: dict[str, dict[str, Choice]] = {}
    for setting in settings:
        setting_runs, choices[setting] = run_setting(spec, setting, sets, out, runner, full)
        records += setting_runs
    # results.json's rows, read by key from here on (the summary, the pages, a committed study read back)
    runs = [r.row() for r in records]
    chosen = {setting: {m: c.as_dict() for m, c in methods.items()} for setting, methods in choices.items()}
    summary = summarize_runs(spec, runs, chosen, validation_positives(sets), load_scores)
    for pick in summary["advice"]:
        write_recommended(out, pick, chosen[pick["setting"]][pick["method"]]["best_config"])
    seconds = time.time() - started
    doc = {"spec": dataclasses.asdict(spec), "code": code, "sets": sets, "data": data, "runs": runs,
           "chosen": chosen, **summary, "seconds": seconds}
    os.makedirs(out, exist_ok=True)
    if spec.reports:
        write_reports(spec, runs, sets, out, log)
    storage.write_bytes(os.path.join(out, "results.json"), json.dumps(doc, indent=1, default=str).encode())
    markdown = results_markdown(spec, summary, chosen, runs, seconds, data)
    storage.write_bytes(os.path.join(out, "results.md"), markdown.encode())
    plot_results(summary, os.path.join(out, "plot.png"))
    if summary["curves"]:
        plot_curves(summary, os.path.join(out, "curves.png"))
    log("\n" + markdown.split("## Chosen hyper-parameters")[0].strip() + "\n")
    log(f"results: {out}/results.json, results.md, plot.png; training configs of the chosen points: {out}/best/ "
        f"({seconds:.0f}s)")
    return doc


def set_threads() -> None:
    """torch's intra-op threads: OMP_NUM_THREADS where set (runs sharing the machine), else every core."""
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)))


def experiment_command(config: str, out: str, quick: bool = False, keep_results: bool = False,
                       execute: Execute | None = None) -> dict[str, Any]:
    set_threads()
    spec = load_spec(config)
    if not quick:
        return run_experiment(spec, out, keep_results=keep_results, execute=execute)
    print("--quick: a smoke run, not the comparison; it leaves out:\n" +
          "".join(f"  - {line}\n" for line in quick_left_out(spec)), end="", flush=True)
    return run_experiment(quick_spec(spec), out, keep_results=keep_results, execute=execute, full=spec)


def experiment_cli(args: Any, execute: Execute | None = None) -> None:
    """`bgsplit experiment CONFIG [--out DIR] [--quick] [--keep-results]` (cluster.cli's handler; with --ray the
    CLI passes cluster.trials.tune_executor as ``execute``: cluster.trials imports this module, not the other way)."""
    from trainer.runtime import output_location

    experiment_command(args.config, output_location(args.out, "--out", fan_out=execute is not None), args.quick,
                       args.keep_results, execute)
