"""Object-store outages: what counts as one, waiting it out, giving up with one clear line, and ranged reads that
resume at the byte where the store went away. The server tests stop and restart their own SeaweedFS (the
session one is shared with other tests and must stay up)."""
import asyncio
import errno
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import aiohttp
import botocore.exceptions as bce
import pytest
from aiohttp.client_reqrep import ConnectionKey, RequestInfo
from fsspec.exceptions import FSTimeoutError
from multidict import CIMultiDict, CIMultiDictProxy
from s3fs.errors import translate_boto_error
from yarl import URL

from data import ranged, remote, storage
from conftest import own_seaweedfs

ROOT = Path(__file__).resolve().parents[1]
ENDPOINT = "http://127.0.0.1:9/b/x"


def client_error(code: str, status: int) -> bce.ClientError:
    return bce.ClientError({"Error": {"Code": code, "Message": f"{code} from the server"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def response_error(status: int) -> aiohttp.ClientResponseError:
    info = RequestInfo(URL("http://127.0.0.1:9/b/x"), "GET", CIMultiDictProxy(CIMultiDict()))
    return aiohttp.ClientResponseError(info, (), status=status, message="answer")


def connector_error() -> aiohttp.ClientConnectorError:
    key = ConnectionKey("127.0.0.1", 9, False, True, None, None, None, None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))


TRANSIENT = {
    "botocore EndpointConnectionError": bce.EndpointConnectionError(endpoint_url=ENDPOINT),
    "botocore ConnectionClosedError": bce.ConnectionClosedError(endpoint_url=ENDPOINT),
    "botocore ReadTimeoutError": bce.ReadTimeoutError(endpoint_url=ENDPOINT),
    "botocore ConnectTimeoutError": bce.ConnectTimeoutError(endpoint_url=ENDPOINT),
    "botocore ProxyConnectionError": bce.ProxyConnectionError(proxy_url="http://proxy:3128"),
    "botocore ResponseStreamingError": bce.ResponseStreamingError(error="payload cut short"),
    "botocore IncompleteReadError": bce.IncompleteReadError(actual_bytes=10, expected_bytes=20),
    "ClientError 503 SlowDown": client_error("SlowDown", 503),
    "ClientError 500 InternalError": client_error("InternalError", 500),
    "ClientError 502 (a proxy's answer)": client_error("502", 502),
    "ClientError 429 throttled": client_error("TooManyRequestsException", 429),
    "ClientError SlowDown without a status": bce.ClientError({"Error": {"Code": "SlowDown"}}, "PutObject"),
    "s3fs-translated 503": translate_boto_error(client_error("SlowDown", 503)),
    "s3fs-translated 500": translate_boto_error(client_error("InternalError", 500)),
    "s3fs-translated 504 (unknown code)": translate_boto_error(client_error("GatewayTimeout", 504)),
    "aiohttp ClientConnectorError": connector_error(),
    "aiohttp ServerDisconnectedError": aiohttp.ServerDisconnectedError(),
    "aiohttp ClientOSError": aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer"),
    "aiohttp ClientPayloadError": aiohttp.ClientPayloadError("Response payload is not completed"),
    "aiohttp ServerTimeoutError": aiohttp.ServerTimeoutError("Timeout on reading data from socket"),
    "aiohttp ClientResponseError 503": response_error(503),
    "ConnectionRefusedError": ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    "ConnectionResetError": ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "BrokenPipeError": BrokenPipeError(errno.EPIPE, "Broken pipe"),
    "TimeoutError": TimeoutError("timed out"),
    "socket.timeout": socket.timeout("timed out"),
    "asyncio.TimeoutError": asyncio.TimeoutError(),
    "fsspec FSTimeoutError": FSTimeoutError(),
    "OSError ENETUNREACH": OSError(errno.ENETUNREACH, "Network is unreachable"),
    "OSError without errno": OSError("Connection broken"),
}
PERMANENT = {
    "ClientError 404 NoSuchKey": client_error("NoSuchKey", 404),
    "ClientError 403 AccessDenied": client_error("AccessDenied", 403),
    "ClientError 403 (HEAD, code only the status)": client_error("403", 403),
    "ClientError 404 (HEAD, code only the status)": client_error("404", 404),
    "ClientError 400 InvalidArgument": client_error("InvalidArgument", 400),
    "ClientError 416 InvalidRange": client_error("InvalidRange", 416),
    "s3fs-translated NoSuchKey": translate_boto_error(client_error("NoSuchKey", 404)),
    "s3fs-translated AccessDenied": translate_boto_error(client_error("AccessDenied", 403)),
    "s3fs-translated 400 (OSError EIO caused by it)": translate_boto_error(client_error("InvalidArgument", 400)),
    "botocore NoCredentialsError": bce.NoCredentialsError(),
    "botocore ParamValidationError": bce.ParamValidationError(report="Invalid bucket name"),
    "botocore SSLError": bce.SSLError(endpoint_url=ENDPOINT, error="certificate verify failed"),
    "aiohttp ClientResponseError 404": response_error(404),
    "aiohttp InvalidURL": aiohttp.InvalidURL("not a url"),
    "FileNotFoundError": FileNotFoundError(errno.ENOENT, "No such file", "s3://b/x"),
    "PermissionError": PermissionError(errno.EACCES, "Permission denied"),
    "IsADirectoryError": IsADirectoryError(errno.EISDIR, "Is a directory"),
    "NotADirectoryError": NotADirectoryError(errno.ENOTDIR, "Not a directory"),
    "FileExistsError": FileExistsError(errno.EEXIST, "File exists"),
    "OSError ENOSPC": OSError(errno.ENOSPC, "No space left on device"),
    "StorageOutage (already waited out)": remote.StorageOutage("read s3://b/x: gave up"),
    "ValueError": ValueError("a bug"),
    "KeyError": KeyError("a bug"),
}


@pytest.mark.parametrize("name", sorted(TRANSIENT))
def test_network_and_server_side_errors_are_transient(name):
    assert remote.is_transient(TRANSIENT[name])


@pytest.mark.parametrize("name", sorted(PERMANENT))
def test_answers_that_will_not_change_are_permanent(name):
    assert not remote.is_transient(PERMANENT[name])


@pytest.fixture
def stats(monkeypatch):
    monkeypatch.setattr(remote, "STATS", dict.fromkeys(remote.STATS, 0))
    # setenv, not delenv: pytest only undoes a delenv of a variable that existed, and configure() sets it
    monkeypatch.setenv(remote.OUTAGE_ENV, "600")
    return remote.STATS


class FakeClock:
    """with_retries' view of time: sleep() moves it on at once, so the back-off schedule and the deadline are checked
    as exact figures, whatever the machine's speed or load."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(remote, "time", fake)
    return fake


def outage_lines(caplog) -> tuple[list[str], list[str]]:
    lines = [r.getMessage() for r in caplog.records if r.name == "bgsplit.storage"]
    return [m for m in lines if "outage:" in m], [m for m in lines if "recovered" in m]


def test_a_short_outage_is_waited_out_with_one_line_when_it_starts_and_one_when_it_ends(stats, caplog, clock):
    start = clock.now

    def store():
        if clock.now - start < 1.5:
            raise bce.EndpointConnectionError(endpoint_url=ENDPOINT)
        return b"payload"

    with caplog.at_level(logging.INFO, logger="bgsplit.storage"):
        assert remote.with_retries(store, "read s3://b/x bytes 0-1000") == b"payload"
    took = clock.now - start
    # capped exponential back-off with +-10% jitter: 0.2, 0.4, 0.8 (and 1.6 if those fell short of 1.5 s)
    assert all(0.9 <= s / (0.2 * 2 ** i) <= 1.1 for i, s in enumerate(clock.sleeps))
    # went through on the first attempt after the store was back: the time is exactly the sleeps taken
    assert took == pytest.approx(sum(clock.sleeps)) and sum(clock.sleeps[:-1]) < 1.5 <= took
    assert stats["retries"] == len(clock.sleeps) in (3, 4) and stats["failures"] == 0
    assert stats["outage_seconds"] == pytest.approx(took)
    began, ended = outage_lines(caplog)
    assert len(began) == 1 and len(ended) == 1 and len(caplog.records) == 2
    assert "read s3://b/x bytes 0-1000" in began[0] and "EndpointConnectionError" in began[0]


def test_an_outage_longer_than_the_timeout_raises_one_line(stats, caplog, clock):
    remote.configure(outage_timeout_s=1)
    calls = []

    def store():
        calls.append(clock.now)
        raise bce.EndpointConnectionError(endpoint_url=ENDPOINT)

    start = clock.now
    with caplog.at_level(logging.INFO, logger="bgsplit.storage"), pytest.raises(remote.StorageOutage) as info:
        remote.with_retries(store, "read s3://b/x bytes 0-1000")
    # the last sleep is cut to the deadline, which is then reached exactly: no attempt past it, none short of it
    assert clock.now - start == pytest.approx(1.0) and calls[-1] - start == pytest.approx(1.0)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, OSError)
    assert message.startswith("read s3://b/x bytes 0-1000: ")
    assert "EndpointConnectionError" in message
    assert "check the object store, or raise storage.outage_timeout_s" in message
    assert isinstance(info.value.last_error, bce.EndpointConnectionError)
    assert len(calls) >= 4 and stats["failures"] == 1
    began, ended = outage_lines(caplog)
    assert len(began) == 1 and not ended  # no "recovered": the error says the rest


def test_a_permanent_error_during_an_outage_ends_it_and_is_raised_at_once(stats):
    answers = [bce.EndpointConnectionError(endpoint_url=ENDPOINT), translate_boto_error(client_error("NoSuchKey", 404))]

    def store():
        raise answers.pop(0)

    with pytest.raises(FileNotFoundError):
        remote.with_retries(store, "read s3://b/x")
    assert stats["retries"] == 1 and stats["failures"] == 0


def test_the_timeout_reaches_forked_and_spawned_processes(stats):
    import multiprocessing as mp

    remote.configure(outage_timeout_s=7.5)
    assert remote.outage_timeout() == 7.5
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.apply(remote.outage_timeout) == 7.5
    spawned = subprocess.run([sys.executable, "-c", "from data import remote; print(remote.outage_timeout())"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert float(spawned.stdout) == 7.5
    with pytest.raises(ValueError, match="> 0"):
        remote.configure(outage_timeout_s=0)
    os.environ[remote.OUTAGE_ENV] = "ten minutes"
    with pytest.raises(ValueError, match="BGSPLIT_OUTAGE_TIMEOUT_S"):
        remote.outage_timeout()


RANGES = [(0, None), (1, 999_999), (65_536, 65_538), (65_535, 131_073), (123_457, 123_457), (999_990, None)]


def check_ranges(url: str, blob: bytes) -> None:
    for start, end in RANGES:
        want = blob[start:end]
        before = remote.STATS["bytes_read"]
        with ranged.open_range(url, start, end, chunk=65_537) as f:
            assert f.read() == want, (start, end)
        assert remote.STATS["bytes_read"] - before == len(want)
        parts = []
        with ranged.open_range(url, start, end, chunk=4099) as f:  # reads smaller, larger and across chunks
            for size in (1, 4098, 4100, 10_001):
                parts.append(f.read(size))
            while data := f.read(7777):
                parts.append(data)
            assert f.read() == b"" and f.tell() == len(want)
            f.seek(max(0, len(want) - 5))
            assert f.read() == want[-5:]
        assert b"".join(parts) == want, (start, end)
    with ranged.open_range(url, 10, 20) as f:
        buf = bytearray(20)
        assert f.readinto(buf) == 10 and bytes(buf[:10]) == blob[10:20]


def test_open_range_reads_exactly_the_range_locally(tmp_path):
    blob = os.urandom(1_000_003)
    (tmp_path / "blob").write_bytes(blob)
    check_ranges(str(tmp_path / "blob"), blob)
    with pytest.raises(FileNotFoundError, match="check the path"):
        ranged.open_range(str(tmp_path / "missing"))


# -- against a real server that the tests stop and start --------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """This module's own SeaweedFS (conftest.own_seaweedfs)."""
    with own_seaweedfs(tmp_path_factory.mktemp("outage-seaweedfs")) as server:
        yield server


def new_url(server) -> str:
    return f"s3://{server.bucket}/outage/{uuid.uuid4().hex[:8]}"


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_a_restarted_server_comes_back_on_the_same_port_with_its_data(store):
    url, blob = new_url(store), os.urandom(200_000)
    storage.write_bytes(url, blob)
    port, data_dir, pid = store.port, store.data, store.proc.pid
    with store.down():
        assert refused(port)
    assert (store.port, store.data) == (port, data_dir) and store.proc.pid != pid
    assert storage.read_bytes(url) == blob
    took = store.outage(0.5)
    assert took >= 0.5 and storage.read_bytes(url) == blob
    assert url.rsplit("/", 1)[-1] in storage.listdir(url.rsplit("/", 1)[0])


def test_open_range_reads_exactly_the_range_from_s3(store):
    url, blob = new_url(store), os.urandom(1_000_003)
    storage.write_bytes(url, blob)
    check_ranges(url, blob)
    assert storage.read_bytes(url) == blob
    with storage.open_read(url) as f:
        assert f.read(10) == blob[:10]


def test_a_missing_object_fails_at_once(store, stats):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError):
        ranged.open_range(new_url(store)).read()
    assert time.monotonic() - start < 2 and stats["retries"] == 0


def test_a_failed_multipart_upload_is_aborted_and_redone_not_completed(store, stats, monkeypatch):
    """A multipart upload whose completion fails is aborted (completing it with the parts sent so far would
    leave a truncated object) and the upload is redone whole."""
    import s3fs.core

    url, blob = new_url(store), os.urandom(12 << 20)
    fs, path = remote._fs(url)
    monkeypatch.setattr(storage, "UPLOAD_CHUNK", 5 << 20)  # S3's smallest part: a multipart upload of 12 MB
    real, calls = s3fs.core.S3FileSystem._call_s3, []

    async def flaky(self, method, *args, **kwargs):
        calls.append(method)
        if method == "complete_multipart_upload" and calls.count(method) == 1:
            raise bce.ConnectionClosedError(endpoint_url=store.endpoint)  # the last request, once
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.core.S3FileSystem, "_call_s3", flaky)
    with storage.atomic_write(url) as f:
        f.write(blob)
    assert storage.read_bytes(url) == blob and stats["retries"] == 1
    assert calls.count("upload_part") >= 6 and calls.count("abort_multipart_upload") == 1
    bucket, key = path.split("/", 1)
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert not [u for u in uploads if u["Key"] == key]  # the first attempt's upload was aborted


