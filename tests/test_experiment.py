"""`bgsplit experiment`: grid sampling, validation-only selection, paired CIs, resume, config errors, and one real
--quick run. Everything but the last test uses a synthetic scorer (no training)."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.experiment import plan_runs, run_experiment
from cluster.experiment_data import slug
from cluster.experiment_spec import (
    ExperimentSpec,
    MethodSpec,
    base_method,
    load_spec,
    parse_spec,
    quick_left_out,
    quick_spec,
)
from cluster.experiment_stats import method_grid, paired_difference, sample_grid, t_quantile_975
from trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "experiment_fmnist.yaml"


def test_grid_sampling_shares_one_budget_and_is_deterministic():
    spec = load_spec(SHIPPED)
    for name, method in spec.methods.items():
        grid = method_grid(spec.grid, method.grid)
        points = sample_grid(grid, spec.budget, spec.tune_seed, name)
        assert len(points) == min(spec.budget, len(grid))
        assert points == sample_grid(grid, spec.budget, spec.tune_seed, name)  # same seed, same points
        assert all(p in grid for p in points) and len({json.dumps(p) for p in points}) == len(points)
        assert all(set(p) == set(spec.grid) | set(method.grid) for p in points)
    grid = method_grid({"optim.lr": [1, 2, 3]}, {"loss.aux_weight": [4, 5, 6]})
    assert len(grid) == 9
    draws = {json.dumps(sample_grid(grid, 4, seed, "bg-split")) for seed in range(20)}
    assert len(draws) > 1  # the seed matters
    assert method_grid({"optim.lr": [1, 2]}, {"optim.lr": [7]}) == [{"optim.lr": 7}]  # own axis wins


def test_base_method_pairs_by_name():
    methods = ["fine-tune", "bg-split", "re-sample", "re-sample + bg-split", "focal", "lonely + bg-split"]
    assert base_method("bg-split", methods) == "fine-tune"
    assert base_method("re-sample + bg-split", methods) == "re-sample"
    assert base_method("re-sample", methods) is None
    assert base_method("lonely + bg-split", methods) is None  # no base method in the experiment


def test_paired_difference_ci_by_hand():
    variant = {0: 0.5, 1: 0.6, 2: 0.7}
    base = {0: 0.4, 1: 0.4, 2: 0.5, 3: 0.9}  # seed 3 has no partner: left out
    p = paired_difference(variant, base)
    assert p["seeds"] == [0, 1, 2] and p["n"] == 3
    # diffs 0.1, 0.2, 0.2: mean 1/6, sample sd sqrt(((1/15)^2 + 2 (1/30)^2) / 2) = 0.057735, t_{.975,2} = 4.303
    half = 4.303 * 0.0577350 / math.sqrt(3)
    assert p["mean"] == pytest.approx(1 / 6)
    assert p["ci95"] == pytest.approx([1 / 6 - half, 1 / 6 + half], abs=1e-6)
    one = paired_difference({0: 0.3}, {0: 0.1})
    assert one["mean"] == pytest.approx(0.2) and one["ci95"] is None
    assert t_quantile_975(60) == pytest.approx(2.000, abs=1e-3)
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)


class FakeScorer:
    """Validation mAP peaks at lr 0.003 (and aux weight 0.1); test mAP is anti-correlated with it, so any use of
    the test split in selection would pick another point. Records every call."""

    def __init__(self, sets):
        self.sets, self.calls = sets, []

    def __call__(self, cfg, eval_set):
        self.calls.append({"eval_set": eval_set, "out_dir": cfg.run.out_dir, "seed": cfg.run.seed,
                           "lr": cfg.optim.lr, "aux": cfg.loss.aux_weight, "sampling": cfg.data.sampling})
        assert cfg.data.val == "" and cfg.data.test == ""  # the run itself never sees another split
        closeness = -abs(math.log(cfg.optim.lr / 0.003)) - abs(cfg.loss.aux_weight - 0.1)
        if eval_set == self.sets["val"]:
            return {"map": 0.5 + 0.1 * closeness, "ap": {}}
        return {"map": 0.5 - 0.1 * closeness + 0.05 * cfg.loss.aux_weight + 0.01 * cfg.run.seed, "ap": {}}


def _fake_sets(tmp_path, version="1"):
    sets = {}
    for name in ("train-a", "train-b", "val", "test"):
        (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name / "manifest.json").write_text(json.dumps({"name": name, "v": version}))
        sets[name] = str(tmp_path / "data" / name)
    return {"A": sets["train-a"], "B": sets["train-b"], "val": sets["val"], "test": sets["test"]}


def _spec(**changes):
    spec = ExperimentSpec(
        base=str(ROOT / "configs" / "fmnist_bg.yaml"),
        methods={"fine-tune": MethodSpec(["loss.aux_weight=0"]),
                 "bg-split": MethodSpec([], {"loss.aux_weight": [0.03, 0.1, 0.3]}),
                 "re-sample": MethodSpec(["data.sampling=balanced", "loss.aux_weight=0"]),
                 "re-sample + bg-split": MethodSpec(["data.sampling=balanced"], {"loss.aux_weight": [0.1, 0.3]})},
        grid={"optim.lr": [0.001, 0.003, 0.01]}, budget=4, seeds=[0, 1, 2], tune_seed=7)
    spec.data = dataclasses.replace(spec.data, settings={"A": 2, "B": 10})
    return dataclasses.replace(spec, **changes)


def test_selection_uses_validation_only_and_scores_test_once_per_final_run(tmp_path):
    sets = _fake_sets(tmp_path)
    spec, scorer = _spec(), FakeScorer(sets)
    doc = run_experiment(spec, str(tmp_path / "out"), score=scorer, code="c0", sets=sets, log=lambda _: None)
    tune_calls = [c for c in scorer.calls if "tune-" in c["out_dir"]]
    final_calls = [c for c in scorer.calls if "final-" in c["out_dir"]]
    assert len(tune_calls) + len(final_calls) == len(scorer.calls)
    assert all(c["eval_set"] == sets["val"] and c["seed"] == spec.tune_seed for c in tune_calls)
    assert all(c["eval_set"] == sets["test"] for c in final_calls)
    # every (setting, method, seed) final run scored on test exactly once
    keys = [(Path(c["out_dir"]).parts[-4], Path(c["out_dir"]).parts[-3], c["seed"]) for c in final_calls]
    assert len(keys) == len(set(keys)) == 2 * 4 * 3
    # the budget: grids of 3, 9, 3 and 6 points give 3, 4, 3 and 4 tuning runs per setting
    used = {m: c["tuning_runs"] for m, c in doc["chosen"]["A"].items()}
    assert used == {"fine-tune": 3, "bg-split": 4, "re-sample": 3, "re-sample + bg-split": 4}
    # chosen by validation: the best val point among the sampled ones, never the best test point
    for setting in ("A", "B"):
        for method, chosen in doc["chosen"][setting].items():
            tuned = [r for r in doc["runs"] if r["setting"] == setting and r["method"] == method
                     and r["phase"] == "tune"]
            assert all(r["split"] == "val" for r in tuned)
            assert chosen["point"] == max(tuned, key=lambda r: r["map"])["point"]
            assert chosen["point"]["optim.lr"] == 0.003
            finals = [r for r in doc["runs"] if r["setting"] == setting and r["method"] == method
                      and r["phase"] == "final"]
            assert [r["seed"] for r in finals] == [0, 1, 2] and all(r["point"] == chosen["point"] for r in finals)
    # pairs: bg-split vs fine-tune and re-sample + bg-split vs re-sample, per setting, by seed
    pairs = {(p["setting"], p["variant"]): p for p in doc["pairs"]}
    assert set(pairs) == {(s, v) for s in "AB" for v in ("bg-split", "re-sample + bg-split")}
    p = pairs[("A", "bg-split")]
    assert p["base"] == "fine-tune" and p["n"] == 3 and p["ci95"][0] <= p["mean"] <= p["ci95"][1]
    md = (tmp_path / "out" / "results.md").read_text()
    for text in ("Test mAP", "paired by seed", "Chosen hyper-parameters", "Wall time", "4 / 9", "3 / 3"):
        assert text in md
    assert (tmp_path / "out" / "plot.png").stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["phase"] for r in saved["runs"]} == {"tune", "final"} and not any(r["reused"] for r in saved["runs"])
    # best/<setting>/recommended.yaml is validation's pick under one name: the README's commands train it as is
    for pick in saved["advice"]:
        recommended = (tmp_path / "out" / "best" / slug(pick["setting"]) / "recommended.yaml").read_text()
        chosen = (tmp_path / "out" / saved["chosen"][pick["setting"]][pick["method"]]["best_config"]).read_text()
        assert recommended.startswith(f"# bgsplit experiment recommends {pick['method']} for setting")
        assert recommended.endswith(chosen) and "NOT A RELIABLE" not in recommended


def test_an_ablation_reuses_the_chosen_point_and_runs_only_its_settings(tmp_path):
    """soft aux as an ablation of bg-split: no tuning runs of its own, bg-split's chosen point plus loss.aux=soft,
    final runs in setting A only, paired against bg-split by seed."""
    sets = _fake_sets(tmp_path)
    spec = _spec()
    spec.methods["bg-split (soft)"] = MethodSpec(["loss.aux=soft"], ablation_of="bg-split", settings=["A"])
    scorer = FakeScorer(sets)
    doc = run_experiment(spec, str(tmp_path / "out"), score=scorer, code="c0", sets=sets, log=lambda _: None)
    runs = [r for r in doc["runs"] if r["method"] == "bg-split (soft)"]
    assert [(r["setting"], r["phase"], r["seed"]) for r in runs] == [("A", "final", s) for s in (0, 1, 2)]
    hard = doc["chosen"]["A"]["bg-split"]
    assert all(r["point"] == hard["point"] and r["overrides"] == [*hard["overrides"], "loss.aux=soft"]
               for r in runs)
    assert "bg-split (soft)" not in doc["chosen"]["B"]
    pairs = [(p["setting"], p["base"]) for p in doc["pairs"] if p["variant"] == "bg-split (soft)"]
    assert pairs == [("A", "bg-split")]
    with pytest.raises(ConfigError, match="ablation_of names 'nope'"):
        parse_spec({"data": {"settings": {"A": 2}}, "methods": {"x": {"ablation_of": "nope"}}})
    with pytest.raises(ConfigError, match="settings names"):
        parse_spec({"data": {"settings": {"A": 2}}, "methods": {"x": {"settings": ["Z"]}}})


def test_resume_reuses_finished_runs_and_reruns_only_what_changed(tmp_path):
    sets = _fake_sets(tmp_path)
    out = str(tmp_path / "out")
    first = FakeScorer(sets)
    doc1 = run_experiment(_spec(), out, score=first, code="c0", sets=sets, log=lambda _: None)
    again = FakeScorer(sets)
    doc2 = run_experiment(_spec(), out, score=again, code="c0", sets=sets, log=lambda _: None)
    assert again.calls == [] and all(r["reused"] for r in doc2["runs"])
    assert [r["map"] for r in doc2["runs"]] == [r["map"] for r in doc1["runs"]]
    # a changed override of one method reruns that method's runs only
    spec = _spec()
    spec.methods["fine-tune"] = MethodSpec(["loss.aux_weight=0", "optim.momentum=0.8"])
    changed = FakeScorer(sets)
    doc3 = run_experiment(spec, out, score=changed, code="c0", sets=sets, log=lambda _: None)
    fresh = [r for r in doc3["runs"] if not r["reused"]]
    assert {r["method"] for r in fresh} == {"fine-tune"} and len(changed.calls) == len(fresh) == 2 * (3 + 3)
    # a killed run: its result file is missing, so only it runs again
    victim = Path(next(r["run_dir"] for r in doc3["runs"] if r["method"] == "bg-split" and r["seed"] == 1
                       and r["phase"] == "final")) / "experiment_result.json"
    victim.unlink()
    partial = FakeScorer(sets)
    run_experiment(spec, out, score=partial, code="c0", sets=sets, log=lambda _: None)
    assert len(partial.calls) == 1 and partial.calls[0]["out_dir"] == str(victim.parent)
    # new code or a rebuilt data set: everything runs again
    newcode = FakeScorer(sets)
    run_experiment(spec, out, score=newcode, code="c1", sets=sets, log=lambda _: None)
    assert len(newcode.calls) == len(doc3["runs"])
    rebuilt = _fake_sets(tmp_path, version="2")
    newdata = FakeScorer(rebuilt)
    run_experiment(spec, out, score=newdata, code="c1", sets=rebuilt, log=lambda _: None)
    assert len(newdata.calls) == len(doc3["runs"])


def test_unknown_experiment_key_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown experiment key 'budjet'"):
        parse_spec({"budjet": 3, "methods": {"a": {}}})
    with pytest.raises(ConfigError, match="unknown experiment key 'methods.a.gird'"):
        parse_spec({"methods": {"a": {"gird": {}}}})
    with pytest.raises(ConfigError, match="unknown experiment key 'data.setings'"):
        parse_spec({"data": {"setings": {}}, "methods": {"a": {}}})
    with pytest.raises(ConfigError, match="'grid.optim.lr' must be a non-empty list"):
        parse_spec({"grid": {"optim.lr": 0.1}, "methods": {"a": {}}})
    with pytest.raises(ConfigError, match="'methods.a.overrides' must be a list"):
        parse_spec({"methods": {"a": {"overrides": "loss.aux_weight=0"}}})
    bad = tmp_path / "bad.yaml"
    bad.write_text(SHIPPED.read_text() + "seedz: [1]\n")
    assert main(["experiment", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bgsplit: error: unknown experiment key 'seedz'") and "\n" not in err
    # a bad training override in a method is the job config's own one-line error, before anything trains
    typo = tmp_path / "typo.yaml"
    typo.write_text(SHIPPED.read_text().replace("loss.aux_weight=0]", "loss.aux_wieght=0]", 1)
                    .replace("base: fmnist_bg.yaml", f"base: {ROOT / 'configs' / 'fmnist_bg.yaml'}"))
    sets = _fake_sets(tmp_path) | {"99.6% bg": "x", "98.0% bg": "y"}
    with pytest.raises(ConfigError, match="method 'fine-tune', methods.fine-tune.overrides: .*aux_wieght"):
        run_experiment(load_spec(typo), str(tmp_path / "o"), score=lambda cfg, s: {"map": 0.0}, code="c",
                       sets=sets, log=lambda _: None)


def test_an_unknown_key_in_a_method_grid_names_the_method(tmp_path):
    """Issue 36: a typo inside one method's grid (or the shared grid) names the method and the experiment key."""
    typo = tmp_path / "typo.yaml"
    typo.write_text(SHIPPED.read_text().replace("grid: {loss.focal_gamma:", "grid: {loss.focal_gama:", 1)
                    .replace("base: fmnist_bg.yaml", f"base: {ROOT / 'configs' / 'fmnist_bg.yaml'}"))
    sets = _fake_sets(tmp_path) | {"99.6% bg": "x", "98.0% bg": "y"}

    def run(spec):
        run_experiment(spec, str(tmp_path / "o"), score=lambda cfg, s: {"map": 0.0}, code="c", sets=sets,
                       log=lambda _: None)

    with pytest.raises(ConfigError, match=r"experiment method 'focal', methods\.focal\.grid: .*focal_gama") as e:
        run(load_spec(typo))
    assert "\n" not in str(e.value)
    shared = load_spec(SHIPPED.with_name("experiment_fmnist.yaml"))
    shared.base = str(ROOT / "configs" / "fmnist_bg.yaml")
    shared.grid = {"optim.lrr": [0.1]}
    with pytest.raises(ConfigError, match=r"method 'fine-tune', grid \(the shared axes\): .*optim\.lrr"):
        run(shared)
    with pytest.raises(ConfigError, match="method 'lp', .*probe.CC"):
        parse_spec({"methods": {"lp": {"kind": "probe", "grid": {"probe.CC": [1.0]}}}})


