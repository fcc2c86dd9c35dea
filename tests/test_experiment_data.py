"""`bgsplit experiment` on any data: shard sets named in the config or built from any source, every set checked
before a run starts; probes, curves, recommendations and the chosen points' training configs in the results."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from data.build import BuildSpec, build_set
from data.shards import write_shard_set
from data.sources import FashionMNISTSource
from cluster.cli import main
from cluster.experiment import run_experiment
from cluster.experiment_data import DataSpec, check_sets, resolve_rare
from cluster.experiment_spec import load_spec, parse_spec
from trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
RARE = ("1", "8")


@pytest.fixture(scope="module")
def own_sets(tmp_path_factory):
    """A user's sets: two training settings and a carved-out validation set from one source, a test set from
    another split; plus broken variants."""
    root = tmp_path_factory.mktemp("own")
    src, test_src = FashionMNISTSource("train"), FashionMNISTSource("test")
    common = dict(seed=0, max_count=200)
    sets = {}
    for name, positives in (("A", 3), ("B", 12)):
        sets[name] = str(root / f"train-{name}")
        build_set(src, BuildSpec("fmnist:train", RARE, positives_per_class=positives, max_background=150,
                                 holdout=120, part="rest", **common), sets[name], progress=False)
    sets["val"] = str(root / "val")
    build_set(src, BuildSpec("fmnist:train", RARE, holdout=120, part="holdout", **common), sets["val"],
              progress=False)
    sets["test"] = str(root / "test")
    build_set(test_src, BuildSpec("fmnist:test", RARE, subsample=200, **common), sets["test"], progress=False)
    # broken: a validation set drawn from the training images, a set of other classes, a set lacking class 8
    sets["leaky"] = str(root / "leaky")
    build_set(src, BuildSpec("fmnist:train", RARE, positives_per_class=3, max_background=150, **common),
              sets["leaky"], progress=False)
    sets["other"] = str(root / "other")
    build_set(test_src, BuildSpec("fmnist:test", ("1", "9"), subsample=200, **common), sets["other"], progress=False)
    sets["lacking"] = str(root / "lacking")  # made by another tool: bgsplit's builder refuses a missing class
    items = [i for i in test_src.items() if i.label in ("0", "1")][:20]
    write_shard_set(sets["lacking"], [(i.key, test_src.read(i), int(i.label == "1"), i.label) for i in items],
                    rare_classes=list(RARE), class_names=["background", "Trouser", "Bag"])
    return sets


def test_good_sets_pass_and_each_bad_one_is_a_one_line_error(own_sets):
    good = {k: own_sets[k] for k in ("A", "B", "val", "test")}
    facts = check_sets(good, ["A", "B"])
    assert facts["A"]["counts"][1:] == [3, 3] and facts["B"]["counts"][1:] == [12, 12]
    cases = [({"val": own_sets["A"] + "-missing"}, "data.sets.val: no shard set at .*build it with"),
             ({"B": own_sets["A"] + "-missing"}, r"data.sets.train\['B'\]: no shard set"),
             ({"test": own_sets["other"]}, "disagree on the classes: data.sets.test has .*same --rare classes"),
             ({"val": own_sets["leaky"]},
              r"data.sets.val .* shares \d+ image\(s\) \(the same bytes\) with data.sets.train"),
             ({"test": own_sets["lacking"]}, "has no test positive of class 'Bag'")]
    lacking = json.loads(Path(own_sets["lacking"], "manifest.json").read_text())["counts"]
    assert lacking[2] == 0, "the fixture's small subsample must miss class 8 for the last case"
    for change, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            check_sets({**good, **change}, ["A", "B"])
        assert "\n" not in str(err.value)


def test_rare_classes_by_name_or_id_and_a_typo_lists_the_names():
    src = FashionMNISTSource("train")
    assert resolve_rare(src, ["Dress", "5", "shirt"], "data.rare") == ("3", "5", "6")
    with pytest.raises(ConfigError, match=r"unknown class id 'Sandle' in data.rare: did you mean 'Sandal'.*3 \(Dress\)"):
        resolve_rare(src, ["Sandle"], "data.rare")


def test_data_block_is_either_sets_or_a_construction(own_sets, tmp_path):
    spec = parse_spec({"data": {"sets": {"train": {"A": "rel/a"}, "val": "s3://b/val", "test": "t"}},
                       "methods": {"x": {}}})
    assert list(spec.data.settings) == ["A"] and spec.data.sets["val"] == "s3://b/val"
    assert Path(spec.data.sets["train"]["A"]).is_absolute()  # a run elsewhere (Ray) reads the same set
    with pytest.raises(ConfigError, match="both sets and construction keys"):
        parse_spec({"data": {"sets": {"train": {"A": "a"}, "val": "v", "test": "t"}, "rare": ["1"]},
                    "methods": {"x": {}}})
    with pytest.raises(ConfigError, match=r"experiment key 'data.sets' needs val, test \(its keys: train, val, test\)"):
        parse_spec({"data": {"sets": {"train": {"A": "a"}}}, "methods": {"x": {}}})
    with pytest.raises(ConfigError, match="at least 1 training positive"):
        from cluster.experiment_data import build_sets
        build_sets(str(tmp_path), DataSpec(settings={"none": 0}))


def _fake_score(sets):
    def score(cfg, eval_set):
        lr = cfg.optim.lr
        base = 0.3 + (0.2 if cfg.data.sampling == "balanced" else 0) + 0.1 * (cfg.loss.aux_weight > 0)
        curve = ([[e, base - 0.01 * abs(e - 2)] for e in (1.0, 2.0, 3.0)]
                 if cfg.run.eval_every and cfg.data.val == sets["val"] else [])
        return {"map": base - abs(lr - 0.003) + 0.01 * cfg.run.seed, "ap": {}, "curve": curve}
    return score


def _fake_probe(calls):
    def probe(params, train, eval_set):
        calls.append((params, eval_set))
        return {"map": 0.35 + (0.05 if params.class_weight == "balanced" else 0), "ap": {}, "fit": {}}
    return probe


def test_own_sets_with_probes_curves_best_configs_and_advice(own_sets, tmp_path):
    sets = {"train": {"A": own_sets["A"], "B": own_sets["B"]}, "val": own_sets["val"], "test": own_sets["test"]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(ROOT / "configs" / "fmnist_bg.yaml"), "data": {"sets": sets},
        "methods": {"fine-tune": {"overrides": ["loss.aux_weight=0"]}, "bg-split": {},
                    "re-sample": {"overrides": ["data.sampling=balanced", "loss.aux_weight=0"]},
                    "probe": {"kind": "probe", "grid": {"probe.class_weight": ["none", "balanced"]}}},
        "grid": {"optim.lr": [0.001, 0.003]}, "seeds": [0, 1, 2], "curve_every": 1.0,
        "pairs": [["re-sample", "fine-tune"]]}))
    spec = load_spec(path)
    calls = []
    doc = run_experiment(spec, str(tmp_path / "out"), score=_fake_score(spec.data.sets), code="c0",
                         probe=_fake_probe(calls), log=lambda _: None)
    # probes: tuned over their own axis only, on validation; one final fit on test per setting
    assert [p.class_weight for p, s in calls if s == own_sets["val"]] == ["none", "balanced"] * 2
    finals = [p for p, s in calls if s == own_sets["test"]]
    assert len(finals) == 2 and all(p.class_weight == "balanced" for p in finals)
    pairs = {(p["setting"], p["variant"], p["base"]): p for p in doc["pairs"]}
    assert ("A", "bg-split", "fine-tune") in pairs and ("A", "re-sample", "fine-tune") in pairs
    vs_probe = pairs[("A", "re-sample", "probe")]  # best trained (by validation) against the best probe
    assert vs_probe["why"].startswith("best trained") and vs_probe["n"] == 3
    assert vs_probe["mean"] == pytest.approx(0.5 - 0.40 + 0.01)  # seeds 0, 1, 2 add 0, .01, .02
    assert [a["method"] for a in doc["advice"]] == ["re-sample", "re-sample"]
    # how sure the choice is: the validation margin over the runner-up, and whether validation has enough positives
    from data.shards import read_manifest

    val = read_manifest(own_sets["val"])
    counts = dict(zip(val.class_names[1:], val.counts[1:]))
    advice = doc["advice"][0]
    assert advice["val_positives"] == counts and advice["val_margin"] > 0
    assert advice["reliable"] == (min(counts.values()) >= 10)
    md_text = (tmp_path / "out" / "results.md").read_text()
    assert ("Not a reliable choice" in md_text) == (not advice["reliable"])
    assert "validation margin" in md_text
    from cluster.experiment_report import results_markdown
    from cluster.experiment_summary import summarize_runs

    few = summarize_runs(spec, doc["runs"], doc["chosen"], {"Trouser": 2, "Bag": 12})
    assert [a["reliable"] for a in few["advice"]] == [False, False]
    text = results_markdown(spec, few, doc["chosen"], doc["runs"], 1.0, doc["data"])
    assert "**Not a reliable choice**: validation holds 2 of Trouser (fewer than 10" in text
    # curves from the final runs only: validation scored along them, the tuning runs never see it
    curves = {(c["setting"], c["method"]): c for c in doc["curves"]}
    assert curves[("A", "bg-split")]["peak_epoch"] == 2.0 and curves[("A", "bg-split")]["n"] == 3
    assert all(not r["curve"] for r in doc["runs"] if r["phase"] == "tune")
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0
    md = (tmp_path / "out" / "results.md").read_text()
    for text in ("## Data", "Which method to use", "**re-sample**", "1 (deterministic)", "end minus peak"):
        assert text in md
    # each trained method's chosen point as a full training config bgsplit train accepts as it is
    best = tmp_path / "out" / "best" / "A" / "re-sample.yaml"
    cfg = load_config(best, [])
    assert cfg.data.sampling == "balanced" and cfg.loss.aux_weight == 0 and cfg.optim.lr == 0.003
    assert (cfg.data.train, cfg.data.val, cfg.data.test) == (own_sets["A"], own_sets["val"], own_sets["test"])
    # and the probe's: `bgsplit train` on it fits the chosen probe (at its input size) and writes a checkpoint
    probe = load_config(tmp_path / "out" / "best" / "A" / "probe.yaml", [])
    assert (probe.probe.kind, probe.probe.class_weight, probe.data.image_size) == ("logistic", "balanced", 160)
    assert "It fits the probe (probe.kind=logistic)" in (tmp_path / "out" / "best" / "A" / "probe.yaml").read_text()
    assert "| best/A/probe.yaml |" in md and "(probe)" not in md
    # the page names it relative to the study folder, so a committed page stays right on another clone
    assert "| best/A/re-sample.yaml |" in md and str(tmp_path) not in md


def test_a_config_typo_fails_before_any_run(own_sets, tmp_path):
    sets = {"train": {"A": own_sets["A"]}, "val": own_sets["val"], "test": own_sets["test"]}
    spec = parse_spec({"base": str(ROOT / "configs" / "fmnist_bg.yaml"), "data": {"sets": sets},
                       "methods": {"ok": {}, "late": {"grid": {"loss.aux_wieght": [0.1, 0.3]}}}})
    ran = []
    with pytest.raises(ConfigError, match="aux_wieght"):
        run_experiment(spec, str(tmp_path / "o"), score=lambda cfg, s: ran.append(1) or {"map": 0.0}, code="c")
    assert ran == []  # the first method's runs did not start either
    with pytest.raises(ConfigError, match="probe.KEY=VALUE"):
        parse_spec({"methods": {"p": {"kind": "probe", "grid": {"optim.lr": [0.1]}}}})


def test_keep_results_reuses_runs_of_other_code_and_says_so(own_sets, tmp_path):
    sets = {"train": {"A": own_sets["A"]}, "val": own_sets["val"], "test": own_sets["test"]}
    spec = parse_spec({"base": str(ROOT / "configs" / "fmnist_bg.yaml"), "data": {"sets": sets},
                       "methods": {"fine-tune": {"overrides": ["loss.aux_weight=0"]}}, "seeds": [0, 1]})
    out = str(tmp_path / "out")
    score = _fake_score(spec.data.sets)
    run_experiment(spec, out, score=score, code="old", log=lambda _: None)
    ran = []
    doc = run_experiment(spec, out, score=lambda c, s: ran.append(1) or score(c, s), code="new",
                         keep_results=True, log=lambda _: None)
    assert ran == [] and all(r["reused"] and r["code"] == "old" for r in doc["runs"])
    assert "Runs per code version: old 2" in Path(out, "results.md").read_text()
    # a study moved to another folder (a fresh clone, another machine) keeps its results: keys hold no paths
    import shutil
    shutil.copytree(out, tmp_path / "moved")
    moved = run_experiment(spec, str(tmp_path / "moved"), score=lambda c, s: ran.append(1) or score(c, s),
                           code="old", log=lambda _: None)
    assert ran == [] and all(r["reused"] for r in moved["runs"])
    run_experiment(spec, out, score=lambda c, s: ran.append(1) or score(c, s), code="new", log=lambda _: None)
    assert len(ran) == 2  # without the flag, new code reruns


def test_the_demo_is_the_experiment_on_a_shipped_config():
    demo = load_spec(ROOT / "configs" / "experiment_demo.yaml")
    exp = load_spec(ROOT / "configs" / "experiment_fmnist.yaml")
    assert demo.data.settings == exp.data.settings and demo.data.background == exp.data.background
    assert list(demo.methods) == ["fine-tune", "bg-split", "re-sample", "re-sample + bg-split"]
    assert demo.reports and all(not m.grid for m in demo.methods.values())


def test_experiment_cli_refuses_a_missing_set_in_one_line(tmp_path, capsys):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"data": {"sets": {"train": {"A": str(tmp_path / "nope")}, "val": "v",
                                                      "test": "t"}}, "methods": {"m": {}}}))
    assert main(["experiment", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.sets.train['A']: no shard set at" in err and "\n" not in err


def test_the_own_data_template_runs_on_a_users_sets(own_sets, tmp_path):
    """configs/experiment_own_data.yaml with only its set paths changed: what a user with their own sets writes."""
    doc = yaml.safe_load((ROOT / "configs" / "experiment_own_data.yaml").read_text())
    doc["base"] = str(ROOT / "configs" / doc["base"])
    doc["data"]["sets"] = {"train": {"mine": own_sets["B"]}, "val": own_sets["val"], "test": own_sets["test"]}
    lines = [line for line in (ROOT / "configs" / "experiment_own_data.yaml").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) <= 14  # the whole config a user writes
    spec = parse_spec(doc)
    calls = []
    result = run_experiment(spec, str(tmp_path / "out"), score=_fake_score(spec.data.sets), code="c",
                            probe=_fake_probe(calls), log=lambda _: None)
    assert {r["method"] for r in result["table"]} == set(spec.methods)
    assert result["advice"][0]["method"] == "re-sample + bg-split" and "vs" in result["advice"][0]  # fake: aux +0.1
    cfg = load_config(tmp_path / "out" / "best" / "mine" / "re-sample-plus-bg-split.yaml", [])
    assert cfg.teacher.image_size == 0 and cfg.data.train == own_sets["B"]


def test_draws_of_the_positives_share_everything_but_the_positives(tmp_path):
    from cluster.experiment_data import build_sets
    from data.loader import set_samples
    from data.shards import manifest_identity, read_manifest

    doc = {"source": "fmnist:train", "test_source": "fmnist:test", "rare": list(RARE), "background": 60,
           "settings": {"low": 2}, "holdout": 40, "test_images": 50, "draws": 3}
    spec = parse_spec({"data": doc, "methods": {"m": {}}})
    assert list(spec.data.settings) == ["low", "low (draw 1)", "low (draw 2)"]
    sets = build_sets(str(tmp_path), spec.data)

    def keys(location):
        return {(k, label) for k, label, _, _ in set_samples(read_manifest(location))}

    drawn = {name: keys(sets[name]) for name in spec.data.settings}
    backgrounds = [{k for k, label in v if label == 0} for v in drawn.values()]
    positives = [{k for k, label in v if label > 0} for v in drawn.values()]
    assert backgrounds[0] == backgrounds[1] == backgrounds[2] and len(backgrounds[0]) == 60
    assert all(len(p) == 4 for p in positives) and positives[0] != positives[1] != positives[2]
    # the first draw is the set a study without draws builds: same manifest identity, so stored runs are reused
    plain = parse_spec({"data": {**doc, "draws": 1}, "methods": {"m": {}}})
    again = build_sets(str(tmp_path / "plain"), plain.data)
    assert manifest_identity(again["low"]) == manifest_identity(sets["low"])
    assert "positives_seed" not in read_manifest(sets["low"]).meta["build"]
    with pytest.raises(ConfigError, match="data.draws"):
        parse_spec({"data": {**doc, "draws": 0}, "methods": {"m": {}}})
