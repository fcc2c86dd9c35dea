"""model.head_init=probe (LP-FT as published): at step 0 the student's main head scores exactly what the tuned
probe on its own trunk's features scores, with or without a fixed background logit; the head it started from
travels in the checkpoint; bad settings are one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config
from trainer.checkpoint import load_checkpoint
from trainer.config import ConfigError
from trainer.head_init import check_positives, features_cache_dir, trunk_features
from trainer.probe import ProbeParams, fit_logistic, predict_logistic
from trainer.train import Trainer

GRID = ["model.head_init=probe", "model.probe_C=[0.001,0.1,10.0]", "model.probe_class_weight=[none,balanced]"]


def _student_probs(student, features: np.ndarray) -> np.ndarray:
    student.eval()
    with torch.no_grad():
        return torch.softmax(student.main_logits(torch.from_numpy(features)), dim=1).numpy()


@pytest.mark.parametrize("background", [None, 0.0, 2.5])
def test_step0_main_head_scores_equal_the_tuned_probe(tiny_sets, tmp_path, background):
    extra = [] if background is None else [f"model.fixed_background_logit={background}"]
    cfg = tiny_config(tiny_sets, tmp_path / "run", *GRID, *extra, "loss.aux_weight=0")
    trainer = Trainer.build(cfg)
    chosen = trainer.head.info
    assert len(chosen["grid"]) == 6 and (chosen["C"], chosen["class_weight"]) in {
        (r["C"], r["class_weight"]) for r in chosen["grid"]}
    assert chosen["val_map"] == max(r["score"] for r in chosen["grid"])
    # the probe refit here, from the same cached features, scores the validation set as the student's head does
    kwargs = {"cache_dir": features_cache_dir(cfg), "resize_ratio": cfg.data.eval_resize_ratio}
    train = trunk_features(trainer.student, cfg.data.train, cfg.data.image_size, **kwargs)
    val = trunk_features(trainer.student, cfg.data.val, cfg.data.image_size, **kwargs)
    probe = fit_logistic(train, ProbeParams(C=chosen["C"], class_weight=chosen["class_weight"]))
    np.testing.assert_allclose(_student_probs(trainer.student, val.features), predict_logistic(probe, val.features),
                               atol=1e-5)
    # and through the run's own evaluation path (images, eval transform, the whole student)
    assert trainer.validate()["map"] == pytest.approx(chosen["val_map"], abs=1e-5)
    assert trainer.head.weights["weight"].shape == trainer.student.main_head.weight.shape


def test_the_starting_head_travels_in_the_checkpoint_and_a_resume_keeps_it(tiny_sets, tmp_path):
    cfg = tiny_config(tiny_sets, tmp_path / "run", *GRID, "loss.aux_weight=0", "optim.epochs=1", "run.max_steps=3")
    trainer = Trainer.build(cfg)
    start = {k: v.clone() for k, v in trainer.student.main_head.state_dict().items()}
    summary = trainer.fit()
    state = load_checkpoint(summary["checkpoint"])
    assert set(state["init_head"]) == {"weight", "bias"}
    for k, v in start.items():
        assert torch.equal(state["init_head"][k], v)
        assert not torch.equal(state["student"][f"main_head.{k}"], v)  # the head trained on from there
    assert summary["head_init"]["C"] == trainer.head.info["C"]
    resumed = Trainer.build(tiny_config(tiny_sets, tmp_path / "run", *GRID, "loss.aux_weight=0", "optim.epochs=1",
                                        "run.max_steps=4", "run.resume=auto"))
    assert resumed.head.info == {}  # no probe fit on resume: the checkpoint holds the head
    resumed.maybe_resume()
    assert all(torch.equal(resumed.head.weights[k], v) for k, v in start.items())
    assert resumed.head.info["C"] == trainer.head.info["C"]


def test_bad_head_init_settings_are_one_line_errors(tiny_sets, tmp_path):
    with pytest.raises(ValueError, match="model.probe_val") as err:
        Trainer.build(tiny_config(tiny_sets, tmp_path / "a", *GRID, "data.val=", "loss.aux_weight=0"))
    assert "\n" not in str(err.value)
    for bad, word in ((["model.normalized_main_head=true"], "cosine"), (["loss.main=ldam_drw"], "cosine"),
                      (["model.probe_C=[]"], "probe_C"), (["model.probe_C=[0.1,-1]"], "probe_C"),
                      (["model.probe_class_weight=[balance]"], "probe_class_weight"),
                      (["model.head_init=probes"], "model.head_init")):
        with pytest.raises(ConfigError, match=word):
            tiny_config(tiny_sets, tmp_path / "b", *GRID, *bad)
    with pytest.raises(ValueError, match="no images of b.*model.head_init=random") as err:
        check_positives(np.array([0, 0, 1, 1, 0]), ["background", "a", "b"], "/sets/train")
    assert "\n" not in str(err.value) and "/sets/train" in str(err.value)
    # a single grid point needs no validation set
    trainer = Trainer.build(tiny_config(tiny_sets, tmp_path / "c", "model.head_init=probe", "model.probe_C=[0.1]",
                                        "model.probe_class_weight=[balanced]", "data.val=", "loss.aux_weight=0"))
    assert trainer.head.info["C"] == 0.1 and trainer.head.info["val_map"] is None


def test_wise_ft_alpha_zero_is_the_probe_and_one_the_fine_tuned_student(tiny_sets, tmp_path):
    from trainer.wise_ft import interpolate, starting_state, sweep

    cfg = tiny_config(tiny_sets, tmp_path / "run", *GRID, "loss.aux_weight=0", "optim.epochs=1", "run.max_steps=3")
    trainer = Trainer.build(cfg)
    student = trainer.student
    kwargs = {"cache_dir": features_cache_dir(cfg), "resize_ratio": cfg.data.eval_resize_ratio}
    val = trunk_features(student, cfg.data.val, cfg.data.image_size, **kwargs)
    at_start = _student_probs(student, val.features)
    trainer.fit()
    theta1 = {k: v.clone() for k, v in student.state_dict().items()}
    theta0 = starting_state(student, cfg.model.weights, trainer.head.weights)
    student.load_state_dict(theta0)
    np.testing.assert_allclose(_student_probs(student, trunk_features(student, cfg.data.val, cfg.data.image_size,
                                                                      **kwargs).features), at_start, atol=1e-6)
    half = interpolate(theta0, theta1, 0.5)
    k = "main_head.weight"
    torch.testing.assert_close(half[k], (theta0[k] + theta1[k]) / 2)
    assert torch.equal(interpolate(theta0, theta1, 1.0)[k], theta1[k])
    student.load_state_dict(theta1)
    # the sweep picks alpha on validation (the largest on a tie), scores test there once, and restores theta_1
    calls = []
    vals = iter([0.1, 0.3, 0.3, 0.2, 0.25])
    result = sweep(student, theta0, lambda: next(vals), lambda: calls.append(student.main_head.weight.clone()) or 0.7)
    assert result["alpha"] == 0.5 and result["map"] == 0.7 and len(calls) == 1
    torch.testing.assert_close(calls[0], half[k])
    assert torch.equal(student.state_dict()[k], theta1[k])
    ones = sweep(student, theta0, iter([0, 0, 0, 0, 1.0]).__next__, lambda: 1 / 0, test_at_one=0.42)
    assert ones["alpha"] == 1.0 and ones["map"] == 0.42  # alpha = 1 is the plain run: its test score is reused


def test_a_study_run_from_a_probe_reports_wise_ft_beside_the_plain_run(tiny_sets, tmp_path):
    from cluster.experiment_scorers import train_and_score

    cfg = tiny_config(tiny_sets, tmp_path / "final-x" / "seed0", *GRID, "loss.aux_weight=0", "optim.epochs=1",
                      "run.max_steps=3", "data.val=", f"model.probe_val={tiny_sets['test']}")
    result = train_and_score(cfg, tiny_sets["test"])
    wise = result["wise_ft"]
    assert wise["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0] and len(wise["val_map"]) == 5
    # here validation and test are one set, so the chosen alpha's test score is its validation score
    assert wise["map"] == pytest.approx(max(wise["val_map"]), abs=1e-6)
    assert wise["val_map"][-1] == pytest.approx(result["map"], abs=1e-6)  # alpha = 1 is the plain run
    assert wise["val_map"][0] == pytest.approx(Trainer.build(cfg).head.info["val_map"], abs=1e-5)  # 0: the probe


def test_a_study_stores_wise_ft_and_fills_it_in_from_the_checkpoint_of_a_run_stored_without(tiny_sets, tmp_path):
    import json

    from cluster.experiment_records import RunRecord
    from cluster.experiment_scorers import default_score
    from cluster.experiment_store import Runner

    cfg = tiny_config(tiny_sets, tmp_path / "m" / "final-x" / "seed0", *GRID, "loss.aux_weight=0", "optim.epochs=1",
                      "run.max_steps=3", "data.val=", f"model.probe_val={tiny_sets['test']}")
    record = RunRecord(setting="s", method="lp-ft", phase="final", seed=0, point={}, overrides=[])
    runner = Runner(score=default_score, code="c0", log=lambda _: None)
    first = runner.run(cfg, tiny_sets["test"], record).row()
    assert first["wise_ft"]["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0] and not first["reused"]
    stored_file = tmp_path / "m" / "final-x" / "seed0" / "experiment_result.json"
    stored = json.loads(stored_file.read_text())
    assert stored["result"]["wise_ft"] == first["wise_ft"]  # kept with the run, so a resumed study reports it
    del stored["result"]["wise_ft"]  # as a run scored before the study reported WiSE-FT was stored
    stored_file.write_text(json.dumps(stored))
    again = runner.run(cfg, tiny_sets["test"], record).row()
    assert again["reused"] and again["map"] == first["map"]
    assert again["wise_ft"]["val_map"] == pytest.approx(first["wise_ft"]["val_map"], abs=1e-6)
    assert json.loads(stored_file.read_text())["result"]["wise_ft"]["alpha"] == first["wise_ft"]["alpha"]
