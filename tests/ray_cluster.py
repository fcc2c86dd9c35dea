"""A real local Ray cluster for the tests: `ray start --head --block` on 127.0.0.1, stopped by its PID.

Its own temp dir (short: Ray's unix socket paths must stay under ~100 characters) and free ports; usage stats
and auth off, listeners on loopback (../shared/environment.md). The head runs in its own session, so stopping
it signals that process group only, never processes found by name.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from s3_server import free_port

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}


class RayCluster:
    def __init__(self, num_cpus: int = 4, extra_env: dict[str, str] | None = None):
        self.num_cpus = num_cpus
        self.extra_env = extra_env or {}
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.temp_dir = tempfile.mkdtemp(prefix="bgray-", dir="/tmp")
        self.log_path = Path(self.temp_dir) / "head.log"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for processes that talk to this cluster (drivers, `ray job submit`)."""
        bin_dir = str(Path(sys.executable).parent)
        return {**os.environ, **RAY_ENV, **self.extra_env, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}

    def start(self, timeout: float = 120.0) -> "RayCluster":
        ray = str(Path(sys.executable).with_name("ray"))
        cmd = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               f"--num-cpus={self.num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", "--disable-usage-stats"]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._jobs_api_answers():
                return self
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"Ray head did not answer on {self.dashboard} within {timeout:.0f}s:\n{self.log_tail()}")

    def _jobs_api_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.dashboard + "/api/jobs/", timeout=2) as r:
                json.loads(r.read())
            return True
        except (OSError, ValueError):
            return False

    def worker_pids(self, class_name: str = "RayTrainWorker") -> list[int]:
        """PIDs of the live actors of ``class_name`` (through the state API over HTTP)."""
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard, filters=[("class_name", "=", class_name),
                                                              ("state", "=", "ALIVE")], raise_on_missing_output=False)
        return sorted(int(a.pid) for a in actors if a.pid)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # the head's own session: its PID is the group id
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # raylet and GCS run in the same session; anything left of it goes with the group
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, AttributeError, TypeError):
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
