"""Ray Train on a real local cluster (127.0.0.1), gloo on CPU, checkpoints on a real S3 server (SeaweedFS).

Slow: each Ray run starts worker processes and imports torch in them (~20-40 s on 2 cores).
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
import torch

from conftest import RARE, TEACHER_SIZE, environ
from data import storage
from data.build import BuildSpec, build_set
from data.sources import FashionMNISTSource

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster(s3):
    from ray_cluster import RAY_ENV, RayCluster

    cluster = RayCluster(num_cpus=4, extra_env=s3.env).start()
    try:
        with environ(RAY_ENV):  # this process is a driver too: loopback addresses must stay loopback
            yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def one_batch_set(tmp_path_factory, teacher):
    """64 samples in 4 equal shards: one global batch is the whole epoch and each of 2 ranks reads 2 shards, so a
    step sees the same samples in any world size."""
    from trainer.teacher_label import label_shard_set
    from trainer.scoring import ScoringConfig

    out = str(tmp_path_factory.mktemp("one-batch") / "train")
    build_set(FashionMNISTSource("train"), BuildSpec("fmnist:train", RARE, positives_per_class=8, max_background=48,
                                                     seed=3, max_count=16), out, progress=False)
    label_shard_set(teacher, out, ScoringConfig(TEACHER_SIZE, 128), topk=5)
    return out


def _launch(cfg, address: str) -> dict:
    import ray

    from cluster.ray_train import launch

    try:
        return launch(cfg, address)
    finally:
        ray.shutdown()


def _student(checkpoint: str) -> dict[str, torch.Tensor]:
    from trainer.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)["student"]


def _evaluate_checkpoint(url: str, val: str, dtype: torch.dtype | None = None) -> dict:
    """The checkpoint's student scored on its own in this process, as the Ray workers' validation scored it: one
    thread (the workers run with OMP_NUM_THREADS=1, and oneDNN's last bits depend on the thread count), batch 16,
    32 px. ``dtype`` bf16: the weights rounded to bf16 as DeepSpeed's bf16 mode holds them, run under autocast."""
    from data.shards import read_manifest
    from trainer.models import load_student_from_checkpoint
    from trainer.evaluate import evaluate_student
    from trainer.scoring import ScoringConfig

    student = load_student_from_checkpoint(url)
    if dtype is not None:
        student = student.to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        return evaluate_student(student, read_manifest(val), ScoringConfig(32, 16, precision=precision),
                                torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)


def test_two_ray_ddp_workers_equal_one_process_with_the_same_global_batch(ray_cluster, one_batch_set, tmp_path):
    """Gradients all-reduced over 2 ranks x 32 images = one process with 64 images, step for step."""
    from trainer.train import train

    common = [f"data.train={one_batch_set}", "data.val=", "data.image_size=32", "data.shuffle_buffer_mb=0.02",
              f"teacher.image_size={TEACHER_SIZE}", "teacher.mode=cached", "model.trunk=resnet18",
              "model.weights=NONE", "model.freeze_bn_stats=true", "loss.aux_weight=0.5", "optim.lr=0.05",
              "optim.epochs=3", "optim.warmup_epochs=0", "optim.schedule=cosine", "run.device=cpu",
              "run.progress=false", "run.log_every=1"]
    from trainer.config import load_config

    single = train(load_config(None, common + ["data.batch_size=64", f"run.out_dir={tmp_path / 'single'}"]))
    ray_cfg = load_config(None, common + ["data.batch_size=32", "cluster.num_workers=2",
                                          f"run.out_dir={tmp_path / 'ray'}"])
    summary = _launch(ray_cfg, ray_cluster.address)
    assert summary["world"] == 2 and summary["steps"] == single["steps"] == 3
    a, b = _student(single["checkpoint"]), _student(summary["checkpoint"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"parameter {k} differs")
    # the check can fail: the three steps moved the weights far beyond its tolerance
    frozen = train(load_config(None, common + ["data.batch_size=64", "optim.lr=1e-12",
                                               f"run.out_dir={tmp_path / 'still'}"]))
    start = _student(frozen["checkpoint"])
    assert max(float((a[k] - start[k]).abs().max()) for k in a if k.endswith("weight")) > 1e-3


def _ray_overrides(tiny_sets, out_dir: str, *extra: str) -> list[str]:
    return [f"data.train={tiny_sets['train']}", "data.val=", "data.image_size=32", "data.batch_size=16",
            "data.shuffle_buffer_mb=0.2", f"teacher.image_size={TEACHER_SIZE}", "teacher.mode=cached",
            "loss.aux_weight=0.1", "optim.lr=0.01", "optim.warmup_epochs=0.5", "optim.schedule=cosine",
            f"run.out_dir={out_dir}", "run.progress=false", "run.log_every=5", "cluster.num_workers=2", *extra]


@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (3, "fp32")])
def test_deepspeed_zero_trains_and_resumes_from_its_s3_checkpoint(ray_cluster, s3, tiny_sets, stage, precision):
    """2 Ray workers write a ZeRO checkpoint to S3 and 2 workers resume from it with its optimiser state. ZeRO-2
    runs in bf16 (DeepSpeed's CPU accelerator has it), where DeepSpeed names the ZeRO files "bf16_zero_pp_rank_N"
    and state.pt must hold the fp32 master weights, not bf16-rounded ones; then 1 worker resumes the same run
    (elastic: from the fp32 weights, its epoch restarted in the 1-worker order)."""
    from trainer.checkpoint import list_checkpoints, load_checkpoint
    from trainer.config import load_config

    out = f"s3://{s3.bucket}/deepspeed-zero{stage}"
    over = _ray_overrides(tiny_sets, out, "engine.name=deepspeed", f"engine.zero_stage={stage}",
                          f"run.precision={precision}", "optim.epochs=2", "run.checkpoint_every=6",
                          f"data.val={tiny_sets['test']}")
    first = _launch(load_config(None, over + ["run.max_steps=12"]), ray_cluster.address)  # 10 steps an epoch
    assert first["steps"] == 12 and first["engine"] == "deepspeed" and first["world"] == 2
    index = json.loads(storage.read_bytes(f"{first['checkpoint']}/index.json"))
    zero = [name for name in index["files"] if "zero_pp_rank_" in name and "optim_states" in name]
    assert index["engine"] == "deepspeed" and len(zero) == 2  # both ranks' partitions uploaded
    assert all(("/bf16_zero_pp_rank_" in n) == (precision == "bf16") for n in zero), zero
    weights = load_checkpoint(first["checkpoint"])["student"]
    assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())
    if precision == "bf16":  # the fp32 masters: bf16 rounding would change them
        assert any(bool((t != t.bfloat16().float()).any()) for k, t in weights.items() if k.endswith("weight"))
    second = _launch(load_config(None, over + ["run.max_steps=14"]), ray_cluster.address)
    assert second["steps"] == 14 and second["resumed_from"].endswith("step-00000012")
    assert second["resume"] == {"from": second["resumed_from"], "from_world": 2, "from_step": 12,
                                "optimizer": "restored"}
    # the validation mAP is that of the weights written: state.pt's student, scored here alone, gives the
    # 2 workers' (gathered, manifest-ordered) result. Catches a validation of other weights (the ZeRO-3 partition
    # of one rank, a step before the checkpoint), a checkpoint without the fp32 masters or the BatchNorm
    # statistics, and scores that depend on how the ranks split the set.
    bf16 = torch.bfloat16 if precision == "bf16" else None
    again = _evaluate_checkpoint(second["checkpoint"], tiny_sets["test"], bf16)
    assert set(second["val"]["ap"]) == set(again["ap"]) == {"Trouser", "Bag"}
    ranks = second["val"]["ranks"]  # images each worker scored: both took part, together the whole set
    assert len(ranks) == 2 and min(ranks) > 0 and sum(ranks) == sum(again["ranks"]) == 300, ranks
    assert again["map"] == pytest.approx(second["val"]["map"], abs=1e-6), (again, second["val"])
    assert again["ap"] == pytest.approx(second["val"]["ap"], abs=1e-6)
    for url in list_checkpoints(out):
        state = load_checkpoint(url)
        assert state["student"]["main_head.weight"].shape[0] == 3 and state["engine_name"] == "deepspeed"
    if stage != 2:
        return
    # elastic: one worker continues the 2-worker run; epoch 1 restarts at step 1 x 20 of the 1-worker plan
    third = _launch(load_config(None, over + ["cluster.num_workers=1", "run.max_steps=22"]), ray_cluster.address)
    assert third["world"] == 1 and third["resumed_from"].endswith("step-00000014")
    assert third["resume"] == {"from": third["resumed_from"], "from_world": 2, "from_step": 14, "optimizer": "fresh"}
    assert third["steps"] == 22 and third["epochs"] == pytest.approx(22 / 20)
    # metrics.jsonl keeps the earlier attempts' lines (appended on resume, also on S3); this one continued at
    # step 20, not 14 (log_every=5: from 14 it would have logged 15 and 20)
    steps = [json.loads(line)["step"] for line in storage.read_bytes(f"{out}/metrics.jsonl").decode().splitlines()]
    assert steps[0] == 5 and steps[-1] == 22 and not any(14 < s < 22 for s in steps)


