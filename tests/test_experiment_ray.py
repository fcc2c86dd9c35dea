"""`bgsplit experiment --ray`: each run a Ray Tune trial on a real local Ray cluster, run side by side, with the
same results as the sequential run; a rerun reuses the stored trials."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import environ
from cluster.experiment import run_experiment
from cluster.experiment_spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _spec(tiny_sets):
    sets = {"train": {"A": tiny_sets["train"]}, "val": tiny_sets["test"], "test": tiny_sets["test"]}
    return parse_spec({
        "base": str(ROOT / "configs" / "fmnist_bg.yaml"), "data": {"sets": sets},
        "overrides": ["data.image_size=32", "data.batch_size=16", "data.shuffle_buffer_mb=0.2", "optim.epochs=1",
                      "optim.warmup_epochs=0.2", "run.device=cpu", "teacher.image_size=32"],
        "methods": {"fine-tune": {"overrides": ["loss.aux_weight=0"]}},
        "grid": {"optim.lr": [0.003, 0.03]}, "seeds": [0], "budget": 2})


def test_two_trials_in_parallel_give_the_sequential_results(tiny_sets, tmp_path):
    from ray_cluster import RAY_ENV, RayCluster

    from cluster.trials import tune_executor

    spec = _spec(tiny_sets)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each trial gets with --cpus-per-trial 1: the same arithmetic, bit for bit
    try:
        alone = run_experiment(spec, str(tmp_path / "seq"), code="c", log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    cluster = RayCluster(num_cpus=2).start()
    try:
        with environ(RAY_ENV):
            import ray

            try:
                execute = tune_executor(cluster.address, cpus_per_trial=1, storage_path=str(tmp_path / "tune"))
                spread = run_experiment(spec, str(tmp_path / "ray"), code="c", log=lambda _: None, execute=execute)
            finally:
                ray.shutdown()
    finally:
        cluster.stop()

    def by_run(doc):
        return {(r["phase"], r["method"], json.dumps(r["point"]), r["seed"]): r for r in doc["runs"]}

    seq, par = by_run(alone), by_run(spread)
    assert set(seq) == set(par) and len(seq) == 3  # 2 tuning runs + 1 final seed
    for key in seq:
        assert par[key]["map"] == seq[key]["map"] and not par[key]["reused"], key
        assert Path(par[key]["run_dir"], "experiment_result.json").exists()  # stored by the trial, not the driver
    tune_runs = sorted((r for r in spread["runs"] if r["phase"] == "tune"), key=lambda r: r["started"])
    first, second = tune_runs
    assert second["started"] < first["started"] + first["seconds"], "the two tuning trials did not overlap"
    # a rerun (a driver restarted after a failure) reuses what the trials stored and starts no trial
    again = run_experiment(spec, str(tmp_path / "ray"), code="c", log=lambda _: None,
                           execute=lambda trials, on_done: pytest.fail(f"{len(trials)} trial(s) rerun"))
    assert all(r["reused"] for r in again["runs"])
