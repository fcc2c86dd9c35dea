"""Tests for trainer.report: files, PNGs, JSON round-trip, lazy image loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.metrics import evaluate
from trainer.report import (
    plot_pr_curves,
    plot_top_scoring_grid,
    write_report,
)

NAMES = ["background", "fox", "owl", "yak"]


def _data(n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Small 3-rare-class problem; class 'yak' (3) has no positives on purpose."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(len(NAMES)), size=n)
    labels = rng.choice([0, 1, 2], size=n)
    labels[:2] = [1, 2]
    return probs, labels


class CountingImages:
    """Fake decoder that records which indices were requested."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, index: int) -> np.ndarray:
        self.calls.append(index)
        return np.full((12, 10, 3), index % 256, dtype=np.uint8)


def _assert_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 200 and image.height >= 150


def _no_temp_files(folder: Path) -> bool:
    return not any(p.name.startswith(".") or p.name.endswith((".tmp", ".partial")) for p in folder.iterdir())


def test_plot_pr_curves_writes_png(tmp_path: Path) -> None:
    probs, labels = _data()
    path = plot_pr_curves(probs, labels, NAMES, tmp_path / "pr_curves.png")
    _assert_png(path)
    assert _no_temp_files(tmp_path)


def test_top_scoring_grid_loads_only_shown_tiles(tmp_path: Path) -> None:
    probs, labels = _data()
    per_class = 3
    images = CountingImages()
    path = plot_top_scoring_grid(probs, labels, images, NAMES, tmp_path / "top_scoring.png", per_class=per_class)
    _assert_png(path)
    shown = {int(i) for c in range(1, len(NAMES)) for i in np.argsort(-probs[:, c], kind="stable")[:per_class]}
    assert set(images.calls) == shown
    assert len(images.calls) == len(set(images.calls))


def test_top_scoring_grid_with_fewer_images_than_tiles(tmp_path: Path) -> None:
    probs, labels = _data(n=2)
    images = CountingImages()
    plot_top_scoring_grid(probs, labels, images, NAMES, tmp_path / "grid.png", per_class=4)
    assert sorted(images.calls) == [0, 1]


def test_top_scoring_grid_rejects_bad_images_and_per_class(tmp_path: Path) -> None:
    probs, labels = _data(n=4)
    with pytest.raises(ValueError, match="uint8"):
        plot_top_scoring_grid(probs, labels, lambda i: np.zeros((3, 8, 8)), NAMES, tmp_path / "g.png", per_class=1)
    with pytest.raises(ValueError, match="per_class"):
        plot_top_scoring_grid(probs, labels, CountingImages(), NAMES, tmp_path / "g.png", per_class=0)


def test_write_report_round_trips_json_and_lists_classes(tmp_path: Path) -> None:
    probs, labels = _data()
    results = evaluate(probs, labels, NAMES, k=5)
    results["extra"] = {"seed": np.int64(3), "loss": np.float32(0.5), "curve": np.arange(3), "bad": float("inf")}
    json_path, md_path = write_report(results, tmp_path, "Run 1", extra_md="Some notes.")
    assert json_path == tmp_path / "report.json" and md_path == tmp_path / "report.md"
    assert _no_temp_files(tmp_path)
    assert json_path.stat().st_mode & 0o777 == 0o644

    loaded = json.loads(json_path.read_text())
    assert loaded["ap"]["yak"] is None
    assert loaded["ap"]["fox"] == pytest.approx(results["ap"]["fox"])
    assert loaded["classes_without_positives"] == ["yak"]
    assert loaded["extra"] == {"seed": 3, "loss": 0.5, "curve": [0, 1, 2], "bad": None}

    markdown = md_path.read_text()
    assert markdown.startswith("# Run 1\n")
    rows = [line for line in markdown.splitlines() if line.startswith("| ")][2:]
    assert [row.split("|")[1].strip() for row in rows] == ["fox", "owl", "yak"]
    assert "| yak | 0 | n/a |" in markdown
    assert "P@5" in markdown
    assert "Some notes." in markdown
    assert "pr_curves.png" not in markdown and "top_scoring.png" not in markdown


def test_write_report_links_existing_pngs(tmp_path: Path) -> None:
    probs, labels = _data()
    plot_pr_curves(probs, labels, NAMES, tmp_path / "pr_curves.png")
    (tmp_path / "top_scoring.png").write_bytes(b"placeholder")
    _, md_path = write_report(evaluate(probs, labels, NAMES), tmp_path, "Linked")
    markdown = md_path.read_text()
    assert "](pr_curves.png)" in markdown and "](top_scoring.png)" in markdown


def test_write_report_requires_evaluate_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lacks keys"):
        write_report({"ap": {}}, tmp_path, "x")


def test_summary_nan_never_leaks_into_json(tmp_path: Path) -> None:
    probs = np.full((3, 2), 0.5)
    results = evaluate(probs, np.zeros(3, dtype=int))
    json_path, _ = write_report(results, tmp_path, "empty")
    text = json_path.read_text()
    assert "NaN" not in text
    assert json.loads(text)["map"] is None
    assert math.isnan(results["map"])


def test_p_at_k_of_a_class_with_fewer_positives_than_k_shows_its_ceiling(tmp_path: Path) -> None:
    probs, labels = _data()
    results = evaluate(probs, labels, NAMES, k=len(labels))  # k above every class's count
    markdown = write_report(results, tmp_path, "Ceiling")[1].read_text()
    for name in ("fox", "owl"):
        n = results["positives"][name]
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))
        assert 0 < n < len(labels) and f"(max {n / len(labels):.3f})" in row
    assert "| yak | 0 | n/a | 0.0000 |" in markdown  # no positives: no ceiling to show
    assert "ceiling (positives / k)" in markdown
    few = write_report(evaluate(probs, labels, NAMES, k=1), tmp_path / "k1", "k=1")[1].read_text()
    assert "(max" not in few and "ceiling" not in few
