"""One rule for a run's cache folders (its trunk's features, its cached prefix views): the config's, else beside
the run, else this machine's ~/.cache/bgsplit for a run that writes to object storage."""
from __future__ import annotations

import os

from trainer.config import load_config
from trainer.head_init import features_cache_dir
from trainer.runtime import run_cache
from trainer.views import cache_folder


def test_the_given_folder_then_beside_the_run_then_the_machine_cache_for_a_remote_run(tmp_path, monkeypatch):
    assert run_cache("/given", "runs/a", "views") == "/given"
    assert run_cache("", "runs/a", "views") == os.path.join("runs/a", "views")
    monkeypatch.delenv("BGSPLIT_CACHE_DIR", raising=False)
    assert run_cache("", "s3://bucket/runs/a", "features") == os.path.join(
        os.path.expanduser("~"), ".cache", "bgsplit", "features")
    monkeypatch.setenv("BGSPLIT_CACHE_DIR", str(tmp_path))  # the one cache the positives' copies use too
    assert run_cache("", "s3://bucket/runs/a", "features") == str(tmp_path / "features")


def test_the_features_and_the_views_of_a_run_follow_the_same_rule(tmp_path):
    for out in (str(tmp_path / "run"), "s3://bucket/run"):
        cfg = load_config(None, [f"run.out_dir={out}"])
        assert features_cache_dir(cfg) == run_cache("", out, "features")
        assert cache_folder(cfg) == run_cache("", out, "views")
    given = load_config(None, ["model.probe_cache_dir=/f", "views.cache_dir=/v"])
    assert (features_cache_dir(given), cache_folder(given)) == ("/f", "/v")