@pytest.mark.slow
def test_an_outage_in_the_middle_of_streaming_and_writing_is_waited_out(store, stats, caplog):
    """The server goes away for 8 s while a 3 MB object streams in 64 KiB ranges and another is written: both
    finish with the right bytes, the stream resumes at its offset (nothing read twice)."""
    url, blob = new_url(store), os.urandom(3_000_017)
    storage.write_bytes(url, blob)
    other_url, other = new_url(store), os.urandom(500_000)
    reading, down = threading.Event(), threading.Event()
    times: dict[str, float] = {}
    errors: list[BaseException] = []

    def take_the_store_away():
        reading.wait(30)
        with store.down():
            times["down"] = time.monotonic()
            down.set()
            time.sleep(8)
        times["up"] = time.monotonic()

    def write_while_down():
        down.wait(60)
        try:
            storage.write_bytes(other_url, other)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        times["written"] = time.monotonic()

    threads = [threading.Thread(target=take_the_store_away), threading.Thread(target=write_while_down)]
    for t in threads:
        t.start()
    parts, stalls = [], []
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="bgsplit.storage"):
        try:
            with ranged.open_range(url, chunk=64 << 10) as f:
                while True:
                    at, t0 = f.tell(), time.monotonic()
                    data = f.read(64 << 10)
                    if time.monotonic() - t0 > 3:
                        stalls.append(at)
                        times["stalled"], times["resumed"] = t0, time.monotonic()
                    if not data:
                        break
                    parts.append(data)
                    if len(parts) == 8:
                        reading.set()
                    time.sleep(0.1)  # slower than the store: the outage falls in the middle of the object
        finally:
            reading.set()
            for t in threads:
                t.join(120)
    streamed = stats["bytes_read"]
    timeline = {k: round(v - start, 1) for k, v in sorted(times.items(), key=lambda kv: kv[1])}
    print(f"timeline, s from the first read: {timeline}, finished {time.monotonic() - start:.1f}")  # pytest -s
    assert not errors
    assert b"".join(parts) == blob and storage.read_bytes(other_url) == other
    assert len(stalls) == 1 and 0 < stalls[0] < len(blob)  # waited once, mid-object
    assert streamed == len(blob)  # the stream resumed at its offset: nothing was read twice
    assert times["written"] > times["up"] and stats["retries"] > 0 and stats["failures"] == 0
    assert stats["outage_seconds"] >= times["up"] - times["down"]
    began, ended = outage_lines(caplog)
    assert len(began) == 1 and len(ended) == 1  # both calls failing together are one outage


