"""Ray Train on a real local cluster (127.0.0.1), gloo on CPU, checkpoints on a real S3 server (SeaweedFS).

Slow: each Ray run starts worker processes and imports torch in them (~20-40 s on 2 cores).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import RARE, TEACHER_SIZE, tiny_config
from data import storage
from data.build import BuildSpec, build_set
from data.sources import FashionMNISTSource

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster(s3):
    from ray_cluster import RAY_ENV, RayCluster

    cluster = RayCluster(num_cpus=4, extra_env=s3.env).start()
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)  # this process is a driver too: loopback addresses must stay loopback
    try:
        yield cluster
    finally:
        cluster.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def one_batch_set(tmp_path_factory, teacher):
    """64 samples in 4 equal shards: one global batch is the whole epoch and each of 2 ranks reads 2 shards, so a
    step sees the same samples in any world size."""
    from trainer.teacher_label import label_shard_set

    out = str(tmp_path_factory.mktemp("one-batch") / "train")
    build_set(FashionMNISTSource("train"), BuildSpec("fmnist:train", RARE, positives_per_class=8, max_background=48,
                                                     seed=3, max_count=16), out, progress=False)
    label_shard_set(teacher, out, image_size=TEACHER_SIZE, topk=5)
    return out


def _launch(cfg, address: str) -> dict:
    import ray

    from cluster.launch import launch

    try:
        return launch(cfg, address)
    finally:
        ray.shutdown()


def _student(checkpoint: str) -> dict[str, torch.Tensor]:
    from trainer.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)["student"]


def test_two_ray_ddp_workers_equal_one_process_with_the_same_global_batch(ray_cluster, one_batch_set, tmp_path):
    """Gradients all-reduced over 2 ranks x 32 images = one process with 64 images, step for step."""
    from trainer.train import train

    common = [f"data.train={one_batch_set}", "data.val=", "data.image_size=32", "data.shuffle_buffer=8",
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
