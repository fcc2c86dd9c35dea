"""The registries (main losses, aux losses, sources, experiment method kinds) are the only lists of their values:
validation, errors, the cosine-head choice, the --source help and the config reference all read them. Each test says
which copied list or stray if-chain it would catch."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.cli import build_parser, main
from cluster.docs import config_reference
from cluster.experiment_configs import check_configs
from cluster.experiment_spec import METHOD_KINDS, ExperimentSpec, MethodSpec, parse_spec
from data.sources import SOURCES, open_source
from data.sources.base import SourceScheme
from data.settings import choices
from trainer.config import ConfigError, LossConfig, load_config
from trainer.losses import AUX_LOSSES, MAIN_LOSSES, MainLossKind
from trainer.models import StudentSpec

ROOT = Path(__file__).resolve().parents[1]
REGISTRIES = {"loss.main": MAIN_LOSSES, "loss.aux": AUX_LOSSES}
MANIFEST = SimpleNamespace(num_classes=4, class_names=["background", "a", "b", "c"], rare_classes=["a", "b", "c"])


def _cases() -> list[tuple[str, str]]:
    return [(key, name) for key, registry in REGISTRIES.items() for name in registry]


def _bad() -> list[tuple[str, str]]:
    """Near misses: a prefix, another case, the other registry's key, empty."""
    return [(key, bad) for key in REGISTRIES for bad in ("ldam", "CE", "Hard", "", "nope")] + \
        [("loss.main", "hard"), ("loss.aux", "ce")]


def _help(*command: str, dest: str) -> str:
    """The help of one flag of a `bgsplit` command."""
    parser = build_parser()
    for name in command:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return next(a for a in parser._actions if a.dest == dest).help


def _message(key: str, bad: str) -> str:
    return f"config key '{key}' is {bad!r}; choose one of {', '.join(REGISTRIES[key])}"


# -- every key accepted, every other value the same one-line error ---------------------------------------------

@pytest.mark.parametrize("key, name", _cases())
def test_every_registry_key_is_accepted_from_yaml_and_override(tmp_path, key, name):
    """Catches a copied tuple (or a Literal) that lost or never had an entry the registry has."""
    section, field = key.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}: {{{field}: {name}}}\n")
    assert getattr(load_config(path).loss, field) == name
    assert getattr(load_config(None, [f"{key}={name}"]).loss, field) == name


@pytest.mark.parametrize("key, bad", _bad())
def test_a_value_not_in_the_registry_is_one_line_naming_the_key_and_every_allowed_value(tmp_path, capsys, key, bad):
    """The same message from a YAML file, a dotted override, `bgsplit train`'s command line and an experiment
    method's override or grid. Catches a list in an error that is not the registry's, a second validator with its
    own wording, and an experiment that lets a bad value through to the first run."""
    want = _message(key, bad)
    section, field = key.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}: {{{field}: '{bad}'}}\n")
    for load in (lambda: load_config(path), lambda: load_config(None, [f"{key}={bad!r}"])):
        with pytest.raises(ConfigError) as e:
            load()
        assert str(e.value) == want

    assert main(["train", f"{key}={bad}" if bad else f"{key}="]) == 2
    assert capsys.readouterr().err.strip() == f"bgsplit: error: {want}"

    spec = ExperimentSpec(base=str(ROOT / "configs" / "fmnist_bg.yaml"), methods={"m": MethodSpec([f"{key}={bad!r}"])})
    spec.data = dataclasses.replace(spec.data, settings={"A": 2})
    sets = {"A": "train-set", "val": "val-set", "test": "test-set"}
    with pytest.raises(ConfigError) as e:
        check_configs(spec, sets)
    assert str(e.value) == f"experiment method 'm', methods.m.overrides: {want}"
    spec.methods = {"m": MethodSpec([], {key: [next(iter(REGISTRIES[key])), bad]})}
    with pytest.raises(ConfigError) as e:
        check_configs(spec, sets)
    assert str(e.value) == f"experiment method 'm', methods.m.grid: {want}" and "\n" not in str(e.value)


def test_the_config_reads_the_registries_themselves(monkeypatch):
    """A loss registered at run time is accepted and listed: catches a copy of the keys taken at import."""
    monkeypatch.setitem(MAIN_LOSSES, "toy", MainLossKind(MAIN_LOSSES["ce"].build, "a test's loss"))
    assert load_config(None, ["loss.main=toy"]).loss.main == "toy"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["loss.main=toyy"])
    assert str(e.value).endswith(f"choose one of {', '.join(MAIN_LOSSES)}") and str(e.value).endswith(", toy")
    assert all(choices(LossConfig, key.split('.')[1]) is registry for key, registry in REGISTRIES.items())


def test_the_config_reference_lists_each_registry_key_with_its_help():
    """Catches a field docstring that lists the values by hand (and goes stale) instead of the registry."""
    text = config_reference()
    for key, registry in REGISTRIES.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
        assert f"One of: {', '.join(registry)}." in row
        for name, entry in registry.items():
            assert f"{name}: {entry.help}" in row


# -- the cosine head comes from the loss's entry ---------------------------------------------------------------

