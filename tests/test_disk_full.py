"""A disk that fills during a checkpoint: nothing partial appears, the previous checkpoint stays loadable, and the
run stops with one line naming the file and the bytes it needed, never an OSError traceback.

The full disk is injected where a real one usually shows itself: the flush and fsync of the storage layer's one
local write path (``data.storage._sync``), with the errno a full filesystem gives (ENOSPC)."""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
import torch

from cluster.cli import main
from data import storage
from trainer.checkpoint import (STATE, latest_checkpoint, list_checkpoints, load_checkpoint, step_url)
from trainer.checkpoint_manager import CheckpointWriter


def _fill_disk_at(monkeypatch, match: str) -> list[str]:
    """Every sync of a file whose final name contains ``match`` fails as on a full disk; returns the paths hit."""
    real, hit = storage._sync, []

    def sync(f, path):
        if match in os.path.basename(path):
            hit.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, path)

    monkeypatch.setattr(storage, "_sync", sync)
    return hit


def _state(step: int) -> dict:
    return {"step": step, "student": {"w": torch.full((5000,), float(step))}}


def _size(state: dict) -> int:
    buf = io.BytesIO()
    torch.save(state, buf)
    return len(buf.getvalue())


def test_a_full_disk_leaves_no_file_and_names_the_path_and_the_bytes(tmp_path, monkeypatch):
    target = tmp_path / "out" / "manifest.json"
    hit = _fill_disk_at(monkeypatch, ".manifest.json.")  # atomic_write's temporary name for it
    with pytest.raises(storage.DiskFull) as err:
        storage.write_bytes(str(target), b"x" * 12345)
    msg = str(err.value)
    assert hit and "\n" not in msg and str(target) in msg and "12,345 bytes" in msg and "bytes were free" in msg
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert os.listdir(tmp_path / "out") == []  # neither the file nor its temporary copy


def test_a_checkpoint_that_meets_a_full_disk_is_never_visible_and_the_previous_one_loads(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    writer = CheckpointWriter(out, keep=2)
    writer.save(10, _state(10), nonce="a")
    writer.wait()
    hit = _fill_disk_at(monkeypatch, STATE)
    writer.save(20, _state(20), nonce="b")  # in the background: the failure comes back to the training thread
    writer._thread.join()
    with pytest.raises(storage.DiskFull) as err:
        writer.check()  # what the loop calls every step
    msg = str(err.value)
    assert hit and "\n" not in msg
    assert step_url(out, 20) in msg and os.path.join(step_url(out, 20), STATE) in msg
    assert f"needed {_size(_state(20)):,} bytes" in msg and step_url(out, 10) in msg
    assert writer.failures == 1
    assert list_checkpoints(out) == [step_url(out, 10)] == [latest_checkpoint(out)]
    assert not os.path.exists(step_url(out, 20))  # not even a folder without an index is left behind
    assert float(load_checkpoint(step_url(out, 10))["student"]["w"][0]) == 10.0
    monkeypatch.undo()  # room again: the next save lands and prunes as usual
    writer.save(30, _state(30), nonce="c")
    writer.wait()
    assert list_checkpoints(out) == [step_url(out, 10), step_url(out, 30)]


def test_a_training_run_stops_with_one_line_and_resumes_from_the_previous_checkpoint(tiny_sets, tmp_path,
                                                                                     monkeypatch, capsys):
    run = tmp_path / "run"
    argv = ["train", "--debug", "--config", "configs/debug.yaml", f"data.train={tiny_sets['train']}", "data.val=",
            f"run.out_dir={run}", "run.progress=false", "loss.aux_weight=0", "data.image_size=32",
            "teacher.mode=cached", "teacher.image_size=64", "run.checkpoint_every=2", "run.max_steps=6"]
    saves = []
    real = storage._sync

    def sync(f, path):  # the first checkpoint lands; the disk is full from the second one's state.pt on
        if os.path.basename(path).startswith(f".{STATE}."):
            saves.append(path)
            if len(saves) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, path)

    monkeypatch.setattr(storage, "_sync", sync)
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("bgsplit: error:")]
    assert len(errors) == 1 and "Traceback" not in err and "OSError" not in err
    first, second = step_url(str(run), 2), step_url(str(run), 4)
    assert os.path.join(second, STATE) in errors[0] and "needed" in errors[0] and first in errors[0]
    assert list_checkpoints(str(run)) == [first] and not os.path.exists(second)
    assert not (run / "summary.json").exists()  # the run did not claim to be done
    monkeypatch.undo()
    assert main(argv + ["run.resume=auto"]) == 0
    out = capsys.readouterr()
    assert '"steps": 6' in out.out and f'"resumed_from": "{first}"' in out.out
    assert load_checkpoint(latest_checkpoint(str(run)))["step"] == 6
