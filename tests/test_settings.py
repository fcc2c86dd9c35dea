"""data.settings, the one loader of every settings dataclass: a Literal or a registry is the field's allowed set for
validation, errors and the config reference alike; an unknown key or a value outside the set is one line naming the
dotted key."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from cluster.cli import build_parser, main
from cluster.experiment_configs import check_configs
from cluster.experiment_spec import ExperimentSpec, MethodSpec
from data.settings import ConfigError, check_all, choices, merge, parse_override
from trainer.config import JobConfig, RunConfig, load_config, validate

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = {"a": 1, "b": 2}


@dataclass
class Inner:
    mode: Literal["x", "y"] = "x"
    size: Literal[1, 2] = 1


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    kind: str = field(default="a", metadata={"choices": REGISTRY})
    rate: float = 0.5
    tags: list[str] = field(default_factory=list)


def _error(fn) -> str:
    with pytest.raises(ConfigError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_any_dataclass_is_filled_from_a_mapping_and_overrides():
    obj = merge(Outer(), {"inner": {"mode": "y", "size": 2}, "rate": 1, "tags": ["t"]})
    merge(obj, parse_override("kind=b"))
    assert obj == Outer(Inner("y", 2), "b", 1.0, ["t"]) and isinstance(obj.rate, float)


def test_unknown_keys_wrong_types_and_values_outside_the_set_name_the_dotted_key():
    assert _error(lambda: merge(Outer(), {"inner": {"mdoe": "x"}})) == \
        "unknown config key 'inner.mdoe': valid keys here are mode, size"
    assert _error(lambda: merge(Outer(), {"inner": {"mode": "z"}})) == \
        "config key 'inner.mode' is 'z'; choose one of x, y"
    assert _error(lambda: merge(Outer(), {"inner": {"size": 3}})) == "config key 'inner.size' is 3; choose one of 1, 2"
    assert _error(lambda: merge(Outer(), {"inner": {"size": "big"}})) == \
        "config key 'inner.size' must be int, got 'big'"
    assert _error(lambda: merge(Outer(), {"kind": "c"})) == "config key 'kind' is 'c'; choose one of a, b"
    assert _error(lambda: merge(Outer(), {"inner": 3})) == "config key 'inner' is a section; give it a mapping, not 3"


def test_a_registry_is_read_live_and_a_value_set_in_code_is_checked_too(monkeypatch):
    monkeypatch.setitem(REGISTRY, "c", 3)
    assert merge(Outer(), {"kind": "c"}).kind == "c"
    assert choices(Outer, "kind") is REGISTRY and choices(Inner, "mode") == ("x", "y")
    assert choices(Outer, "rate") is None
    bad = Outer()
    bad.inner.mode = "q"
    assert _error(lambda: check_all(bad)) == "config key 'inner.mode' is 'q'; choose one of x, y"


def test_the_job_config_declares_its_choices_once():
    """Catches a choice list kept beside a field (the old CHOICES table) instead of its type."""
    assert choices(RunConfig, "precision") == ("auto", "fp32", "bf16", "fp16")
    cfg = JobConfig()
    cfg.run.device = "gpu"
    assert _error(lambda: validate(cfg)) == "config key 'run.device' is 'gpu'; choose one of auto, cpu, cuda"
    assert load_config(None, ["engine.zero_stage=3"]).engine.zero_stage == 3


# -- every flag of every command comes from a dataclass field ----------------------------------------------------

def _commands(parser: argparse.ArgumentParser, prog: str = "bgsplit"):
    """(the command's name, its parser) for every leaf command of the `bgsplit` parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prog, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _commands(sub, f"{prog} {name}")


def test_every_flag_of_every_command_is_a_field_of_the_command_s_dataclasses():
    """Catches a flag added by hand (parser.add_argument) beside the dataclasses, and a dataclass field that is not
    a flag."""
    seen = 0
    for prog, parser in _commands(build_parser()):
        fields = {f.name: f for cls in parser.settings for f in dataclasses.fields(cls)}
        actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
        assert sorted(a.dest for a in actions) == sorted(fields), prog
        for a in actions:
            f = fields[a.dest]
            want = f.metadata.get("flags", ("--" + f.name.replace("_", "-"),))
            assert a.option_strings == ([] if f.metadata.get("positional") else list(want)), (prog, a.dest)
            assert a.help == f.metadata.get("help"), (prog, a.dest)
            seen += 1
    assert seen > 100  # train, eval, shards build/plan/add-labels, mine, teacher-*, demo, experiment, docs, ...


def test_the_commands_that_score_a_set_share_one_scoring_group_and_lead_with_their_own_flags():
    """eval, mine and teacher-label inherit cluster.commands.Scoring: the same flags and help in each (only a
    redeclared default differs), listed after a flag of the command's own."""
    from cluster.commands import Scoring

    parsers = dict(_commands(build_parser()))
    helps, defaults = [], []
    for prog, own in (("eval", "--out"), ("mine", "--exclude"), ("teacher-label", "--overwrite")):
        parser = parsers[f"bgsplit {prog}"]
        assert issubclass(parser.settings[0], Scoring), prog
        flags = [a.option_strings[0] for a in parser._actions if a.option_strings]
        assert flags.index(own) < flags.index("--loader-workers") < flags.index("--precision"), prog
        helps.append({a.dest: a.help for a in parser._actions if a.dest in ("num_workers", "precision")})
        defaults.append((parser.get_default("image_size"), parser.get_default("batch_size")))
    assert helps[0] == helps[1] == helps[2]
    assert defaults == [(0, 256), (0, 256), (224, 128)]


def test_a_misspelt_choice_is_the_same_one_line_error_from_yaml_override_flag_and_experiment(tmp_path, capsys):
    tail = "is 'fp33'; choose one of auto, fp32, bf16, fp16"
    path = tmp_path / "c.yaml"
    path.write_text("run: {precision: fp33}\n")
    assert _error(lambda: load_config(path)) == f"config key 'run.precision' {tail}"
    assert _error(lambda: load_config(None, ["run.precision=fp33"])) == f"config key 'run.precision' {tail}"
    assert main(["train", "run.precision=fp33"]) == 2
    assert capsys.readouterr().err.strip() == f"bgsplit: error: config key 'run.precision' {tail}"
    for argv in (["eval", "--checkpoint", "c", "--data", "d", "--out", str(tmp_path / "o")],
                 ["mine", "--checkpoint", "c", "--pool", "p", "--out", str(tmp_path / "o")],
                 ["teacher-label", "--data", "d"]):
        assert main(argv + ["--precision", "fp33"]) == 2
        assert capsys.readouterr().err.strip() == f"bgsplit: error: flag '--precision' {tail}"
    assert main(["shards", "plan", "--data", "d", "--world", "1", "--workers", "0", "--batch-size", "2",
                 "--mode", "exakt"]) == 2
    assert capsys.readouterr().err.strip() == \
        "bgsplit: error: flag '--mode' is 'exakt'; choose one of exact, resampled"
    spec = ExperimentSpec(base=str(ROOT / "configs" / "fmnist_bg.yaml"),
                          methods={"m": MethodSpec(["run.precision=fp33"])})
    spec.data = dataclasses.replace(spec.data, settings={"A": 2})
    assert _error(lambda: check_configs(spec, {"A": "t", "val": "v", "test": "s"})) == \
        f"experiment method 'm', methods.m.overrides: config key 'run.precision' {tail}"


def test_the_experiment_spec_probe_params_and_data_sets_are_loaded_by_the_same_loader():
    """Catches a part of the study spec parsed by hand again, with a wording of its own."""
    from cluster.experiment_spec import parse_spec
    from trainer.probe import probe_params

    assert _error(lambda: parse_spec({"methods": {"a": {"kind": "prob"}}})) == \
        "experiment key 'methods.a.kind' is 'prob'; choose one of train, probe"
    assert _error(lambda: probe_params(["probe.kind=lgistic"])) == \
        "config key 'probe.kind' is 'lgistic'; choose one of logistic, knn"
    assert _error(lambda: parse_spec({"methods": {"a": {"setings": []}}})).startswith(
        "unknown experiment key 'methods.a.setings': valid keys here are ablation_of, grid, kind, overrides, settings")
    assert _error(lambda: parse_spec({"data": {"sets": {"train": "x", "val": "v", "test": "t"}},
                                      "methods": {"a": {}}})) == \
        "experiment key 'data.sets.train' must be a mapping, got 'x'"
    assert _error(lambda: parse_spec({"seeds": [0, "1"], "methods": {"a": {}}})) == \
        "experiment key 'seeds[1]' must be int, got '1'"
    spec = parse_spec({"data": {"rare": [3, "Dress"]}, "methods": {"a": None}, "curve_every": 1})
    assert spec.data.rare == ["3", "Dress"] and spec.methods["a"].kind == "train" and spec.curve_every == 1.0