def test_quick_says_what_it_leaves_out_and_its_best_configs_say_they_are_smoke_length(tmp_path):
    """Issue 36: --quick dropped 2 of 4 methods without a word, and its best/ config kept optim.epochs 0.5 with
    nothing saying so (trained as recommended: 7.1 test mAP; the same point at 1.75 epochs: 17.8)."""
    import yaml

    spec, sets = _spec(), _fake_sets(tmp_path)
    lines = quick_left_out(spec)
    assert "methods re-sample, re-sample + bg-split (only fine-tune, bg-split run)" in lines
    assert "settings B (only A runs)" in lines and any(line.startswith("final seeds 1, 2 ") for line in lines)
    assert any("optim.epochs=0.5 instead of 1.75" in line for line in lines)
    run_experiment(quick_spec(spec), str(tmp_path / "quick"), score=FakeScorer(sets), code="c", sets=sets,
                   log=lambda _: None, full=spec)
    best = sorted((tmp_path / "quick" / "best").rglob("*.yaml"))
    assert [p.name for p in best] == ["bg-split.yaml", "fine-tune.yaml", "recommended.yaml"]
    assert "SMOKE-LENGTH CONFIG" in best[2].read_text()  # the recommended copy carries the warning too
    for path in best[:2]:
        text = path.read_text()
        assert text.startswith("# SMOKE-LENGTH CONFIG, made by `bgsplit experiment --quick`: optim.epochs: 0.5 "
                               "here, 1.75 in the full study.\n")
        assert "train this one at full length by adding: optim.epochs=1.75\n" in text
        assert yaml.safe_load(text)["optim"]["epochs"] == 0.5  # the header is a comment: the config still loads
    run_experiment(spec, str(tmp_path / "full"), score=FakeScorer(sets), code="c", sets=sets, log=lambda _: None)
    assert not [p for p in (tmp_path / "full" / "best").rglob("*.yaml") if "SMOKE" in p.read_text()]


