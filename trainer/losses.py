"""Main-task imbalance losses and the auxiliary (teacher-mimicking) losses, their settings, and the registries that
name them.

Main losses differ in how they treat the huge background class; each is a callable of (logits, labels, epoch) built
once from the class counts of the training set. The aux loss is the same whichever main loss runs, as in the paper
("BG splitting can be combined with other imbalance methods"). ``loss.main`` and ``loss.aux`` accept exactly the keys
of ``MAIN_LOSSES`` and ``AUX_LOSSES`` (LossConfig gives them as its fields' choices), so a new loss is a function and
an entry here, its settings fields of ``LossConfig`` (the ``loss.*`` keys). trainer.config imports this module and
stays cheap to load: torch is imported where a loss is built or computed, not when this module is.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


MainLoss = Callable[["torch.Tensor", "torch.Tensor", float], "torch.Tensor"]


def class_balanced_weights(counts: list[int], beta: float) -> torch.Tensor:
    """Cui et al. 2019: weight (1 - beta) / (1 - beta^n_c), normalised to sum to the number of classes."""
    import torch

    n = torch.tensor([max(c, 1) for c in counts], dtype=torch.float64)
    w = (1.0 - beta) / (1.0 - torch.pow(beta, n))
    return (w / w.sum() * len(counts)).float()


def ldam_margins(counts: list[int], max_margin: float) -> torch.Tensor:
    """Cao et al. 2019: margin proportional to n_c^(-1/4), the rarest class getting ``max_margin``."""
    import torch

    m = 1.0 / torch.tensor([max(c, 1) for c in counts], dtype=torch.float64).pow(0.25)
    return (m * (max_margin / m.max())).float()


def class_balanced_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cui et al.'s class-balanced softmax loss: the batch mean of w_y * CE. Not ``F.cross_entropy(weight=w)``,
    which divides by the batch's weight sum: at 99.9% background most batches hold no positive, and that ratio
    then cancels the weights and leaves plain CE."""
    import torch.nn.functional as F

    return (F.cross_entropy(logits.float(), labels, reduction="none") * weights.to(logits.device)[labels]).mean()


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    import torch.nn.functional as F

    logp = F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return (-(1.0 - logp.exp()).pow(gamma) * logp).mean()


def _ce(cfg: LossConfig, counts: list[int], drw_epoch: float) -> MainLoss:
    import torch.nn.functional as F

    return lambda logits, labels, epoch: F.cross_entropy(logits.float(), labels)


def _class_balanced(cfg: LossConfig, counts: list[int], drw_epoch: float) -> MainLoss:
    weights = class_balanced_weights(counts, cfg.cb_beta)
    return lambda logits, labels, epoch: class_balanced_ce(logits, labels, weights)


def _focal(cfg: LossConfig, counts: list[int], drw_epoch: float) -> MainLoss:
    return lambda logits, labels, epoch: focal_loss(logits, labels, cfg.focal_gamma)


def _ldam_drw(cfg: LossConfig, counts: list[int], drw_epoch: float) -> MainLoss:
    import torch.nn.functional as F

    margins = ldam_margins(counts, cfg.ldam_max_margin)
    weights = class_balanced_weights(counts, cfg.cb_beta)

    def ldam(logits: torch.Tensor, labels: torch.Tensor, epoch: float) -> torch.Tensor:
        # logits are scale * cosine from the normalised head: subtract the scaled margin of the true class
        margin = cfg.ldam_scale * margins.to(logits.device)[labels]
        adjusted = logits.float().scatter_add(1, labels[:, None], -margin[:, None])
        weight = weights.to(logits.device) if epoch >= drw_epoch else None
        return F.cross_entropy(adjusted, labels, weight=weight)

    return ldam


def _logit_adjust(cfg: LossConfig, counts: list[int], drw_epoch: float) -> MainLoss:
    import torch
    import torch.nn.functional as F

    total = sum(counts)
    log_prior = torch.tensor([math.log(max(c, 1) / total) for c in counts])
    return lambda logits, labels, epoch: F.cross_entropy(
        logits.float() + cfg.logit_adjust_tau * log_prior.to(logits.device), labels)


@dataclass(frozen=True)
class MainLossKind:
    """One ``loss.main`` value: how its loss is built, and what the student's main head must be for it."""

    build: Callable[[LossConfig, list[int], float], MainLoss]
    """(the loss settings, the training set's class counts, the epoch deferred re-weighting starts) -> the loss."""
    help: str
    """What it is, in a few words (the config reference lists it)."""
    cosine_head: bool = False
    """The loss reads the main logits as scale * cosine: the student gets a normalised main head (StudentSpec),
    which a probe-initialised head cannot be."""


def aux_hard(aux_logits: torch.Tensor, teacher_idx: torch.Tensor) -> torch.Tensor:
    """The paper's aux loss: cross-entropy against the teacher's top-1 class."""
    import torch.nn.functional as F

    return F.cross_entropy(aux_logits.float(), teacher_idx[:, 0])


