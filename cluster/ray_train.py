"""The Ray Train driver behind `bgsplit train --ray --config configs/X.yaml [section.key=value ...]`.

Meant to run as the entrypoint of `ray job submit --working-dir . -- bgsplit train --ray ...` (RAY_ADDRESS is
set by the job), or directly against `--ray-address`, or with neither on a one-machine cluster it starts itself.
A Ray Train TorchTrainer starts ``cluster.num_workers`` processes with the process group already joined; each
runs the same ``Trainer`` as `bgsplit train` (the engine, DDP or DeepSpeed, comes from the config). Ray keeps
no checkpoints of its own: ours go to ``run.out_dir`` (any fsspec URL), and a worker group that Ray restarts
after a worker died resumes from the newest complete one there (FailureConfig bounds the restarts).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

from data import remote, storage
from trainer.config import JobConfig, config_from_dict

log = logging.getLogger("bgsplit.cluster")

FORWARDED_ENV = ("AWS_", "BGSPLIT_", "DS_ACCELERATOR", "OMP_NUM_THREADS", "TORCH_HOME", "FSSPEC_", "NCCL_")
"""Driver environment the workers need too (object-store endpoint and keys, retry and thread settings)."""

LOCAL_CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
"""A self-started one-machine cluster listens on 127.0.0.1 only and sends no usage statistics."""


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV)}
    env.setdefault("OMP_NUM_THREADS", "1")  # several trainers share a node: no thread oversubscription
    return env


def train_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker; torch.distributed is initialised by Ray (gloo on CPU, NCCL on GPU)."""
    import ray.train
    import torch

    from trainer.train import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = config_from_dict(config["job"])
    context = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(context.get_local_rank())
    if cfg.cluster.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
        cfg.run.device = "cpu"
    trainer = Trainer.build(cfg, device, restartable=True)  # every attempt continues the run
    trainer.maybe_resume()
    summary = trainer.fit()
    val = summary.get("val") or {}
    ray.train.report({"steps": summary["steps"], "val_map": val.get("map"),
                      "resumed_from": summary.get("resumed_from") or ""})


def storage_path(cfg: JobConfig) -> str:
    if cfg.cluster.storage_path:
        return cfg.cluster.storage_path
    if remote.is_remote(cfg.run.out_dir):
        return os.path.expanduser("~/ray_results")
    return os.path.abspath(os.path.join(cfg.run.out_dir, "ray"))


def make_trainer(cfg: JobConfig, name: str = "bgsplit"):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    c = cfg.cluster
    resources: dict[str, float] = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    if c.memory_per_worker_gb > 0:
        resources["memory"] = c.memory_per_worker_gb * (1 << 30)
    from trainer.runtime import collective_timeout, fanned_out

    cfg = fanned_out(cfg)  # workers start in their own directories (refused in Ray's temporary working dir)

    remote.configure(outage_timeout_s=cfg.storage.outage_timeout_s)  # forwarded to the workers (BGSPLIT_*)
    return TorchTrainer(
        train_worker,
        train_loop_config={"job": cfg.to_dict()},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo",
                                 timeout_s=int(collective_timeout().total_seconds())),
        run_config=RunConfig(name=name, storage_path=storage_path(cfg),
                             failure_config=FailureConfig(max_failures=c.max_failures)),
    )


def cluster_file(environ: dict[str, str] | None = None) -> str:
    """Where `ray start --head` records this machine's cluster (and where a killed head leaves it behind)."""
    environ = os.environ if environ is None else environ
    return os.path.join(environ.get("RAY_TMPDIR") or tempfile.gettempdir(), "ray", "ray_current_cluster")


def answers(address: str, timeout_s: float = 1.0) -> bool:
    host, _, port = address.strip().rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def local_address(path: str, reachable: Callable[[str], bool] = answers) -> str:
    """The address for "no cluster named": this machine's `ray start` cluster if it answers, else "local" (start
    a new one). Ray itself joins whatever the cluster file names, so a head killed by PID left a file that made
    every later run wait minutes on a dead address."""
    try:
        with open(path) as f:
            recorded = f.read().strip()
    except OSError:
        return "local"
    return recorded if recorded and reachable(recorded) else "local"


def connect(address: str = "") -> None:
    """Join the cluster (``address``, RAY_ADDRESS under `ray job submit`, else this machine's `ray start` cluster
    if it answers) or start a one-machine one; nothing when this process is already connected. Every command
    with ``--ray`` (training, Tune's trials, the shard passes) connects here."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    env = worker_env()
    if not address:
        address = local_address(cluster_file())
    if address != "local":
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return
    os.environ.update(LOCAL_CLUSTER_ENV)
    ray.init(address="local", runtime_env={"env_vars": env}, include_dashboard=False,
             _node_ip_address="127.0.0.1")


def launch(cfg: JobConfig, address: str = "") -> dict[str, Any]:
    """Run the TorchTrainer to the end and return the run's summary.json (written by rank 0)."""
    from data.shards import read_manifest
    from trainer.runtime import fanned_out

    # a bad path fails here, in one line, instead of in every worker and every restart
    cfg = fanned_out(cfg)
    for location in filter(None, (cfg.data.train, cfg.data.val)):
        read_manifest(location)
    connect(address)
    result = make_trainer(cfg).fit()
    if result.error is not None:
        raise RuntimeError(f"Ray training failed after cluster.max_failures={cfg.cluster.max_failures} restarts: "
                           f"{result.error}")
    return json.loads(storage.read_bytes(storage.join(cfg.run.out_dir, "summary.json")))
