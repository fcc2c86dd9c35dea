"""The process a command runs in: its device, its process group and collectives, its seeds, and where its
outputs may go. Training, evaluation, mining, labelling and the Ray drivers all need these, so they live apart
from the training loop.

Under `ray job submit --working-dir .` the entrypoint runs in Ray's temporary copy of that directory
(``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>``), which `ray stop` deletes: a relative output
path there is lost without a word. Workers of a fanned-out job start in directories of their own, so a relative
path means another place on every node. Both are decided here, once, from the working directory and the
environment Ray sets (``RAY_JOB_CONFIG_JSON_ENV_VAR``), as pure functions a test can feed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data import remote
from data.config import cache_root

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job manager for a submitted entrypoint: the job's runtime env, with ``working_dir`` if uploaded."""


def ray_job_working_dir(cwd: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The temporary working directory of a submitted Ray job when this process runs in one, else None."""
    cwd = os.getcwd() if cwd is None else cwd
    environ = os.environ if environ is None else environ
    try:
        runtime_env = json.loads(environ.get(RAY_JOB_ENV) or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        runtime_env = {}
    parts = cwd.replace(os.sep, "/").split("/")
    in_copy = "working_dir_files" in parts or any(p.startswith("_ray_pkg_") for p in parts)
    return cwd if in_copy and (runtime_env.get("working_dir") or RAY_JOB_ENV not in environ) else None


def output_location(value: str, key: str, *, fan_out: bool = False, cwd: str | None = None,
                    environ: Mapping[str, str] | None = None, output: bool = True) -> str:
    """A path as the command must use it: a URL or an absolute path as given; a relative one refused in a Ray
    job's temporary working directory, made absolute against the driver's when the work fans out to other
    processes (``fan_out``), and left as it is otherwise. ``output=False``: an input (a set), whose relative
    path there would name the copy, which holds only the files git does not ignore."""
    if not value or remote.is_remote(value) or os.path.isabs(value):
        return value
    temporary = ray_job_working_dir(cwd, environ)
    if temporary is not None:
        why = "which `ray stop` deletes" if output else "which holds only the files git does not ignore"
        raise ValueError(f"{key}={value} is relative, and this job runs in Ray's temporary copy of the working dir "
                         f"({temporary}), {why}: give {key} as an absolute path that every node sees "
                         f"(e.g. {key}=$PWD/{value} in the submitting shell) or an s3:// URL")
    return os.path.abspath(os.path.join(cwd or os.getcwd(), value)) if fan_out else value


def fanned_out(cfg: Any) -> Any:
    """A copy of a job config whose sets and run folder mean the same in every process the work fans out to (Ray
    workers and Tune trials start in their own directories): ``output_location`` with ``fan_out`` for each."""
    def at(section: str, key: str) -> str:
        return output_location(getattr(getattr(cfg, section), key), f"{section}.{key}", fan_out=True,
                               output=key == "out_dir")

    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=at("run", "out_dir")),
                               data=dataclasses.replace(cfg.data, train=at("data", "train"), val=at("data", "val"),
                                                        test=at("data", "test")))


def resolve_device(name: str) -> torch.device:
    """``auto`` takes a usable GPU, else the CPU. ``cuda``, and ``auto`` under BGSPLIT_REQUIRE_GPU=1 (the Docker
    image sets it), refuse the CPU instead: a GPU job that quietly trains on the CPU only shows as hours lost.
    "Usable" means a tiny op runs, because a host driver older than this wheel's CUDA can still show the GPU."""
    if name == "cpu":
        return torch.device("cpu")
    import warnings  # local: this function is the only user

    required = name == "cuda" or os.environ.get("BGSPLIT_REQUIRE_GPU", "0") == "1"

    def refuse(what: str) -> ValueError:
        under_env = required and name != "cuda"  # auto, refused only because of the variable
        asked = f"run.device={name}" + (" with BGSPLIT_REQUIRE_GPU=1" if under_env else "")
        cpu_run = "run.device=cpu" + (" or BGSPLIT_REQUIRE_GPU=0" if under_env else "")
        if torch.version.cuda:
            build = f"torch {torch.__version__} is built for CUDA {torch.version.cuda}"
            fix = f"run on a host whose NVIDIA driver supports CUDA {torch.version.cuda} (docker run --gpus all)"
        else:
            build, fix = f"torch {torch.__version__} is a CPU-only build", "install a CUDA build of torch"
        return ValueError(f"{asked} but {what}; {build}: {fix}, or for a CPU run set {cpu_run}")

    with warnings.catch_warnings(record=True) as caught:  # torch says why CUDA failed to start only as a warning
        warnings.simplefilter("always")
        visible = torch.cuda.is_available()
    if not visible:
        if not required:
            return torch.device("cpu")
        why = next((str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()), "")
        raise refuse("no GPU is usable: torch.cuda.is_available() is False" + (f" ({why})" if why else ""))
    # one GPU per process: torchrun and Ray both say which one through LOCAL_RANK
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        (torch.ones(1, device=device) + 1).item()
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise refuse(f"{device} is visible yet a CUDA op on it fails ({first})") from e
    return device


def collective_timeout() -> timedelta:
    """Longer than an object-store outage that one rank waits out, so the other ranks, blocked in the next
    collective, do not time out first."""
    return timedelta(seconds=max(1800.0, remote.outage_timeout() + 600.0))


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1) unless Ray or a caller already did."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout())
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (a collective: every rank calls it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's value, in rank order, on every rank (a collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_cache(given: str, out_dir: str, name: str) -> str:
    """A run's cache folder (its trunk's features, its cached prefix views): the one the config gives, else
    ``out_dir/name`` beside the run, else, for a run writing to object storage, this machine's cache
    (data.config.cache_root()/name): caches are read back here, memory-mapped, never from the store."""
    if given:
        return given
    if remote.is_remote(out_dir):
        return os.path.join(cache_root(), name)
    return os.path.join(out_dir, name)
