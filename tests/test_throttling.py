"""A store that throttles (S3's 503 SlowDown, or 429) is waited out within the outage budget, its answers are
counted, and no sample is skipped for it; one that throttles past the budget ends in one StorageOutage line.

The throttling is real HTTP: bench/throttle_proxy.py on loopback in front of the suite's SeaweedFS answers a
number of requests with the error answer and a Retry-After header, then lets the rest through."""
from __future__ import annotations

import contextlib
import os
import sys
import uuid
from pathlib import Path

import pytest

from conftest import environ, noise_samples
from data import remote, storage
from data.config import LoaderConfig
from data.loader import ShardStream, make_loader
from data.shards import read_manifest, write_shard_set

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from throttle_proxy import ThrottleProxy  # noqa: E402

SAMPLES, PER_SHARD = 48, 8


@pytest.fixture(scope="module")
def shard_set(s3):
    root = f"s3://{s3.bucket}/throttle/{uuid.uuid4().hex[:8]}"
    write_shard_set(root, noise_samples(SAMPLES, (24, 24)), rare_classes=["r"], class_names=["bg", "R"],
                    max_count=PER_SHARD)
    return root


@contextlib.contextmanager
def through(s3, tmp_path, throttle: int, status: int, after: int = 0, retry_after: float = 0.2, match: str = ".tar"):
    """s3fs pointed at a throttling proxy in front of the suite's SeaweedFS for a block. s3fs clients keep the
    endpoint they were made with, so its instance cache is cleared on the way in and out."""
    import s3fs

    proxy = ThrottleProxy(s3.endpoint.split("://", 1)[1], throttle, status, retry_after, after,
                          log=str(tmp_path / f"throttled-{uuid.uuid4().hex[:6]}.log"), match=match).start()
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with environ({"AWS_ENDPOINT_URL": proxy.endpoint}):
            yield proxy
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        proxy.stop()


def _read(root: str) -> tuple[list[str], list[int]]:
    keys, skipped = [], [0, 0]
    for batch in ShardStream(read_manifest(root), LoaderConfig(image_size=8, batch_size=5), train=False):
        keys += batch.get("key", [])
        skipped = [skipped[i] + int(batch["skipped"][i]) for i in (0, 1)]
    return keys, skipped


@pytest.mark.parametrize("status", [503, 429])
def test_throttled_reads_are_retried_counted_and_never_skipped(s3, shard_set, tmp_path, monkeypatch, status):
    monkeypatch.setattr(remote, "STATS", dict.fromkeys(remote.STATS, 0))
    # the shard reads are throttled: the first two go through, the next twelve get the throttling answer
    with through(s3, tmp_path, throttle=12, status=status, after=2) as proxy:
        keys, skipped = _read(shard_set)
        throttled = proxy.throttled()
    assert keys == [f"s{i:04d}" for i in range(SAMPLES)] and skipped == [0, 0]
    assert throttled == 12  # the proxy's own count: every throttle it planned was met
    assert remote.STATS["throttled"] == throttled  # each counted, those s3fs retried by itself included
    assert remote.STATS["retries"] <= throttled and remote.STATS["failures"] == 0
    if status == 429:  # s3fs itself retries a SlowDown a few times (~1 s); a 429 comes straight to with_retries
        assert remote.STATS["retries"] == throttled


def test_a_training_stream_s_loader_workers_count_their_throttles_too(s3, shard_set, tmp_path, monkeypatch):
    """Forked loader workers meet the throttling; their counts reach the training process with the batches
    (read-ahead off, so no range is fetched after a worker's last batch has gone)."""
    monkeypatch.setattr(remote, "STATS", dict.fromkeys(remote.STATS, 0))
    with through(s3, tmp_path, throttle=10, status=503) as proxy:
        stream = ShardStream(read_manifest(shard_set), LoaderConfig(image_size=8, batch_size=4, num_workers=2,
                                                                    shuffle_buffer_mb=0.01, read_ahead_mb=0),
                             train=True, seed=1)
        stream.epochs = 1
        batches = list(make_loader(stream, 2))
        throttled = proxy.throttled()
    keys = [k for b in batches for k in b.get("key", [])]
    assert sorted(keys) == [f"s{i:04d}" for i in range(SAMPLES)]  # every sample once: nothing skipped, no padding
    assert sum(int(b["skipped"].sum()) for b in batches) == 0
    worker = [b["storage"] for b in batches if "storage" in b]
    assert throttled == 10 and sum(w["throttled"] for w in worker) + remote.STATS["throttled"] == throttled
    assert sum(w["retries"] for w in worker) >= 1


def test_throttling_past_the_outage_budget_is_one_line_not_skipped_samples(s3, shard_set, tmp_path, monkeypatch):
    monkeypatch.setenv(remote.OUTAGE_ENV, "1.5")
    with through(s3, tmp_path, throttle=10_000, status=503, retry_after=0.3):
        with pytest.raises(remote.StorageOutage) as err:
            _read(shard_set)
    msg = str(err.value)
    assert "\n" not in msg and "storage.outage_timeout_s" in msg and f"{shard_set}/shard-background-" in msg
    assert "reduce your request rate" in msg  # the SlowDown answer, named
    assert os.environ[remote.OUTAGE_ENV] == "1.5"


class _Clock:
    """with_retries' view of time, moved on by its sleeps: the waits are checked as exact figures."""

    def __init__(self) -> None:
        self.now, self.sleeps = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _slow_down(retry_after: str) -> Exception:
    import botocore.exceptions as bce

    return bce.ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                            "ResponseMetadata": {"HTTPStatusCode": 503, "HTTPHeaders": {"retry-after": retry_after}}},
                           "GetObject")


@pytest.mark.parametrize("header, budget, waits, gives_up", [
    ("3", 600, [3.0, 3.0, 3.0], False),  # the store's word, not the exponential ladder (0.2, 0.4, 0.8)
    ("120", 10, [10.0], True),  # never past the outage budget: it ends there, in one line
])
def test_a_retry_after_header_sets_the_wait_within_the_budget(monkeypatch, header, budget, waits, gives_up):
    clock = _Clock()
    monkeypatch.setattr(remote, "time", clock)
    monkeypatch.setattr(remote, "STATS", dict.fromkeys(remote.STATS, 0))
    monkeypatch.setenv(remote.OUTAGE_ENV, str(budget))
    failures = iter(range(3))

    def call():
        if next(failures, None) is not None:
            raise OSError(16, "Please reduce your request rate.") from _slow_down(header)
        return "ok"

    if gives_up:
        with pytest.raises(remote.StorageOutage, match="storage.outage_timeout_s"):
            remote.with_retries(call, "read s3://b/shard.tar bytes 0-10")
    else:
        assert remote.with_retries(call, "read s3://b/shard.tar bytes 0-10") == "ok"
    assert clock.sleeps == waits
    assert remote.STATS["retries"] == len(waits)
