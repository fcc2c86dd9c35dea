"""Where outputs may go: a relative path in a Ray job's temporary working dir is refused, not silently lost."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.runtime import RAY_JOB_ENV, output_location, ray_job_working_dir

JOB_DIR = "/tmp/ray/session_2026-12-03_12-27-24_098482_1/runtime_resources/working_dir_files/_ray_pkg_e0d4550517"
JOB_ENV = {RAY_JOB_ENV: json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_e0d4550517.zip"}})}


def test_a_submitted_job_with_an_uploaded_working_dir_is_recognised():
    assert ray_job_working_dir(JOB_DIR, JOB_ENV) == JOB_DIR
    assert ray_job_working_dir(JOB_DIR + "/sub", {}) == JOB_DIR + "/sub"  # the copy's path alone says so
    assert ray_job_working_dir("/home/me/project", JOB_ENV) is None  # a job without --working-dir runs in place
    assert ray_job_working_dir("/home/me/project", {}) is None
    no_upload = {RAY_JOB_ENV: json.dumps({"runtime_env": {}})}
    assert ray_job_working_dir("/home/me/_ray_pkg_notes", no_upload) is None
    assert ray_job_working_dir("/home/me", {RAY_JOB_ENV: "not json"}) is None


def test_relative_outputs_are_refused_in_the_temporary_copy_and_made_absolute_when_fanning_out():
    with pytest.raises(ValueError) as info:
        output_location("runs/x", "run.out_dir", cwd=JOB_DIR, environ=JOB_ENV)
    message = str(info.value)
    assert "\n" not in message and "run.out_dir=runs/x" in message and "ray stop" in message
    assert "run.out_dir=$PWD/runs/x" in message
    with pytest.raises(ValueError, match="git does not ignore"):
        output_location("artifacts/train", "data.train", cwd=JOB_DIR, environ=JOB_ENV, output=False)
    for kept in ("s3://bucket/runs/x", "/abs/runs/x", ""):
        assert output_location(kept, "run.out_dir", fan_out=True, cwd=JOB_DIR, environ=JOB_ENV) == kept
    assert output_location("runs/x", "--out", fan_out=True, cwd="/home/me", environ={}) == "/home/me/runs/x"
    assert output_location("runs/x", "--out", cwd="/home/me", environ={}) == "runs/x"  # one process: as given


def test_the_cli_refuses_a_relative_out_in_a_ray_jobs_copy(tmp_path, monkeypatch, capsys):
    from cluster.cli import main

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv(RAY_JOB_ENV, JOB_ENV[RAY_JOB_ENV])
    config = str(Path(__file__).resolve().parents[1] / "configs" / "debug.yaml")
    assert main(["train", "--config", config, "run.out_dir=runs/x"]) == 2
    assert main(["eval", "--checkpoint", "c", "--data", "d", "--out", "report"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("bgsplit: error:") and "temporary copy" in e for e in errors)
    assert "run.out_dir=runs/x" in errors[0] and "--out=report" in errors[1]
    assert not (copy / "report").exists()


def test_no_address_joins_a_local_cluster_only_if_it_answers(tmp_path):
    """A head killed by PID leaves its cluster file behind; Ray would wait minutes on it, we start a new one."""
    import socket

    from cluster.ray_train import cluster_file, local_address

    assert cluster_file({"RAY_TMPDIR": str(tmp_path)}) == str(tmp_path / "ray" / "ray_current_cluster")
    recorded = tmp_path / "ray_current_cluster"
    assert local_address(str(recorded)) == "local"  # no file: no cluster on this machine
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        address = f"127.0.0.1:{live.getsockname()[1]}"
        recorded.write_text(address + "\n")
        assert local_address(str(recorded)) == address
    assert local_address(str(recorded)) == "local"  # the same file once nothing listens there
    recorded.write_text("")
    assert local_address(str(recorded)) == "local"
