"""WiSE-FT (Wortsman et al., 2022): the fine-tuned student interpolated back towards where it started.

A run that starts from the probe (model.head_init=probe) has a good theta_0: the pre-trained trunk with the
probe's head. theta(alpha) = (1 - alpha) theta_0 + alpha theta_1 sweeps from that probe (alpha = 0) to the
fine-tuned student (alpha = 1); in between it often keeps the probe's robustness and the fine-tune's fit. Which
alpha is chosen on validation only; the test split scores the chosen alpha once.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def starting_state(student: torch.nn.Module, weights: str, init_head: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """theta_0 of a run that started from a probe: the trunk as loaded from ``weights`` (model.weights) and the
    head the checkpoint recorded (``init_head``); the aux head as trained (it never scores)."""
    from trainer.backbones import load_backbone

    trunk = load_backbone(student.arch, weights).trunk.state_dict()
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    for k, v in trunk.items():
        state[f"trunk.{k}"] = v.to(state[f"trunk.{k}"].dtype)
    for k, v in init_head.items():
        state[f"main_head.{k}"] = v.to(state[f"main_head.{k}"])
    return state


def interpolate(theta0: dict[str, torch.Tensor], theta1: dict[str, torch.Tensor], alpha: float
                ) -> dict[str, torch.Tensor]:
    """(1 - alpha) theta0 + alpha theta1 for every floating tensor (weights and BatchNorm statistics); counters
    such as num_batches_tracked come from theta1."""
    if theta0.keys() != theta1.keys():
        raise ValueError(f"theta_0 and theta_1 hold different tensors: {sorted(theta0.keys() ^ theta1.keys())[:3]}")
    return {k: torch.lerp(theta0[k].to(v), v, alpha) if v.is_floating_point() else v.clone()
            for k, v in theta1.items()}


def sweep(student: torch.nn.Module, theta0: dict[str, torch.Tensor], score_val: Callable[[], float],
          score_test: Callable[[], float], *, alphas: tuple[float, ...] = ALPHAS,
          test_at_one: float | None = None) -> dict[str, Any]:
    """Score validation at every alpha, pick the best (the largest alpha on a tie: the fine-tuned end), and score
    test at that alpha only. ``student`` holds theta_1 and holds it again when this returns. ``test_at_one`` is
    the plain run's test score, reused when alpha = 1 wins."""
    theta1 = {k: v.detach().clone() for k, v in student.state_dict().items()}
    val = []
    try:
        for alpha in alphas:
            student.load_state_dict(interpolate(theta0, theta1, alpha))
            val.append(float(score_val()))
        best = max(range(len(alphas)), key=lambda i: (val[i], alphas[i]))
        alpha = alphas[best]
        if alpha == 1.0 and test_at_one is not None:
            test = test_at_one
        else:
            student.load_state_dict(interpolate(theta0, theta1, alpha))
            test = float(score_test())
    finally:
        student.load_state_dict(theta1)
    return {"alphas": list(alphas), "val_map": val, "alpha": alpha, "map": test}
