"""Shard sets, teacher caches and training data on a real S3 server (SeaweedFS on loopback), and the retry policy."""
import uuid

import pytest
import torch

from conftest import RARE, TEACHER_SIZE, tiny_config
from data import storage
from data.build import BuildSpec, build_set
from data.loader import ShardStream
from data.shards import read_manifest
from data.sources import FashionMNISTSource


def _prefix(s3) -> str:
    return f"s3://{s3.bucket}/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def s3_set(s3, tmp_path_factory):
    """The same -BG set built twice, to a local folder and to S3."""
    spec = BuildSpec("fmnist:test", RARE, subsample=120, seed=0, max_count=25)
    src = FashionMNISTSource("test")
    local = build_set(src, spec, str(tmp_path_factory.mktemp("local") / "set"), progress=False)
    remote = build_set(src, spec, _prefix(s3) + "/set", progress=False)
    return local, remote


def test_shards_round_trip_through_s3(s3_set):
    local, remote = s3_set
    again = read_manifest(remote.root)
    assert again.counts == local.counts and len(again.shards) == len(local.shards) > 2
    assert all(u.startswith("s3://") for u in again.shard_urls())
    a = list(ShardStream(local, train=False, image_size=32, batch_size=32))
    b = list(ShardStream(again, train=False, image_size=32, batch_size=32))
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert all(int(x["skipped"].sum()) == 0 for x in b)


def test_rebuild_to_s3_is_idempotent(s3_set):
    _, remote = s3_set
    spec = BuildSpec("fmnist:test", RARE, subsample=120, seed=0, max_count=25)
    before = storage.listdir(remote.root)
    again = build_set(FashionMNISTSource("test"), spec, remote.root, progress=False)
    assert again.meta["build_seconds"] == remote.meta["build_seconds"]  # the manifest was not rewritten
    assert storage.listdir(remote.root) == before


def test_train_from_s3_with_a_cached_teacher_on_s3(s3_set, teacher, tmp_path):
    from trainer.teacher_label import label_shard_set
    from trainer.train import train

    _, remote = s3_set
    url = label_shard_set(teacher, remote.root, image_size=TEACHER_SIZE, topk=5)
    assert url.startswith("s3://") and storage.exists(url)
    sets = {"train": remote.root, "test": remote.root}
    summary = train(tiny_config(sets, tmp_path / "run", "loss.aux_weight=0.1", "run.max_steps=3"))
    assert summary["steps"] == 3 and summary["skipped"] == {"bad_images": 0, "missing_teacher": 0, "bad_shards": 0}
    assert 0.0 <= summary["val"]["map"] <= 1.0


def test_a_missing_shard_object_is_skipped_and_counted(s3, tmp_path):
    spec = BuildSpec("fmnist:test", RARE, subsample=60, seed=1, max_count=20)
    m = build_set(FashionMNISTSource("test"), spec, _prefix(s3) + "/gone", progress=False)
    victim = m.shard_urls("background")[0]
    storage.remove(victim)
    batches = list(ShardStream(read_manifest(m.root), train=False, image_size=16, batch_size=100))
    seen = sum(len(b.get("key", [])) for b in batches)
    assert seen == m.count - m.shards[[s.kind for s in m.shards].index("background")].count
    assert sum(int(b["skipped"][2]) for b in batches) == 1


def test_retries_transient_errors_and_counts_them(monkeypatch):
    monkeypatch.setattr(storage, "STATS", {"retries": 0, "failures": 0})
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert storage.with_retries(flaky, "get x", attempts=5, base_delay=0.001) == "ok"
    assert len(calls) == 3 and storage.STATS == {"retries": 2, "failures": 0}

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/x")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.with_retries(missing, "get y", attempts=5, base_delay=0.001)
    assert len(calls) == 1  # a permanent error is not retried

    def down():
        raise TimeoutError("read timed out")

    with pytest.raises(TimeoutError):
        storage.with_retries(down, "get z", attempts=3, base_delay=0.001)
    assert storage.STATS == {"retries": 4, "failures": 1}


def test_retries_in_loader_worker_processes_reach_the_training_process(s3_set, monkeypatch):
    """Each shard's first open fails with a connection reset in the worker process; the batches carry the
    worker's retry count back (the training process's own counter never sees it)."""
    import fsspec

    from data.loader import make_loader

    _, remote = s3_set
    manifest = read_manifest(remote.root)
    real_open, failed = fsspec.open, set()

    def flaky_open(url, *args, **kwargs):
        if url not in failed:
            failed.add(url)
            raise ConnectionResetError(f"reset while opening {url}")
        return real_open(url, *args, **kwargs)

    monkeypatch.setattr(fsspec, "open", flaky_open)  # inherited by the forked worker
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY", 0.001)
    before = dict(storage.STATS)
    stream = ShardStream(manifest, train=False, image_size=32, batch_size=32)
    batches = list(make_loader(stream, 1))
    assert sum(len(b.get("key", [])) for b in batches) == remote.count
    worker_retries = sum(b["storage"]["retries"] for b in batches if "storage" in b)
    assert worker_retries == len(remote.shards)
    assert storage.STATS == before  # the parent did not retry: only the reported counts show them
