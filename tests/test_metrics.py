"""Tests for trainer.metrics: agreement with sklearn, hand-computed cases, input errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve

from trainer.metrics import (
    average_precision,
    evaluate,
    pr_curve,
    precision_at_k,
    rare_class_names,
    summarize,
)


def _random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random binary problem with at least one positive; half the cases are tie-heavy."""
    n = int(rng.integers(1, 301))
    if rng.random() < 0.5:
        levels = rng.random(int(rng.integers(1, 5)))
        scores = rng.choice(levels, size=n)
    else:
        scores = rng.random(n)
    targets = rng.random(n) < rng.random()
    targets[rng.integers(n)] = True
    return scores, targets


def test_average_precision_matches_sklearn_on_random_cases() -> None:
    rng = np.random.default_rng(1234)
    for _ in range(200):
        scores, targets = _random_case(rng)
        expected = average_precision_score(targets, scores)
        assert abs(average_precision(scores, targets) - expected) <= 1e-12


def test_pr_curve_matches_sklearn() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        scores, targets = _random_case(rng)
        precision, recall = pr_curve(scores, targets)
        sk_precision, sk_recall, _ = precision_recall_curve(targets, scores)
        np.testing.assert_allclose(precision, sk_precision, atol=1e-12)
        np.testing.assert_allclose(recall, sk_recall, atol=1e-12)


def test_average_precision_ties_enter_together() -> None:
    # Threshold 0.5 admits both tied samples: P=1/2, R=1/2; then P=2/3, R=1.
    ap = average_precision(np.array([0.5, 0.5, 0.2]), np.array([0, 1, 1]))
    assert ap == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3, abs=1e-15)


def test_average_precision_no_positives_is_nan() -> None:
    assert math.isnan(average_precision(np.array([0.1, 0.9]), np.array([0, 0])))


def test_average_precision_all_positive_is_one() -> None:
    scores = np.array([0.3, 0.3, 0.9, 0.1])
    assert average_precision(scores, np.ones(4, dtype=bool)) == 1.0
    assert average_precision(scores, np.ones(4, dtype=bool)) == average_precision_score(np.ones(4), scores)


@pytest.mark.parametrize(
    "scores, targets",
    [
        (np.zeros((2, 2)), np.zeros((2, 2))),
        (np.zeros(3), np.zeros(2)),
        (np.array([0.1, np.nan]), np.array([0, 1])),
        (np.array([0.1, 0.2]), np.array([0, 2])),
    ],
)
def test_average_precision_rejects_bad_input(scores: np.ndarray, targets: np.ndarray) -> None:
    with pytest.raises(ValueError):
        average_precision(scores, targets)


def test_pr_curve_without_positives_raises() -> None:
    with pytest.raises(ValueError):
        pr_curve(np.array([0.2, 0.4]), np.array([0, 0]))


def test_precision_at_k_hand_computed_with_stable_ties() -> None:
    scores = np.array([0.3, 0.9, 0.5, 0.5, 0.1])
    targets = np.array([1, 0, 0, 1, 1])
    # Descending with lower index first among ties: 1, 2, 3, 0, 4.
    assert precision_at_k(scores, targets, k=2) == 0.0
    assert precision_at_k(scores, targets, k=3) == pytest.approx(1 / 3)
    assert precision_at_k(scores, targets, k=4) == pytest.approx(2 / 4)


def test_precision_at_k_clips_k_to_n() -> None:
    scores = np.array([0.3, 0.9, 0.5, 0.5, 0.1])
    targets = np.array([1, 0, 0, 1, 1])
    assert precision_at_k(scores, targets, k=100) == pytest.approx(3 / 5)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_precision_at_k_rejects_bad_k(k: object) -> None:
    with pytest.raises(ValueError):
        precision_at_k(np.array([0.1, 0.2]), np.array([0, 1]), k=k)  # type: ignore[arg-type]


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    """Background + 2 rare classes, 6 images; APs worked out in the test below."""
    rare = np.array(
        [
            [0.10, 0.20],
            [0.90, 0.05],
            [0.30, 0.60],
            [0.20, 0.15],
            [0.80, 0.10],
            [0.05, 0.70],
        ]
    )
    probs = np.column_stack([1.0 - rare.sum(axis=1), rare])
    labels = np.array([0, 1, 1, 2, 0, 2])
    return probs, labels


