"""The BG-splitting task: student forward, teacher targets and the combined loss, returned as one dict.

The training loop only sees ``task(batch, epoch) -> {"loss", ...}``; whether the aux head is on (lambda > 0),
which main loss runs and whether the teacher is online or cached are decided here. ``student`` may be the
DDP/DeepSpeed-wrapped module; the teacher is a separate frozen module that no wrapper or optimiser ever sees.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainer.config import JobConfig
from trainer.losses import AUX_LOSSES, build_main_loss
from trainer.models import Teacher


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = logits.float().softmax(dim=1)
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return top.indices, top.values


class BGSplitTask:
    def __init__(self, student: nn.Module, teacher: Teacher | None, cfg: JobConfig, class_counts: list[int],
                 drw_epoch: float, teacher_dtype: torch.dtype | None = None):
        self.student = student
        self.teacher = teacher
        self.teacher_dtype = teacher_dtype
        self.cfg = cfg
        self.use_aux = cfg.loss.aux_weight > 0
        self.main_loss = build_main_loss(cfg.loss, class_counts, drw_epoch)
        if self.use_aux and cfg.teacher.mode == "online" and teacher is None:
            raise ValueError("loss.aux_weight > 0 with teacher.mode=online needs a teacher")
        self.aux_loss = AUX_LOSSES[cfg.loss.aux].loss
        if self.use_aux and cfg.teacher.mode == "cached" and AUX_LOSSES[cfg.loss.aux].needs_logits:
            raise ValueError(f"loss.aux={cfg.loss.aux} needs the teacher's full output: use teacher.mode=online, or "
                             "loss.aux=topk with cached labels")

    def teacher_targets(self, batch: dict[str, Any], prefix: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Cached labels (teacher-label, or cached views) from the batch; else the teacher's logits, from the
        student's frozen prefix when it is the teacher's own (``shared_prefix``), else from the image."""
        if "teacher_idx" in batch:
            return {"teacher_idx": batch["teacher_idx"], "teacher_prob": batch["teacher_prob"]}
        # the teacher is outside the engine, so it gets its own autocast (DeepSpeed does not cast it)
        image = batch["image"]
        with torch.autocast(image.device.type, dtype=self.teacher_dtype, enabled=self.teacher_dtype is not None):
            logits = (self.teacher(image) if prefix is None
                      else self.teacher.from_prefix(prefix, self.shared_prefix))
        idx, prob = teacher_topk(logits, self.cfg.teacher.topk)
        # inference-mode tensors cannot be saved for backward: clone them into normal tensors
        return {"teacher_idx": idx.clone(), "teacher_prob": prob.clone(), "teacher_logits": logits.clone()}

    shared_prefix: int = 0
    """N when the teacher runs only its upper stages on the student's frozen prefix (Trainer.build decides)."""

    def __call__(self, batch: dict[str, Any], epoch: float) -> dict[str, torch.Tensor]:
        if "prefix" in batch:  # a cached view: the frozen prefix ran when the cache was built
            out = self.student(prefix=batch["prefix"], with_aux=self.use_aux)
        else:
            share = self.use_aux and bool(self.shared_prefix)
            out = self.student(batch["image"], with_aux=self.use_aux, return_prefix=share)
        main_loss = self.main_loss(out["main"], batch["label"], epoch)
        result = {"main_logits": out["main"], "main_loss": main_loss}
        if not self.use_aux:
            result["loss"] = main_loss
            return result
        targets = self.teacher_targets(batch, out.get("prefix"))
        aux_loss = self.aux_loss(out["aux"], targets, self.cfg.loss)
        result.update(aux_logits=out["aux"], aux_loss=aux_loss, teacher_top1=targets["teacher_idx"][:, 0],
                      loss=main_loss + self.cfg.loss.aux_weight * aux_loss)
        return result
