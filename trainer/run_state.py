"""The pieces of a training run that a checkpoint keeps, each one ``state_dict``/``load_state_dict`` pair, so the
CheckpointManager can write and restore a run without knowing what a run holds (torchtitan's shape: pieces
register, the manager owns when and how).

A piece's ``state_dict`` is its share of state.pt (tensors and plain containers, read back with
``weights_only=True``); its optional ``meta_dict`` is its share of meta.json (what eval, mine and the study read
without touching tensors). Both are merged at the top level, under the names checkpoints have always used, so a
checkpoint written before pieces existed restores the same way. ``load_state_dict`` gets the merged dict.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from data.loader import SKIP_KINDS, LoaderState
from trainer.checkpoint import rng_state, set_rng_state
from trainer.schedule import set_schedule_step
from trainer.runtime import gather

log = logging.getLogger("bgsplit.train")


@dataclass
class RunProgress:
    """Where the run stands: the step, the data order's position, the LR schedule, and the counters the run's
    summary reports (validation history, skipped samples)."""

    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    step: int = 0
    loader: LoaderState = field(default_factory=LoaderState)
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: torch.Tensor = field(default_factory=lambda: torch.zeros(len(SKIP_KINDS), dtype=torch.long))
    skipped_by_shard: dict[str, dict[str, int]] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict()}

    def meta_dict(self) -> dict[str, Any]:
        return {"steps_per_epoch": self.steps_per_epoch, "history": self.history, "skipped": self.skipped.tolist(),
                "skipped_by_shard": self.skipped_by_shard}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.skipped = torch.tensor(state.get("skipped", [0] * len(SKIP_KINDS)), dtype=torch.long)
        self.skipped_by_shard = dict(state.get("skipped_by_shard", {}))

    def on_world_change(self, url: str, saved_world: int, world: int) -> None:
        """The data order and the step count depend on the world, so the interrupted epoch restarts in the new
        world's order (nothing of it is skipped; what was done of it is done again) with the step and the LR
        schedule at that epoch's start."""
        before, epoch = self.step, self.loader.epoch
        self.loader.load_state_dict({"epoch": epoch, "batches": 0})
        self.step = epoch * self.steps_per_epoch
        set_schedule_step(self.scheduler, self.step)
        log.warning("%s was written by %d ranks, this run has %d: restarting its epoch %d from the start in this "
                    "world's order (step %d -> %d)", url, saved_world, world, epoch, before, self.step)


@dataclass
class EngineState:
    """The student's full weights and the engine's own state (optimiser, loss scaler). Under DeepSpeed neither
    is loaded here: the CheckpointManager puts the weights in before the engine wraps the student and loads
    ZeRO's partitioned files itself."""

    engine: Any

    def state_dict(self) -> dict[str, Any]:
        return {"student": self.engine.student_state_dict(), "engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.engine.name != "ddp":
            return
        self.engine.student.load_state_dict(state["student"])
        # a checkpoint of the previous format kept the optimiser at the top level
        self.engine.load_state_dict(state["engine"] if "engine" in state else state)


@dataclass
class RngStates:
    """Every rank's generators (gathered: a collective); the same world gets each rank's own back, another world
    size starts every rank from rank 0's."""

    rank: int
    world: int

    def state_dict(self) -> dict[str, Any]:
        return {"rng": gather(rng_state())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        set_rng_state(rngs[self.rank] if len(rngs) == self.world else rngs[0])


@dataclass
class HeadStart:
    """model.head_init=probe: the probe the main head started from (``info``: C, weighting, validation mAP, grid)
    and the head's weights at step 0 (``weights``, WiSE-FT's theta_0), kept in every checkpoint so a resumed run
    and its scorers still have them."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"init_head": {k: v.detach().cpu() for k, v in self.weights.items()}} if self.weights else {}

    def meta_dict(self) -> dict[str, Any]:
        return {"head_init": self.info}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = dict(state.get("init_head") or {})
        self.info = dict(state.get("head_init") or {})
