"""The converged probe baselines: the logistic fit reaches scikit-learn's optimum (an independent solver), class
weights and kNN votes match hand computations, and features are cached once per set, loadable without pickle."""
from __future__ import annotations

import numpy as np
import pytest

from trainer.config import ConfigError
from trainer.probe import (Features, ProbeParams, class_weights, extract_features, fit_logistic, predict_knn,
                           predict_logistic, probe_params, probe_scores)


def _blobs(n_per=(200, 12, 8), dim=16, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c, n in enumerate(n_per):
        centre = rng.normal(0, 1.5, dim)
        xs.append(rng.normal(0, 1, (n, dim)) + centre)
        ys.append(np.full(n, c))
    x = np.concatenate(xs).astype(np.float32)
    return Features(x, np.concatenate(ys).astype(np.int64), ["background", "a", "b"])


@pytest.mark.parametrize("weighting", ["none", "balanced"])
def test_logistic_fit_reaches_the_same_optimum_as_scikit_learn(weighting):
    from sklearn.linear_model import LogisticRegression

    train = _blobs()
    params = ProbeParams(C=0.3, class_weight=weighting)
    model = fit_logistic(train, params)
    assert model["converged"] and model["grad_max"] < 1e-5
    # the same objective on the same standardised features, solved by another library
    x = (train.features - model["mean"].numpy()) / model["std"].numpy()
    ref = LogisticRegression(C=0.3, class_weight=None if weighting == "none" else "balanced", tol=1e-10,
                             max_iter=5000).fit(x, train.labels)
    ours = predict_logistic(model, train.features)
    np.testing.assert_allclose(ours, ref.predict_proba(x), atol=2e-4)


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
    for bad, word in ((["probe.kk=3"], "probe.KEY=VALUE"), (["optim.lr=0.1"], "probe.KEY=VALUE"),
                      (["probe.kind=svm"], "choose one of"), (["probe.k=x"], "must be a int"),
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
