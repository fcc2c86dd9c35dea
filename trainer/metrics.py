"""Evaluation metrics for rare-class retrieval.

Background Splitting is judged by how well each rare class is *ranked*
among a sea of background images, so the metrics here are ranking metrics
computed one-vs-rest per rare class from the main head's softmax scores.
Column 0 of the main head is the background class: it is never a target
of evaluation, only the thing the rare classes must be separated from.

Only numpy is used so that evaluation runs wherever the trainer runs,
without sklearn; the tests check agreement with sklearn to 1e-12.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "average_precision",
    "precision_at_k",
    "pr_curve",
    "evaluate",
    "summarize",
    "rare_class_names",
    "check_eval_inputs",
]


def _check_binary_inputs(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coerce to 1-D float scores / bool targets, failing loudly on bad input.

    A silent broadcast or a NaN score would produce a plausible but wrong
    ranking, which is far worse than an exception during evaluation.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.ndim != 1 or targets.ndim != 1:
        raise ValueError(f"scores and targets must be 1-D, got shapes {scores.shape} and {targets.shape}")
    if scores.shape != targets.shape:
        raise ValueError(f"scores and targets differ in length: {scores.shape[0]} vs {targets.shape[0]}")
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    scores = scores.astype(np.float64, copy=False)
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    if targets.dtype != np.bool_:
        if not np.all((targets == 0) | (targets == 1)):
            raise ValueError("targets must be binary (0/1 or bool)")
        targets = targets.astype(np.bool_)
    return scores, targets


def _threshold_counts(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True/false positive counts at each distinct score threshold, highest first.

    All samples sharing a score enter the ranking together (one threshold),
    which is how sklearn's ``_binary_clf_curve`` treats ties; cutting inside
    a tie would make AP depend on an arbitrary order of equal scores.
    """
    order = np.argsort(scores, kind="mergesort")[::-1]
    sorted_scores = scores[order]
    sorted_targets = targets[order]
    distinct = np.flatnonzero(np.diff(sorted_scores))
    last_of_group = np.r_[distinct, sorted_targets.size - 1]
    tps = np.cumsum(sorted_targets, dtype=np.float64)[last_of_group]
    fps = 1.0 + last_of_group - tps
    return tps, fps


def pr_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every distinct threshold, for plotting.

    Same layout as ``sklearn.metrics.precision_recall_curve``: recall runs
    from 1 down to 0 and the final point is (recall 0, precision 1), so the
    curve is anchored at the top-left corner. With no positives recall is
    undefined and a ValueError is raised instead of plotting garbage.
    """
    scores, targets = _check_binary_inputs(scores, targets)
    if scores.size == 0:
        raise ValueError("pr_curve needs at least one sample")
    tps, fps = _threshold_counts(scores, targets)
    if tps[-1] == 0:
        raise ValueError("pr_curve needs at least one positive target")
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Non-interpolated average precision, identical to sklearn's.

    AP = sum_n (R_n - R_{n-1}) * P_n over distinct thresholds. We avoid
    the trapezoidal/interpolated variants because they are optimistic on
    the tiny positive sets that rare classes have.

    A class with no positives has no defined AP (recall is 0/0), so NaN is
    returned; ``evaluate`` excludes such classes from the mean and lists
    them so the report can say how many were left out.
    """
    scores, targets = _check_binary_inputs(scores, targets)
    if not targets.any():
        return float("nan")
    precision, recall = pr_curve(scores, targets)
    # Same expression as sklearn, so the float rounding matches too.
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def precision_at_k(scores: np.ndarray, targets: np.ndarray, k: int = 100) -> float:
    """Fraction of positives among the k highest scores.

    This is what a labeller browsing the top of a ranked list experiences.
    k is clipped to the number of samples so small evaluation sets still
    give a number. Ties are broken by a stable sort of the descending
    score, i.e. among equal scores the lower index ranks first; this keeps
    the result deterministic (unlike AP, P@k must cut inside a tie).
    """
    scores, targets = _check_binary_inputs(scores, targets)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if scores.size == 0:
        raise ValueError("precision_at_k needs at least one sample")
    k_eff = min(int(k), scores.size)
    top = np.argsort(-scores, kind="stable")[:k_eff]
    return float(np.count_nonzero(targets[top]) / k_eff)


