"""Baselines on the frozen teacher's features: a converged logistic-regression probe and a kNN classifier.

A practitioner's first try on a rare-class problem is not a head trained by SGD for a run's few epochs (which
under-fits and flatters every trained method) but features extracted once and a convex fit run to convergence,
its regularisation tuned on validation. Both baselines here score every image of a set from its pooled
features, so they plug into ``bgsplit experiment`` as methods like any trained one.

Features are cached per (set, teacher weights, image size, eval transform) as .npz arrays, loaded with
``allow_pickle=False``: a cache file handed over by someone else cannot run code.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from data.settings import ConfigError, load, parse_override

FEATURES_VERSION = 1
"""Bump when extraction changes what a cached feature file holds."""


@dataclass(frozen=True)
class ProbeParams:
    """One probe configuration: what ``probe.*`` overrides and grid axes of an experiment method set."""

    kind: Literal["logistic", "knn"] = "logistic"
    """logistic (L2-regularised multinomial regression fit by L-BFGS) or knn (cosine, temperature-weighted)."""
    image_size: int = 160
    """Input size of the teacher for feature extraction (EfficientNet-Lite0: 224 native, 160 keeps accuracy)."""
    C: float = 1.0
    """Inverse L2 strength, as scikit-learn's: the penalty is ||W||^2 / (2 C n) on the mean loss."""
    class_weight: Literal["none", "balanced"] = "none"
    """none, or balanced (each class weighted n / (classes x n_c), as scikit-learn's 'balanced')."""
    k: int = 20
    """kNN: neighbours that vote."""
    temperature: float = 0.07
    """kNN: a neighbour votes exp(cosine / temperature)."""
    max_iter: int = 1000
    """L-BFGS iterations at most (a fit that stops on this is reported as not converged)."""


def probe_params(overrides: list[str]) -> ProbeParams:
    """``probe.KEY=VALUE`` strings -> ProbeParams (data.settings: an unknown key, a bad type or a choice outside a
    Literal is its one-line ConfigError); any other section is a one-line ConfigError too."""
    values: dict[str, Any] = {}
    for text in overrides:
        if not text.startswith("probe.") or "=" not in text:
            raise ConfigError(f"probe method override '{text}' is not probe.KEY=VALUE with KEY one of "
                              f"{', '.join(f.name for f in fields(ProbeParams))}")
        values.update(parse_override(text)["probe"])
    params = load(ProbeParams, values, "probe.")
    if params.C <= 0 or params.k < 1 or params.temperature <= 0 or params.image_size < 16:
        raise ConfigError(f"probe values out of range: {params} (C > 0, k >= 1, temperature > 0, image_size >= 16)")
    return params


# ------------------------------------------------------------------------------------------------ features


@dataclass
class Features:
    features: np.ndarray
    """[N, d] float32 pooled trunk features, in the set's manifest order."""
    labels: np.ndarray
    """[N] int64 main labels (0 background, 1..K rare)."""
    class_names: list[str]


def _cache_path(cache_dir: str, location: str, identity: str, teacher_digest: str, image_size: int,
                resize_ratio: float) -> Path:
    key = json.dumps([FEATURES_VERSION, identity, teacher_digest, image_size, resize_ratio])
    return Path(cache_dir) / f"{Path(location.rstrip('/')).name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


@torch.no_grad()
def extract_features(teacher: torch.nn.Module, location: str, image_size: int, *, cache_dir: str,
                     identity: str, batch_size: int = 128, resize_ratio: float = 1.15) -> Features:
    """The teacher trunk's pooled features of every image of a set (eval transform: resize, centre crop),
    computed once and cached under ``cache_dir`` by the set's manifest ``identity`` and the teacher's weights."""
    from data import storage
    from data.loader import ShardStream, make_loader
    from data.config import LoaderConfig
    from data.shards import read_manifest

    manifest = read_manifest(location)
    path = _cache_path(cache_dir, location, identity, teacher.digest(), image_size, resize_ratio)
    if path.exists():
        with np.load(path, allow_pickle=False) as cached:
            return Features(cached["features"], cached["labels"], list(manifest.class_names))
    stream = ShardStream(manifest, LoaderConfig(image_size=image_size, batch_size=batch_size,
                                                eval_resize_ratio=resize_ratio),
                         train=False)
    feats, labels, order = [], [], []
    shard_index = {s.url: i for i, s in enumerate(manifest.shards)}
    for batch in make_loader(stream, 0):
        if "image" not in batch:
            continue
        x = teacher.normalize(batch["image"])
        feats.append(teacher.trunk(x).float())
        labels.append(batch["label"])
        order.extend((shard_index[url], int(i)) for url, i in batch["ref"])
    if not feats:
        raise ValueError(f"shard set {location} yielded no decodable images: check its shards")
    rank = np.lexsort((np.array([i for _, i in order]), np.array([s for s, _ in order])))
    out = Features(torch.cat(feats).numpy()[rank], torch.cat(labels).numpy().astype(np.int64)[rank],
                   list(manifest.class_names))
    with storage.atomic_write(str(path)) as f:  # never visible half-written
        np.savez(f, features=out.features, labels=out.labels)
    return out


