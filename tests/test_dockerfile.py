"""Docker cannot build here: check what can be checked. The Dockerfile parses, its base is pinned, it installs
with the README's command, and its entrypoint starts a Ray head or worker or runs any command."""
import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_parses_and_installs_like_the_readme():
    ops = _instructions()
    known = {"FROM", "RUN", "WORKDIR", "COPY", "ENV", "ENTRYPOINT", "CMD", "ARG", "LABEL", "EXPOSE", "USER"}
    assert {op for op, _ in ops} <= known
    assert ops[0][0] == "FROM" and re.fullmatch(r"\S+:\d[\w.\-]*", ops[0][1]), "the base image must be pinned"
    runs = [rest for op, rest in ops if op == "RUN"]
    assert "./run.sh install" in runs
    assert "./run.sh" in (ROOT / "README.md").read_text()  # the same install command as the README
    entry = json.loads(dict(ops)["ENTRYPOINT"])
    assert entry[0].startswith("/opt/bgsplit/") and dict(ops)["WORKDIR"] == "/opt/bgsplit"
    assert (ROOT / entry[0].removeprefix("/opt/bgsplit/")).stat().st_mode & 0o111  # executable in the repo


def _entry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "cluster" / "entrypoint.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "BGSPLIT_DRY_RUN": "1"}, timeout=30)


def test_entrypoint_starts_head_and_workers_and_passes_commands_through():
    assert subprocess.run(["bash", "-n", str(ROOT / "cluster" / "entrypoint.sh")]).returncode == 0
    head = _entry("head").stdout
    assert head.startswith("ray start --head --block") and "--disable-usage-stats" in head
    assert "--address=10.0.0.1:6379" in _entry("worker", "10.0.0.1:6379").stdout
    missing = _entry("worker")
    assert missing.returncode == 2 and "head's address" in missing.stderr
    assert _entry("bgsplit", "train", "--config", "x.yaml").stdout.strip() == "bgsplit train --config x.yaml"
