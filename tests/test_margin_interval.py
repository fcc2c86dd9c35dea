"""The validation margin's interval (issue 32): a paired, class-stratified bootstrap over the validation images."""
import numpy as np, pytest
from trainer.metrics import map_difference_interval, evaluate

def _set(n_pos, n_bg=200, k=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.zeros(n_bg, int), *[np.full(n_pos, c) for c in range(1, k + 1)]])
    return rng, labels

def test_diff_is_the_map_difference_and_a_clear_winner_has_an_interval_above_zero():
    rng, y = _set(100)
    good = rng.random((len(y), 4)); good[np.arange(len(y)), y] += 1.0
    bad = rng.random((len(y), 4)); bad[np.arange(len(y)), y] += 0.1
    r = map_difference_interval(good, bad, y, resamples=300)
    assert r["diff"] == pytest.approx(evaluate(good, y)["map"] - evaluate(bad, y)["map"])
    assert 0 < r["low"] <= r["diff"] <= r["high"]

def test_three_positives_a_class_give_a_wide_interval_where_a_hundred_give_a_narrow_one():
    widths = {}
    for n in (3, 100):
        rng, y = _set(n, seed=n)
        a = rng.random((len(y), 4)); a[np.arange(len(y)), y] += 0.3
        b = rng.random((len(y), 4)); b[np.arange(len(y)), y] += 0.25
        r = map_difference_interval(a, b, y, resamples=300)
        widths[n] = r["high"] - r["low"]
    assert widths[3] > 3 * widths[100]

def test_identical_scores_give_zero_and_mismatched_shapes_are_refused():
    rng, y = _set(5)
    a = rng.random((len(y), 4))
    assert map_difference_interval(a, a, y, resamples=50) == {"diff": 0.0, "low": 0.0, "high": 0.0, "resamples": 50}
    with pytest.raises(ValueError, match="the same images"):
        map_difference_interval(a, a[:, :3], y, resamples=10)
