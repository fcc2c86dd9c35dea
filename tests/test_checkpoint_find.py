"""A checkpoint by run: a run folder, RUN/latest or RUN/checkpoints/latest is the run's newest complete
checkpoint (the step number depends on the sampling, so a copied command need not know it); a wrong step names
the checkpoints that exist."""
from __future__ import annotations

import shutil

import pytest

from conftest import tiny_config
from trainer.checkpoint import (INDEX, CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, read_meta,
                               resolve)
from trainer.checkpoint_manager import CheckpointManager, resume_rule
from trainer.models import StudentSpec
from cluster.cli import main
from trainer.train import train


@pytest.fixture(scope="module")
def run_dir(tiny_sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("found") / "run"
    train(tiny_config(tiny_sets, out, "run.max_steps=3", "run.checkpoint_every=1", "run.keep_checkpoints=2",
                      "loss.aux_weight=0", "data.val=", "run.async_checkpoint=false"))
    return out


def test_a_run_folder_and_latest_mean_its_newest_checkpoint(run_dir):
    newest = latest_checkpoint(str(run_dir))
    assert newest.endswith("step-00000003") and len(list_checkpoints(str(run_dir))) == 2
    for given in (run_dir, f"{run_dir}/", run_dir / "latest", run_dir / "checkpoints" / "latest"):
        assert resolve(str(given)) == newest
    assert resolve(newest) == newest
    assert load_checkpoint(str(run_dir))["step"] == 3


def test_a_missing_step_lists_what_exists(run_dir, capsys):
    with pytest.raises(FileNotFoundError, match=r"step-00000009 does not exist; .* has checkpoints: step-00000002, "
                                                r"step-00000003, and .*latest\) means its newest"):
        load_checkpoint(str(run_dir / "checkpoints" / "step-00000009"))
    assert main(["eval", "--checkpoint", str(run_dir / "checkpoints" / "step-00000060"), "--data", "x",
                 "--out", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoints: step-00000002, step-00000003" in err and "\n" not in err


def test_a_run_without_a_complete_checkpoint_says_so(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for ckpt in (copy / "checkpoints").iterdir():
        (ckpt / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no complete checkpoint yet \(checkpoints: step-00000002 "
                                                r"\(incomplete\), step-00000003 \(incomplete\)\)"):
        resolve(str(copy))


def test_eval_takes_a_run_folder(run_dir, tiny_sets, tmp_path):
    assert main(["eval", "--checkpoint", str(run_dir), "--data", tiny_sets["test"], "--out", str(tmp_path / "r"),
                 "--image-size", "32"]) == 0
    assert (tmp_path / "r" / "report.json").exists()


def test_the_manager_resumes_the_newest_complete_one_and_refuses_another_engine(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    newest = latest_checkpoint(str(copy))
    crashed = copy / "checkpoints" / "step-00000004"  # an upload that never wrote its index
    shutil.copytree(newest, crashed)
    (crashed / INDEX).unlink()
    spec = StudentSpec.from_dict(read_meta(newest)["student_spec"], newest)
    manager = CheckpointManager(str(copy))
    assert manager.find("", spec, "ddp", 0) is None and manager.found is None
    state = manager.find("auto", spec, "ddp", 0)
    assert manager.found[0] == newest and state["step"] == 3 and not crashed.exists()  # the stale one is removed
    assert manager.find(str(copy / "latest"), spec, "ddp", 0)["step"] == 3 and manager.found[0] == newest
    with pytest.raises(ValueError, match=r"engine.name=ddp but this run uses engine.name=deepspeed") as e:
        manager.find("auto", spec, "deepspeed", 0)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"model.frozen_stages=0 but this run has model.frozen_stages=2"):
        manager.find("auto", spec, "ddp", 2)


def test_a_restartable_run_continues_its_own_newest_checkpoint(run_dir, tmp_path):
    """Ray Train restarts a failed worker group with the same config: every attempt resumes the run's newest
    checkpoint, and an explicit run.resume is the start only while the run has none of its own."""
    assert resume_rule("", True, False) == "auto" and resume_rule("", False, True) == ""
    assert resume_rule("/other/ckpt", True, False) == "/other/ckpt"
    assert resume_rule("/other/ckpt", True, True) == "auto" and resume_rule("/other/ckpt", False, True) == "/other/ckpt"
    newest = latest_checkpoint(str(run_dir))
    spec = StudentSpec.from_dict(read_meta(newest)["student_spec"], newest)
    fresh = CheckpointManager(str(tmp_path / "new-run"), restartable=True)
    assert fresh.find(newest, spec, "ddp", 0) is not None and fresh.found[0] == newest  # none of its own yet
    again = CheckpointManager(str(run_dir), restartable=True)
    assert again.find("", spec, "ddp", 0)["step"] == 3 and again.found[0] == newest


def test_an_empty_index_is_reported_as_such_not_as_missing(run_dir, tmp_path, capsys):
    """Issue 36: a checkpoint whose index.json is 0 bytes was taken for complete, then "does not exist"."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    newest = copy / "checkpoints" / "step-00000003"
    (newest / INDEX).write_bytes(b"")
    # a run folder skips it for the newest one that is complete, and its listing says why
    assert resolve(str(copy)).endswith("step-00000002")
    assert load_checkpoint(str(copy))["step"] == 2
    with pytest.raises(CheckpointError, match=r"step-00000003 is damaged: its index.json is empty \(0 bytes\).*"
                                              r"step-00000003 \(its index.json is empty \(0 bytes\)\)"):
        load_checkpoint(str(newest))
    (copy / "checkpoints" / "step-00000002" / INDEX).write_text("{trunc")
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint yet \(checkpoints: step-00000002 \(its "
                                                r"index.json is not valid JSON \(6 bytes\)\), step-00000003 \(its "
                                                r"index.json is empty"):
        load_checkpoint(str(copy))
    assert main(["eval", "--checkpoint", str(copy), "--data", "x", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" not in err and "index.json is empty" in err and "\n" not in err


def test_a_checkpoint_without_its_state_or_a_run_without_checkpoints_says_which(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "step-00000003" / "state.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"step-00000003 has index.json but no state.pt"):
        load_checkpoint(str(copy))
    shutil.rmtree(copy / "checkpoints")
    with pytest.raises(FileNotFoundError, match=r"run folder .*copy has no checkpoints \(no checkpoints/ in it"):
        load_checkpoint(str(copy))
