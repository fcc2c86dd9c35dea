"""data.settings, the one loader of every settings dataclass: a Literal or a registry is the field's allowed set for
validation, errors and the config reference alike; an unknown key or a value outside the set is one line naming the
dotted key."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from data.settings import ConfigError, check_all, choices, merge, parse_override
from trainer.config import JobConfig, RunConfig, load_config, validate

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
