"""Training checkpoints on any fsspec URL: written in the background, visible only when complete, keep-last-k.

A checkpoint is a folder (object-store prefix) ``<out_dir>/checkpoints/step-NNNNNNNN/`` holding

- ``state.pt``: written by rank 0: student, scheduler, engine state (the optimiser under DDP), loader position,
  every rank's RNG state, config, model shape, metrics history;
- ``deepspeed/``: DeepSpeed's own files when that engine runs (every rank uploads its ZeRO partition, then
  drops a ``rank-NNNNN.done`` marker carrying this save's nonce);
- ``index.json``: written last, by rank 0, once its own upload and every rank's marker are there.

Only a folder with ``index.json`` is a checkpoint: a crash or a killed process part-way through an upload
(an S3 multipart upload that never completes is never visible) leaves at most a folder without an index, which
``latest_checkpoint`` ignores and the next resume removes. The slow part, the upload, runs in a background
thread while training goes on; the state is serialised to bytes first, so later steps cannot change what is
written, and a new save first waits for the previous upload (at most one in flight). ``save`` is called on every
rank: the collective parts (gathering RNG states, DeepSpeed's partitioned save) happen there, never under
``if rank == 0``.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np
import torch

from data import storage

log = logging.getLogger("bgsplit.checkpoint")

PATTERN = re.compile(r"^step-(\d{8})$")
INDEX, STATE, DEEPSPEED = "index.json", "state.pt", "deepspeed"
FORMAT = "bgsplit-checkpoint/2"
MARKER_TIMEOUT_S = float(os.environ.get("BGSPLIT_CHECKPOINT_MARKER_TIMEOUT", "1800"))


def checkpoint_dir(out_dir: str) -> str:
    return storage.join(out_dir, "checkpoints")


def step_url(out_dir: str, step: int) -> str:
    return storage.join(checkpoint_dir(out_dir), f"step-{step:08d}")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _steps(out_dir: str) -> list[tuple[int, str]]:
    folder = checkpoint_dir(out_dir)
    return sorted((int(m.group(1)), storage.join(folder, n))
                  for n in storage.listdir(folder) if (m := PATTERN.match(n)))


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints (an index file is present), oldest first."""
    return [url for _, url in _steps(out_dir) if storage.exists(storage.join(url, INDEX))]


def incomplete_checkpoints(out_dir: str) -> list[str]:
    return [url for _, url in _steps(out_dir) if not storage.exists(storage.join(url, INDEX))]


def latest_checkpoint(out_dir: str) -> str | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def state_url(url: str) -> str:
    """A checkpoint folder or its state.pt; a plain .pt file (exported weights) is read as it is."""
    url = url.rstrip("/")
    if url.endswith(".pt"):
        return url
    if not storage.exists(storage.join(url, INDEX)):
        if storage.exists(storage.join(url, STATE)):
            raise FileNotFoundError(f"checkpoint {url} is incomplete (no {INDEX}: its upload did not finish); "
                                    "use an older checkpoint or run.resume=auto")
        raise FileNotFoundError(f"checkpoint {url} does not exist: give an existing checkpoint, or run.resume=auto")
    return storage.join(url, STATE)


def load_checkpoint(url: str) -> dict[str, Any]:
    state = state_url(url)
    if not storage.exists(state):
        raise FileNotFoundError(f"checkpoint {url} does not exist: give an existing checkpoint, or run.resume=auto")
    return torch.load(io.BytesIO(storage.read_bytes(state)), map_location="cpu", weights_only=False)


def check_compatible(state: dict[str, Any], model_meta: dict[str, Any], url: str) -> None:
    """Refuse to resume into a student of another shape; say which field differs and what to do."""
    saved = state.get("model_meta", {})
    for field in ("num_classes", "trunk", "aux_classes", "fixed_background_logit", "normalized_main_head"):
        if field in saved and saved[field] != model_meta.get(field):
            raise ValueError(f"cannot resume from {url}: it has {field}={saved[field]!r} but this run has "
                             f"{field}={model_meta.get(field)!r}; use a new run.out_dir or the matching config")


def load_student_from_checkpoint(url: str):
    """Rebuild a trained student (for evaluation or as a teacher) from a checkpoint alone."""
    from trainer.models import build_student

    state = load_checkpoint(url)
    meta = state["model_meta"]
    student = build_student(meta["trunk"], "NONE", meta["num_classes"], None, aux_classes=meta["aux_classes"],
                            fixed_background_logit=meta["fixed_background_logit"],
                            normalized_main_head=meta["normalized_main_head"], logit_scale=meta["logit_scale"])
    student.load_state_dict(state["student"])
    student.class_names = meta.get("class_names")
    return student.eval()


def download_folder(url: str, local: str, keep: Callable[[str], bool] = lambda name: True) -> str:
    """Copy the files directly under ``url`` that ``keep`` accepts into the local folder ``local``."""
    os.makedirs(local, exist_ok=True)
    for name in storage.listdir(url):
        if keep(name):
            with open(os.path.join(local, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(url, name)))
    return local