def test_a_killed_worker_is_restarted_and_the_run_finishes_from_the_newest_checkpoint(ray_cluster, s3, tiny_sets):
    """SIGKILL one of two Ray workers after the first checkpoint: Ray restarts the group (FailureConfig), the
    workers resume from the newest complete checkpoint and the run ends at its planned step count."""
    from trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

    out = f"s3://{s3.bucket}/killed-worker"
    over = _ray_overrides(tiny_sets, out, "optim.epochs=8", "run.checkpoint_every=10", "cluster.max_failures=1",
                          "run.keep_checkpoints=20", "data.image_size=48")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.launch", "--address", ray_cluster.address, *over],
                            cwd=ROOT, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while latest_checkpoint(out) is None:
        assert proc.poll() is None, "".join(lines[-40:])
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    seen = int(latest_checkpoint(out).rsplit("-", 1)[1])
    pids = ray_cluster.worker_pids()
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, "".join(lines[-60:])
    reader.join(timeout=10)
    result = json.loads([line for line in lines if line.startswith("{")][-1])
    summary = json.loads(storage.read_bytes(f"{out}/summary.json"))
    assert result["world"] == 2 and summary["epochs"] == pytest.approx(8.0)  # the planned length, all of it
    assert result["resumed_from"], "the restarted workers did not resume"
    assert int(result["resumed_from"].rsplit("-", 1)[1]) >= seen  # at most one checkpoint interval lost
    for url in list_checkpoints(out):
        assert load_checkpoint(url)["step"] == int(url.rsplit("-", 1)[1])


