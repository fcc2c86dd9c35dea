"""The "-BG" relabelling: K rare classes keep labels 1..K (split-file order), everything else is background 0.

Pure functions of (labels, rare classes, caps, seed) so a data set is reproducible from its build command and
testable without images. Capping positives is how the paper's background fractions (98.30%, 99.98%) arise;
nothing is dropped from the background except by an explicit ``max_background`` (a size knob for debugging).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data.sources.listing import LabelCodes, positions


@dataclass(frozen=True)
class BGSelection:
    """Which source items a -BG set keeps and the main label of each (0 = background)."""

    indices: np.ndarray
    main_labels: np.ndarray
    rare_classes: tuple[str, ...]

    @property
    def counts(self) -> dict[int, int]:
        values, counts = np.unique(self.main_labels, return_counts=True)
        out = {c: 0 for c in range(len(self.rare_classes) + 1)}
        out.update({int(v): int(n) for v, n in zip(values, counts)})
        return out

    @property
    def background_fraction(self) -> float:
        n = len(self.main_labels)
        return float(np.sum(self.main_labels == 0) / n) if n else float("nan")

    def describe(self) -> str:
        counts = self.counts
        per_class = ", ".join(f"{c}:{counts[i + 1]}" for i, c in enumerate(self.rare_classes))
        return (f"{len(self.main_labels)} images, background {counts[0]} ({100 * self.background_fraction:.2f}%),"
                f" positives per rare class {{{per_class}}}")


def main_labels_for(labels: list[str] | LabelCodes, rare_classes: list[str]) -> np.ndarray:
    """Map original labels to 0..K; a rare class's main label is its 1-based position in the split file.
    A source's listing gives its labels as codes (``LabelCodes``): mapped through the table, not item by item."""
    lookup = {c: i + 1 for i, c in enumerate(rare_classes)}
    dtype = np.int16 if len(rare_classes) < 2 ** 15 else np.int64  # 2 B a source item in the build driver
    if isinstance(labels, LabelCodes):
        table = np.array([lookup.get(name, 0) for name in labels.names], dtype=dtype)
        return table[labels.codes] if len(labels) else np.zeros(0, dtype=dtype)
    return np.array([lookup.get(lab, 0) for lab in labels], dtype=dtype)