def _upload_folder(local: str, url: str) -> list[str]:
    """Upload every file under ``local`` (recursively) below ``url``; returns the relative names."""
    names = []
    for folder, _, files in os.walk(local):
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(folder, name), local).replace(os.sep, "/")
            with open(os.path.join(folder, name), "rb") as f:
                storage.write_bytes(storage.join(url, rel), f.read())
            names.append(rel)
    return names


class CheckpointWriter:
    """Saves checkpoints of one run: serialise now, upload in the background, publish with the index last.

    Stateful across saves only through the one in-flight upload; ``wait`` joins it and re-raises its error.
    """

    def __init__(self, out_dir: str, keep: int = 2, rank: int = 0, world: int = 1, background: bool = True):
        self.out_dir, self.keep, self.rank, self.world, self.background = out_dir, keep, rank, world, background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.failures = 0
        self.uploads = 0
        self.upload_seconds = 0.0

    def save(self, step: int, state: dict[str, Any] | None, nonce: str,
             sharded: Callable[[str], None] | None = None) -> str:
        """Write checkpoint ``step``. ``state`` is rank 0's payload (None elsewhere); ``sharded(folder)`` writes
        an engine's per-rank files into a local folder (a collective call: every rank makes it). ``nonce`` must
        be the same on every rank (rank 0 draws it and broadcasts it) so stale markers of an earlier, crashed
        attempt at the same step are never mistaken for this one. A failed earlier upload is logged and counted
        here, not raised: training goes on and the checkpoint before it stays the newest complete one."""
        try:
            self.wait()
        except RuntimeError as e:
            log.error("%s", e)
        url = step_url(self.out_dir, step)
        payload = None
        if state is not None:
            buf = io.BytesIO()
            torch.save(state, buf)
            payload = buf.getvalue()
        staging = None
        if sharded is not None:
            staging = tempfile.mkdtemp(prefix=f"bgsplit-ckpt-{step}-r{self.rank}-")
            sharded(staging)
        job = lambda: self._upload(url, step, payload, staging, nonce)  # noqa: E731
        if self.background:
            self._thread = threading.Thread(target=self._run, args=(job,), name=f"checkpoint-{step}", daemon=True)
            self._thread.start()
        else:
            self._run(job)
            self._raise()
        return url

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self.failures += 1
            raise RuntimeError(f"checkpoint upload under {checkpoint_dir(self.out_dir)} failed: {error}; the "
                               "previous complete checkpoint is untouched") from error

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e

    def _upload(self, url: str, step: int, payload: bytes | None, staging: str | None, nonce: str) -> None:
        start = time.time()
        files: list[str] = []
        try:
            if payload is not None:
                storage.write_bytes(storage.join(url, STATE), payload)
                files.append(STATE)
            if staging is not None:
                files += [f"{DEEPSPEED}/{n}" for n in _upload_folder(staging, storage.join(url, DEEPSPEED))]
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        if staging is not None and self.rank != 0:
            storage.write_bytes(storage.join(url, f"rank-{self.rank:05d}.done"), json.dumps(
                {"nonce": nonce, "files": files}).encode())
        if self.rank == 0:
            if staging is not None:
                files += self._wait_for_markers(url, nonce)
            index = {"format": FORMAT, "step": step, "nonce": nonce, "world": self.world, "files": files,
                     "engine": DEEPSPEED if staging is not None else "ddp", "time": time.time()}
            storage.write_bytes(storage.join(url, INDEX), json.dumps(index, indent=1).encode())
            self._prune()
        self.uploads += 1
        self.upload_seconds += time.time() - start
        log.info("checkpoint %s complete (%.1f s upload)", url, time.time() - start)

    def _wait_for_markers(self, url: str, nonce: str) -> list[str]:
        """The other ranks' uploaded files, once each rank's marker of this save is there."""
        deadline = time.time() + MARKER_TIMEOUT_S
        pending = set(range(1, self.world))
        files: list[str] = []
        while pending:
            for r in sorted(pending):
                marker = storage.join(url, f"rank-{r:05d}.done")
                doc = json.loads(storage.read_bytes(marker)) if storage.exists(marker) else {}
                if doc.get("nonce") == nonce:
                    files += doc.get("files", [])
                    pending.discard(r)
            if pending and time.time() > deadline:
                raise TimeoutError(f"ranks {sorted(pending)} did not finish uploading {url} within "
                                   f"{MARKER_TIMEOUT_S:.0f} s; it stays incomplete")
            if pending:
                time.sleep(0.2)
        return files

    def _prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints and drop incomplete ones older than the newest."""
        complete = list_checkpoints(self.out_dir)
        old = complete[:-self.keep] if self.keep > 0 else []
        newest = complete[-1] if complete else ""
        old += [u for u in incomplete_checkpoints(self.out_dir) if u < newest]
        for url in old:
            remove_checkpoint(url)


def remove_checkpoint(url: str) -> None:
    """Index first, so a reader never sees an indexed checkpoint with files missing."""
    storage.remove(storage.join(url, INDEX))
    storage.remove(url, recursive=True)