def rare_class_names(class_names: Sequence[str] | None, num_columns: int) -> list[str]:
    """Names of the rare classes 1..K for a main head with ``num_columns`` = K+1 outputs.

    Accepts either all K+1 names (index 0 = background, dropped here) or
    just the K rare names, because callers naturally hold one or the other;
    the two lengths cannot be confused. Names must be unique since they key
    the result dictionaries.
    """
    num_rare = num_columns - 1
    if class_names is None:
        return [f"class_{c}" for c in range(1, num_columns)]
    names = [str(n) for n in class_names]
    if len(names) == num_columns:
        names = names[1:]
    elif len(names) != num_rare:
        raise ValueError(f"class_names has {len(names)} names; expected {num_columns} (with background) or {num_rare}")
    if len(set(names)) != len(names):
        raise ValueError("class_names must be unique")
    return names


def check_eval_inputs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate the [N, K+1] score matrix and the [N] integer labels.

    Public so the report plots reject exactly the input that ``evaluate``
    rejects, instead of drawing figures for data the metrics refuse.
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D [N, K+1], got shape {probs.shape}")
    if probs.shape[1] < 2:
        raise ValueError(f"probs needs a background column and at least one rare class, got {probs.shape[1]} columns")
    if probs.shape[0] == 0:
        raise ValueError("probs has no rows; nothing to evaluate")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must have shape ({probs.shape[0]},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    num_classes = probs.shape[1]
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"label {int(bad[0])} outside 0..{num_classes - 1}")
    return probs, labels


def evaluate(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    k: int = 100,
) -> dict:
    """Per-rare-class AP and P@k plus their mean, as a JSON-friendly dict.

    The score of rare class c is ``probs[:, c]`` (the main head's softmax),
    evaluated one-vs-rest; background (column 0) is not a rare class and is
    excluded. ``map`` is the mean AP over rare classes that have positives
    (NaN when none do); the others are listed in ``classes_without_positives``
    so a reader can see the mean covers fewer classes.
    """
    probs, labels = check_eval_inputs(probs, labels)
    names = rare_class_names(class_names, probs.shape[1])
    ap: dict[str, float] = {}
    p_at_k: dict[str, float] = {}
    positives: dict[str, int] = {}
    for column, name in enumerate(names, start=1):
        targets = labels == column
        ap[name] = average_precision(probs[:, column], targets)
        p_at_k[name] = precision_at_k(probs[:, column], targets, k)
        positives[name] = int(np.count_nonzero(targets))
    missing = [name for name in names if positives[name] == 0]
    mean_ap, _ = summarize(list(ap.values()))
    return {
        "ap": ap,
        "precision_at_k": p_at_k,
        "map": mean_ap,
        "k": int(k),
        "num_images": int(probs.shape[0]),
        "positives": positives,
        "classes_without_positives": missing,
    }


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) across seeds, ignoring NaNs.

    Sample std because the seeds are a sample of the run-to-run variation.
    A single value gives std 0.0 rather than NaN so one-seed tables still
    print; no values at all give (NaN, NaN).
    """
    array = np.asarray(values, dtype=np.float64).ravel()
    array = array[~np.isnan(array)]
    if array.size == 0:
        return float("nan"), float("nan")
    mean = float(array.mean())
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return mean, std



def map_difference_interval(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray, *,
                            resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """How sure "a beats b on this validation set" is: mAP(a) - mAP(b) and its paired bootstrap interval over the
    set's images, resampled within each class (background alike) so every resample keeps the set's positives per
    class. With 3 validation positives a class two methods' mAPs are each a few images' ranks: the interval shows
    how far another draw of such a set could move the margin, which a margin alone hides (issue 32).

    ``scores_*``: [N, K+1] main-head scores of the same images in the same order; ``labels``: [N] (0 background)."""
    if np.shape(scores_a) != np.shape(scores_b):
        raise ValueError(f"scores of {np.shape(scores_a)} and {np.shape(scores_b)}: the same images are needed")
    scores_a, labels = check_eval_inputs(scores_a, labels)
    scores_b, _ = check_eval_inputs(scores_b, labels)
    rare = [c for c in range(1, scores_a.shape[1]) if np.any(labels == c)]

    def mean_ap(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean([average_precision(a[:, c], y == c) - average_precision(b[:, c], y == c)
                              for c in rare]))

    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    diffs = np.empty(resamples)
    for i in range(resamples):
        pick = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        diffs[i] = mean_ap(scores_a[pick], scores_b[pick], labels[pick])
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return {"diff": mean_ap(scores_a, scores_b, labels), "low": float(low), "high": float(high),
            "resamples": resamples}
