"""The data an experiment compares methods on: shard sets a user already has, or sets built from any source.

A comparison is only worth reading if its sets are what they claim, so every set is checked before the first
run starts (one line each, naming the experiment key and the fix): a missing set, sets that disagree on the
classes, a validation or test image that is also a training image (by content: data.overlap), a split without a
positive of some class.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from data.settings import ConfigError, load


@dataclass
class DataSpec:
    """Either ``sets`` (shard sets already built) or a source plus a -BG construction (data.build.build_set)."""

    sets: dict[str, Any] = field(default_factory=dict,
                                 metadata={"parse": lambda value, where: parse_sets(value, where)})
    """Built shard sets: {train: {setting: location}, val: location, test: location}; local paths or URLs.
    When given, the construction keys below are not used (and the settings are the keys of ``train``)."""
    source: str = "fmnist:train"
    """Any source spec `bgsplit shards build` reads (its schemes: data.sources.open.SOURCES): training sets and the
    validation carve-out come from it."""
    test_source: str = "fmnist:test"
    """The source the test set is drawn from (another split of the data: never the training source)."""
    rare: list[str | int] = field(default_factory=lambda: ["3", "5", "6"])
    """Rare classes by the source's label or by name (Fashion-MNIST: "3" or "Dress"); labels 1..K in order (read
    as strings: YAML's 3 is "3")."""
    background: int | None = 1485
    """Background images in every training set (the same images in every setting); null: all of them."""
    settings: dict[str, int | None] = field(default_factory=lambda: {"99.6% bg": 2, "98.0% bg": 10})
    """Setting name -> positives per rare class in its training set."""
    holdout: int = 1000
    """Validation images carved out of the training source (selection only), stratified by class."""
    test_images: int | None = 1500
    """Test images drawn from the test source (uniformly, keeping its class mix); null: all of them."""
    seed: int = 0
    """Seed of the carve-out and of the draw of positives and background."""
    resize_short_side: int | None = None
    """Store images re-encoded at this short side (large photos); null keeps them as they are."""
    draws: int = 1
    """Draws of the positives of each setting: draw d > 0 is the setting '<name> (draw d)', the same background,
    validation and test images with other positives (BuildSpec.positives_seed d), tuned and reported like any
    setting. With 2 positives a class, which 2 a user happens to have moves mAP as much as a run's seed does."""

    @property
    def built(self) -> bool:
        return bool(self.sets)


@dataclass
class SetLocations:
    """``data.sets``: shard sets already built, local paths or URLs."""

    train: dict[str, str]
    """Setting name -> its training set."""
    val: str
    test: str


def parse_data(values: Any, where: str = "data") -> DataSpec:
    """``data`` of an experiment file (data.settings loads it: an unknown key is a one-line ConfigError naming
    it): built ``sets``, or a source and its -BG construction, never both."""
    spec = load(DataSpec, values, where + ".", "experiment")
    if spec.sets:
        mixed = sorted(set(values) - {"sets"})
        if mixed:
            raise ConfigError(f"experiment data gives both sets and construction keys {mixed}: name built shard "
                              "sets with data.sets, or a source and its -BG construction, not both")
        return DataSpec(sets=spec.sets, settings={name: None for name in spec.sets["train"]})
    spec.rare = [str(r) for r in spec.rare]
    if not spec.settings:
        raise ConfigError("experiment key 'data.settings' must map setting names to positives per class")
    spec.settings = expand_draws(spec.settings, spec.draws)
    return spec


DRAW = " (draw "


def expand_draws(settings: dict[str, Any], draws: int) -> dict[str, Any]:
    """Each setting, then its draws 1..draws-1 as settings of their own."""
    if not isinstance(draws, int) or draws < 1:
        raise ConfigError(f"experiment key 'data.draws' must be an integer >= 1, got {draws!r}")
    return {f"{name}{DRAW}{d})" if d else name: n for name, n in settings.items() for d in range(draws)}


def positives_seed(setting: str) -> int | None:
    """The draw a setting name carries ('99.6% bg (draw 2)' -> 2); None for the first draw (the set's seed)."""
    if not setting.endswith(")") or DRAW not in setting:
        return None
    return int(setting.rsplit(DRAW, 1)[1][:-1])


def slug(text: str) -> str:
    """A folder name for a setting or method: '99.6% bg' -> '99.6-bg', 're-sample + bg-split' ->
    're-sample-plus-bg-split'."""
    kept = "".join(c if c.isalnum() or c in ".-" else " " for c in text.replace("+", " plus "))
    return "-".join(kept.split())


def parse_sets(value: Any, where: str = "data.sets") -> dict[str, Any]:
    """``data.sets`` (SetLocations) as {train: {setting: loc}, val: loc, test: loc}, local paths made absolute (a
    run under Ray or in another folder must read the same sets)."""
    sets = load(SetLocations, value, where + ".", "experiment")
    if not sets.train or not all(sets.train.values()):
        raise ConfigError(f"experiment key '{where}.train' must map setting names to shard-set locations")
    for key in ("val", "test"):
        if not getattr(sets, key):
            raise ConfigError(f"experiment key '{where}.{key}' must be a shard-set location")
    return {"train": {k: _absolute(v) for k, v in sets.train.items()}, "val": _absolute(sets.val),
            "test": _absolute(sets.test)}


def _absolute(location: str) -> str:
    from trainer.runtime import output_location

    return output_location(location, "data.sets", fan_out=True, output=False)  # the set a Ray trial reads too


