"""What a study compares, as its YAML file says it, parsed with one-line errors; the --quick smoke spec.

The methods (their overrides, their own grid axes, what they ablate, the settings they run in), the shared grid
and budget, the seeds, and the data. A key the spec does not know, or a method's override the training config
rejects, is a one-line error naming where in the file it is. The ``--quick`` smoke run is a spec cut down from it,
and says what it leaves out."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.experiment_data import DataSpec, parse_data
from cluster.experiment_stats import method_grid, point_overrides
from data.settings import ConfigError, load
from trainer.config import load_config


def _axes(values: Any, where: str) -> dict[str, list[Any]]:
    if not isinstance(values, dict):
        raise ConfigError(f"experiment key '{where}' must map dotted config keys to lists of values")
    for key, options in values.items():
        if not isinstance(options, list) or not options:
            raise ConfigError(f"experiment key '{where}.{key}' must be a non-empty list of values, got {options!r}")
    return {str(k): list(v) for k, v in values.items()}


@dataclass(frozen=True)
class MethodKind:
    """One ``methods.<name>.kind``: what the study runs for such a method, and how its spec is checked when the
    file is read."""

    help: str
    check: Callable[[ExperimentSpec, str, MethodSpec], None] = lambda spec, name, method: None
    """(the spec, the method's name, its spec) -> None, or a one-line ConfigError naming the experiment key."""


def _check_probe(spec: ExperimentSpec, name: str, method: MethodSpec) -> None:
    if method.ablation_of:
        raise ConfigError(f"methods.{name} is a probe: it cannot be an ablation")
    from trainer.probe import probe_params

    for point in method_grid({}, method.grid):  # every point must be a valid probe: fail before any run
        in_method(name, method, point, lambda o: probe_params(o), [*method.overrides, *point_overrides(point)])


METHOD_KINDS: dict[str, MethodKind] = {
    "train": MethodKind("a bgsplit training run per point and seed"),
    "probe": MethodKind("trainer.probe on the frozen teacher's cached features: its whole grid of probe.* axes "
                        "searched on validation, the budget and shared grid not applying; deterministic, so one final "
                        "fit stands for every seed", _check_probe),
}
"""``methods.<name>.kind`` -> what it is; a spec accepts exactly these keys (the study's phases read the kind)."""


@dataclass
class MethodSpec:
    overrides: list[str] = field(default_factory=list)
    """Dotted config overrides that define the method (e.g. loss.aux_weight=0); probe.* keys for a probe."""
    grid: dict[str, list[Any]] = field(default_factory=dict, metadata={"parse": _axes})
    """The method's own hyper-parameter axes, added to the shared grid (same key: the method's values win)."""
    ablation_of: str = ""
    """An ablation: no tuning of its own, it trains with the point chosen for this (earlier) method plus its
    overrides, and is paired with it (e.g. soft aux targets against hard ones at the same LR and lambda)."""
    settings: list[str] = field(default_factory=list)
    """The settings it runs in (empty: all)."""
    kind: str = field(default="train", metadata={"choices": METHOD_KINDS})
    """What the study runs for the method: a key of METHOD_KINDS (train or probe, each said there)."""


@dataclass
class ExperimentSpec:
    base: str = "configs/fmnist_bg.yaml"
    """Training config every run starts from (relative paths: to the experiment file, then the working dir)."""
    data: DataSpec = field(default_factory=DataSpec, metadata={"parse": parse_data})
    overrides: list[str] = field(default_factory=list)
    """Overrides applied to every run before the method's."""
    methods: dict[str, MethodSpec] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict, metadata={"parse": _axes})
    """Shared hyper-parameter axes (dotted key -> values) that every trained method is tuned over."""
    budget: int = 4
    """Validation runs per method: a larger grid is sampled down to this many points (fixed seed)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Final runs per setting x method, one per seed, each scored once on the test split."""
    tune_seed: int = 1000
    """run.seed of every tuning run, and the seed of the grid sampling."""
    curve_every: float = 0.0
    """Epochs between validation scores recorded along every final run (0: none). The curves are only looked at,
    never used to choose anything: selection is the tuning runs' final validation mAP."""
    pairs: list[list[str]] = field(default_factory=list)
    """Extra [variant, base] pairs to report by seed, besides each BG-split variant against its base."""
    reports: bool = False
    """Write an evaluation report (PR curves, top-scoring images) of each trained method's first final run in
    the first setting, under report/<method>/ (the demo's)."""
    title: str = "tuned comparison"
    """The results page's heading."""


