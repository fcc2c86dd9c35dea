"""The logistic probe's solver: the torch L-BFGS that ``trainer.probe.fit_logistic`` used to run vs the
scikit-learn fit that replaced it, on synthetic features shaped like the real case.

3,974 x 1,280 float32 features (EfficientNet-Lite0's pooled trunk: non-negative, strongly correlated, drawn here
as a rectified mix of a 256-d latent with a 1/k spectrum, plus noise), 4 classes: background (99.4%) and 3 rare classes of 8 images each, whose
features are offset from the background's along a random direction. Each solver fits the same objective
(ProbeParams': multinomial, L2 at C as scikit-learn's, balanced class weights) at each C, timed on
``--threads`` threads; the two solutions' probabilities on the training features are compared.

    .venv/bin/python bench/probe_solver.py --json artifacts/bench/probe_solver.json   # ~8 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import sklearn.linear_model  # noqa: F401  (imported here so its import is not timed as part of the first fit)
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.probe import Features, ProbeParams, class_weights, fit_logistic, predict_logistic  # noqa: E402


def fit_logistic_torch_reference(train: Features, params: ProbeParams) -> dict[str, Any]:
    """The reference: ``fit_logistic`` as it was before scikit-learn (git show d1ebbe3:trainer/probe.py),
    unchanged. Multinomial logistic regression on standardised features, to convergence by L-BFGS in float64."""
    x = torch.from_numpy(train.features).double()
    y = torch.from_numpy(train.labels)
    num_classes = len(train.class_names)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    sample_w = torch.from_numpy(class_weights(train.labels, num_classes, params.class_weight))[y]
    n = len(y)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=params.max_iter, tolerance_grad=1e-7,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        nll = torch.nn.functional.cross_entropy(x @ w + b, y, reduction="none")
        loss = (sample_w * nll).sum() / sample_w.sum() + (w * w).sum() / (2 * params.C * n)
        loss.backward()
        return loss

    loss = opt.step(objective)
    state = opt.state[opt._params[0]]
    grad = torch.cat([w.grad.flatten(), b.grad.flatten()]).abs().max().item()
    return {"mean": mean, "std": std, "w": w.detach(), "b": b.detach(), "iterations": int(state["n_iter"]),
            "grad_max": grad, "loss": float(loss.detach()), "converged": int(state["n_iter"]) < params.max_iter}


SOLVERS = {"torch-lbfgs (old reference)": fit_logistic_torch_reference, "sklearn-lbfgs (fit_logistic)": fit_logistic}


def synthetic_features(n: int, dim: int, rare: int, per_rare: int, seed: int) -> Features:
    """Background plus ``rare`` classes of ``per_rare`` images each. Real pooled features are strongly correlated
    (a few directions carry most of the variance), which is what makes the weakly regularised fits slow: here a
    256-d latent with a 1/k spectrum mixed into ``dim`` rectified features plus a little noise. A rare class is
    the background's distribution shifted along its own latent direction (drawn with the same spectrum)."""
    rng = np.random.default_rng(seed)
    spectrum = 1.0 / np.arange(1, 257)
    latent, labels = rng.normal(size=(n, 256)) * spectrum, np.zeros(n, np.int64)
    positives = rng.choice(n, rare * per_rare, replace=False).reshape(rare, per_rare)
    scale = np.linalg.norm(latent, axis=1).mean()
    for c, rows in enumerate(positives, start=1):
        direction = rng.normal(size=256) * spectrum
        labels[rows] = c
        latent[rows] += scale * direction / np.linalg.norm(direction)
    mixed = latent @ rng.normal(size=(256, dim))
    mixed = mixed / mixed.std(0) + rng.normal(-0.5, 0.5, dim)
    features = np.maximum(mixed + 0.05 * rng.normal(size=(n, dim)), 0)
    return Features(features.astype(np.float32), labels, ["background"] + [f"rare{c}" for c in range(1, rare + 1)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3974)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--per-rare", type=int, default=8, help="training images of each of the 3 rare classes")
    p.add_argument("--Cs", default="1e-4,1e-2")
    p.add_argument("--class-weight", default="balanced", choices=["none", "balanced"])
    p.add_argument("--threads", type=int, default=1, help="torch's threads (the scikit-learn fit always runs on one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", default="", help="a cached features .npz (trainer.probe's cache: features, labels) "
                   "to fit instead of synthetic ones")
    p.add_argument("--json", default="", help="write one row per (solver, C)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.features:
        with np.load(args.features, allow_pickle=False) as cached:
            labels = cached["labels"]
            train = Features(cached["features"], labels, [str(c) for c in range(int(labels.max()) + 1)])
    else:
        train = synthetic_features(args.n, args.dim, 3, args.per_rare, args.seed)
    print(f"{len(train.labels)} x {train.features.shape[1]} features, classes {np.bincount(train.labels).tolist()}")
    rows = []
    print("| solver | C | seconds | iterations | converged | grad_max | max prob diff vs other |\n"
          "| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for C in [float(c) for c in args.Cs.split(",")]:
        params = ProbeParams(C=C, class_weight=args.class_weight)
        cells = {}
        for name, fit in SOLVERS.items():
            start = time.perf_counter()
            model = fit(train, params)
            cells[name] = (time.perf_counter() - start, model, predict_logistic(model, train.features))
        for name, (seconds, model, probs) in cells.items():
            other = next(v[2] for k, v in cells.items() if k != name)
            row = {"solver": name, "C": C, "class_weight": args.class_weight, "seconds": round(seconds, 2),
                   "iterations": model["iterations"], "converged": bool(model["converged"]),
                   "max_prob_diff_vs_other_solver": float(np.abs(probs - other).max()),
                   "grad_max": model["grad_max"], "loss": model["loss"]}
            rows.append(row)
            print(f"| {name} | {C:g} | {seconds:.2f} | {row['iterations']} | {row['converged']} | "
                  f"{row['grad_max']:.1e} | {row['max_prob_diff_vs_other_solver']:.1e} |", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": vars(args), "cpus": os.cpu_count(),
                                               "machine": platform.platform(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
