"""Main-task imbalance losses and the auxiliary (teacher-mimicking) losses.

Main losses differ in how they treat the huge background class; each is a callable of
(logits, labels, epoch) built once from the class counts of the training set. The aux loss is the same whichever
main loss runs, as in the paper ("BG splitting can be combined with other imbalance methods").
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from trainer.config import LossConfig

MainLoss = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def class_balanced_weights(counts: list[int], beta: float) -> torch.Tensor:
    """Cui et al. 2019: weight (1 - beta) / (1 - beta^n_c), normalised to sum to the number of classes."""
    n = torch.tensor([max(c, 1) for c in counts], dtype=torch.float64)
    w = (1.0 - beta) / (1.0 - torch.pow(beta, n))
    return (w / w.sum() * len(counts)).float()


def ldam_margins(counts: list[int], max_margin: float) -> torch.Tensor:
    """Cao et al. 2019: margin proportional to n_c^(-1/4), the rarest class getting ``max_margin``."""
    m = 1.0 / torch.tensor([max(c, 1) for c in counts], dtype=torch.float64).pow(0.25)
    return (m * (max_margin / m.max())).float()


def class_balanced_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cui et al.'s class-balanced softmax loss: the batch mean of w_y * CE. Not ``F.cross_entropy(weight=w)``,
    which divides by the batch's weight sum: at 99.9% background most batches hold no positive, and that ratio
    then cancels the weights and leaves plain CE."""
    return (F.cross_entropy(logits.float(), labels, reduction="none") * weights.to(logits.device)[labels]).mean()


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return (-(1.0 - logp.exp()).pow(gamma) * logp).mean()


def build_main_loss(cfg: LossConfig, counts: list[int], drw_epoch: float) -> MainLoss:
    """``drw_epoch`` is the epoch at which LDAM's deferred re-weighting starts."""
    kind = cfg.main
    if kind == "ce":
        return lambda logits, labels, epoch: F.cross_entropy(logits.float(), labels)
    if kind == "class_balanced":
        weights = class_balanced_weights(counts, cfg.cb_beta)
        return lambda logits, labels, epoch: class_balanced_ce(logits, labels, weights)
    if kind == "focal":
        return lambda logits, labels, epoch: focal_loss(logits, labels, cfg.focal_gamma)
    if kind == "logit_adjust":
        total = sum(counts)
        log_prior = torch.tensor([math.log(max(c, 1) / total) for c in counts])
        return lambda logits, labels, epoch: F.cross_entropy(
            logits.float() + cfg.logit_adjust_tau * log_prior.to(logits.device), labels)
    if kind == "ldam_drw":
        margins = ldam_margins(counts, cfg.ldam_max_margin)
        weights = class_balanced_weights(counts, cfg.cb_beta)

        def ldam(logits: torch.Tensor, labels: torch.Tensor, epoch: float) -> torch.Tensor:
            # logits are scale * cosine from the normalised head: subtract the scaled margin of the true class
            margin = cfg.ldam_scale * margins.to(logits.device)[labels]
            adjusted = logits.float().scatter_add(1, labels[:, None], -margin[:, None])
            weight = weights.to(logits.device) if epoch >= drw_epoch else None
            return F.cross_entropy(adjusted, labels, weight=weight)

        return ldam
    raise ValueError(f"unknown main loss '{kind}'")


def aux_hard(aux_logits: torch.Tensor, teacher_idx: torch.Tensor) -> torch.Tensor:
    """The paper's aux loss: cross-entropy against the teacher's top-1 class."""
    return F.cross_entropy(aux_logits.float(), teacher_idx[:, 0])


def aux_soft(aux_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(teacher || student) at temperature tau, times tau^2 so gradients keep their scale (Hinton et al.)."""
    log_p = F.log_softmax(aux_logits.float() / tau, dim=1)
    log_q = F.log_softmax(teacher_logits.float() / tau, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * tau * tau


def aux_topk(aux_logits: torch.Tensor, teacher_idx: torch.Tensor, teacher_prob: torch.Tensor,
             tau: float) -> torch.Tensor:
    """Cross-entropy against the teacher's top-k probabilities renormalised over those k classes.

    Equal to KL to that truncated distribution up to its (constant) entropy; this is what a cache of top-k
    labels can supply without the teacher's full output.
    """
    q = teacher_prob.float()
    if tau != 1.0:
        q = q.clamp_min(1e-12).pow(1.0 / tau)
    q = q / q.sum(dim=1, keepdim=True)
    log_p = F.log_softmax(aux_logits.float() / tau, dim=1).gather(1, teacher_idx)
    return -(q * log_p).sum(dim=1).mean() * tau * tau
