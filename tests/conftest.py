"""Shared fixtures: small real data (Fashion-MNIST from the Debian package) and the real EfficientNet-Lite0 teacher.

Built once per session because the teacher forward is the slow part on CPU.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.build import BuildSpec, build_set  # noqa: E402
from data.sources import FashionMNISTSource  # noqa: E402

RARE = ("1", "8")  # Trouser and Bag: separable from the rest, so a short run must learn them
TEACHER_SIZE = 64


@pytest.fixture(scope="session")
def teacher():
    from trainer.models import build_teacher

    return build_teacher("efficientnet_lite0", "", TEACHER_SIZE)


@pytest.fixture(scope="session")
def tiny_sets(tmp_path_factory, teacher):
    """A 90%-background training set and a natural test subset, both with cached teacher labels."""
    from trainer.teacher_label import label_shard_set
    from trainer.scoring import ScoringConfig

    root = tmp_path_factory.mktemp("fmnist")
    train_src, test_src = FashionMNISTSource("train"), FashionMNISTSource("test")
    train = build_set(train_src, BuildSpec("fmnist:train", RARE, positives_per_class=16, max_background=288,
                                           seed=0, max_count=100), str(root / "train"), progress=False)
    test = build_set(test_src, BuildSpec("fmnist:test", RARE, subsample=300, seed=0, max_count=100),
                     str(root / "test"), progress=False)
    for m in (train, test):
        label_shard_set(teacher, m.root, ScoringConfig(TEACHER_SIZE, 128), topk=5)
    return {"train": str(root / "train"), "test": str(root / "test"), "root": root}


def tiny_config(tiny_sets, out_dir, *overrides):
    from trainer.config import load_config

    base = [f"data.train={tiny_sets['train']}", f"data.val={tiny_sets['test']}", "data.image_size=32",
            "data.batch_size=16", "data.shuffle_buffer_mb=0.2", f"teacher.image_size={TEACHER_SIZE}",
            "teacher.mode=cached", "optim.epochs=4", "optim.warmup_epochs=0.5", "optim.schedule=cosine",
            "optim.lr=0.02", f"run.out_dir={out_dir}", "run.progress=false", "run.log_every=5", "run.device=cpu"]
    return load_config(None, base + list(overrides))


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """Set environment variables for a block (a fixture's lifetime), then put back what was there before."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def simulated_rank(p, rank: int, world: int) -> tuple[list[int], object]:
    """One rank of a simulated world running a trainer.shard_pass pass: its share by the executor's own split,
    the shards still to do, the work on the CPU. Publishing the parts in rank order is what rank 0 does."""
    import torch

    from data.plan import split_shards

    share = p.todo(split_shards(p.shard_counts(), rank, world))
    return share, p.run(share, torch.device("cpu"))


def noise_samples(count: int, shape: tuple[int, int], width: int = 4, seed: int = 0) -> list[tuple]:
    """``count`` background samples (key ``s0000``..., a random grey PNG of ``shape``) for write_shard_set: sets
    whose bytes, not their content, are what a test looks at."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(buf, format="PNG")
        samples.append((f"s{i:0{width}d}", buf.getvalue(), 0, "x"))
    return samples


@contextlib.contextmanager
def own_seaweedfs(folder: Path):
    """A module's own SeaweedFS (one a test may stop and restart). s3fs caches one filesystem object per set of
    arguments, and its client keeps the endpoint it was made with: the cache is cleared on the way in and out so
    that neither this server nor the session one is reached through a client made for the other."""
    import s3fs
    from s3_server import SeaweedS3

    server = SeaweedS3(folder).start()
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with environ(server.env):
            yield server
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1; AWS_* variables point s3fs at it for the session."""
    from s3_server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        with environ(server.env):
            yield server
    finally:
        server.stop()
