"""How a set is scored: one object from the command or a run's config down to the forward pass.

Training's validation, a study's tuning runs and curves, `bgsplit eval`, `mine`, `teacher-label` and the probes'
feature and embedding passes each used to retype the input size, batch, loader workers, resize and precision,
with their own defaults, so two passes over one split could score it two ways (issue 33). They all take this
one now; a pass that has a digest (mine's parts, a label set, stored embeddings) reads its size from it, so the
digest is the one it always was. Kept free of torch at import: a mining job pickles it to Ray tasks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from data.config import LoaderConfig

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ScoringConfig:
    """How a set is scored, one object from the command or a run's config down to the forward pass, so two passes
    over one set score it the same way; its defaults are evaluation's reference numbers (fp32)."""

    image_size: int
    batch_size: int = 256
    num_workers: int = 0
    resize_ratio: float = 1.15
    precision: str = "fp32"
    """run.precision's words; "fp32" (the reference numbers) unless a command or run asks otherwise."""

    @classmethod
    def of(cls, cfg: Any) -> ScoringConfig:
        """How a run's config scores a set: its size, data.batch_size and loader workers, its resize, and
        run.precision. Training's validation, a study's tuning runs, its curves, WiSE-FT's sweep and its final
        test score all take this one, so a study scores validation one way (issue 33: tuning scored at batch 128
        in fp32 while the curves of the same split ran at data.batch_size in run.precision, bf16 on a GPU)."""
        return cls(cfg.data.image_size, cfg.data.batch_size, cfg.data.num_workers, cfg.data.eval_resize_ratio,
                   cfg.run.precision)

    def loader(self) -> LoaderConfig:
        return LoaderConfig(image_size=self.image_size, batch_size=self.batch_size, num_workers=self.num_workers,
                            eval_resize_ratio=self.resize_ratio)

    def dtype(self, device: torch.device) -> torch.dtype | None:
        from trainer.engine import autocast_dtype

        return autocast_dtype(self.precision, device)
