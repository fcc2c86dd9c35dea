"""The Ray head and the job driver die mid-run (a preempted node, an operator's `ray stop`): the same command
against a fresh cluster resumes from the newest complete checkpoint in storage, at its step, and the run ends
at the planned step count, saying where it resumed. Real local Ray clusters, checkpoints on the suite's SeaweedFS.
"""
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

from conftest import TEACHER_SIZE, environ
from data import storage

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _command(address: str, tiny_sets, out: str) -> list[str]:
    return [sys.executable, "-m", "cluster.cli", "train", "--ray", "--ray-address", address,
            f"data.train={tiny_sets['train']}", "data.val=", "data.image_size=32", "data.batch_size=16",
            "data.shuffle_buffer_mb=0.2", f"teacher.image_size={TEACHER_SIZE}", "teacher.mode=cached",
            "loss.aux_weight=0", "optim.epochs=6", "optim.warmup_epochs=0.5", f"run.out_dir={out}",
            "run.progress=false", "run.log_every=5", "run.checkpoint_every=5", "run.keep_checkpoints=20",
            "cluster.num_workers=2"]


def _kill_node(cluster, driver: subprocess.Popen) -> None:
    """SIGKILL to everything the node ran, as a preemption does: the training workers (by their PIDs: they are
    not in the head's process group, and left alone they train on for seconds and may even finish a checkpoint),
    the head's session (GCS, raylet) and the driver."""
    workers = cluster.worker_pids()
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.killpg(cluster.proc.pid, signal.SIGKILL)
    driver.kill()
    driver.wait(timeout=60)
    cluster.stop()  # reaps the head process and removes its temp dir
    for pid in workers:  # gone (a zombie at most, until Ray's reaper, now dead too, is replaced by init)
        deadline = time.time() + 30
        while time.time() < deadline and os.path.exists(f"/proc/{pid}") and _state(pid) not in ("Z", "X"):
            time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def test_a_killed_head_and_driver_then_the_same_command_resumes_at_the_last_checkpoint(s3, tiny_sets):
    from ray_cluster import RAY_ENV, RayCluster
    from trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

    out = f"s3://{s3.bucket}/killed-head-{os.getpid()}"
    first = RayCluster(num_cpus=4, extra_env=s3.env).start()
    with environ(RAY_ENV):
        driver = subprocess.Popen(_command(first.address, tiny_sets, out), cwd=ROOT, env=first.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True)
        reader.start()
        deadline = time.time() + 400
        try:
            while latest_checkpoint(out) is None:
                assert driver.poll() is None, "".join(lines[-40:])
                assert time.time() < deadline, "no checkpoint within 400 s"
                time.sleep(0.2)
            while len(first.worker_pids()) < 2:  # both training workers are up (they wrote the checkpoint)
                assert time.time() < deadline, "the two training workers are not both alive"
                time.sleep(0.2)
        finally:
            _kill_node(first, driver)
        reader.join(timeout=10)
        assert not storage.exists(f"{out}/summary.json")  # it did not get to the end
        kept = latest_checkpoint(out)  # the newest complete one, whatever was in flight when the node died
        at = load_checkpoint(kept)["step"]

        second = RayCluster(num_cpus=4, extra_env=s3.env).start()
        try:
            again = subprocess.run(_command(second.address, tiny_sets, out), cwd=ROOT, env=second.env,
                                   capture_output=True, text=True, timeout=600)
        finally:
            second.stop()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    result = json.loads([ln for ln in again.stdout.splitlines() if ln.startswith('{"checkpoint"')][-1])
    summary = json.loads(storage.read_bytes(f"{out}/summary.json"))
    assert result["resumed_from"] == kept and summary["resumed_from"] == kept  # said so, and at that step
    assert summary["epochs"] == pytest.approx(6.0) and result["world"] == 2  # the planned length, all of it
    steps = [int(u.rsplit("-", 1)[1]) for u in list_checkpoints(out)]
    assert steps[-1] == result["steps"] and at in steps
    assert all(s % 5 == 0 or s == steps[-1] for s in steps)
    for url in list_checkpoints(out):
        assert load_checkpoint(url)["step"] == int(url.rsplit("-", 1)[1])
    metrics = [json.loads(ln) for ln in storage.read_bytes(f"{out}/metrics.jsonl").decode().splitlines() if ln]
    logged = [m["step"] for m in metrics if "step" in m]
    assert logged and logged[0] > at and logged == sorted(set(logged))  # trained on from its step, none twice
