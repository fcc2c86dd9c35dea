"""Data-parallel loading without hangs: two real gloo processes on a deliberately uneven shard set."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.shards import write_shard_set
from s3_server import free_port

pytestmark = pytest.mark.slow


def _png(v: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), v % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Background shards of 60 and 9 samples: a naive shard split gives one rank 15 batches, the other 2."""
    root = tmp_path_factory.mktemp("uneven") / "set"
    samples = [(f"k{i:03d}", _png(i), 1 if i < 3 else 0, "x") for i in range(72)]
    m = write_shard_set(str(root), samples, rare_classes=["r"], class_names=["bg", "R"], max_count=60)
    assert sorted(s.count for s in m.shards) == [3, 9, 60]
    return str(root)


@pytest.mark.parametrize("mode, policy, workers", [("exact", "pad", 0), ("exact", "drop", 2),
                                                   ("resampled", "pad", 1)])
def test_two_ranks_with_uneven_shards_finish_with_equal_steps(uneven, tmp_path, mode, policy, workers):
    job = Path(__file__).with_name("dist_loader_job.py")
    proc = subprocess.run([sys.executable, str(job), uneven, str(free_port()), str(tmp_path), mode, policy,
                           str(workers)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"]
    assert ranks[0]["steps"][0] == ranks[0]["planned"] > 0
    if mode == "exact" and policy == "pad":
        keys = {k.split("#")[0] for r in ranks for k in r["keys"]}
        assert keys == {f"k{i:03d}" for i in range(72)}  # every sample seen, padding only repeats


def test_torchrun_trains_with_two_ddp_processes_and_one_process_resumes(tiny_sets, tmp_path):
    """`torchrun --nproc_per_node 2 -m cluster.cli train` (the README's multi-process command): both ranks run
    the planned steps in one process group, rank 0 alone writes metrics, summary and the checkpoint; then the
    same run resumes in one process (a restart with fewer workers)."""
    from conftest import TEACHER_SIZE

    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "cluster.cli", "train", "--debug",
           f"data.train={tiny_sets['train']}", "data.val=", "data.image_size=32", "data.batch_size=16",
           f"teacher.image_size={TEACHER_SIZE}", "teacher.mode=cached", "run.max_steps=3", f"run.out_dir={out}",
           "run.progress=false", "run.log_every=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"] == 2 and summary["steps"] == 3 and summary["engine"] == "ddp"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one writer: no line twice
    assert (out / "checkpoints" / "step-00000003" / "index.json").exists()
    # elastic: one process continues the 2-process run with the whole optimiser state; the data order depends on
    # the world, so the interrupted epoch 0 restarts in the 1-process order (10 -> 20 steps an epoch)
    single = [sys.executable, "-m", "cluster.cli", *cmd[cmd.index("cluster.cli") + 1:]]
    resume = subprocess.run(single + ["run.resume=auto", "run.max_steps=4"], capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resume.returncode == 0, resume.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"] == 1 and summary["steps"] == 4 and summary["resumed_from"].endswith("step-00000003")
    assert summary["resume"] == {"from": summary["resumed_from"], "from_world": 2, "from_step": 3,
                                 "optimizer": "restored"}
    appended = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert appended == [1, 2, 3, 1, 2, 3, 4]  # restarted at the epoch's start: step 0 of the 1-process plan


def test_torchrun_ddp_ranks_see_different_batches_and_end_with_identical_weights(tiny_sets, tmp_path):
    """DDP all-reduces the gradients: 2 torchrun ranks, each on its own share of the data, must hold bit-identical
    parameters after every step. Each rank writes its own weights (tests/ddp_sync_job.py), since rank 0 alone
    writes the checkpoint. Catches a student that is not wrapped in DDP (or an optimiser that steps the bare
    module's unsynchronised gradients), an aux head left out of the all-reduce, and ranks that start from
    different initial weights. BatchNorm running statistics are not compared: each rank's last forward moves
    them with its own batch (DDP broadcasts rank 0's at the next forward), which is expected."""
    import torch
    from conftest import TEACHER_SIZE

    out = tmp_path / "sync"
    out.mkdir()
    job = Path(__file__).with_name("ddp_sync_job.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(job), str(out), f"data.train={tiny_sets['train']}", "data.val=",
           "data.image_size=32", "data.batch_size=16", "data.shuffle_buffer_mb=0.2", "teacher.mode=cached",
           f"teacher.image_size={TEACHER_SIZE}", "model.trunk=resnet18", "model.weights=NONE",
           "loss.aux_weight=0.5", "optim.lr=0.05", "optim.warmup_epochs=0", "run.max_steps=3", "run.device=cpu",
           f"run.out_dir={out / 'run'}", "run.progress=false", "run.log_every=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["world"] == r1["world"] == 2 and len(r0["losses"]) == len(r1["losses"]) == 3
    # the ranks trained on different batches (so unsynchronised gradients would have pulled them apart)...
    assert all(a != b for a, b in zip(r0["losses"], r1["losses"])), (r0["losses"], r1["losses"])
    # ...from the same start, and end with the same weights to the last bit
    assert r0["before"].keys() == r1["after"].keys() and "aux_head.weight" in r0["after"]
    for k in r0["before"]:
        assert torch.equal(r0["before"][k], r1["before"][k]), f"{k} differs between ranks before training"
        assert torch.equal(r0["after"][k], r1["after"][k]), f"{k} differs between ranks after training"
    # and the weights did move (three steps of LR 0.05), so equality is not that of untouched weights
    for k in ("trunk.conv1.weight", "main_head.weight", "aux_head.weight"):
        assert float((r0["after"][k] - r0["before"][k]).abs().max()) > 1e-4, k


NO_SYNC_JOB = """
import sys, torch, torch.distributed as dist
from torch import nn
from trainer.engine import ddp_module
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
ddp = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
compiled = torch.compile(ddp)  # wraps lazily: nothing is compiled until called
assert not isinstance(compiled, nn.parallel.DistributedDataParallel)  # what the engine used to test
assert ddp_module(compiled) is ddp and ddp_module(ddp) is ddp and ddp_module(nn.Linear(4, 2)) is None
with ddp_module(compiled).no_sync():
    assert not ddp.require_backward_grad_sync
assert ddp.require_backward_grad_sync
dist.destroy_process_group()
print("ok")
"""


def test_no_sync_is_found_through_the_compiled_wrapper():
    """With engine.compile the student is torch.compile(DDP(student)); gradient accumulation must still skip the
    all-reduce of every micro-batch but the last, so the engine finds DDP inside the compiled module."""
    proc = subprocess.run([sys.executable, "-c", NO_SYNC_JOB, str(free_port())], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