def test_ray_job_submit_runs_the_debug_config(ray_cluster, s3, tiny_sets):
    """The README's cluster command, end to end: `ray job submit --working-dir . -- python -m cluster.cli train
    --ray` (the same driver as `python -m cluster.launch`)."""
    out = f"s3://{s3.bucket}/job-submit"
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster.dashboard,
           "--working-dir", str(ROOT), "--", "python", "-m", "cluster.cli", "train", "--ray", "--config",
           "configs/debug.yaml",
           f"data.train={tiny_sets['train']}", f"data.val={tiny_sets['test']}", f"run.out_dir={out}",
           "run.max_steps=4", "data.image_size=32", f"teacher.image_size={TEACHER_SIZE}", "cluster.num_workers=2",
           "run.progress=false"]
    done = subprocess.run(cmd, cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith('{"checkpoint"')][-1])
    assert result["steps"] == 4 and result["world"] == 2
    summary = json.loads(storage.read_bytes(f"{out}/summary.json"))
    # validation ran on the rare classes of the test set, and the job printed what the run wrote
    assert set(summary["val"]["ap"]) == {"Trouser", "Bag"} and result["val_map"] == summary["val"]["map"]
    # and it is the mAP of the checkpoint the job wrote (debug.yaml: fp32), scored here on its own: catches a
    # reported number that belongs to other weights or another evaluation than the saved student's
    again = _evaluate_checkpoint(f"{out}/checkpoints/step-00000004", tiny_sets["test"])
    assert again["map"] == pytest.approx(summary["val"]["map"], abs=1e-6), (again, summary["val"])
    assert storage.exists(f"{out}/checkpoints/step-00000004/index.json")
    # the job's last line names the run folder with what it holds
    assert done.stdout.strip().splitlines()[-1] != "" and any(
        line.startswith(f"run folder {out}: summary.json, metrics.jsonl") for line in done.stdout.splitlines()[-8:])
    # a relative run.out_dir would land in Ray's temporary copy of the working dir: refused before any worker
    # (through the second door, `python -m cluster.launch`, which the README's older commands use)
    relative = [c if not c.startswith("run.out_dir=") else "run.out_dir=runs/lost" for c in cmd]
    at = relative.index("cluster.cli")
    relative[at:at + 3] = ["cluster.launch"]
    lost = subprocess.run(relative, cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=300)
    assert lost.returncode != 0
    assert "run.out_dir=runs/lost is relative" in lost.stdout + lost.stderr and "ray stop" in lost.stdout + lost.stderr
    assert not (ROOT / "runs" / "lost").exists()