def resolve_rare(source: Any, wanted: list[str], where: str) -> tuple[str, ...]:
    """Rare classes given by label or by class name -> the source's labels (data.sources.resolve_rare_classes:
    an unknown one lists the valid ones and the closest match)."""
    from data.sources import resolve_rare_classes

    try:
        return tuple(resolve_rare_classes(list(wanted), set(source.items().labels.names), where,
                                          source.class_names()))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_sets(root: str, data: DataSpec) -> dict[str, str]:
    """Build the training set of each setting, the validation carve-out and the test set (idempotent)."""
    from data.build import BuildSpec, build_set
    from data.sources import open_source

    for name, positives in data.settings.items():
        if not isinstance(positives, int) or positives < 1:
            raise ConfigError(f"experiment setting '{name}' asks for {positives!r} positives per class: every rare "
                              "class needs at least 1 training positive (data.settings maps names to counts >= 1)")
    src = open_source(data.source)
    rare = resolve_rare(src, list(data.rare), "experiment key 'data.rare'")
    test_src = open_source(data.test_source)
    resolve_rare(test_src, list(rare), "experiment key 'data.test_source' (the test source lacks a rare class)")
    common = {"seed": data.seed, "resize_short_side": data.resize_short_side}
    sets: dict[str, str] = {}
    for name, positives in data.settings.items():
        sets[name] = os.path.join(root, f"train-{slug(name)}")
        build_set(src, BuildSpec(data.source, rare, positives_per_class=positives, max_background=data.background,
                                 holdout=data.holdout, part="rest", positives_seed=positives_seed(name), **common),
                  sets[name], progress=False)
    sets["val"] = os.path.join(root, "val")
    build_set(src, BuildSpec(data.source, rare, holdout=data.holdout, part="holdout", **common), sets["val"],
              progress=False)
    sets["test"] = os.path.join(root, "test")
    build_set(test_src, BuildSpec(data.test_source, rare, subsample=data.test_images, **common), sets["test"],
              progress=False)
    return sets


def locate_sets(root: str, data: DataSpec) -> dict[str, str]:
    """{setting: training set, val, test}: the given sets, or the built ones under ``root``."""
    if data.built:
        return {**data.sets["train"], "val": data.sets["val"], "test": data.sets["test"]}
    return build_sets(root, data)


def _where(name: str, settings: list[str]) -> str:
    return f"data.sets.train[{name!r}]" if name in settings else f"data.sets.{name}"


def _check_leaks(sets: dict[str, str], settings: list[str]) -> None:
    """One data.overlap comparison of every held-out set with every training set, named by experiment key."""
    from data.overlap import CONTENT, REBUILD, comparable, first_sample, shared

    names = {sets[name]: _where(name, settings) for name in [*settings, "val", "test"]}
    hashes = comparable([sets[name] for name in [*settings, "val", "test"]], names=names)
    for held in ("val", "test"):
        for name in settings:
            common = shared(hashes[sets[held]], hashes[sets[name]])
            if not common.size:
                continue
            by = hashes[sets[held]].by
            first = first_sample(sets[held], common, by)
            what = (f"{common.size} image(s) (the same bytes)" if by == CONTENT else
                    f"{common.size} image key(s) (by file name: a set here records no content hashes, so other "
                    "images under the same names count too; " + REBUILD.replace("rebuild it", "rebuild them") + ")")
            raise ConfigError(f"experiment data.sets.{held} ({sets[held]}) shares {what} with "
                              f"{_where(name, settings)} (first: {first}): a method would be scored on images it "
                              f"trained on; carve the {held} set out with `bgsplit shards build --holdout` or draw "
                              "it from another split")


def check_sets(sets: dict[str, str], settings: list[str], *, keys: bool = True) -> dict[str, Any]:
    """Refuse sets a comparison cannot be trusted on, before anything trains; returns each set's counts.

    ``keys``: also refuse validation or test images that are also training images (data.overlap: by content
    where the sets record it, else by key)."""
    from data.shards import read_manifest

    manifests = {}
    for name in [*settings, "val", "test"]:
        try:
            manifests[name] = read_manifest(sets[name])
        except FileNotFoundError:
            raise ConfigError(f"experiment {_where(name, settings)}: no shard set at {sets[name]} (no manifest.json)"
                              ": build it with `bgsplit shards build`, or fix the path") from None
    first = manifests["val"]
    for name, m in manifests.items():
        if m.class_names != first.class_names or m.rare_classes != first.rare_classes:
            raise ConfigError(f"experiment sets disagree on the classes: {_where(name, settings)} has "
                              f"{m.class_names[1:]} (ids {m.rare_classes}) but data.sets.val has "
                              f"{first.class_names[1:]} (ids {first.rare_classes}): build every set with the same "
                              "--rare classes in the same order")
    for name, m in manifests.items():
        for k, cls in enumerate(m.class_names[1:], start=1):
            if m.counts[k] == 0:
                role = "training" if name in settings else name
                raise ConfigError(f"experiment {_where(name, settings)} ({sets[name]}) has no {role} positive of "
                                  f"class '{cls}': a setting needs at least one of every rare class (add images of "
                                  "it, or drop the class from every set)")
    if keys:
        _check_leaks(sets, settings)
    return {name: {"count": m.count, "counts": m.counts, "background_fraction": m.background_fraction,
                   "class_names": m.class_names} for name, m in manifests.items()}
