"""`bgsplit experiment --ray`: every train-and-score run of a phase as a Ray Tune trial with its own resources.

A comparison is tens to hundreds of independent runs; on a cluster they run side by side instead of one after
another in the driver. Each trial trains and scores one config exactly as the sequential executor does
(cluster.experiment_store.run_trial) and stores its result beside its run, so a driver that dies (or a job that is
re-submitted) reruns only the trials that had not finished: the experiment's result cache is the restart record.
Run folders and sets must be reachable from every node (a shared file system or object storage); relative local
paths are made absolute on the driver, so no trial writes into Ray's per-trial working directory.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m cluster.cli experiment configs/experiment_fmnist.yaml --out /shared/exp --ray --gpus-per-trial 1
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def _trial(config: dict[str, Any]) -> None:
    """A Tune function trainable: one trial = one run (threads = the CPUs the trial was given)."""
    import torch
    from ray import tune

    from cluster.experiment_scorers import default_score
    from cluster.experiment_store import Trial, run_trial
    from trainer.config import config_from_dict
    from trainer.runtime import resolve_device

    job = config["job"]
    torch.set_num_threads(max(1, int(job["cpus"])))
    cfg = config_from_dict(job["config"])
    resolve_device(cfg.run.device)  # BGSPLIT_REQUIRE_GPU is honoured on the trial's node too
    result = run_trial(Trial(cfg, job["eval_set"], job["key"], job["code"]), default_score)
    tune.report({"map": result["map"], "result": json.dumps(result)})


def tune_executor(address: str = "", cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
                  storage_path: str = "", max_failures: int = 2) -> Callable:
    """An executor (cluster.experiment_store.Execute) that runs a batch of trials on the Ray cluster at ``address``
    (RAY_ADDRESS under `ray job submit`; a one-machine cluster when empty), as many at once as the resources
    allow; a trial whose worker dies is retried ``max_failures`` times."""
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise ValueError(f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got {cpus_per_trial} and "
                         f"{gpus_per_trial}")

    def execute(trials: list, on_done: Callable[[int, dict[str, Any]], None]) -> None:
        from ray import tune

        from cluster.ray_train import connect
        from trainer.runtime import fanned_out, output_location

        connect(address)
        jobs = [{"index": i, "config": fanned_out(t.cfg).to_dict(), "eval_set": t.eval_set, "key": t.key,
                 "code": t.code, "cpus": cpus_per_trial} for i, t in enumerate(trials)]
        trainable = tune.with_resources(_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
        tuner = tune.Tuner(
            trainable, param_space={"job": tune.grid_search(jobs)},
            tune_config=tune.TuneConfig(reuse_actors=False),
            run_config=tune.RunConfig(name="bgsplit-experiment", storage_path=output_location(storage_path, "--out", fan_out=True) or None,
                                      failure_config=tune.FailureConfig(max_failures=max_failures), verbose=0))
        failed = []
        for result in tuner.fit():
            index = result.config["job"]["index"]
            if result.error is not None or "result" not in (result.metrics or {}):
                failed.append((trials[index].cfg.run.out_dir, result.error))
                continue
            on_done(index, json.loads(result.metrics["result"]))
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(trials)} trial(s) failed after {max_failures} retries (first: "
                               f"{failed[0][0]}: {str(failed[0][1]).strip().splitlines()[-1:]}); finished trials are "
                               "stored: rerun the experiment to retry the rest")

    return execute
