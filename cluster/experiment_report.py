"""What a study leaves for a reader: results.md, its plots, the chosen points' configs under best/, reports.

results.md holds the data, test mAP, paired differences, the recommendation, the curves, the chosen points and the
wall time; plot.png and curves.png draw them; best/<setting>/ holds each chosen point's training config, with the
pick as recommended.yaml; with ``reports`` (the demo's), report/<method>/ holds a trained method's evaluation report.
The files written here go through storage's atomic write."""
from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cluster.experiment_data import slug as _slug
from cluster.experiment_spec import ExperimentSpec
from cluster.experiment_summary import FEW_VAL_POSITIVES
from data import storage


def write_best(out: str, setting: str, method: str, doc: dict[str, Any], how: str, smoke: str = "",
                fits: str = "") -> str:
    path = Path(out, "best", _slug(setting), f"{_slug(method)}.yaml")
    shown = os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd()) else str(path)
    what = (f"# It fits the probe ({fits}) on data.train's teacher features and writes it as a checkpoint that "
            "eval and mine take.\n" if fits else "")
    header = (f"{smoke}# bgsplit experiment: {method}'s chosen point in setting '{setting}' ({how}).\n{what}"
              f"# Train it: bgsplit train --config {shown} data.train=<your full training set>\n")
    storage.write_bytes(str(path), (header + yaml.safe_dump(doc, sort_keys=False)).encode())
    # relative to the study folder: a committed results page is right on any clone the study moves to
    return os.path.relpath(path, out)


def write_recommended(out: str, pick: dict[str, Any], best: str) -> None:
    """best/<setting>/recommended.yaml: the chosen method's file under one name, so the README's commands (and a
    script) train whatever validation picked on the user's data without reading results.md first."""
    path = Path(out, "best", _slug(pick["setting"]), "recommended.yaml")
    doubt = ("# NOT A RELIABLE CHOICE: validation holds fewer than "
             f"{FEW_VAL_POSITIVES} positives of a class (results.md says which); treat it as a hint.\n"
             if pick.get("reliable") is False else "")
    header = (f"# bgsplit experiment recommends {pick['method']} for setting '{pick['setting']}' (best validation "
              f"mAP, {100 * pick['val_map']:.1f}); a copy of {best}.\n{doubt}")
    storage.write_bytes(str(path), (header + Path(out, best).read_text()).encode())


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _ci(p: dict[str, Any]) -> str:
    return "n/a (one seed)" if p["ci95"] is None else f"[{_pct(p['ci95'][0])}, {_pct(p['ci95'][1])}]"