@pytest.mark.parametrize("name", list(MAIN_LOSSES))
def test_the_student_has_a_cosine_head_exactly_when_its_main_loss_says_so(name):
    """StudentSpec's choice (and its scale) follows the entry: catches a loss name tested in models.py again."""
    cfg = load_config(None, [f"loss.main={name}", "loss.ldam_scale=12.5"])
    spec = StudentSpec.from_config(cfg, MANIFEST, 0)
    assert spec.normalized_main_head is MAIN_LOSSES[name].cosine_head
    assert spec.logit_scale == (12.5 if MAIN_LOSSES[name].cosine_head else 30.0)
    # the explicit switch still turns it on whatever the loss
    forced = StudentSpec.from_config(load_config(None, [f"loss.main={name}", "model.normalized_main_head=true"]),
                                     MANIFEST, 0)
    assert forced.normalized_main_head


def test_a_new_cosine_loss_gets_the_cosine_head_and_refuses_a_probe_started_head(monkeypatch):
    """Catches ldam_drw named in StudentSpec or in validate()'s probe-head check instead of the flag."""
    monkeypatch.setitem(MAIN_LOSSES, "cos_toy", MainLossKind(MAIN_LOSSES["ce"].build, "a test's loss", cosine_head=True))
    assert StudentSpec.from_config(load_config(None, ["loss.main=cos_toy"]), MANIFEST, 0).normalized_main_head
    with pytest.raises(ConfigError, match=r"\(model.normalized_main_head or loss.main=ldam_drw or loss.main=cos_toy\)"):
        load_config(None, ["loss.main=cos_toy", "model.head_init=probe"])
    assert load_config(None, ["loss.main=ce", "model.head_init=probe"]).model.head_init == "probe"


# -- aux losses: the one that needs the teacher's logits -------------------------------------------------------

def test_only_an_aux_loss_that_needs_the_whole_output_is_refused_with_cached_views():
    for name, entry in AUX_LOSSES.items():
        overrides = [f"loss.aux={name}", "views.count=2", "model.frozen_stages=1"]
        if entry.needs_logits:
            with pytest.raises(ConfigError, match=f"loss.aux={name} needs the teacher's whole output.*use "
                                                  "loss.aux=hard or topk with views.count"):
                load_config(None, overrides)
        else:
            assert load_config(None, overrides).loss.aux == name


# -- sources ---------------------------------------------------------------------------------------------------

def test_every_source_scheme_is_named_by_its_form_and_listed_in_the_help_and_errors():
    """Catches a form list or --source help written by hand beside the registry."""
    forms = [entry.form for entry in SOURCES.values()]
    assert all(entry.form.startswith(f"{scheme}:") for scheme, entry in SOURCES.items())
    for bad in ("nope:x", "folder:", "manifest", "wds:", "FOLDER:/x"):
        with pytest.raises(ValueError) as e:
            open_source(bad)
        assert str(e.value) == f"bad source spec '{bad}'; valid forms: {', '.join(forms)}"
    assert all(form in _help("shards", "build", dest="source") for form in forms)
    assert all(f"{scheme}:" in _help("mine", dest="pool") for scheme in SOURCES)


def test_open_source_dispatches_through_the_registry(monkeypatch):
    """A scheme registered at run time opens; #unlabelled passes labelled=False only where the entry says so, and
    a bare scheme only where it is allowed. Catches an if-chain left in front of the registry."""
    opened = []

    def toy(spec, rest, **kw):
        opened.append((spec, rest, kw))
        return "a source"

    monkeypatch.setitem(SOURCES, "toy", SourceScheme("toy:<x>", toy, unlabelled_pool=True))
    monkeypatch.setitem(SOURCES, "plain", SourceScheme("plain:<x>", toy, bare=True))
    assert open_source("toy:a:b", root="r") == "a source"
    assert open_source("toy:a#unlabelled") == "a source"
    assert open_source("plain:x#unlabelled") == open_source("plain") == "a source"
    assert opened == [("toy:a:b", "a:b", {"root": "r"}), ("toy:a", "a", {"labelled": False}),
                      ("plain:x", "x", {}), ("plain", "", {})]
    with pytest.raises(ValueError, match="bad source spec 'toy:'; valid forms: .*toy:<x>, plain:<x>$"):
        open_source("toy:")


# -- experiment method kinds -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(METHOD_KINDS))
def test_every_method_kind_is_accepted(kind):
    assert parse_spec({"methods": {"a": {"kind": kind}}}).methods["a"].kind == kind


@pytest.mark.parametrize("bad", ["Train", "probes", "", "tune"])
def test_a_method_kind_not_in_the_registry_is_one_line_naming_the_allowed_kinds(bad):
    with pytest.raises(ConfigError) as e:
        parse_spec({"methods": {"a": {"kind": bad}}})
    assert str(e.value) == f"experiment key 'methods.a.kind' is {bad!r}; choose one of {', '.join(METHOD_KINDS)}"


def test_the_config_and_the_cli_still_load_without_torch():
    """trainer.config imports the loss registry: catches a module-level torch import in trainer/losses.py, which
    would cost every `bgsplit` command (and its --help) the ~2 s torch takes to import."""
    import subprocess
    import sys

    code = "import sys, trainer.config, cluster.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
