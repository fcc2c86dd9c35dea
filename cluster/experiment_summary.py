"""What a study's final runs say: the table, paired differences, curves and validation's pick.

Test mAP mean and spread per setting x method, the paired differences by seed (each BG-split variant against its
base, the configured pairs, the best trained method against the best probe), the validation curves, and the method
validation recommends, with how sure that choice is. It reads runs and chosen points as results.json holds them
(mappings read by key), so a study's file can be summarized again as it is."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cluster.experiment_spec import ExperimentSpec, base_method
from cluster.experiment_stats import mean_std, paired_difference
from data.shards import read_manifest


def _maps_by_seed(finals: list[dict[str, Any]], setting: str, method: str, seeds: Sequence[int]) -> dict[int, float]:
    rows = [r for r in finals if r["setting"] == setting and r["method"] == method]
    if rows and rows[0].get("deterministic"):  # one deterministic fit stands for every seed
        return {s: rows[0]["map"] for s in seeds}
    return {r["seed"]: r["map"] for r in rows}


FEW_VAL_POSITIVES = 10
"""Below this many validation positives of a class, a choice between methods is read from noise: on a clip-art set
with 2 validation positives a class the experiment's 36 probe points scored between 3 and 19 val mAP."""


def margin_interval(runs: list[dict[str, Any]], setting: str, chosen: dict[str, Any], winner: str, runner_up: str,
                    scores_of: Callable[[str], tuple[Any, Any] | None]) -> list[float] | None:
    """The 95% interval of validation's margin between the winner and the runner-up, bootstrapped over the
    validation images from the scores their chosen points' tuning runs stored; None where a run kept none."""
    from trainer.metrics import map_difference_interval

    stored = []
    for method in (winner, runner_up):
        run = next((r for r in runs if r["setting"] == setting and r["method"] == method and r["phase"] == "tune"
                    and r["overrides"] == chosen[method]["overrides"] and r.get("run_dir")), None)
        stored.append(scores_of(run["run_dir"]) if run else None)
    if any(s is None for s in stored) or stored[0][1].shape != stored[1][1].shape or \
            (stored[0][1] != stored[1][1]).any():
        return None
    r = map_difference_interval(stored[0][0], stored[1][0], stored[0][1])
    return [r["low"], r["high"]]


