"""Learning-rate schedule as a pure function of the optimiser step: linear warm-up, then step or cosine.

The paper's recipe: 1 epoch of warm-up from 0.001 to 0.01, then x0.1 at epochs 21/41/61/81 of 90.
"""
from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig


def lr_at(step: int, steps_per_epoch: int, cfg: OptimConfig) -> float:
    epoch = step / max(steps_per_epoch, 1)
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * epoch / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
        progress = min((epoch - cfg.warmup_epochs) / span, 1.0)
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (so it has state_dict/load_state_dict) whose factor makes the LR equal ``lr_at``, times each
    parameter group's ``lr_mult`` (optim.trunk_lr_mult); the trunk group's is 0 during LP-FT's probe phase."""
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * group.get("lr_mult", 1.0)
        group["initial_lr"] = group["lr"]

    def factor(step: int) -> float:
        return lr_at(step, steps_per_epoch, cfg) / cfg.lr

    def trunk_factor(step: int) -> float:
        return 0.0 if in_probe_phase(step, steps_per_epoch, cfg) else factor(step)

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [trunk_factor if g.get("role") == "trunk" else factor for g in optimizer.param_groups])


def in_probe_phase(step: int, steps_per_epoch: int, cfg: OptimConfig) -> bool:
    """LP-FT's first phase (optim.lp_epochs): the trunk is held fixed while the heads train."""
    return step < cfg.lp_epochs * max(steps_per_epoch, 1)


def set_schedule_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a LambdaLR at ``step`` (the LR it would have there), as if it had been stepped that often."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
