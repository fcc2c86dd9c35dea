"""Each small contract answered once (issue 33, item 4): a guard per contract that fails when a second copy
comes back, and the unified behaviour it stands for."""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest

from data import storage

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("data", "trainer", "cluster")


def _sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for d in PRODUCT for p in sorted((ROOT / d).rglob("*.py"))}


def _where(pattern: str) -> set[str]:
    return {name for name, text in _sources().items() if re.search(pattern, text, re.M)}


# ------------------------------------------------------------------------------------------------ one atomic write


def test_files_are_published_only_by_the_storage_layer():
    """A file appears whole through data.storage.atomic_write / write_bytes; the one other rename is the views
    cache's folder (a directory made visible at once, which no file write can do)."""
    assert _where(r"\bos\.replace\(") == {"data/storage.py", "trainer/views.py"}
    assert _where(r"os\.replace\(partial, folder\)") == {"trainer/views.py"}
    assert _where(r"mkstemp|NamedTemporaryFile") == {"data/storage.py"}


def test_reports_and_scores_meet_a_full_disk_as_every_write_does(tmp_path, monkeypatch):
    """The report's JSON, Markdown and plots go through the one write: a full disk is its one DiskFull line and
    leaves neither the file nor a temporary copy."""
    from trainer.metrics import evaluate
    from trainer.report import plot_pr_curves, write_report

    def sync(f, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage, "_sync", sync)
    rng = np.random.default_rng(0)
    probs, labels = rng.dirichlet(np.ones(3), 20), np.arange(20) % 3
    with pytest.raises(storage.DiskFull, match="pr.png"):
        plot_pr_curves(probs, labels, ["bg", "a", "b"], tmp_path / "pr.png")
    with pytest.raises(storage.DiskFull, match="report.json"):
        write_report(evaluate(probs, labels, ["bg", "a", "b"]), tmp_path, "t")
    assert os.listdir(tmp_path) == []