def test_the_plan_counts_the_runs_the_study_makes(tmp_path):
    sets, spec = _fake_sets(tmp_path), _spec()
    scorer = FakeScorer(sets)
    run_experiment(spec, str(tmp_path / "out"), score=scorer, code="c", sets=sets, log=lambda _: None)
    plan = plan_runs(spec)
    assert plan["train"]["tune"] == sum("tune-" in c["out_dir"] for c in scorer.calls)
    assert plan["train"]["final"] == sum("final-" in c["out_dir"] for c in scorer.calls)
    assert plan["probe"] == {"tune": 0, "final": 0}
    probes = dataclasses.replace(spec, methods={**spec.methods, "lp": MethodSpec(kind="probe", grid={
        "probe.C": [0.1, 1.0], "probe.class_weight": ["none", "balanced"]}, settings=["A"])})
    assert plan_runs(probes)["probe"] == {"tune": 4, "final": 1}  # one deterministic final fit


def test_progress_lines_count_down_and_the_first_estimate_is_within_2x_of_the_time_left(tmp_path):
    """A study of 26 runs whose every run takes 0.15 s: the estimate printed after the first run against the time
    the rest really took; then a rerun reuses every run and says so."""
    sets = _fake_sets(tmp_path)
    spec = _spec()
    spec.data = dataclasses.replace(spec.data, settings={"A": 2})
    scorer = FakeScorer(sets)

    def slow(cfg, eval_set):
        time.sleep(0.15)
        return scorer(cfg, eval_set)

    lines: list[tuple[float, str]] = []
    run_experiment(spec, str(tmp_path / "out"), score=slow, code="c", sets=sets,
                   log=lambda line: lines.append((time.monotonic(), line)))
    total = sum(plan_runs(spec)["train"].values())
    assert lines[0][1].startswith(f"plan: {total} runs: ")
    progress = [(t, line) for t, line in lines if line.startswith("  [")]
    assert [line.split(" run(s)")[0] for _, line in progress] == [f"  [{i}" for i in range(1, total + 1)]
    assert progress[-1][1] == f"  [{total} run(s) done, 0 to do: about 0 s left]"
    first_at, first = progress[0]
    assert f", {total - 1} to do: about " in first
    estimate = float(first.split("about ")[1].split(" s left")[0])
    measured = progress[-1][0] - first_at
    assert measured / 2 <= estimate <= 2 * measured, (estimate, measured)
    again: list[str] = []
    run_experiment(spec, str(tmp_path / "out"), score=slow, code="c", sets=sets, log=again.append)
    assert f"  [0 run(s) done, {total} reused, 0 to do: about 0 s left]" in again


