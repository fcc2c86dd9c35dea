"""Human-readable evaluation reports: plots, Markdown, JSON and method tables.

The numbers come from ``trainer.metrics``; this module only presents them.
Every file is written through the one atomic write (``data.storage.atomic_write``)
so an interrupted run or a concurrent reader never sees a half-written report
or a truncated PNG.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

# Headless training machines have no display; Agg must be chosen before pyplot loads.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data import storage  # noqa: E402
from trainer.metrics import (  # noqa: E402
    average_precision,
    check_eval_inputs,
    pr_curve,
    rare_class_names,
)

__all__ = [
    "plot_pr_curves",
    "plot_top_scoring_grid",
    "write_report",
    "PR_CURVES_PNG",
    "TOP_SCORING_PNG",
]

PR_CURVES_PNG = "pr_curves.png"
TOP_SCORING_PNG = "top_scoring.png"

_CORRECT_COLOR = "#2ca02c"
_WRONG_COLOR = "#d62728"


# --------------------------------------------------------------------------- files


def _save_figure(fig: plt.Figure, path: Path) -> Path:
    """Save a figure atomically as PNG and always release it (pyplot keeps figures alive)."""
    try:
        with storage.atomic_write(str(path)) as f:
            fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
        return Path(path)
    finally:
        plt.close(fig)


def _jsonable(value: Any) -> Any:
    """Recursively turn numpy/Path values into JSON types and NaN/inf into null.

    JSON has no NaN; null keeps the file valid for strict parsers while
    still saying "no value" (e.g. AP of a class without positives).
    """
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    raise ValueError(f"cannot serialise {type(value).__name__} to JSON")


# --------------------------------------------------------------------------- plots


def plot_pr_curves(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None,
    path: str | os.PathLike,
) -> Path:
    """One PNG with a precision-recall curve per rare class, AP in the legend.

    Classes without positives have no curve; they are named in the title
    so their absence is visible rather than silent.
    """
    probs, labels = check_eval_inputs(probs, labels)
    names = rare_class_names(class_names, probs.shape[1])
    fig, ax = plt.subplots(figsize=(7, 5))
    skipped = []
    for column, name in enumerate(names, start=1):
        targets = labels == column
        if not targets.any():
            skipped.append(name)
            continue
        precision, recall = pr_curve(probs[:, column], targets)
        ap = average_precision(probs[:, column], targets)
        ax.plot(recall, precision, drawstyle="steps-post", label=f"{name} (AP {ap:.3f})")
    _style_pr_axes(ax, skipped)
    return _save_figure(fig, Path(path))


def _style_pr_axes(ax: plt.Axes, skipped: list[str]) -> None:
    """Axes limits, labels and an outside legend so many classes stay readable."""
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    title = "Precision-recall per rare class"
    if skipped:
        title += f"\nno positives (no curve): {', '.join(skipped)}"
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)


def _check_tile(image: Any, index: int) -> np.ndarray:
    """Reject images imshow would misrender (e.g. float 0..255 or CHW tensors)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"get_image({index}) must return HxWx3 uint8, got {image.dtype} {image.shape}")
    return image


def _top_indices(scores: np.ndarray, count: int) -> np.ndarray:
    """Highest scores first; ties go to the lower index, as in precision_at_k."""
    return np.argsort(-scores, kind="stable")[:count]


def plot_top_scoring_grid(
    probs: np.ndarray,
    labels: np.ndarray,
    images: Callable[[int], np.ndarray],
    class_names: Sequence[str] | None,
    path: str | os.PathLike,
    per_class: int = 8,
) -> Path:
    """Grid of the highest-scoring evaluation images per rare class.

    One row per rare class; each tile is framed green when the image truly
    is that class and red when not, with its score as the title. ``images``
    is called lazily and at most once per distinct index shown, so the
    caller decodes only the tiles that appear (an evaluation set may hold
    hundreds of thousands of images).
    """
    probs, labels = check_eval_inputs(probs, labels)
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    names = rare_class_names(class_names, probs.shape[1])
    cache: dict[int, np.ndarray] = {}

    def fetch(index: int) -> np.ndarray:
        if index not in cache:
            cache[index] = _check_tile(images(index), index)
        return cache[index]

    fig, axes = plt.subplots(
        len(names), per_class, figsize=(1.6 * per_class, 1.8 * len(names)), squeeze=False
    )
    for row, name in enumerate(names):
        column = row + 1
        top = _top_indices(probs[:, column], per_class)
        for slot, ax in enumerate(axes[row]):
            if slot < top.size:
                index = int(top[slot])
                _draw_tile(ax, fetch(index), probs[index, column], labels[index] == column)
            else:
                ax.axis("off")
        axes[row][0].set_ylabel(name, fontsize=8)
    from matplotlib.patches import Patch

    # without a key the two frame colours are a guess; the title above each tile is its score for the row's class
    fig.legend(handles=[Patch(facecolor="none", edgecolor=_CORRECT_COLOR, linewidth=3, label="is the row's class"),
                        Patch(facecolor="none", edgecolor=_WRONG_COLOR, linewidth=3,
                              label="is not (background or another class)")],
               loc="lower center", ncol=2, fontsize=7, frameon=False, title="frame: tile title = score",
               title_fontsize=7)
    fig.subplots_adjust(bottom=0.1 + 0.1 / len(names))
    return _save_figure(fig, Path(path))