def test_a_store_down_longer_than_the_timeout_raises_storage_outage(store, stats, monkeypatch):
    monkeypatch.setenv(remote.OUTAGE_ENV, "3")
    url = new_url(store)
    storage.write_bytes(url, b"x" * 100_000)
    f = ranged.open_range(url, chunk=64 << 10)  # the size is known: the failure is a read
    with store.down():
        start = time.monotonic()
        with pytest.raises(remote.StorageOutage) as info:
            f.read()
        took = time.monotonic() - start
    assert 3 <= took < 6
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"read {url} bytes 0-65536: ")
    assert "EndpointConnectionError" in message and "raise storage.outage_timeout_s (now 3s" in message
    assert stats["failures"] == 1


@pytest.mark.slow
def test_a_training_run_waits_out_a_30_s_outage_of_its_shards_labels_and_checkpoints(store, teacher, tmp_path):
    """Shards, teacher labels and checkpoints on the store; the store stops for 30 s mid-run (a loader worker
    process reading, checkpoints uploading). The run finishes with its planned steps, nothing skipped, every
    sample of each epoch seen once, and its checkpoints complete."""
    import collections

    from conftest import RARE, TEACHER_SIZE
    from data.build import BuildSpec, build_set
    from data.sources import FashionMNISTSource
    from trainer.checkpoint import list_checkpoints, load_checkpoint
    from trainer.config import load_config
    from trainer.teacher_label import label_shard_set
    from trainer.scoring import ScoringConfig
    from trainer.train import Trainer

    root = new_url(store)
    m = build_set(FashionMNISTSource("test"), BuildSpec("fmnist:test", RARE, subsample=240, seed=5, max_count=12),
                  f"{root}/train", progress=False)
    label_shard_set(teacher, m.root, ScoringConfig(TEACHER_SIZE, 128))
    cfg = load_config(None, [f"data.train={m.root}", "data.val=", "data.image_size=32", "data.batch_size=16",
                             "data.num_workers=1", "data.shuffle_buffer_mb=0.05", f"teacher.image_size={TEACHER_SIZE}",
                             "teacher.mode=cached", "loss.aux_weight=0.1", "optim.epochs=2", "run.checkpoint_every=4",
                             "run.keep_checkpoints=20", f"run.out_dir={root}/run", "run.progress=false",
                             "run.device=cpu", "storage.outage_timeout_s=120"])
    trainer = Trainer.build(cfg)
    keys: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    outage: dict[str, float] = {}

    class Watch:
        """Records every batch's keys by epoch; just after the step-4 checkpoint started uploading, takes the
        store away for 30 s."""

        def before_step(self, trainer, micro):
            for batch in micro:
                keys[int(batch["position"][0])].update(batch["key"])
            if trainer.step == 6 and "thread" not in outage:
                def take_the_store_away():
                    outage["down"] = time.monotonic()
                    outage["seconds"] = store.outage(30)

                outage["thread"] = threading.Thread(target=take_the_store_away)
                outage["thread"].start()

    start = time.monotonic()
    summary = trainer.fit(callbacks=[Watch()])
    outage["thread"].join(60)
    assert time.monotonic() - start > 30 and outage["seconds"] >= 30  # the run really waited
    assert summary["steps"] == trainer.total_steps == 2 * trainer.steps_per_epoch
    assert summary["skipped"] == {"bad_images": 0, "bad_shards": 0} and summary["skipped_by_shard"] == {}
    assert summary["storage"]["retries"] > 0 and summary["storage"]["outage_seconds"] > 10
    for epoch in (0, 1):
        seen = keys[epoch]
        assert len(seen) == m.count and sum(seen.values()) == trainer.steps_per_epoch * 16
        assert sum(seen.values()) - m.count < 16  # each sample once, plus less than a batch of padding
    checkpoints = list_checkpoints(cfg.run.out_dir)
    assert len(checkpoints) == trainer.total_steps // 4 + (trainer.total_steps % 4 > 0)
    assert load_checkpoint(checkpoints[-1])["step"] == trainer.total_steps