@pytest.mark.slow
def test_quick_experiment_end_to_end_through_the_cli(tmp_path, capsys):
    out = tmp_path / "exp"
    start = time.time()
    assert main(["experiment", str(SHIPPED), "--quick", "--out", str(out)]) == 0
    seconds = time.time() - start
    doc = json.loads((out / "results.json").read_text())
    # the estimate printed before the first run, from the calibration's measured steps, against what the runs took
    printed = capsys.readouterr().out
    estimate = printed.split("  estimate: about ")[1].split(" on this machine")[0]
    number, unit = estimate.split()
    estimated = float(number) * {"s": 1, "min": 60}[unit]
    took = sum(r["seconds"] for r in doc["runs"])
    assert took / 2 <= estimated <= 2 * took, (estimate, took)
    assert printed.index("  estimate: about ") < printed.index("tune {")  # before the first run, not after it
    assert len(doc["runs"]) == 2 * (2 + 1)  # 2 methods x (2 tuning points + 1 final seed)
    assert all((r["split"] == "val") == (r["phase"] == "tune") for r in doc["runs"])
    assert all(0.0 <= r["map"] <= 1.0 for r in doc["runs"])
    assert (out / "results.md").read_text().count("| 99.6% bg |") >= 4
    assert (out / "plot.png").stat().st_size > 0
    # the tuning runs dropped their checkpoints, the final runs kept theirs
    assert not list(out.rglob("tune-*/checkpoints")) and len(list(out.rglob("final-*/seed0/checkpoints"))) == 2
    # a rerun reuses every run
    assert main(["experiment", str(SHIPPED), "--quick", "--out", str(out)]) == 0
    assert all(r["reused"] for r in json.loads((out / "results.json").read_text())["runs"])
    again = capsys.readouterr().out
    assert "6 found stored" in again and "measuring this machine" not in again  # nothing to calibrate for
    print(f"quick experiment: {seconds:.0f}s")