# ------------------------------------------------------------------------------------------------ the fits


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
    """Per-class loss weights: all 1, or n / (classes x n_c) for the classes present ('balanced')."""
    if mode == "none":
        return np.ones(num_classes)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


FIT_TOL = 1e-8
"""L-BFGS stops once the largest gradient entry of the objective is below this (scikit-learn's ``tol``, L-BFGS-B's
``gtol``) or once the objective stops moving (its ``ftol``, 64 eps relative, which ends real-shaped fits at about
this gradient anyway). Measured on bench/probe_solver.py's features at C = 1e-2: 1e-8 and 1e-10 give the same
fit; 1e-6 moves probabilities by 1e-4, and scikit-learn's default 1e-4 by 8e-3."""

ABSENT_GAP = 1e4
"""A class with no training image gets w = 0 and a bias ABSENT_GAP below the smallest bias of the present classes.
The present classes' weights sum to zero at the optimum (the loss's gradient over classes does, so L2 leaves the sum
at 0), so on any input the top present logit is at least the smallest present bias: the absent class trails it by
1e4 or more and scores below exp(-1e4), an exact 0 in float32 and float64, yet its logit stays finite (a -inf
bias would make a loss on that class inf and its gradients NaN in a head trained further)."""


def _standardise(features: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Standardised float64 features with the mean and std (unbiased, clamped at 1e-6) they were scaled by, the
    latter as float64 tensors because ``predict_logistic`` and saved models take them so."""
    x = torch.from_numpy(features).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    return ((x - mean) / std).numpy(), mean, std


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The classes present; scikit-learn cannot fit fewer than two, and a label past the class names is a bug."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"training labels span {labels.min()}..{labels.max()} but there are {num_classes} classes")
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError(f"a logistic probe needs training images of two classes or more, got {present.tolist()}")
    return present


def _estimator(max_iter: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(tol=FIT_TOL, max_iter=max_iter, warm_start=True)


def _sklearn_C(C: float, num_present: int) -> float:
    """With two classes scikit-learn fits one weight vector v (binomial loss, penalty ||v||^2 / 2C) where our
    objective has two (multinomial, symmetric optimum w = -+v/2, penalty ||v||^2 / 4C): the same fit at 2C."""
    return 2 * C if num_present == 2 else C


def _fit(est: Any, x: np.ndarray, y: np.ndarray, sample_w: np.ndarray, C: float, num_present: int) -> None:
    """One solve, warm-started if ``est`` was fit before. Convergence is reported by ``_model``, not warned."""
    from sklearn.exceptions import ConvergenceWarning

    est.set_params(C=_sklearn_C(C, num_present))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(x, y, sample_weight=sample_w)


def _full_weights(est: Any, present: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's coefficients of the classes present -> w [d, K] and b [K] over all classes."""
    coef, intercept = est.coef_, est.intercept_
    if len(present) == 2:  # the binomial fit's v, b -> the multinomial's symmetric optimum
        coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    w = np.zeros((coef.shape[1], num_classes))
    b = np.full(num_classes, intercept.min() - ABSENT_GAP)
    w[:, present], b[present] = coef.T, intercept
    return w, b


def _objective(x: np.ndarray, y: np.ndarray, sample_w: np.ndarray, w: np.ndarray, b: np.ndarray,
               C: float) -> tuple[float, float]:
    """ProbeParams' objective and the largest entry of its gradient over all of w and b, recomputed here so the
    figures do not depend on how scikit-learn scales or parametrises its own."""
    logits = x @ w + b
    logits -= logits.max(1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    rows = np.arange(len(y))
    total = sample_w.sum()
    resid = np.exp(log_p)
    resid[rows, y] -= 1
    resid *= (sample_w / total)[:, None]
    grad_w, grad_b = x.T @ resid + w / (C * len(y)), resid.sum(0)
    loss = -(sample_w * log_p[rows, y]).sum() / total + (w * w).sum() / (2 * C * len(y))
    return float(loss), float(max(np.abs(grad_w).max(), np.abs(grad_b).max()))


def _model(est: Any, prepared: dict[str, Any], C: float, max_iter: int) -> dict[str, Any]:
    w, b = _full_weights(est, prepared["present"], prepared["num_classes"])
    loss, grad_max = _objective(prepared["x"], prepared["y"], prepared["sample_w"], w, b, C)
    iterations = int(est.n_iter_[0])
    return {"mean": prepared["mean"], "std": prepared["std"], "w": torch.from_numpy(w), "b": torch.from_numpy(b),
            "iterations": iterations, "grad_max": grad_max, "loss": loss, "converged": iterations < max_iter}


def _prepare(train: Features, class_weight: str) -> dict[str, Any]:
    if class_weight not in ("none", "balanced"):
        raise ValueError(f"class_weight={class_weight!r}: choose none or balanced")
    num_classes = len(train.class_names)
    y = np.asarray(train.labels, dtype=np.int64)
    present = _check_labels(y, num_classes)
    x, mean, std = _standardise(train.features)
    return {"x": x, "y": y, "mean": mean, "std": std, "present": present, "num_classes": num_classes,
            "sample_w": class_weights(y, num_classes, class_weight)[y]}


def fit_logistic(train: Features, params: ProbeParams) -> dict[str, Any]:
    """Multinomial L2 logistic regression on standardised features (ProbeParams' objective), solved by
    scikit-learn's L-BFGS to ``FIT_TOL``: 10-100x faster than the torch L-BFGS it replaces, same optimum.

    Returns the model (mean, std, w [d, K], b [K], float64 tensors; classes absent from training: see
    ABSENT_GAP) and how the fit ended (iterations, grad_max, loss of the objective; converged: stopped before
    ``max_iter``)."""
    return fit_logistic_path(train, [params.C], params.class_weight, max_iter=params.max_iter)[0]


def fit_logistic_path(train: Features, Cs: list[float], class_weight: str, *,
                      max_iter: int = ProbeParams.max_iter) -> list[dict[str, Any]]:
    """``fit_logistic`` at every C, in the order of ``Cs``. Solved from the smallest C up, each fit starting at
    the previous optimum, which is close: a path costs less than cold fits and ends at the same models (the
    objective is convex, its optimum unique up to a common shift of the biases, which no probability sees).

    On one thread (numpy's BLAS and OpenMP pools capped while fitting): probes run beside other trials, and the
    products of a few thousand rows gain little from more."""
    from threadpoolctl import threadpool_limits

    Cs = [float(c) for c in Cs]
    if not Cs or min(Cs) <= 0:
        raise ValueError(f"Cs must be a non-empty list of values > 0, got {Cs}")
    prepared = _prepare(train, class_weight)
    est = _estimator(max_iter)
    models: list[dict[str, Any] | None] = [None] * len(Cs)
    with threadpool_limits(limits=1):
        for i in sorted(range(len(Cs)), key=Cs.__getitem__):
            _fit(est, prepared["x"], prepared["y"], prepared["sample_w"], Cs[i], len(prepared["present"]))
            models[i] = _model(est, prepared, Cs[i], max_iter)
    return models


def tune_logistic(train: Features, val: Features, Cs: list[float], class_weight_modes: list[str],
                  score: Callable[[np.ndarray, np.ndarray], float], *,
                  max_iter: int = ProbeParams.max_iter) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pick C and the class weighting on validation: every (mode, C) fit on ``train`` (a warm-started path per
    mode), scored by ``score(probs, val.labels)``, higher better. Returns the best model, with its "C" and
    "class_weight", and the table of every point in (mode, Cs) order; on a tie the first in that order wins, and
    a NaN score never does."""
    if not class_weight_modes:
        raise ValueError("class_weight_modes is empty: give none, balanced or both")
    best, best_score, table = None, -np.inf, []
    for mode in class_weight_modes:
        for C, model in zip(Cs, fit_logistic_path(train, Cs, mode, max_iter=max_iter)):
            value = float(score(predict_logistic(model, val.features), val.labels))
            table.append({"C": float(C), "class_weight": mode, "score": value, "iterations": model["iterations"],
                          "converged": model["converged"]})
            if value > best_score or (best is None and value == -np.inf):
                best, best_score = {**model, "C": float(C), "class_weight": mode}, value
    if best is None:
        raise ValueError("every validation score was NaN: check the score function and the validation labels")
    return best, table


def fold_linear(model: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A fitted probe as one nn.Linear on raw features (weight [K, d], bias [K], float32): the standardisation
    folded in, in float64 before the cast, so it can head a network in place of the probe and its scaling."""
    w = model["w"] / model["std"][:, None]
    b = model["b"] - model["mean"] @ w
    return w.T.contiguous().float(), b.float()


def predict_logistic(model: dict[str, Any], features: np.ndarray) -> np.ndarray:
    x = (torch.from_numpy(features).double() - model["mean"]) / model["std"]
    return torch.softmax(x @ model["w"] + model["b"], dim=1).float().numpy()


def predict_knn(train: Features, features: np.ndarray, params: ProbeParams, chunk: int = 4096) -> np.ndarray:
    """Class scores from the k most cosine-similar training images, each voting exp(sim / T) (the weighted kNN
    of self-supervised evaluation); rows sum to 1. A class absent among the neighbours scores 0."""
    base = torch.nn.functional.normalize(torch.from_numpy(train.features).float(), dim=1)
    labels = torch.from_numpy(train.labels)
    num_classes = len(train.class_names)
    k = min(params.k, len(labels))
    out = []
    for start in range(0, len(features), chunk):
        q = torch.nn.functional.normalize(torch.from_numpy(features[start:start + chunk]).float(), dim=1)
        sims, idx = (q @ base.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, labels[idx], (sims / params.temperature).exp())
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out).numpy()


def probe_scores(train: Features, evaluation: Features, params: ProbeParams) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit on ``train`` (logistic) or index it (kNN) and score every image of ``evaluation``."""
    if params.kind == "knn":
        return predict_knn(train, evaluation.features, params), {}
    model = fit_logistic(train, params)
    info = {k: model[k] for k in ("iterations", "grad_max", "loss", "converged")}
    return predict_logistic(model, evaluation.features), info
