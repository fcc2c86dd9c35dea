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
    task = trainer.task

    def recording_task(batch, epoch):
        result = task(batch, epoch)
        losses.append(float(result["loss"].detach()))  # this rank's own batch, before any all-reduce
        return result

    trainer.task = recording_task
    trainer.fit()
    after = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
    torch.save({"before": before, "after": after, "losses": losses, "world": trainer.world},
               os.path.join(out, f"rank{trainer.rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