@pytest.mark.slow
def test_quick_demo_is_the_experiment_with_reports(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    # configs/experiment_demo.yaml tunes nothing: only final runs, each scored once on test
    assert [(r["method"], r["phase"], r["split"]) for r in doc["runs"]] == [("fine-tune", "final", "test"),
                                                                           ("bg-split", "final", "test")]
    for method in ("fine-tune", "bg-split"):
        assert (out / "report" / method / "report.md").exists() and (out / "report" / method / "pr_curves.png").exists()
        assert (out / "best" / "99.6-bg" / f"{method}.yaml").exists()
    assert "| 99.6% bg | bg-split |" in (out / "results.md").read_text()


@pytest.mark.parametrize("gap, excluded", [(2.0, True), (0.0, False)])
def test_the_pick_states_its_margin_with_an_interval_from_the_stored_validation_scores(tmp_path, gap, excluded):
    """Issue 32: a pick read from few validation images says how sure it is. Every run stores its per-image scores;
    the pick's margin over the runner-up gets a bootstrap interval over the validation images: clear of 0 when
    the winner ranks the positives far better, and said to be within the noise when both rank them alike."""
    import numpy as np

    sets = _fake_sets(tmp_path)
    spec = _spec()
    spec.data = dataclasses.replace(spec.data, settings={"A": 2})
    labels = np.repeat([0, 1, 2, 3], [200, 20, 20, 20])
    scorer = FakeScorer(sets)

    def with_scores(cfg, eval_set):
        out = scorer(cfg, eval_set)
        rng = np.random.default_rng([int(1000 * cfg.optim.lr), int(100 * cfg.loss.aux_weight),
                                     cfg.data.sampling == "balanced"])
        scores = rng.random((len(labels), 4))
        if (cfg.loss.aux_weight, cfg.optim.lr, cfg.data.sampling) == (0.1, 0.003, "natural"):  # bg-split's best
            scores[np.arange(len(labels)), labels] += gap
        return {**out, "scores": scores, "labels": labels}

    doc = run_experiment(spec, str(tmp_path / "out"), score=with_scores, code="c", sets=sets, log=lambda _: None)
    pick = doc["advice"][0]
    low, high = pick["val_margin_ci95"]
    assert (low > 0) == excluded and low <= high
    run = next(r for r in doc["runs"] if r["phase"] == "tune")
    assert (Path(run["run_dir"]) / "scores.npy").exists() and (Path(run["run_dir"]) / "scores_labels.npy").exists()
    md = (tmp_path / "out" / "results.md").read_text()
    assert "95% interval [" in md and ("within validation's noise" in md) != excluded


def test_a_study_scores_validation_one_way(monkeypatch):
    """Issue 33: a study's tuning runs scored validation at batch 128 in fp32 while the curves of its final runs
    scored the same split at data.batch_size in run.precision (bf16 on a GPU). Every scorer of a run now takes
    ScoringConfig.of(its config): the scorers are checked for the setups they hand evaluate_student."""
    import types

    from cluster import experiment_scorers
    from trainer.scoring import ScoringConfig

    cfg = load_config(str(ROOT / "configs" / "fmnist_bg.yaml"), ["data.batch_size=48", "run.precision=bf16",
                                                               "data.num_workers=3", "data.eval_resize_ratio=1.25"])
    seen = []
    monkeypatch.setattr("trainer.evaluate.evaluate_student",
                        lambda student, manifest, setup, device, **kw: seen.append(setup) or {
                            "map": 0.5, "ap": {}, "predictions": (None, None, [], [])})
    monkeypatch.setattr("data.shards.read_manifest", lambda location: location)
    fake = types.SimpleNamespace(fit=lambda: None, student=None, device="cpu", steps_per_epoch=1,
                                 progress=types.SimpleNamespace(history=[]), head=types.SimpleNamespace(weights={}))
    monkeypatch.setattr("trainer.train.Trainer.build", classmethod(lambda cls, c: fake))
    experiment_scorers.train_and_score(cfg, "val-set", keep_checkpoint=True)
    assert seen == [ScoringConfig.of(cfg)] == [ScoringConfig(cfg.data.image_size, 48, 3, 1.25, "bf16")]