def summarize_runs(spec: ExperimentSpec, runs: list[dict[str, Any]], chosen: dict[str, Any] | None = None,
                   val_positives: dict[str, int] | None = None,
                   scores_of: Callable[[str], tuple[Any, Any] | None] | None = None) -> dict[str, Any]:
    """Test mAP mean/std per setting x method, the paired differences (each BG-split variant against its base,
    the configured pairs, and the best trained method against the best probe, both picked on validation), the
    validation curves, and which method validation recommends; from the final runs only. ``scores_of`` (a run
    folder -> the scores it stored) adds the interval of validation's margin."""
    table, pairs, curves, advice = [], [], [], []
    chosen = chosen or {}
    finals = [r for r in runs if r["phase"] == "final"]
    for setting in spec.data.settings:
        by_method = {m: _maps_by_seed(finals, setting, m, spec.seeds) for m in spec.methods}
        for method in spec.methods:
            rows = [r for r in finals if r["setting"] == setting and r["method"] == method]
            if rows:
                mean, std = mean_std([r["map"] for r in rows])
                table.append({"setting": setting, "method": method, "mean": mean, "std": std, "n": len(rows),
                              "maps": [r["map"] for r in sorted(rows, key=lambda r: r["seed"])],
                              "deterministic": bool(rows[0].get("deterministic")),
                              "val_map": chosen.get(setting, {}).get(method, {}).get("val_map")})
            wise = [r for r in rows if r.get("wise_ft")]
            if wise:  # beside the plain run: the same runs interpolated back to their probe, alpha on validation
                wise.sort(key=lambda r: r["seed"])
                mean, std = mean_std([r["wise_ft"]["map"] for r in wise])
                table.append({"setting": setting, "method": f"{method} + WiSE-FT", "mean": mean, "std": std,
                              "n": len(wise), "maps": [r["wise_ft"]["map"] for r in wise], "deterministic": False,
                              "val_map": None, "alphas": [r["wise_ft"]["alpha"] for r in wise]})
            curve = _mean_curve([r["curve"] for r in rows if r.get("curve")])
            if curve:
                curves.append({"setting": setting, "method": method, "n": sum(1 for r in rows if r.get("curve")),
                               **curve})
        wanted = [(m, base_method(m, list(spec.methods), spec.methods), "BG split") for m in spec.methods]
        wanted += [(v, b, "configured") for v, b in spec.pairs]
        ranked = _ranked_by_validation(spec, chosen.get(setting, {}), by_method)
        trained = [m for m in ranked if spec.methods[m].kind == "train"]
        probes = [m for m in ranked if spec.methods[m].kind == "probe"]
        if trained and probes:
            wanted.append((trained[0], probes[0], "best trained vs best probe (by validation)"))
        seen = set()
        for variant, base, why in wanted:
            if base is None or (variant, base) in seen or not by_method.get(variant) or not by_method.get(base):
                continue
            seen.add((variant, base))
            pairs.append({"setting": setting, "variant": variant, "base": base, "why": why,
                          **_paired(spec, setting, finals, variant, base, by_method)})
        if ranked:
            pick = {"setting": setting, "method": ranked[0], "val_map": chosen[setting][ranked[0]]["val_map"]}
            if len(ranked) > 1:
                pick.update(runner_up=ranked[1], vs=_paired(spec, setting, finals, ranked[0], ranked[1], by_method),
                            val_margin=pick["val_map"] - chosen[setting][ranked[1]]["val_map"])
                if scores_of is not None:
                    pick["val_margin_ci95"] = margin_interval(runs, setting, chosen[setting], ranked[0], ranked[1],
                                                              scores_of)
            if val_positives:
                few = {c: n for c, n in val_positives.items() if n < FEW_VAL_POSITIVES}
                pick.update(val_positives=dict(val_positives), reliable=not few)
            advice.append(pick)
    return {"table": table, "pairs": pairs, "curves": curves, "advice": advice}


def validation_positives(sets: dict[str, str]) -> dict[str, int] | None:
    """Positives of each rare class in the validation set (its manifest), None without one."""
    if not sets.get("val"):
        return None
    try:
        manifest = read_manifest(sets["val"])
    except (FileNotFoundError, ValueError):  # a study handed stand-in sets (its scorer never reads them)
        return None
    return {name: int(n) for name, n in zip(manifest.class_names[1:], manifest.counts[1:])}


def _paired(spec: ExperimentSpec, setting: str, finals: list[dict[str, Any]], variant: str, base: str,
            by_method: dict[str, dict[int, float]]) -> dict[str, Any]:
    """paired_difference by seed; two deterministic fits are one difference with no interval (repeating it per
    seed would claim a zero-width one)."""
    fixed = [any(r.get("deterministic") for r in finals if r["setting"] == setting and r["method"] == m)
             for m in (variant, base)]
    if all(fixed):
        first = spec.seeds[0]
        return paired_difference({first: by_method[variant][first]}, {first: by_method[base][first]})
    return paired_difference(by_method[variant], by_method[base])


def _ranked_by_validation(spec: ExperimentSpec, chosen: dict[str, Any], by_method: dict[str, dict[int, float]]
                          ) -> list[str]:
    """Methods with a validation score of their own (tuned, not ablations), best first: the test split never
    decides which method is recommended."""
    scored = [m for m, c in chosen.items() if c.get("val_map") is not None and not c.get("ablation_of")
              and by_method.get(m)]
    return sorted(scored, key=lambda m: -chosen[m]["val_map"])


def _mean_curve(curves: list[list[list[float]]]) -> dict[str, Any]:
    """Validation mAP per recorded epoch averaged over seeds, with its peak and its end (does it fall?)."""
    if not curves:
        return {}
    length = min(len(c) for c in curves)
    epochs = [curves[0][i][0] for i in range(length)]
    means = [sum(c[i][1] for c in curves) / len(curves) for i in range(length)]
    peak = max(range(length), key=lambda i: means[i])
    return {"epochs": epochs, "val_map": means, "peak_epoch": epochs[peak], "peak": means[peak],
            "final": means[-1]}
