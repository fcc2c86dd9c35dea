"""The study's arithmetic: the grid and its fixed-seed sample, and the statistics of the final runs.

No training in it: the grid a method is tuned over and its fixed-seed sample under the budget, a grid point as
config overrides, the mean and standard deviation of the final runs, and paired differences by seed with a 95% t
interval."""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections.abc import Sequence
from typing import Any


def method_grid(shared: dict[str, list[Any]], own: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every point of the shared axes x the method's own axes (own values replace a shared axis of that key)."""
    axes = {**shared, **own}
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def _stable_int(*parts: Any) -> int:
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12], 16)


def sample_grid(points: list[dict[str, Any]], budget: int, seed: int, method: str) -> list[dict[str, Any]]:
    """At most ``budget`` grid points: all of a small grid, else a fixed-seed sample (grid order kept).

    The draw depends only on (seed, method, grid size), so it is the same on every rerun and machine."""
    if len(points) <= budget:
        return list(points)
    chosen = sorted(random.Random(_stable_int(seed, method, len(points))).sample(range(len(points)), budget))
    return [points[i] for i in chosen]


def point_overrides(point: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in point.items()]


# two-sided 95% t quantiles t_{0.975, df}, df = 1..30 (scipy is not a dependency)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """t_{0.975} with ``df`` degrees of freedom: a table to 30, then the Cornish-Fisher expansion (error < 1e-3)."""
    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_difference(variant: dict[int, float], base: dict[int, float]) -> dict[str, Any]:
    """Mean of variant - base over the seeds both have, with a 95% t confidence interval (None for one seed)."""
    seeds = sorted(set(variant) & set(base))
    diffs = [variant[s] - base[s] for s in seeds]
    n = len(diffs)
    out: dict[str, Any] = {"seeds": seeds, "diffs": diffs, "n": n, "mean": None, "ci95": None}
    if n == 0:
        return out
    mean = sum(diffs) / n
    out["mean"] = mean
    if n > 1:
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        half = t_quantile_975(n - 1) * sd / math.sqrt(n)
        out["ci95"] = [mean - half, mean + half]
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)
