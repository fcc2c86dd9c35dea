"""What a training run tells whoever reads it: metrics.jsonl and TensorBoard a log interval, the progress bar, and
the two lines it ends with (its result as JSON, and where its outputs went), the same in one process, under
torchrun and on Ray."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from data import remote, storage


def result_line(summary: dict[str, Any]) -> str:
    """A run's result as one JSON line, the same keys in one process, under torchrun and on Ray (`bgsplit
    train [--ray]`), so a script reads one format whichever way the run went."""
    val = summary.get("val") or {}
    return json.dumps({"checkpoint": summary["checkpoint"], "steps": summary["steps"], "world": summary.get("world"),
                       "engine": summary.get("engine"), "val_map": val.get("map"),
                       "resumed_from": summary.get("resumed_from"), "skipped": summary.get("skipped")})


def run_folder_line(out_dir: str, probe: bool = False) -> str:
    """The last line of a run: where its outputs went, so that nobody has to guess a folder (under Ray the
    working directory is a temporary copy), with the forms eval and mine take for its checkpoint. A probe fit
    logs no metrics: summary.json and its one checkpoint."""
    where = out_dir if remote.is_remote(out_dir) else os.path.abspath(out_dir)
    board = "" if remote.is_remote(out_dir) else f", tensorboard/ (tensorboard --logdir {where}/tensorboard)"
    logs = "" if probe else f", metrics.jsonl{board}"
    return (f"run folder {where}: summary.json{logs}, checkpoints/; give eval and mine "
            f"--checkpoint {where} (its newest checkpoint)")


class MetricsLogger:
    """metrics.jsonl (one JSON object a log interval) plus TensorBoard scalars when tensorboard is installed.

    A fresh run starts the file anew (a rerun into the same run.out_dir must not read as one long run); a resumed
    run appends to what its earlier attempts wrote. On object storage, where nothing can be appended, the file
    is written whole at the end, the earlier attempts' lines first."""

    def __init__(self, out_dir: str, append: bool = False):
        self.remote = remote.is_remote(out_dir)
        self.path = storage.join(out_dir, "metrics.jsonl")
        self.lines: list[str] = []
        if self.remote and append and storage.exists(self.path):
            self.lines = storage.read_bytes(self.path).decode().splitlines()
        self.file = None if self.remote else open(self.path, "a" if append else "w")
        self.tb = None
        if not self.remote:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                self.tb = None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        line = json.dumps({"step": step, "time": time.time(), **scalars})
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        else:
            self.lines.append(line)
        if self.tb:
            for k, v in scalars.items():
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        else:
            storage.write_bytes(self.path, ("\n".join(self.lines) + "\n").encode())
        if self.tb:
            self.tb.close()


class NoLogger:
    """Ranks other than 0 log nothing: one metrics file per run."""

    def log(self, step: int, scalars: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, initial: int, enabled: bool):
    """A bar on a terminal; in a log file or under `ray job submit`, a line every ~10 s (data.progress)."""
    if not enabled:
        return _NoBar()
    from data.progress import progress

    return progress(total, initial=initial, unit="step", desc="train")
