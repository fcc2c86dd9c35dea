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
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import ConfigError

FEATURES_VERSION = 1
"""Bump when extraction changes what a cached feature file holds."""


@dataclass(frozen=True)
class ProbeParams:
    """One probe configuration: what ``probe.*`` overrides and grid axes of an experiment method set."""

    kind: str = "logistic"
    """logistic (L2-regularised multinomial regression fit by L-BFGS) or knn (cosine, temperature-weighted)."""
    image_size: int = 160
    """Input size of the teacher for feature extraction (EfficientNet-Lite0: 224 native, 160 keeps accuracy)."""
    C: float = 1.0
    """Inverse L2 strength, as scikit-learn's: the penalty is ||W||^2 / (2 C n) on the mean loss."""
    class_weight: str = "none"
    """none, or balanced (each class weighted n / (classes x n_c), as scikit-learn's 'balanced')."""
    k: int = 20
    """kNN: neighbours that vote."""
    temperature: float = 0.07
    """kNN: a neighbour votes exp(cosine / temperature)."""
    max_iter: int = 1000
    """L-BFGS iterations at most (a fit that stops on this is reported as not converged)."""


PROBE_KINDS = ("logistic", "knn")


def probe_params(overrides: list[str]) -> ProbeParams:
    """``probe.KEY=VALUE`` strings -> ProbeParams; any other key, or a bad value, is a one-line ConfigError."""
    fields = {f: type(v) for f, v in asdict(ProbeParams()).items()}
    values: dict[str, Any] = {}
    for text in overrides:
        key, sep, raw = text.partition("=")
        name = key.removeprefix("probe.")
        if not sep or not key.startswith("probe.") or name not in fields:
            raise ConfigError(f"probe method override '{text}' is not probe.KEY=VALUE with KEY one of "
                              f"{', '.join(fields)}")
        try:
            values[name] = fields[name](raw) if fields[name] is not str else raw
        except ValueError:
            raise ConfigError(f"probe override '{text}': {name} must be a {fields[name].__name__}") from None
    params = ProbeParams(**values)
    if params.kind not in PROBE_KINDS:
        raise ConfigError(f"probe.kind={params.kind!r}: choose one of {', '.join(PROBE_KINDS)}")
    if params.class_weight not in ("none", "balanced"):
        raise ConfigError(f"probe.class_weight={params.class_weight!r}: choose none or balanced")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial.npz")
    np.savez(tmp, features=out.features, labels=out.labels)
    os.replace(tmp, path)  # never visible half-written
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


def fit_logistic(train: Features, params: ProbeParams) -> dict[str, Any]:
    """Multinomial logistic regression on standardised features, to convergence by L-BFGS in float64.

    Returns the fitted model (mean, std, W, b) and how the fit ended (iterations, gradient norm, converged)."""
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
