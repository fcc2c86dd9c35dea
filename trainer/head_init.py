"""LP-FT as Kumar et al. publish it: the main head starts as the converged, validation-tuned logistic probe.

With two positives a class most of what a run can learn sits in the head, and the probe is the head's best point
(its optimum is convex and found in seconds); a random head, or one fit by SGD for part of an epoch, starts
fine-tuning far from it and the trunk's first gradients undo pre-trained features to fit noise. So before step 0
the student's own trunk (at the run's input size, in eval mode, the eval transform) embeds the training set once,
``trainer.probe`` fits the probe on those features at every (C, weighting) of the grid and keeps the one with the
best validation mAP, and its standardisation is folded into the main head's weights. The head's starting weights
travel in the checkpoint (``init_head``) so WiSE-FT can interpolate back to them (``trainer.wise_ft``).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from data.shards import manifest_identity
from trainer.probe import Features, extract_features, fold_linear, tune_logistic
from trainer.runtime import run_cache

log = logging.getLogger(__name__)


def features_cache_dir(cfg: Any) -> str:
    return run_cache(cfg.model.probe_cache_dir, cfg.run.out_dir, "features")


class _TrunkView(torch.nn.Module):
    """The student's trunk as ``extract_features`` takes a network: normalize + trunk, and a digest of exactly
    what computes the features (trunk weights and input normalisation), so features cached for one run's
    initial trunk serve every run of a study that starts from the same weights."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.trunk, self.normalize = student.trunk, student.normalize

    def digest(self) -> str:
        from data.teacher_labels import weights_digest

        return weights_digest({**{f"trunk.{k}": v for k, v in self.trunk.state_dict().items()},
                               **{f"norm.{k}": v for k, v in self.normalize.state_dict().items()}})


def trunk_features(student: torch.nn.Module, location: str, image_size: int, *, cache_dir: str,
                   resize_ratio: float) -> Features:
    """The student trunk's pooled features of a set, in eval mode (running BatchNorm statistics, no dropout);
    the student's own mode is restored after."""
    was_training = student.training
    student.eval()
    try:
        return extract_features(_TrunkView(student), location, image_size, cache_dir=cache_dir,
                                identity=manifest_identity(location), resize_ratio=resize_ratio)
    finally:
        student.train(was_training)


def mean_ap(probs: np.ndarray, labels: np.ndarray) -> float:
    from trainer.metrics import evaluate

    return float(evaluate(probs, labels)["map"])


def head_weights(model: dict[str, Any], fixed_background_logit: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe as the main head's (weight, bias). With a fixed background logit c the head has no background
    row: subtracting the background's logit from every class's (a per-image shift, which softmax ignores) and
    adding c gives rare rows w_k - w_0 and b_k - b_0 + c, the same probabilities."""
    weight, bias = fold_linear(model)
    if fixed_background_logit is None:
        return weight, bias
    return (weight[1:] - weight[0]).contiguous(), bias[1:] - bias[0] + float(fixed_background_logit)


def check_positives(labels: np.ndarray, class_names: list[str], location: str) -> None:
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [name for name, n in zip(class_names, counts) if n == 0]
    if empty:
        raise ValueError(f"model.head_init=probe: data.train={location} has no images of {', '.join(empty)}, so "
                         f"the probe cannot score them; add examples of each class or use model.head_init=random")


def fit_probe_head(student: torch.nn.Module, cfg: Any) -> dict[str, Any]:
    """Fit the tuned probe on the student's trunk features and load it into the main head; returns what was
    chosen (C, class_weight, validation mAP, the grid's table, the set sizes) for the run's summary."""
    train_set, val_set = cfg.data.train, cfg.model.probe_val or cfg.data.val
    Cs, weightings = list(cfg.model.probe_C), list(cfg.model.probe_class_weight)
    if not val_set and len(Cs) * len(weightings) > 1:
        raise ValueError(f"model.head_init=probe chooses among {len(Cs) * len(weightings)} probes "
                         f"(model.probe_C x model.probe_class_weight) on validation, and neither model.probe_val "
                         f"nor data.val is set: give one, or a single C and weighting (model.probe_C=[1e-4] "
                         f"model.probe_class_weight=[balanced])")
    kwargs = {"cache_dir": features_cache_dir(cfg), "resize_ratio": cfg.data.eval_resize_ratio}
    train = trunk_features(student, train_set, cfg.data.image_size, **kwargs)
    check_positives(train.labels, train.class_names, train_set)
    val = trunk_features(student, val_set, cfg.data.image_size, **kwargs) if val_set else train
    score = mean_ap if val_set else (lambda probs, labels: 0.0)
    model, table = tune_logistic(train, val, Cs, weightings, score)
    weight, bias = head_weights(model, student.fixed_background_logit)
    head = student.main_head
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))
    chosen = {"C": model["C"], "class_weight": model["class_weight"], "converged": model["converged"],
              "val_map": next(r["score"] for r in table if (r["C"], r["class_weight"]) ==
                              (model["C"], model["class_weight"])) if val_set else None,
              "train_images": int(len(train.labels)), "val_images": int(len(val.labels)) if val_set else 0,
              "grid": table}
    log.info("main head = the logistic probe on the trunk's %d-px features of %d images: C=%g, %s weights%s",
             cfg.data.image_size, chosen["train_images"], chosen["C"], chosen["class_weight"],
             f", val mAP {chosen['val_map']:.4f}" if val_set else " (one grid point, no validation)")
    return chosen


def broadcast_head(student: torch.nn.Module, world: int) -> None:
    """Rank 0 fit the probe; every rank starts from its head (before the engine wraps the student, so the
    engines' own first broadcast is not relied on: DeepSpeed's ZeRO-3 partitions instead)."""
    if world > 1:
        for t in (student.main_head.weight, student.main_head.bias):
            torch.distributed.broadcast(t.data, 0)