def aux_soft(aux_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(teacher || student) at temperature tau, times tau^2 so gradients keep their scale (Hinton et al.)."""
    import torch.nn.functional as F

    log_p = F.log_softmax(aux_logits.float() / tau, dim=1)
    log_q = F.log_softmax(teacher_logits.float() / tau, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * tau * tau


def aux_topk(aux_logits: torch.Tensor, teacher_idx: torch.Tensor, teacher_prob: torch.Tensor,
             tau: float) -> torch.Tensor:
    """Cross-entropy against the teacher's top-k probabilities renormalised over those k classes.

    Equal to KL to that truncated distribution up to its (constant) entropy; this is what a cache of top-k
    labels can supply without the teacher's full output.
    """
    import torch.nn.functional as F

    q = teacher_prob.float()
    if tau != 1.0:
        q = q.clamp_min(1e-12).pow(1.0 / tau)
    q = q / q.sum(dim=1, keepdim=True)
    log_p = F.log_softmax(aux_logits.float() / tau, dim=1).gather(1, teacher_idx)
    return -(q * log_p).sum(dim=1).mean() * tau * tau


AuxLoss = Callable[["torch.Tensor", dict[str, "torch.Tensor"], "LossConfig"], "torch.Tensor"]
"""(the aux head's logits, the teacher's targets: teacher_idx and teacher_prob, its top-k, and teacher_logits when
the teacher ran online, the loss settings) -> the aux loss."""


@dataclass(frozen=True)
class AuxLossKind:
    """One ``loss.aux`` value: its loss, and whether it needs the teacher's whole output."""

    loss: AuxLoss
    help: str
    """What it is, in a few words (the config reference lists it)."""
    needs_logits: bool = False
    """It reads the teacher's full logits, which only an online teacher gives: cached labels and cached views
    store the top-k."""


MAIN_LOSSES: dict[str, MainLossKind] = {
    "ce": MainLossKind(_ce, "plain cross-entropy"),
    "class_balanced": MainLossKind(_class_balanced, "Cui et al.'s class-balanced cross-entropy (loss.cb_beta)"),
    "focal": MainLossKind(_focal, "focal loss (loss.focal_gamma)"),
    "ldam_drw": MainLossKind(_ldam_drw, "LDAM margins with deferred re-weighting, on a cosine main head "
                             "(loss.ldam_*, loss.drw_start_epoch)", cosine_head=True),
    "logit_adjust": MainLossKind(_logit_adjust, "cross-entropy on the logits plus tau x the log class prior "
                                 "(loss.logit_adjust_tau)"),
}
"""``loss.main`` -> its kind: the config accepts exactly these keys."""

AUX_LOSSES: dict[str, AuxLossKind] = {
    "hard": AuxLossKind(lambda aux, t, cfg: aux_hard(aux, t["teacher_idx"]),
                        "CE on the teacher's top-1, the paper"),
    "soft": AuxLossKind(lambda aux, t, cfg: aux_soft(aux, t["teacher_logits"], cfg.temperature),
                        "KL to the online teacher's whole output at loss.temperature", needs_logits=True),
    "topk": AuxLossKind(lambda aux, t, cfg: aux_topk(aux, t["teacher_idx"], t["teacher_prob"], cfg.temperature),
                        "KL on the top-k renormalised"),
}
"""``loss.aux`` -> its kind: the config accepts exactly these keys."""


@dataclass
class LossConfig:
    main: str = field(default="ce", metadata={"choices": MAIN_LOSSES})
    """The main head's loss: how the background class is weighed against the rare ones."""
    aux: str = field(default="hard", metadata={"choices": AUX_LOSSES})
    """The aux head's loss against the teacher's output."""
    aux_weight: float = 0.1
    """lambda; 0 disables the aux head's loss and gives the fine-tuning baseline."""
    temperature: float = 1.0
    """Soft aux-loss temperature tau (the loss is scaled by tau^2)."""
    cb_beta: float = 0.999
    """Class-balanced loss: beta of the effective number of samples."""
    focal_gamma: float = 2.0
    """Focal loss: gamma."""
    ldam_max_margin: float = 0.5
    """LDAM: the largest per-class margin (for the rarest class)."""
    ldam_scale: float = 30.0
    """LDAM: logit scale of the normalised classifier."""
    drw_start_epoch: float = 0.6
    """Deferred re-weighting starts at this fraction of training when < 1, else at this epoch."""
    logit_adjust_tau: float = 1.0
    """Logit adjustment: tau times log class prior added to the logits during training."""


def build_main_loss(cfg: LossConfig, counts: list[int], drw_epoch: float) -> MainLoss:
    """``drw_epoch`` is the epoch at which LDAM's deferred re-weighting starts."""
    kind = MAIN_LOSSES.get(cfg.main)
    if kind is None:
        raise ValueError(f"unknown main loss '{cfg.main}'")
    return kind.build(cfg, counts, drw_epoch)