def results_markdown(spec: ExperimentSpec, summary: dict[str, Any], chosen: dict[str, Any], runs: list[dict],
                     seconds: float, data: dict[str, Any] | None = None) -> str:
    tuned = any(c["tuning_runs"] for methods in chosen.values() for c in methods.values())
    how = (f"Hyper-parameters chosen on the validation split (budget {spec.budget} runs per method, run.seed "
           f"{spec.tune_seed})" if tuned else "Nothing tuned: every method runs its configured point")
    lines = [f"# bgsplit experiment: {spec.title}", "",
             (f"{how}; each final model scored once on the test split; seeds {spec.seeds}. mAP in points. A probe "
              "is one deterministic fit: its single test score pairs with every seed."), ""]
    if data:
        lines += ["## Data", "", "| set | images | background | per class |", "| --- | ---: | ---: | --- |"]
        for name, d in data.items():
            lines.append(f"| {name} | {d['count']} | {100 * d['background_fraction']:.2f}% | "
                         + ", ".join(f"{c} {n}" for c, n in zip(d["class_names"][1:], d["counts"][1:])) + " |")
        lines.append("")
    lines += ["## Test mAP (mean ± std over seeds)", "",
              "| setting | method | test mAP | seeds | val mAP (chosen point) |", "| --- | --- | ---: | ---: | ---: |"]
    for row in summary["table"]:
        n = "1 (deterministic)" if row["deterministic"] else row["n"]
        if row.get("alphas"):
            n = f"{n} (alpha on val: {', '.join(f'{a:g}' for a in row['alphas'])})"
        lines.append(f"| {row['setting']} | {row['method']} | {_pct(row['mean'])} ± {_pct(row['std'])} | {n} | "
                     f"{_pct(row['val_map'])} |")
    lines += ["", "## Paired differences (variant minus base, paired by seed, 95% t interval)", "",
              "| setting | variant | base | mean diff | 95% CI | seeds | why |",
              "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for p in summary["pairs"]:
        lines.append(f"| {p['setting']} | {p['variant']} | {p['base']} | {_pct(p['mean'])} | {_ci(p)} | {p['n']} | "
                     f"{p['why']} |")
    if summary["advice"]:
        lines += ["", "## Which method to use (chosen on validation)", ""]
        for a in summary["advice"]:
            text = f"- {a['setting']}: **{a['method']}** (val mAP {_pct(a['val_map'])})"
            if "vs" in a:
                ci = a.get("val_margin_ci95")
                sure = ("" if not ci else f", 95% interval [{_pct(ci[0])}, {_pct(ci[1])}] over resampled validation "
                        "images" + (": within validation's noise" if ci[0] <= 0 else ""))
                margin = (f" (validation margin {_pct(a['val_margin'])} points{sure})" if a.get("val_margin") is not None
                          else "")
                text += (f"; against the runner-up on validation, {a['runner_up']}{margin}, its test mAP differs by "
                         f"{_pct(a['vs']['mean'])} points, 95% CI {_ci(a['vs'])}")
            lines.append(text + ".")
            if a.get("reliable") is False:
                few = ", ".join(f"{n} of {c}" for c, n in a["val_positives"].items() if n < FEW_VAL_POSITIVES)
                lines.append(f"  **Not a reliable choice**: validation holds {few} (fewer than {FEW_VAL_POSITIVES} "
                             "positives of a class), and a margin read from so few images is within their noise. "
                             "Treat the pick as a hint: label more positives for validation (`shards build "
                             "--holdout-positives-per-class`, or `shards add-labels` into the validation set) and "
                             "run the experiment again; its finished runs are reused.")
    if summary["curves"]:
        lines += ["", "## Validation mAP along the final runs (mean over seeds; looked at, never used to choose)",
                  "", "| setting | method | seeds | peak (epoch) | at the end | end minus peak |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for c in summary["curves"]:
            lines.append(f"| {c['setting']} | {c['method']} | {c['n']} | {_pct(c['peak'])} ({c['peak_epoch']:.0f}) |"
                         f" {_pct(c['final'])} | {_pct(c['final'] - c['peak'])} |")
        lines += ["", "![validation curves](curves.png)"]
    lines += ["", "## Chosen hyper-parameters (best validation mAP)", "",
              "| setting | method | chosen | val mAP | runs used / grid size | training config |",
              "| --- | --- | --- | ---: | ---: | --- |"]
    for setting, methods in chosen.items():
        for method, c in methods.items():
            point = ", ".join(f"{k}={v}" for k, v in c["point"].items()) or "(no axes)"
            if c.get("ablation_of"):
                point = f"{c['ablation_of']}'s: {point}"
            lines.append(f"| {setting} | {method} | {point} | {_pct(c['val_map'])} | "
                         f"{c['tuning_runs']} / {c['grid_size']} | {c.get('best_config', '(probe)')} |")
    trained = [r for r in runs if not r["reused"]]
    codes: dict[str, int] = {}
    for r in runs:
        codes[r.get("code") or "?"] = codes.get(r.get("code") or "?", 0) + 1
    lines += ["", "## Wall time", "",
              (f"{seconds:.0f} s in all; {len(runs)} runs ({len(trained)} run now, "
               f"{len(runs) - len(trained)} reused); {sum(r['seconds'] for r in runs):.0f} s of training + scoring "
               f"over all runs (mean {sum(r['seconds'] for r in runs) / max(len(runs), 1):.0f} s a run). Runs per "
               f"code version: {', '.join(f'{c} {n}' for c, n in codes.items())}."), "",
              "![test mAP per method](plot.png)", ""]
    return "\n".join(lines)


def save_figure(fig: Any, path: str) -> None:
    """A figure as a PNG through the one atomic write (rendered to bytes first): a study killed while plotting
    leaves the previous plot or none, never half of one."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    storage.write_bytes(path, png.getvalue())


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
    save_figure(fig, path)
    plt.close(fig)


def plot_curves(summary: dict[str, Any], path: str) -> None:
    """Validation mAP against epoch for every method, one panel per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(c["setting"] for c in summary["curves"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for c in summary["curves"]:
            if c["setting"] == setting:
                ax.plot(c["epochs"], [100 * v for v in c["val_map"]], marker=".", label=f"{c['method']} ({c['n']})")
        ax.set_title(setting)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation mAP (mean over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_reports(spec: ExperimentSpec, runs: list[dict[str, Any]], sets: dict[str, str], out: str,
                  log: Callable[[str], None]) -> None:
    """The first final run of each trained method in the first setting, evaluated into a report (PR curves,
    top-scoring images): what the demo shows a reader beside its table."""
    from trainer.checkpoint import latest_checkpoint
    from trainer.evaluate import evaluate_to_report
    from trainer.scoring import ScoringConfig

    setting = next(iter(spec.data.settings))
    for method, mspec in spec.methods.items():
        first = next((r for r in runs if r["setting"] == setting and r["method"] == method and r["phase"] == "final"
                      and mspec.kind == "train"), None)
        checkpoint = latest_checkpoint(first["run_dir"]) if first else None
        if checkpoint is None:
            continue
        evaluate_to_report(None, sets["test"], os.path.join(out, "report", _slug(method)),
                           ScoringConfig(first["image_size"]), checkpoint=checkpoint, rank=0, world=1,
                           title=f"{setting}, {method}, seed {first['seed']}")
    log(f"reports and plots: {out}/report/<method>/report.md, pr_curves.png, top_scoring.png")
