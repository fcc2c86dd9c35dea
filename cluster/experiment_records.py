"""The rows of results.json, typed: a run's ``RunRecord`` and a method's chosen point, its ``Choice``.

A run's record says which run it is, where it ran and what it scored; a choice is a method's point in one setting.
The driver and the run store build and read these; ``row()`` and ``as_dict()`` are the one place they become the
file's mappings, whose keys and values stay what they were before the rows were typed (committed studies, the docs'
tables and the summaries read the file by key)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunRecord:
    """One run of a study: planned with its identity (setting, method, phase, seed, point), completed by the run
    store with where it ran and what it scored."""

    setting: str
    method: str
    phase: str
    """tune (scored on the validation split) or final (scored on the test split, once)."""
    seed: int
    point: dict[str, Any]
    """The grid point it trains (dotted key -> value)."""
    overrides: list[str]
    """The method's overrides and the point's, as the run's config applies them."""
    deterministic: bool = False
    """A probe's final fit: deterministic, so its one score stands for every seed."""
    image_size: int | None = None
    """A trained run's input size (its checkpoint is evaluated at it); None for a probe fit."""
    run_dir: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    """What scoring returned, as stored beside the run: map, ap, seconds, started, curve, fit (and wise_ft for a
    final run that started from a probe); a result stored by an older version is kept as it was."""
    code: str | None = None
    """The fingerprint of the code that made the result."""
    reused: bool = False
    """Found stored by an earlier invocation, not run now."""

    @property
    def split(self) -> str:
        return "val" if self.phase == "tune" else "test"

    @property
    def map(self) -> float:
        return self.result["map"]

    def row(self) -> dict[str, Any]:
        """The run as a row of results.json's "runs"."""
        return {"setting": self.setting, "method": self.method, "phase": self.phase, "split": self.split,
                "seed": self.seed, "point": self.point, "overrides": self.overrides,
                **({"deterministic": True} if self.deterministic else {}),
                **({"image_size": self.image_size} if self.image_size is not None else {}),
                "run_dir": self.run_dir, **self.result, "code": self.code, "reused": self.reused}


@dataclass
class Choice:
    """A method's chosen point in one setting: the best validation mAP of its tuning runs, its only point, or (an
    ablation) the point of the method it ablates plus its own overrides."""

    point: dict[str, Any]
    overrides: list[str]
    val_map: float | None
    """The chosen point's validation mAP; None when nothing was tuned."""
    grid_size: int
    tuning_runs: int
    budget: int
    deterministic: bool = False
    """A probe's choice: its final fit stands for every seed."""
    best_config: str = ""
    """The chosen point's training config under best/, relative to the study folder."""
    ablation_of: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The choice as a value of results.json's "chosen"."""
        return {"point": self.point, "overrides": self.overrides, "val_map": self.val_map,
                "grid_size": self.grid_size, "tuning_runs": self.tuning_runs, "budget": self.budget,
                **({"deterministic": True} if self.deterministic else {}),
                **({"best_config": self.best_config} if self.best_config else {}),
                **({"ablation_of": self.ablation_of} if self.ablation_of else {})}
