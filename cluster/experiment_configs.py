"""The training config of every run a study makes, from one function, loaded before the first run.

One function (``job_config``) makes them, so the runs, the plan of their cost, the check before the first run and
the chosen points' configs under best/ agree. Every config is loaded once up front, so a typo in a method's override
or grid is a one-line error before hours of runs."""
from __future__ import annotations

import os
from typing import Any

from cluster.experiment_data import slug as _slug
from cluster.experiment_spec import ExperimentSpec, in_method
from cluster.experiment_stats import method_grid, point_overrides
from trainer.config import ConfigError, JobConfig, load_config


def dotted(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as dotted key -> value (``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        out.update(dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def smoke_header(quick: ExperimentSpec, full: ExperimentSpec, train: str, overrides: list[str]) -> str:
    """The YAML comment a --quick best/ config opens with: what in it differs from the full study's config of the
    same point (the training length, chiefly), so it is not trained as it stands and taken for the recipe."""
    short = dotted(job_config(quick, train, "runs/x", 0, overrides).to_dict())
    long = dotted(job_config(full, train, "runs/x", 0, overrides).to_dict())
    changed = [f"{k}: {short[k]} here, {long[k]} in the full study" for k in short if short[k] != long.get(k)]
    fix = " ".join(f"{k}={long[k]}" for k in short if short[k] != long.get(k))
    return ("# SMOKE-LENGTH CONFIG, made by `bgsplit experiment --quick`: "
            + ("; ".join(changed) or "its training length is the full study's") + ".\n"
            f"# Its point was chosen from at most {quick.budget} tuning runs: run the experiment without --quick for "
            "the study's choice" + (f", or train this one at full length by adding: {fix}" if fix else "") + "\n")


def job_config(spec: ExperimentSpec, train: str, out_dir: str, seed: int, overrides: list[str], *,
               val: str = "", curve_every: float = 0.0, study_dir: str = "") -> JobConfig:
    """One run's config: the base, the study's overrides, then the run's own, training on ``train`` into
    ``out_dir`` with ``seed``; ``val``: the split a probe-started head is chosen on, and (every ``curve_every``
    epochs, when set) the split the run's curve is scored on; ``study_dir``: where the study's shared caches are."""
    # data.val stays empty unless curves are recorded: the one scored evaluation of a run is done by the scorer,
    # on the split the phase allows; a curve on validation is only looked at, never used to choose. A probe that
    # starts the head (model.head_init=probe) is chosen on validation in every phase: never on test
    curve = [f"data.val={val}", f"run.eval_every={curve_every}"] if curve_every else []
    # the study's caches (the trunk's features for a probe-initialised head, cached prefix views) are shared
    # by all its runs: each is keyed by what it depends on
    probe = [*([f"model.probe_val={val}"] if val else []),
             *([f"model.probe_cache_dir={os.path.join(study_dir, 'features')}",
                f"views.cache_dir={os.path.join(study_dir, 'views')}"] if study_dir else [])]
    return load_config(spec.base, [f"data.train={train}", "data.val=", "data.test=", f"run.out_dir={out_dir}",
                                   f"run.seed={seed}", "run.progress=false", "run.resume=", *probe, *spec.overrides,
                                   *overrides, *curve])


def best_config(spec: ExperimentSpec, sets: dict[str, str], setting: str, method: str, overrides: list[str]
                ) -> dict[str, Any]:
    """The full training config of a method's chosen point, ready for `bgsplit train --config` (swap data.train
    for the full-size set)."""
    cfg = job_config(spec, sets[setting], f"runs/{_slug(method)}", 0, overrides, val=sets["val"])
    doc = cfg.to_dict()
    doc["data"].update(val=sets["val"], test=sets["test"])
    doc["run"].update(progress=True)
    return doc


def probe_training(overrides: list[str]) -> list[str]:
    """The training overrides that make `bgsplit train` fit the probe a probe method's ``overrides`` choose."""
    from trainer.probe import probe_params
    from trainer.probe_model import training_overrides

    return training_overrides(probe_params(overrides))


def check_configs(spec: ExperimentSpec, sets: dict[str, str]) -> None:
    """Every config the experiment will train, loaded once up front: a typo in a method's override or grid is a
    one-line error before the first run, not hours in."""
    for setting in spec.data.settings:
        try:
            job_config(spec, sets[setting], "runs/check", 0, [])
        except ConfigError as e:
            raise ConfigError(f"experiment key 'overrides' or 'base': {e}") from None
        for name, mspec in spec.methods.items():
            def load(overrides: list[str]) -> JobConfig:
                return job_config(spec, sets[setting], "runs/check", 0, overrides)

            if mspec.kind == "train" and not mspec.ablation_of:
                for point in method_grid(spec.grid, mspec.grid):
                    in_method(name, mspec, point, load, [*mspec.overrides, *point_overrides(point)])
            elif mspec.ablation_of:
                in_method(name, mspec, {}, load, mspec.overrides)
