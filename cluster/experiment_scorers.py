"""The real scorers of a study: train a config and score it once, or fit a probe on the teacher's features.

The work that costs time: a config trained from scratch, its final student scored once on the split its phase
allows (with WiSE-FT beside a run that started from a probe); a probe fit on the frozen teacher's cached features.
The driver takes them as parameters, so its logic is tested without them."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.shards import manifest_identity
from trainer.config import JobConfig


def train_and_score(cfg: JobConfig, eval_set: str, keep_checkpoint: bool = True) -> dict[str, Any]:
    """The real scorer: train ``cfg`` from scratch, score its final student on ``eval_set`` once. With data.val
    set (final runs of a study with curves), the validation mAP along the way comes back as ``curve``."""
    from data.shards import read_manifest
    from trainer.evaluate import evaluate_student
    from trainer.scoring import ScoringConfig
    from trainer.train import Trainer

    trainer = Trainer.build(cfg)
    trainer.fit()
    scoring = ScoringConfig.of(cfg)  # as the run's own validation scores: one way a study scores

    result = evaluate_student(trainer.student, read_manifest(eval_set), scoring, trainer.device, keep_predictions=True)
    out = {"map": result["map"], "ap": result["ap"], "scores": result["predictions"][0],
           "labels": result["predictions"][1],
           "curve": [[h["step"] / trainer.steps_per_epoch, h["val_map"]] for h in trainer.progress.history if "val_map" in h]}
    if trainer.head.weights and cfg.model.probe_val and keep_checkpoint:
        out["wise_ft"] = wise_ft_scores(trainer.student, cfg, trainer.head.weights, eval_set, result["map"],
                                        trainer.device)
    if not keep_checkpoint:  # tuning runs are never loaded again: 27 MB each is too much to keep x100
        shutil.rmtree(Path(cfg.run.out_dir) / "checkpoints", ignore_errors=True)
    return out


def wise_ft_scores(student: Any, cfg: JobConfig, init_head: dict[str, Any], eval_set: str, plain_map: float,
                   device: Any) -> dict[str, Any]:
    """A final run that started from a probe: WiSE-FT between that probe and the fine-tuned student, alpha chosen
    on validation (model.probe_val, the split the probe itself was chosen on), test scored at it once."""
    from data.shards import read_manifest
    from trainer.evaluate import evaluate_student
    from trainer.scoring import ScoringConfig
    from trainer.wise_ft import starting_state, sweep

    scoring = ScoringConfig.of(cfg)  # as the run's own validation scores: one way a study scores

    def score(location: str) -> float:
        return evaluate_student(student, read_manifest(location), scoring, device)["map"]

    theta0 = starting_state(student, cfg.model.weights, init_head)
    return sweep(student, theta0, lambda: score(cfg.model.probe_val), lambda: score(eval_set), test_at_one=plain_map)


def wise_ft_from_checkpoint(cfg: JobConfig, eval_set: str, plain_map: float) -> dict[str, Any] | None:
    """WiSE-FT of a stored final run from its kept checkpoint (a run scored before its study asked for it);
    None when the run kept no checkpoint with the head it started from."""
    import torch

    from trainer.checkpoint import latest_checkpoint, load_checkpoint
    from trainer.models import student_from_state

    url = latest_checkpoint(cfg.run.out_dir)
    state = load_checkpoint(url) if url else None
    if not state or not state.get("init_head"):
        return None
    return wise_ft_scores(student_from_state(state, url), cfg, state["init_head"], eval_set, plain_map,
                          torch.device("cpu"))


def default_score(cfg: JobConfig, eval_set: str) -> dict[str, Any]:
    """train_and_score, keeping the checkpoints of final runs only (run_setting puts them under final-*/)."""
    return train_and_score(cfg, eval_set, keep_checkpoint=f"{os.sep}final-" in cfg.run.out_dir)


@dataclass
class FeatureProbe:
    """The real probe scorer: the base config's teacher, features cached under ``cache_dir``."""

    teacher_name: str
    teacher_weights: str
    cache_dir: str
    resize_ratio: float = 1.15
    _teacher: Any = None

    def __call__(self, params: Any, train: str, eval_set: str) -> dict[str, Any]:
        from trainer.metrics import evaluate
        from trainer.models import build_teacher
        from trainer.probe import extract_features, probe_scores

        if self._teacher is None:
            self._teacher = build_teacher(self.teacher_name, self.teacher_weights)
        feats = [extract_features(self._teacher, loc, params.image_size, cache_dir=self.cache_dir,
                                  identity=manifest_identity(loc), resize_ratio=self.resize_ratio)
                 for loc in (train, eval_set)]
        probs, fit = probe_scores(feats[0], feats[1], params)
        result = evaluate(probs, feats[1].labels, feats[1].class_names)
        return {"map": result["map"], "ap": result["ap"], "fit": fit, "scores": probs, "labels": feats[1].labels}
