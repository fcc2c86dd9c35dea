"""Writing one run's checkpoints and choosing which one it continues from (trainer.checkpoint holds the format,
reading and its safety). The writer serialises a save at once and uploads it in the background, publishing the
index last; the manager asks every question the training loop has of a run's checkpoints, collectively on every
rank."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable

import torch

from data import storage
from trainer.checkpoint import (DEEPSPEED, FORMAT, INDEX, META, STATE, check_plain, checkpoint_dir,
                               download_folder, incomplete_checkpoints, json_safe, latest_checkpoint,
                               list_checkpoints, load_checkpoint, remove_checkpoint, resolve, step_url)
from trainer.runtime import broadcast, gather

log = logging.getLogger("bgsplit.checkpoint")

MARKER_TIMEOUT_S = float(os.environ.get("BGSPLIT_CHECKPOINT_MARKER_TIMEOUT", "1800"))
"""How long rank 0 waits for every rank's marker before it leaves a checkpoint incomplete."""


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
        self._url = ""
        """The checkpoint being written (the one a failure is about)."""
        self.failures = 0
        self.uploads = 0
        self.upload_seconds = 0.0

    def save(self, step: int, state: dict[str, Any] | None, nonce: str,
             sharded: Callable[[str], None] | None = None, meta: dict[str, Any] | None = None) -> str:
        """Write checkpoint ``step``. ``state`` is rank 0's state.pt payload (None elsewhere: tensors and plain
        containers, checked here, so what is written is what ``weights_only=True`` reads back) and ``meta``
        its JSON description (meta.json; the format and the step are added); ``sharded(folder)`` writes
        an engine's per-rank files into a local folder (a collective call: every rank makes it). ``nonce`` must
        be the same on every rank (rank 0 draws it and broadcasts it) so stale markers of an earlier, crashed
        attempt at the same step are never mistaken for this one. A failed earlier upload is logged and counted
        here, not raised: training goes on and the checkpoint before it stays the newest complete one."""
        try:
            self.wait()
        except RuntimeError as e:
            log.error("%s", e)
        url = self._url = step_url(self.out_dir, step)
        payload = None
        if state is not None:
            check_plain(state)
            buf = io.BytesIO()
            torch.save(state, buf)
            doc = json_safe({**(meta or {}), "format": FORMAT, "step": step})
            payload = (buf.getvalue(), json.dumps(doc, indent=1, allow_nan=False).encode())
        staging = None
        if sharded is not None:
            staging = tempfile.mkdtemp(prefix=f"bgsplit-ckpt-{step}-r{self.rank}-")
            try:
                sharded(staging)
            except OSError as e:  # the engine's own files: a full staging disk is reported like ours
                if e.errno not in storage.FULL_ERRNOS:
                    raise
                written = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(staging) for n in names)
                shutil.rmtree(staging, ignore_errors=True)
                self.failures += 1
                raise self._not_written(storage.disk_full(staging, None, written, " (DeepSpeed's staging folder)"))
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

    def check(self) -> None:
        """Raise now if the upload in flight already failed for a full disk (a cheap look, every step): waiting
        for the next save would train on for steps no checkpoint can keep."""
        if isinstance(self._error, storage.DiskFull):
            self.wait()

    def _not_written(self, error: storage.DiskFull) -> storage.DiskFull:
        previous = latest_checkpoint(self.out_dir)
        kept = f"the previous checkpoint {previous} is complete and loadable" if previous else "no earlier checkpoint"
        return storage.DiskFull(f"checkpoint {self._url} was not written, the run stops: {error}; {kept}")

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self.failures += 1
            if isinstance(error, storage.DiskFull):  # waiting does not cure it: the run stops, in one line
                raise self._not_written(error) from None
            raise RuntimeError(f"checkpoint upload under {checkpoint_dir(self.out_dir)} failed: {error}; the "
                               "previous complete checkpoint is untouched") from error

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e

    def _upload(self, url: str, step: int, payload: tuple[bytes, bytes] | None, staging: str | None,
                nonce: str) -> None:
        start = time.time()
        files: list[str] = []
        try:
            if payload is not None:
                storage.write_bytes(storage.join(url, STATE), payload[0])
                files.append(STATE)
                storage.write_bytes(storage.join(url, META), payload[1])
                files.append(META)
            if staging is not None:
                files += [f"{DEEPSPEED}/{n}" for n in _upload_folder(staging, storage.join(url, DEEPSPEED))]
        except storage.DiskFull:
            # what this rank wrote of it goes (it has no index, so it never counted), giving back the room; the
            # folder too when no other rank writes into it
            with contextlib.suppress(OSError):
                for name in files:
                    storage.remove(storage.join(url, name))
                if staging is None:
                    storage.remove(url, recursive=True)
            raise
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