def positives_for_background_fraction(num_background: int, num_rare: int, fraction: float) -> int:
    """Positives per rare class so that background makes up ``fraction`` of the set (at least one each)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"target background fraction must be in (0, 1), got {fraction}")
    total = num_background * (1.0 - fraction) / fraction
    return max(1, int(round(total / max(num_rare, 1))))


def select_bg(labels: list[str] | LabelCodes, rare_classes: list[str], *, positives_per_class: int | None = None,
              background_fraction: float | None = None, max_background: int | None = None,
              seed: int = 0, positives_seed: int | None = None) -> BGSelection:
    """Choose the items of a -BG set.

    Evaluation sets pass neither cap and keep every positive. Training sets cap positives per class, either
    directly or through a target background fraction, with a seeded choice so the same seed gives the same set.
    ``positives_seed`` draws the positives from a generator of their own (the background stays ``seed``'s).
    """
    if positives_per_class is not None and background_fraction is not None:
        raise ValueError("give positives_per_class or background_fraction, not both")
    if positives_per_class is not None and positives_per_class < 1:
        raise ValueError(f"positives_per_class must be >= 1, got {positives_per_class}")
    mains = main_labels_for(labels, rare_classes)
    rng = np.random.default_rng(seed)
    background = positions(mains == 0)
    if max_background is not None and len(background) > max_background:
        background = np.sort(rng.choice(background, size=max_background, replace=False))
    cap = positives_per_class
    if background_fraction is not None:
        cap = positives_for_background_fraction(len(background), len(rare_classes), background_fraction)
    kept = [background]
    if positives_seed is not None:
        rng = np.random.default_rng([positives_seed, 2027])
    for k in range(1, len(rare_classes) + 1):
        members = positions(mains == k)
        if len(members) == 0:
            raise ValueError(f"rare class '{rare_classes[k - 1]}' has no images in this source; check the split file")
        if cap is not None and len(members) > cap:
            members = np.sort(rng.choice(members, size=cap, replace=False))
        kept.append(members)
    indices = np.concatenate(kept)
    indices.sort()
    return BGSelection(indices=indices, main_labels=mains[indices], rare_classes=tuple(rare_classes))


def holdout_shares(sizes: list[int], num_background: int, holdout: int, rare_classes: list[str], *,
                   per_class: int | None = None) -> tuple[list[int], int]:
    """How many images a validation carve-out of ``holdout`` takes from each rare class, and from the background.

    ``sizes[k]`` is how many images rare class ``rare_classes[k]`` has in the source. By default each rare class
    gives its share of the source (``holdout * size / source size``, rounded half up) but at least 1 and at most
    all but one, so the validation set mirrors the source's class mix (the paper evaluates on the natural mix) and
    scores every class; where the floors overfill a tiny holdout, the largest shares give one back. ``per_class``
    instead takes exactly that many from every rare class (for a steadier validation AP on a huge source, where a
    class's share is 1). The background (every non-rare class, uniformly) fills the rest of ``holdout``.
    """
    num_items = sum(sizes) + num_background
    if not 0 < holdout < num_items:
        raise ValueError(f"--holdout {holdout} does not fit a source of {num_items} images: use 1 to {num_items - 1}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"--holdout-positives-per-class must be >= 1, got {per_class}")
    count, each = len(rare_classes), per_class or 1
    if holdout < count * each:
        raise ValueError(f"--holdout {holdout} cannot hold {each} image(s) of each of the {count} rare classes: use "
                         f"--holdout {count * each} or more")
    for name, n in zip(rare_classes, sizes):
        if n == 0:
            raise ValueError(f"rare class '{name}' has no images in this source; check the split file")
        if n <= each:
            raise ValueError(f"rare class '{name}' has {n} image(s): too few to hold out {each} and train on the "
                             "rest; " + (f"use --holdout-positives-per-class {n - 1} or less" if n > 1 else
                                         "drop the class or build without --holdout"))
    if per_class is not None:
        shares = [per_class] * count
    else:
        shares = [min(n - 1, max(1, math.floor(holdout * n / num_items + 0.5))) for n in sizes]
        while sum(shares) > holdout:  # the floors of 1 overfilled a tiny holdout: the largest shares give back
            shares[int(np.argmax(shares))] -= 1
    background = holdout - sum(shares)
    if num_background and background >= num_background:
        raise ValueError(f"--holdout {holdout} would take all {num_background} background images: use --holdout "
                         f"{sum(shares) + num_background - 1} or less")
    return shares, background


def check_training_positives(rare_classes: list[str], sizes: list[int], shares: list[int], positives_per_class: int,
                             *, holdout: int, per_class: int | None = None) -> None:
    """Refuse a carve-out that leaves a rare class fewer than ``positives_per_class`` images to train on."""
    for name, n, held in zip(rare_classes, sizes, shares):
        left = n - held
        if left >= positives_per_class:
            continue
        fixes = [f"--holdout-positives-per-class {n - positives_per_class}"] if n > positives_per_class else []
        raise ValueError(f"rare class '{name}' has {n} images and the holdout takes {held} ("
                         + (f"--holdout-positives-per-class {per_class}" if per_class else f"its share of --holdout "
                            f"{holdout}") + f"), leaving {left} to train on, fewer than --positives-per-class "
                         f"{positives_per_class}: use " + " or ".join([*fixes, f"--positives-per-class {left}"]))


def stratified_holdout(labels: list[str] | LabelCodes, rare_classes: list[str], holdout: int, seed: int, *,
                       per_class: int | None = None,
                       positives_per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Carve a validation set out of the training source: (rest, holdout) index arrays, disjoint, seeded.

    Model selection must never look at the test split, so the validation set comes from training images. It is
    stratified (:func:`holdout_shares` gives the counts): each rare class and the background are drawn apart, each
    from its own seeded permutation (so a larger share extends a smaller one). The carve-out depends only on
    (labels, rare classes, holdout, per_class, seed): the validation set and every training set built beside it
    with those values are disjoint, whatever their caps. ``positives_per_class`` is only checked: a carve-out that
    leaves a class fewer than that to train on is an error naming the fix, never a silently smaller training set.
    """
    mains = main_labels_for(labels, rare_classes)
    members = [positions(mains == k) for k in range(len(rare_classes) + 1)]
    sizes = [len(m) for m in members[1:]]
    shares, background = holdout_shares(sizes, len(members[0]), holdout, list(rare_classes), per_class=per_class)
    if positives_per_class is not None:
        check_training_positives(list(rare_classes), sizes, shares, positives_per_class, holdout=holdout,
                                 per_class=per_class)
    held = [np.random.default_rng([seed, 7919, k]).permutation(m)[:n]
            for k, (m, n) in enumerate(zip(members, [background, *shares]))]
    held_all = np.concatenate(held)
    held_all.sort()
    rest = np.ones(len(labels), dtype=bool)  # a mask, not setdiff1d: that sorts a copy of every index
    rest[held_all] = False
    return positions(rest), held_all


STEADY_VALIDATION = 10
"""Validation positives of a class below which its AP, and so every choice made on validation, hangs on a handful of
images: the issue-36 newcomer's 1 a class gave 34.2 and 2.8 val mAP for one config on two seeds."""


def few_validation_positives(name: str, held: int, size: int, positives_per_class: int | None) -> str | None:
    """One line on a rare class whose validation share is below ``STEADY_VALIDATION`` (None when it is not): what
    it holds and the flag value that holds more while ``positives_per_class`` still train."""
    if held >= STEADY_VALIDATION:
        return None
    room = size - positives_per_class if positives_per_class else size // 2  # no cap: keep half to train on
    more = min(STEADY_VALIDATION, room)
    fix = (f"--holdout-positives-per-class {more} holds {more}" + (f" and leaves {positives_per_class} to train on"
                                                                   if positives_per_class else "")
           if more > held else "adding images of the class is the way to more")
    return (f"rare class '{name}' has {held} validation image(s) of its {size}: validation AP, and every choice made"
            f" on it, rests on {'it' if held == 1 else 'them'}; {fix} (fewer than {STEADY_VALIDATION} stays noisy;"
            " k-fold validation, scoring every image, is not in bgsplit yet)")

