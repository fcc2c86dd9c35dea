"""Checkpoints on a real S3 server: visible only when complete, keep-last-k, one upload in flight, killed uploads."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from data import storage
from trainer.checkpoint import (INDEX, latest_checkpoint, list_checkpoints, load_checkpoint, step_url)
from trainer.checkpoint_manager import CheckpointWriter

ROOT = Path(__file__).resolve().parents[1]


def _state(step: int, size: int = 1000) -> dict:
    return {"step": step, "student": {"w": torch.full((size,), float(step))}}


def test_keep_last_k_and_only_indexed_folders_count(s3):
    out = f"s3://{s3.bucket}/ckpt-keep"
    writer = CheckpointWriter(out, keep=2)
    for step in (10, 20, 30):
        writer.save(step, _state(step), nonce=f"n{step}")
    writer.wait()
    assert [u.rsplit("/", 1)[-1] for u in list_checkpoints(out)] == ["step-00000020", "step-00000030"]
    # a folder whose index never arrived is not a checkpoint, however new
    storage.write_bytes(storage.join(step_url(out, 40), "state.pt"), b"half")
    assert latest_checkpoint(out).endswith("step-00000030")
    assert float(load_checkpoint(latest_checkpoint(out))["student"]["w"][0]) == 30.0
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_checkpoint(step_url(out, 40))
    # the next save prunes the incomplete folder that is older than the newest complete checkpoint
    writer.save(50, _state(50), nonce="n50")
    writer.wait()
    assert not storage.exists(storage.join(step_url(out, 40), "state.pt"))


def test_at_most_one_upload_in_flight_and_training_goes_on(tmp_path, monkeypatch):
    """The save returns before its upload ends; the next save waits for it first."""
    gate, uploading, active, peak = threading.Event(), threading.Event(), [0], [0]
    real = storage.write_bytes

    def slow_write(url, data):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        uploading.set()
        gate.wait(10)
        real(url, data)
        active[0] -= 1

    monkeypatch.setattr(storage, "write_bytes", slow_write)
    writer = CheckpointWriter(str(tmp_path), keep=5)
    start = time.time()
    writer.save(1, _state(1), nonce="a")
    assert uploading.wait(5) and time.time() - start < 5  # returned while the upload is held
    assert latest_checkpoint(str(tmp_path)) is None  # nothing visible yet
    threading.Timer(0.5, gate.set).start()
    writer.save(2, _state(2), nonce="b")  # waits for step 1's upload, then starts its own
    writer.wait()
    assert peak[0] == 1
    assert [u[-2:] for u in list_checkpoints(str(tmp_path))] == ["01", "02"]


def test_a_failed_upload_leaves_no_checkpoint_and_is_counted(tmp_path, monkeypatch):
    writer = CheckpointWriter(str(tmp_path), keep=3)
    writer.save(1, _state(1), nonce="a")
    writer.wait()
    real = storage.write_bytes

    def fail_on_index(url, data):
        if url.endswith(INDEX):
            raise OSError("connection reset by peer")
        real(url, data)

    monkeypatch.setattr(storage, "write_bytes", fail_on_index)
    writer.save(2, _state(2), nonce="b")
    writer.save(3, _state(3), nonce="c")  # logs step 2's failure and goes on
    assert writer.failures == 1
    with pytest.raises(RuntimeError, match="failed"):
        writer.wait()
    assert [u[-2:] for u in list_checkpoints(str(tmp_path))] == ["01"]


def test_markers_of_an_earlier_attempt_do_not_publish_a_checkpoint(tmp_path, monkeypatch):
    """Rank 0 publishes only when every rank's marker carries this save's nonce."""
    monkeypatch.setattr("trainer.checkpoint_manager.MARKER_TIMEOUT_S", 1.0)
    url = step_url(str(tmp_path), 7)
    storage.write_bytes(storage.join(url, "rank-00001.done"), json.dumps({"nonce": "old"}).encode())
    writer = CheckpointWriter(str(tmp_path), keep=2, rank=0, world=2)
    writer.save(7, _state(7), nonce="new", sharded=lambda folder: Path(folder, "part.bin").write_bytes(b"x"))
    with pytest.raises(RuntimeError, match="did not finish"):
        writer.wait()
    assert latest_checkpoint(str(tmp_path)) is None
    # the other rank's upload of this attempt completes the checkpoint
    other = CheckpointWriter(str(tmp_path), keep=2, rank=1, world=2)
    other.save(7, None, nonce="new", sharded=lambda folder: Path(folder, "part-r1.bin").write_bytes(b"y"))
    other.wait()
    writer.save(7, _state(7), nonce="new", sharded=lambda folder: Path(folder, "part.bin").write_bytes(b"x"))
    writer.wait()
    assert latest_checkpoint(str(tmp_path)) == url


KILLED_UPLOAD = """
import sys, torch
sys.path.insert(0, {root!r})
from trainer.checkpoint_manager import CheckpointWriter
w = CheckpointWriter({out!r}, keep=3)
w.save(1, {{"step": 1, "student": {{"w": torch.ones(10)}}}}, nonce="a"); w.wait()
print("first", flush=True)
w.save(2, {{"step": 2, "student": {{"w": torch.randn(60_000_000)}}}}, nonce="b")  # 240 MB: a multipart upload
print("uploading", flush=True)
w.wait()
print("done", flush=True)
"""


def test_an_upload_killed_part_way_leaves_no_visible_checkpoint(s3, tmp_path):
    out = f"s3://{s3.bucket}/ckpt-killed"
    script = KILLED_UPLOAD.format(root=str(ROOT), out=out)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **s3.env})
    assert proc.stdout.readline().strip() == "first"
    assert proc.stdout.readline().strip() == "uploading"
    time.sleep(1.0)  # serialised; the multipart upload of step 2 is under way
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert latest_checkpoint(out).endswith("step-00000001")
    assert not storage.exists(storage.join(step_url(out, 2), INDEX))
    assert float(load_checkpoint(latest_checkpoint(out))["student"]["w"].sum()) == 10.0