class CheckpointManager:
    """One run's checkpoints, every question the loop asks of them in one place: which one to continue from
    (``find``), whether it fits this run (``validate``), its DeepSpeed partition (``load_sharded``), and writing
    and pruning new ones (``save``). The loop owns its state (Trainer.state_dict / load_state_dict); the folder
    layout, the index, the markers and ZeRO's file names stay here. ``find``, ``load_sharded`` and ``save`` are
    collectives: every rank calls them."""

    def __init__(self, out_dir: str, keep: int = 2, rank: int = 0, world: int = 1, background: bool = True):
        self.out_dir, self.rank, self.world = out_dir, rank, world
        self.writer = CheckpointWriter(out_dir, keep, rank, world, background)

    def find(self, resume: str) -> tuple[str | None, dict[str, Any] | None]:
        """``run.resume``: '' starts fresh, 'auto' takes the newest complete checkpoint under the run folder
        (rank 0 decides, so every rank loads the same one), else the given checkpoint (or a run folder's newest).
        Every rank loads the state: DeepSpeed needs the fp32 weights on each before it wraps the student."""
        url = None
        if self.rank == 0:
            url = latest_checkpoint(self.out_dir) if resume == "auto" else resolve(resume) if resume else None
            if resume == "auto":
                for stale in incomplete_checkpoints(self.out_dir):  # a crashed upload: never a checkpoint
                    log.warning("removing incomplete checkpoint %s (its upload never finished)", stale)
                    remove_checkpoint(stale)
        url = broadcast(url)
        return (url, load_checkpoint(url)) if url is not None else (None, None)

    @staticmethod
    def validate(state: dict[str, Any], spec: Any, engine_name: str, url: str) -> None:
        """The checkpoint's student has this run's shape (``spec``, a StudentSpec, compares field by field) and
        was written by this run's engine; anything else is one line naming the field and the fix."""
        if state.get("engine_name") == "probe":
            kind = ((state.get("config") or {}).get("probe") or {}).get("kind", "?")
            raise ValueError(f"cannot resume from {url}: it is a probe fit (probe.kind={kind}), not a training run; "
                             "give eval and mine its --checkpoint, and start training with run.resume= (empty) or "
                             "model.head_init=probe to begin a student from a probe")
        spec.check_resume(state.get("student_spec"), url)
        saved_engine = state.get("engine_name", "ddp")
        if saved_engine != engine_name:
            raise ValueError(f"cannot resume from {url}: it was written by engine.name={saved_engine} but this run "
                             f"uses engine.name={engine_name}; use the same engine or a new run.out_dir")

    def load_sharded(self, url: str, engine: Any, saved_world: int) -> bool:
        """Fetch this rank's DeepSpeed files (its own ZeRO partition and the shared model states) and load them.

        Only possible when the checkpoint has the files this rank would write, under the names the installed
        DeepSpeed gives them (bf16 mode prefixes ZeRO files with "bf16_"), and the world is the same. Otherwise
        (another world size, precision or ZeRO stage) the run keeps the fp32 weights it loaded from state.pt and
        starts its optimiser state (momentum) afresh; all ranks decide together, since DeepSpeed's loading is
        collective. Returns whether the optimiser state was restored."""
        tag = engine.TAG
        folder = storage.join(url, DEEPSPEED, tag)
        mine = engine.own_files(tag)
        present = set(storage.listdir(folder)) if storage.exists(folder) else set()
        usable = all(gather(saved_world == self.world and mine <= present))
        if not usable:
            log.warning("%s: DeepSpeed's files there (%s) are not this run's (%d ranks, expects %s): resuming from "
                        "its fp32 weights with a fresh optimiser state", url, ", ".join(sorted(present)) or "none",
                        self.world, ", ".join(sorted(mine)))
            return False
        with tempfile.TemporaryDirectory(prefix=f"bgsplit-resume-r{self.rank}-") as local:
            download_folder(folder, os.path.join(local, tag), keep=lambda n: n in mine or "zero_pp_rank_" not in n)
            engine.load_sharded(local)
        return True

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any],
             sharded: Callable[[str], None] | None = None) -> str:
        """Start writing checkpoint ``step`` (rank 0's ``state`` and ``meta`` are written; the other ranks'
        are ignored) and return its URL; the upload runs on. One nonce for every rank tells this attempt's
        markers from a crashed earlier one's at the same step."""
        nonce = broadcast(os.urandom(8).hex() if self.rank == 0 else None)
        first = self.rank == 0
        return self.writer.save(step, state if first else None, nonce, sharded, meta=meta if first else None)

    def wait(self) -> None:
        """Until the last save is complete (its error, if any, raised here)."""
        self.writer.wait()

    def check(self) -> None:
        """Raise a full disk met by the upload in flight now rather than at the next save (every step: cheap)."""
        self.writer.check()

    def uploads(self) -> dict[str, Any]:
        w = self.writer
        return {"count": w.uploads, "seconds": round(w.upload_seconds, 3), "failures": w.failures}