def _draw_tile(ax: plt.Axes, image: np.ndarray, score: float, correct: bool) -> None:
    """One image with a coloured frame and its score; ticks off, spines kept as the frame."""
    color = _CORRECT_COLOR if correct else _WRONG_COLOR
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color(color)
        spine.set_linewidth(4)
    ax.set_title(f"{score:.3f}", fontsize=7, color=color)


# --------------------------------------------------------------------------- report


_REQUIRED_RESULT_KEYS = ("ap", "precision_at_k", "positives", "map", "k")


def _format_fraction(value: Any) -> str:
    """Four decimals, or 'n/a' for missing/NaN values (classes without positives)."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.4f}"


def _md_cell(text: Any) -> str:
    """Escape pipes so a class name cannot split a Markdown table cell."""
    return str(text).replace("|", "\\|")


def _results_markdown(results: Mapping[str, Any]) -> list[str]:
    """Summary bullets and the per-class table for an ``evaluate`` result."""
    names = list(results["ap"])
    missing = list(results.get("classes_without_positives", []))
    lines = []
    if "num_images" in results:
        lines.append(f"- Images evaluated: {results['num_images']}")
    counted = len(names) - len(missing)
    lines.append(f"- mAP over {counted} of {len(names)} rare classes: {_format_fraction(results['map'])}")
    if missing:
        lines.append(f"- Classes without positives (no AP, excluded from mAP): {', '.join(map(str, missing))}")
    lines += ["", f"| class | positives | AP | P@{results['k']} |", "| --- | ---: | ---: | ---: |"]
    for name in names:
        cells = [
            _md_cell(name),
            str(results["positives"].get(name, "n/a")),
            _format_fraction(results["ap"][name]),
            _p_at_k_cell(results["precision_at_k"].get(name), results["positives"].get(name), results["k"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(isinstance(n, int) and 0 < n < results["k"] for n in results["positives"].values()):
        lines += ["", f"P@{results['k']} of a class with fewer than {results['k']} positives cannot reach 1: its "
                  "ceiling (positives / k) is shown beside it."]
    return lines


def _p_at_k_cell(value: float | None, positives: int | None, k: int) -> str:
    """A class with 30 positives has P@100 at most 0.30: without its ceiling a perfect ranking reads as poor."""
    cell = _format_fraction(value)
    if isinstance(positives, int) and 0 < positives < k:
        cell += f" (max {positives / k:.3f})"
    return cell


def _figure_links(out_dir: Path) -> list[str]:
    """Links to the standard PNGs, only for those actually present."""
    figures = [(PR_CURVES_PNG, "Precision-recall curves"), (TOP_SCORING_PNG, "Top-scoring images")]
    lines = []
    for filename, caption in figures:
        if (out_dir / filename).is_file():
            lines += ["", f"## {caption}", "", f"![{caption}]({filename})"]
    return lines


def write_report(
    results: Mapping[str, Any],
    out_dir: str | os.PathLike,
    title: str,
    extra_md: str = "",
) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; return their paths.

    ``results`` is an ``evaluate`` dict, possibly with extra keys (they go
    to the JSON only). The JSON is strict (NaN becomes null) so any tool can
    read it back; the Markdown is for people browsing a run folder.
    """
    missing = [key for key in _REQUIRED_RESULT_KEYS if key not in results]
    if missing:
        raise ValueError(f"results lacks keys: {', '.join(missing)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n"
    json_path = out_dir / "report.json"
    storage.write_bytes(str(json_path), payload.encode("utf-8"))
    lines = [f"# {title}", ""] + _results_markdown(results) + _figure_links(out_dir)
    if extra_md:
        lines += ["", extra_md.rstrip("\n")]
    markdown = "\n".join(lines) + "\n"
    md_path = out_dir / "report.md"
    storage.write_bytes(str(md_path), markdown.encode("utf-8"))
    return json_path, md_path


# --------------------------------------------------------------------------- method tables