def parse_spec(doc: dict[str, Any]) -> ExperimentSpec:
    """Build an ExperimentSpec from a YAML mapping (data.settings: an unknown key, a bad type or a choice outside a
    registry is a one-line ConfigError naming the experiment key), then check what ties its parts together."""
    spec = load(ExperimentSpec, doc or {}, "", "experiment")
    if not spec.methods:
        raise ConfigError("experiment key 'methods' must map method names to {overrides: [...], grid: {...}}")
    for name, method in spec.methods.items():
        _check_method(spec, name, method)
    if spec.curve_every < 0:
        raise ConfigError(f"experiment key 'curve_every' must be epochs >= 0, got {spec.curve_every!r}")
    for pair in spec.pairs:
        if len(pair) != 2:
            raise ConfigError(f"experiment key 'pairs' must be a list of [variant, base] method names, got "
                              f"{spec.pairs!r}")
        for m in pair:
            if m not in spec.methods:
                raise ConfigError(f"experiment key 'pairs' names '{m}', which is not a method: the methods are "
                                  f"{list(spec.methods)}")
    if spec.budget < 1 or not spec.seeds:
        raise ConfigError("experiment needs budget >= 1 and at least one seed")
    return spec


def _check_method(spec: ExperimentSpec, name: str, method: MethodSpec) -> None:
    """A method against the spec: what its kind requires, and the methods and settings it names (an ablation's
    method listed before it)."""
    METHOD_KINDS[method.kind].check(spec, name, method)
    earlier = list(spec.methods)[:list(spec.methods).index(name)]
    if method.ablation_of and method.ablation_of not in earlier:
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


def load_spec(path: str | Path) -> ExperimentSpec:
    from trainer.config import config_file

    try:
        p = config_file(path)  # a shipped experiment by name from any working directory
    except ConfigError:
        raise ConfigError(f"experiment file {path} does not exist; see configs/experiment_*.yaml") from None
    spec = parse_spec(yaml.safe_load(p.read_text()) or {})
    base = Path(spec.base)
    if not base.is_absolute() and not base.is_file() and (p.parent / base).is_file():
        spec.base = str(p.parent / base)
    return spec


def quick_spec(spec: ExperimentSpec) -> ExperimentSpec:
    """The smoke run: first setting, first two methods, two grid points, one seed, half-epoch runs."""
    first = next(iter(spec.data.settings.items()))
    methods = dict(list(spec.methods.items())[:2])
    if spec.data.built:
        data = dataclasses.replace(spec.data, settings=dict([first]),
                                   sets={**spec.data.sets, "train": {first[0]: spec.data.sets["train"][first[0]]}})
    else:
        data = dataclasses.replace(spec.data, settings=dict([first]), holdout=300, test_images=500)
    return dataclasses.replace(
        spec, data=data, methods=methods, budget=2, seeds=spec.seeds[:1], curve_every=0.0,
        pairs=[p for p in spec.pairs if set(p) <= set(methods)],
        overrides=[*spec.overrides, f"optim.epochs={QUICK_EPOCHS}"])


QUICK_EPOCHS = 0.5


def quick_left_out(spec: ExperimentSpec) -> list[str]:
    """What ``quick_spec`` drops from ``spec``, one line each: a smoke run that silently compared 2 of 5 methods at
    a quarter of the length was read as the study's answer (issue 36)."""
    quick = quick_spec(spec)
    lines = []
    methods = [m for m in spec.methods if m not in quick.methods]
    if methods:
        lines.append(f"methods {', '.join(methods)} (only {', '.join(quick.methods)} run)")
    settings = [s for s in spec.data.settings if s not in quick.data.settings]
    if settings:
        lines.append(f"settings {', '.join(settings)} (only {', '.join(quick.data.settings)} runs)")
    seeds = [s for s in spec.seeds if s not in quick.seeds]
    if seeds:
        lines.append(f"final seeds {', '.join(map(str, seeds))} (seed {quick.seeds[0]} only: no confidence interval)")
    if spec.budget > quick.budget:
        lines.append(f"tuning points: {quick.budget} a method instead of up to {spec.budget}")
    full = load_config(spec.base, spec.overrides).optim.epochs
    lines.append(f"training length: optim.epochs={QUICK_EPOCHS} instead of {full:g} (the configs under best/ say "
                 "so in their header)")
    if spec.curve_every:
        lines.append(f"validation curves (curve_every={spec.curve_every:g})")
    if not spec.data.built:
        lines.append(f"data: a {quick.data.holdout}-image validation set and {quick.data.test_images} test images "
                     f"instead of {spec.data.holdout} and {spec.data.test_images}")
    return lines


def in_method(name: str, mspec: MethodSpec, point: dict[str, Any], load: Callable[[list[str]], Any],
               overrides: list[str]) -> Any:
    """``load(overrides)``, a ConfigError naming the method and the experiment key the bad override came from: a
    study of five methods whose error only names a config key leaves the user searching the file for it."""
    try:
        return load(overrides)
    except ConfigError as e:
        where = f"methods.{name}.overrides"
        for key, value in point.items():
            try:
                load(point_overrides({key: value}))
            except ConfigError:
                where = f"methods.{name}.grid" if key in mspec.grid else "grid (the shared axes)"
                break
        raise ConfigError(f"experiment method '{name}', {where}: {e}") from None


BG_SPLIT = "bg-split"
BASELINE = "fine-tune"


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
