"""The converged probe baselines: the logistic fit reaches the optimum an independent solver finds, a warm-started
C path the cold fits, tuning picks what a brute force picks, the probe folds into one linear layer, class weights
and kNN votes match hand computations, and features are cached once per set, loadable without pickle."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import ConfigError
from trainer.probe import (Features, ProbeParams, class_weights, extract_features, fit_logistic, fit_logistic_path,
                           fold_linear, predict_knn, predict_logistic, probe_params, probe_scores, tune_logistic)


def _blobs(n_per=(200, 12, 8), dim=16, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c, n in enumerate(n_per):
        centre = rng.normal(0, 1.5, dim)
        xs.append(rng.normal(0, 1, (n, dim)) + centre)
        ys.append(np.full(n, c))
    x = np.concatenate(xs).astype(np.float32)
    return Features(x, np.concatenate(ys).astype(np.int64), ["background", "a", "b"])


def _only(train: Features, keep: tuple[int, ...]) -> Features:
    """``train`` without the images of the classes not in ``keep`` (their names stay: absent classes)."""
    rows = np.isin(train.labels, keep)
    return Features(train.features[rows], train.labels[rows], train.class_names)


def _scipy_probs(train: Features, weighting: str, C: float) -> np.ndarray:
    """ProbeParams' objective on the classes present, solved by scipy's L-BFGS-B from our own loss and gradient:
    an independent solver (and parametrisation: one weight vector per class even for two classes)."""
    from scipy.optimize import minimize

    x64 = train.features.astype(np.float64)
    x = (x64 - x64.mean(0)) / x64.std(0, ddof=1)
    present, y = np.unique(train.labels, return_inverse=True)
    n, d, k = len(y), x.shape[1], len(present)
    sw = class_weights(train.labels, len(train.class_names), weighting)[train.labels]
    onehot = np.eye(k)[y]

    def objective(theta):
        w, b = theta[:d * k].reshape(d, k), theta[d * k:]
        z = x @ w + b
        z -= z.max(1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
        r = sw[:, None] * (np.exp(log_p) - onehot) / sw.sum()
        loss = -(sw * (log_p * onehot).sum(1)).sum() / sw.sum() + (w * w).sum() / (2 * C * n)
        return loss, np.concatenate([(x.T @ r + w / (C * n)).ravel(), r.sum(0)])

    res = minimize(objective, np.zeros((d + 1) * k), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-11, "ftol": 1e-15, "maxiter": 20000})
    w, b = res.x[:d * k].reshape(d, k), res.x[d * k:]
    z = x @ w + b
    probs = np.zeros((n, len(train.class_names)))
    probs[:, present] = np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
    return probs


@pytest.mark.parametrize("keep", [(0, 1, 2), (0, 2)], ids=["three-classes", "two-classes-one-absent"])
@pytest.mark.parametrize("weighting", ["none", "balanced"])
def test_logistic_fit_reaches_the_optimum_of_an_independent_solver(weighting, keep):
    train = _only(_blobs(), keep)
    model = fit_logistic(train, ProbeParams(C=0.05, class_weight=weighting))
    assert model["converged"] and model["grad_max"] < 1e-6
    x64 = train.features.astype(np.float64)  # standardised as documented: mean and unbiased std of the rows
    np.testing.assert_allclose(model["mean"].numpy(), x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model["std"].numpy(), x64.std(0, ddof=1), rtol=1e-12)
    ours = predict_logistic(model, train.features)
    np.testing.assert_allclose(ours, _scipy_probs(train, weighting, 0.05), atol=1e-4)
    assert model["w"].shape == (16, 3) and model["b"].shape == (3,)


def test_a_warm_started_path_finds_the_cold_fits():
    train = _blobs()
    Cs = [0.1, 1e-3, 10.0, 1e-2]  # not sorted: the models come back in this order
    path = fit_logistic_path(train, Cs, "balanced")
    probs = [predict_logistic(m, train.features) for m in path]
    for C, got in zip(Cs, probs):
        cold = fit_logistic(train, ProbeParams(C=C, class_weight="balanced"))
        np.testing.assert_allclose(got, predict_logistic(cold, train.features), atol=1e-4)
    assert np.abs(probs[1] - probs[2]).max() > 0.1  # the Cs make different models: order matters
    assert all(m["converged"] for m in path)


def _neg_log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12)).mean())


def test_tuning_picks_what_a_brute_force_of_cold_fits_picks():
    train = _blobs()
    val = _blobs()
    val.features = val.features + np.random.default_rng(1).normal(0, 1.5, val.features.shape).astype(np.float32)
    Cs, modes = [1e-3, 1e-2, 0.1, 1.0, 10.0], ["none", "balanced"]
    best, table = tune_logistic(train, val, Cs, modes, _neg_log_loss)
    brute = [(mode, C, _neg_log_loss(predict_logistic(fit_logistic(train, ProbeParams(C=C, class_weight=mode)),
                                                      val.features), val.labels))
             for mode in modes for C in Cs]
    pick = max(brute, key=lambda r: r[2])  # max keeps the first of equals
    assert (best["class_weight"], best["C"]) == pick[:2] and pick[1] not in (Cs[0], Cs[-1])  # an inner optimum
    assert [(r["class_weight"], r["C"]) for r in table] == [r[:2] for r in brute]
    np.testing.assert_allclose([r["score"] for r in table], [r[2] for r in brute], rtol=1e-5)
    np.testing.assert_allclose(predict_logistic(best, val.features),
                               predict_logistic(fit_logistic(train, ProbeParams(C=pick[1], class_weight=pick[0])),
                                                val.features), atol=1e-4)
    # a tie goes to the first point in (mode, C) order; NaN never wins, and all-NaN is an error
    tied, _ = tune_logistic(train, val, [1.0, 0.1], ["balanced", "none"], lambda p, y: 0.5)
    assert (tied["class_weight"], tied["C"]) == ("balanced", 1.0)
    scores = iter([np.nan, 0.2, 0.1])  # a score undefined at the first point
    after_nan, _ = tune_logistic(train, val, [1e-2, 0.1, 1.0], ["none"], lambda p, y: next(scores))
    assert after_nan["C"] == 0.1
    with pytest.raises(ValueError, match="NaN"):
        tune_logistic(train, val, [1.0], ["none"], lambda p, y: np.nan)


@pytest.mark.parametrize("keep", [(0, 1, 2), (0, 1)], ids=["all-present", "last-absent"])
def test_fold_linear_is_the_probe_as_one_linear_layer(keep):
    train = _only(_blobs(), keep)
    train.features = train.features * np.linspace(0.5, 3, 16, dtype=np.float32) + 4  # raw != standardised
    model = fit_logistic(train, ProbeParams(C=0.3, class_weight="balanced"))
    weight, bias = fold_linear(model)
    assert weight.dtype == bias.dtype == torch.float32 and weight.shape == (3, 16) and bias.shape == (3,)
    head = torch.nn.Linear(16, 3)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    query = _blobs(seed=0).features * np.linspace(0.5, 3, 16, dtype=np.float32) + 4  # every class's images
    query = query + np.random.default_rng(2).normal(0, 0.5, query.shape).astype(np.float32)
    folded = torch.softmax(head(torch.from_numpy(query)), dim=1).detach().numpy()
    np.testing.assert_allclose(folded, predict_logistic(model, query), atol=1e-5)


def test_a_class_absent_from_training_scores_zero_and_breaks_nothing():
    full = _blobs()
    train = _only(full, (0, 2))  # class 1 has no training image: a binary fit inside a 3-class model
    model = fit_logistic(train, ProbeParams(C=1.0, class_weight="balanced"))
    assert model["w"][:, 1].abs().max() == 0 and torch.isfinite(model["b"]).all()
    probs = predict_logistic(model, full.features)  # including class 1's own images
    assert probs[:, 1].max() < 1e-30 and np.allclose(probs.sum(1), 1, atol=1e-6)
    assert (probs.argmax(1) == full.labels)[full.labels != 1].mean() > 0.95
    weight, bias = fold_linear(model)
    assert torch.isfinite(bias).all() and torch.softmax(torch.from_numpy(full.features) @ weight.T + bias, 1)[:, 1].max() < 1e-30
    best, table = tune_logistic(train, full, [0.1, 1.0], ["none", "balanced"], _neg_log_loss)
    assert len(table) == 4 and np.isfinite([r["score"] for r in table]).all()
    scores, info = probe_scores(train, full, ProbeParams(C=1.0))
    assert scores.shape == (len(full.labels), 3) and info["converged"]


def test_bad_fit_inputs_are_one_line_errors():
    train = _blobs()
    for call, word in ((lambda: fit_logistic(_only(train, (0,)), ProbeParams()), "two classes"),
                       (lambda: fit_logistic_path(train, [], "none"), "Cs"),
                       (lambda: fit_logistic_path(train, [1.0, -1.0], "none"), "Cs"),
                       (lambda: fit_logistic_path(train, [1.0], "balance"), "choose none or balanced"),
                       (lambda: fit_logistic(Features(train.features, train.labels, ["a", "b"]), ProbeParams()),
                        "2 classes")):
        with pytest.raises(ValueError, match=word):
            call()


def test_balanced_weights_and_knn_votes_by_hand():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 2])
    np.testing.assert_allclose(class_weights(labels, 4, "balanced"), [8 / (3 * 6), 8 / 3, 8 / 3, 0.0])
    assert class_weights(labels, 3, "none").tolist() == [1, 1, 1]
    # three training points on the unit circle; a query at angle 0 sees cos 1, cos 0.5 and cos(pi)
    train = Features(np.array([[1, 0], [np.cos(0.5), np.sin(0.5)], [-1, 0]], np.float32), np.array([0, 1, 1]),
                     ["background", "x"])
    scores = predict_knn(train, np.array([[2, 0]], np.float32), ProbeParams(kind="knn", k=2, temperature=0.5))
    w0, w1 = np.exp(1 / 0.5), np.exp(np.cos(0.5) / 0.5)  # the far point is not among the 2 neighbours
    np.testing.assert_allclose(scores[0], [w0 / (w0 + w1), w1 / (w0 + w1)], rtol=1e-5)


def test_probe_params_are_typed_and_checked():
    p = probe_params(["probe.kind=knn", "probe.k=7", "probe.C=0.5", "probe.class_weight=balanced"])
    assert (p.kind, p.k, p.C, p.class_weight) == ("knn", 7, 0.5, "balanced")
    for bad, word in ((["probe.kk=3"], "unknown config key 'probe.kk': valid keys here are C, class_weight"),
                      (["optim.lr=0.1"], "probe.KEY=VALUE"),
                      (["probe.kind=svm"], "config key 'probe.kind' is 'svm'; choose one of logistic, knn"),
                      (["probe.k=x"], "config key 'probe.k' must be int, got 'x'"),
                      (["probe.C=0"], "out of range")):
        with pytest.raises(ConfigError, match=word):
            probe_params(bad)


def test_probe_separates_what_it_should():
    train, test = _blobs(seed=0), _blobs(seed=0)
    test.features = test.features + np.random.default_rng(1).normal(0, 0.1, test.features.shape).astype(np.float32)
    for params in (ProbeParams(C=1.0), ProbeParams(kind="knn", k=5)):
        probs, _ = probe_scores(train, test, params)
        assert probs.shape == (len(test.labels), 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
        assert (probs.argmax(1) == test.labels).mean() > 0.95


def test_features_of_a_real_set_are_cached_once_and_load_without_pickle(tiny_sets, teacher, tmp_path):
    cache = tmp_path / "features"
    first = extract_features(teacher, tiny_sets["test"], 64, cache_dir=str(cache), identity="v1")
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and first.features.shape == (300, 1280) and len(first.labels) == 300
    with np.load(files[0], allow_pickle=False) as stored:  # plain arrays: nothing to unpickle
        np.testing.assert_array_equal(stored["features"], first.features)
    stamp = files[0].stat().st_mtime_ns
    again = extract_features(teacher, tiny_sets["test"], 64, cache_dir=str(cache), identity="v1")
    assert files[0].stat().st_mtime_ns == stamp and np.array_equal(again.features, first.features)
    # another identity (a rebuilt set) or image size is another cache entry
    extract_features(teacher, tiny_sets["test"], 48, cache_dir=str(cache), identity="v1")
    assert len(list(cache.glob("*.npz"))) == 2
    # manifest order: labels as the set's shards list them
    from data.shards import read_manifest

    m = read_manifest(tiny_sets["test"])
    assert np.bincount(first.labels, minlength=3).tolist() == m.counts