def test_evaluate_hand_computed_three_classes() -> None:
    probs, labels = _hand_case()
    result = evaluate(probs, labels, ["background", "cat", "dog"], k=3)
    # cat ranking: 1(+) 4(-) 2(+) ... -> AP = 1/2*1 + 1/2*2/3 = 5/6; top-3 has 2 cats.
    # dog ranking: 5(+) 2(-) 0(-) 3(+) -> AP = 1/2*1 + 1/2*2/4 = 3/4; top-3 has 1 dog.
    assert result["ap"] == pytest.approx({"cat": 5 / 6, "dog": 3 / 4})
    assert result["precision_at_k"] == pytest.approx({"cat": 2 / 3, "dog": 1 / 3})
    assert result["map"] == pytest.approx((5 / 6 + 3 / 4) / 2)
    assert result["positives"] == {"cat": 2, "dog": 2}
    assert result["k"] == 3
    assert result["num_images"] == 6
    assert result["classes_without_positives"] == []


def test_evaluate_accepts_rare_only_names_and_default_names() -> None:
    probs, labels = _hand_case()
    assert list(evaluate(probs, labels, ["cat", "dog"])["ap"]) == ["cat", "dog"]
    assert list(evaluate(probs, labels)["ap"]) == ["class_1", "class_2"]


def test_evaluate_excludes_class_without_positives() -> None:
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=20)
    labels = np.array([0] * 10 + [1] * 5 + [3] * 5)
    result = evaluate(probs, labels, ["bg", "a", "b", "c"])
    assert math.isnan(result["ap"]["b"])
    assert result["classes_without_positives"] == ["b"]
    assert result["positives"]["b"] == 0
    assert result["map"] == pytest.approx((result["ap"]["a"] + result["ap"]["c"]) / 2)


def test_evaluate_map_nan_when_no_class_has_positives() -> None:
    probs = np.full((4, 3), 1 / 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate(probs, np.zeros(4, dtype=int))
    assert math.isnan(result["map"])
    assert result["classes_without_positives"] == ["class_1", "class_2"]


@pytest.mark.parametrize(
    "probs, labels, message",
    [
        (np.zeros(3), np.zeros(3, dtype=int), "2-D"),
        (np.zeros((3, 1)), np.zeros(3, dtype=int), "background column"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "no rows"),
        (np.zeros((3, 3)), np.zeros(4, dtype=int), "shape"),
        (np.zeros((3, 3)), np.zeros(3), "integers"),
        (np.zeros((3, 3)), np.array([0, 7, 1]), "label 7 outside 0..2"),
        (np.zeros((3, 3)), np.array([0, -1, 1]), "label -1 outside 0..2"),
    ],
)
def test_evaluate_rejects_bad_shapes_and_labels(probs: np.ndarray, labels: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(probs, labels)


def test_rare_class_names_rejects_wrong_length_and_duplicates() -> None:
    with pytest.raises(ValueError, match="expected 3"):
        rare_class_names(["a"], 3)
    with pytest.raises(ValueError, match="unique"):
        rare_class_names(["bg", "a", "a"], 3)


def test_summarize() -> None:
    mean, std = summarize([0.5, 0.7, float("nan")])
    assert mean == pytest.approx(0.6)
    assert std == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert summarize([0.3]) == (0.3, 0.0)
    assert all(math.isnan(v) for v in summarize([float("nan")]))
    assert all(math.isnan(v) for v in summarize([]))
