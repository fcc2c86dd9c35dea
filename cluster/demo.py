"""`bgsplit demo`: the experiment harness on a shipped config (configs/experiment_demo.yaml), so the README's first
command runs the same code, cache and tables as `bgsplit experiment`."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from cluster.experiment import run_experiment, set_threads
from cluster.experiment_data import check_sets, locate_sets
from cluster.experiment_spec import load_spec, quick_spec

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "experiment_demo.yaml"


def run_demo(out: str = "artifacts/demo", *, quick: bool = False, seeds: int | None = None,
             prepare_only: bool = False, keep_results: bool = False) -> dict[str, Any]:
    set_threads()
    spec = load_spec(CONFIG)
    if seeds is not None:
        spec = dataclasses.replace(spec, seeds=list(range(seeds)))
    full = spec if quick else None
    if quick:
        spec = quick_spec(spec)
    if prepare_only:
        sets = locate_sets(os.path.join(out, "data"), spec.data)
        check_sets(sets, list(spec.data.settings))
        print(f"data ready: {', '.join(sets.values())}", flush=True)
        return {"sets": sets}
    return run_experiment(spec, out, keep_results=keep_results, full=full)
