"""The study's cost: the per-run model, the estimate before the first run, its correction by finished runs, and
the plan's shapes against the runs a study really makes. The calibration against a real study's time is checked
in test_experiment's --quick run (slow)."""
from __future__ import annotations

import pytest

from cluster.study_cost import Progress, Rates, RunShape, duration_text, predict

RATES = Rates(image_size=64, batch=32, setup_s=2.0, step_s=0.5, forward_s=0.01, views_s=30.0, fit_s=3.0)


def test_a_trained_run_costs_its_setup_steps_scoring_and_the_views_its_set_builds_first():
    run = RunShape("A", "bg-split", "tune", "train", steps=100, batch=32, image_size=64, scored=1000)
    assert predict(run, RATES) == pytest.approx(2.0 + 100 * 0.5 + 1000 * 0.01)
    first = RunShape("A", "bg-split", "tune", "train", steps=100, batch=64, image_size=128, scored=1000,
                     builds_views=True)
    # twice the batch: twice a step; twice the size: four times a forward
    assert predict(first, RATES) == pytest.approx(2.0 + 100 * 1.0 + 1000 * 0.04 + 30.0)


def test_a_probe_costs_its_new_features_and_a_logistic_fit_but_no_fit_for_knn():
    assert predict(RunShape("A", "lp", "tune", "probe", image_size=64, scored=500, logistic=True), RATES) == \
        pytest.approx(500 * 0.01 + 3.0)
    assert predict(RunShape("A", "knn", "tune", "probe", image_size=64, scored=0), RATES) == 0.0


def _shapes():
    return [*(RunShape("A", "ft", "tune", "train", steps=10, batch=32, image_size=64, scored=100) for _ in range(3)),
            *(RunShape("A", "ft", "final", "train", steps=40, batch=32, image_size=64, scored=200) for _ in range(2)),
            RunShape("A", "lp", "final", "probe", image_size=64, scored=300, logistic=True)]


def test_the_plan_states_the_estimate_before_the_first_run_and_finished_runs_rescale_the_rest():
    lines: list[str] = []
    progress = Progress(_shapes(), RATES, lines.append)
    progress.start()
    tune, final, probe = 2 + 5 + 1, 2 + 20 + 2, 3 + 3
    assert progress.seconds_left() == pytest.approx(3 * tune + 2 * final + probe)
    assert lines[0].startswith("plan: 6 runs: 3 tuning and 2 final training runs, 1 probe fits")
    assert f"estimate: about {duration_text(3 * tune + 2 * final + probe)} on this machine" in lines[1]
    # the first tuning run took twice the model's time: every trained run left is predicted twice as long
    progress.record({"setting": "A", "method": "ft", "phase": "tune", "seconds": 2 * tune})
    assert progress.seconds_left() == pytest.approx(2 * (2 * tune + 2 * final) + probe)
    assert lines[-1] == f"  [1 run(s) done, 5 to do: about {duration_text(2 * (2 * tune + 2 * final) + probe)} left]"
    # a reused run leaves the count and says nothing of the time
    progress.record({"setting": "A", "method": "ft", "phase": "tune", "seconds": 0.1, "reused": True})
    assert progress.seconds_left() == pytest.approx(2 * (tune + 2 * final) + probe)
    assert lines[-1].startswith("  [1 run(s) done, 1 reused, 4 to do:")


def test_without_rates_the_time_left_is_each_kinds_measured_mean_and_unknown_before_a_trained_run():
    lines: list[str] = []
    progress = Progress(_shapes(), None, lines.append)
    progress.start()
    assert progress.seconds_left() is None and "from the first trained run on" in lines[-1]
    progress.record({"setting": "A", "method": "lp", "phase": "final", "seconds": 4.0})
    assert progress.seconds_left() is None  # a probe fit's seconds say nothing of a training run's
    progress.record({"setting": "A", "method": "ft", "phase": "tune", "seconds": 30.0})
    assert progress.seconds_left() == pytest.approx(4 * 30.0)


def test_stored_runs_are_named_and_left_out_of_the_estimate():
    shapes = [RunShape("A", "ft", "tune", "train", steps=10, batch=32, image_size=64, scored=100, stored=True),
              RunShape("A", "ft", "final", "train", steps=10, batch=32, image_size=64, scored=100)]
    lines: list[str] = []
    Progress(shapes, RATES, lines.append).start()
    assert "1 found stored by an earlier invocation" in lines[0]
    assert f"about {duration_text(predict(shapes[1], RATES))} on this machine for the 1 runs not stored" in lines[1]


def test_durations_read_as_a_person_would_say_them():
    assert [duration_text(x) for x in (42, 600, 11_000)] == ["42 s", "10 min", "3 h 03 min"]
