"""Run under torchrun by tests/test_distributed.py: every rank builds the real Trainer from the same overrides,
fits a few steps and writes its own student's weights (before and after) and the loss of each step it took, so
the test can compare the ranks. Rank 0 alone writes the checkpoint, which is why this job exists.

Usage: torchrun --nproc_per_node 2 tests/ddp_sync_job.py OUT_DIR override...
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.config import load_config
from trainer.train import Trainer


def main(out: str, overrides: list[str]) -> None:
    trainer = Trainer.build(load_config(None, overrides))
    before = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
    losses: list[float] = []

    class Record:
        def after_step(self, trainer, step_losses):
            losses.append(float(step_losses["loss"]))  # this rank's own batch, before any all-reduce

    trainer.fit(callbacks=[Record()])
    after = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
    torch.save({"before": before, "after": after, "losses": losses, "world": trainer.world},
               os.path.join(out, f"rank{trainer.rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
