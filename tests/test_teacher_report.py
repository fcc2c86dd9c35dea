"""`bgsplit teacher-report`: per input size, does the teacher split the set's background into stable groups?"""
from __future__ import annotations

import json

import numpy as np

from cluster.cli import main
from trainer.teacher_report import classes_covering, reading, report_size


def test_the_report_measures_the_teacher_on_the_background_at_each_size(tiny_sets, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["teacher-report", "--data", tiny_sets["train"], "--sizes", "32,96", "--images", "40", "--out",
                 str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["image_size"] for r in doc["rows"]] == [32, 96]
    for r in doc["rows"]:
        assert r["images"] == 40 and 1 <= r["classes_90"] <= 40
        assert 0 < r["top1"] <= 1 and 0 < r["entropy"] < r["uniform_entropy"]
        assert r["source_labels"] >= 2 and 0 <= r["nmi"] <= 1  # Fashion-MNIST's own classes of the background
    small, large = doc["rows"]
    assert large["top1"] > small["top1"]  # the teacher is surer at a size nearer its training resolution
    assert "| 96 px |" in (out / "results.md").read_text() and "| 96 px |" in capsys.readouterr().out


def test_coverage_and_readings_follow_their_definitions():
    assert classes_covering(np.array([0, 0, 0, 1, 2])) == 3  # 90% of 5 answers needs all three classes
    assert classes_covering(np.array([4] * 95 + [1] * 5)) == 1  # one class already holds 95%
    assert classes_covering(np.array([4] * 85 + [1] * 15)) == 2 and classes_covering(np.array([4] * 90 + [1] * 10)) == 1
    assert classes_covering(np.array([7] * 100)) == 1
    row = {"top1": 0.004, "agreement": 0.5, "nmi": 0.6}
    assert reading(row).startswith("barely")
    assert reading({**row, "top1": 0.8, "agreement": 0.27}).startswith("unstable")
    assert reading({**row, "top1": 0.3}).startswith("splits it into")
    assert reading({**row, "top1": 0.3, "nmi": 0.05}).startswith("splits it, but not")


def test_bad_report_inputs_are_one_line_errors(tiny_sets, tmp_path, capsys):
    assert main(["teacher-report", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nothing" in err
    assert main(["teacher-report", "--data", tiny_sets["train"], "--sizes", "64,big", "--out", str(tmp_path)]) == 2
    assert "--sizes" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def _png(value: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_teacher_that_answers_by_brightness_is_fully_stable_and_follows_the_source_labels():
    """A stand-in teacher whose answer is the image's mean brightness bucket: every crop of a flat image gets the
    same answer (agreement 1), two buckets hold every answer, and the answers are the source labels (NMI 1)."""
    import torch

    def teacher(x: torch.Tensor) -> torch.Tensor:
        bucket = (x.float().mean(dim=(1, 2, 3)) > 127).long()
        return torch.nn.functional.one_hot(bucket, 10).float() * 20.0

    encoded = [_png(30)] * 6 + [_png(220)] * 4
    row = report_size(teacher, encoded, ["dark"] * 6 + ["light"] * 4, 32, batch_size=3)
    assert row["agreement"] == 1.0 and row["classes_90"] == 2 and row["teacher_classes"] == 10
    assert row["top1"] > 0.99 and row["entropy"] < 0.01 and abs(row["nmi"] - 1.0) < 1e-9
    assert row["source_labels"] == 2
