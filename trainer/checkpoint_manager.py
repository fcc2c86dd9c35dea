"""Writing one run's checkpoints and restoring a run from one (trainer.checkpoint holds the format, reading and
its safety). The writer serialises a save at once and uploads it in the background, publishing the index last; the
manager asks every question the training loop has of a run's checkpoints, collectively on every rank, and restores
the pieces a run registers with it (trainer.run_state), so the Trainer neither authors a checkpoint nor referees a
resume."""
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
from typing import Any, Callable, Protocol

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


class Stateful(Protocol):
    """A piece of a run a checkpoint keeps (trainer.run_state). Optional: ``meta_dict()`` (its share of
    meta.json) and ``on_world_change(url, saved_world, world)`` (a resume onto another number of ranks)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def resume_rule(resume: str, restartable: bool, has_checkpoint: bool) -> str:
    """``run.resume`` as this run takes it. A restartable run (Ray Train restarts a failed worker group with the
    same config) resumes from the newest complete checkpoint under run.out_dir on every attempt; an explicit
    checkpoint is its start only while the run has none of its own."""
    if restartable and (resume in ("", "auto") or has_checkpoint):
        return "auto"
    return resume


class CheckpointManager:
    """One run's checkpoints, every question the loop asks of them in one place. The run's stateful pieces
    register (``register``; ``describe`` adds what only describes the run), and the manager writes them
    (``save``, when ``due``), finds and checks the checkpoint a run continues from (``find``, once), puts its
    weights in before an engine that keeps its own copy wraps the student (``weights_before_wrap``) and restores
    the pieces (``restore``: another world size, DeepSpeed's partitions). The folder layout, the index, the
    markers and ZeRO's file names stay here. ``find``, ``restore`` and ``save`` are collectives: every rank
    calls them."""

    def __init__(self, out_dir: str, keep: int = 2, rank: int = 0, world: int = 1, background: bool = True,
                 every: int = 0, restartable: bool = False):
        self.out_dir, self.rank, self.world, self.every, self.restartable = out_dir, rank, world, every, restartable
        self.writer = CheckpointWriter(out_dir, keep, rank, world, background)
        self.pieces: list[Stateful] = []
        self.description: dict[str, Any] = {}
        self.found: tuple[str, dict[str, Any]] | None = None
        """The checkpoint ``find`` chose and its state, until ``restore`` has loaded it."""
        self.resumed: dict[str, Any] = {}
        """What the run continued from (``from``, ``from_world``, ``from_step``, ``optimizer``); {} when fresh."""

    def register(self, *pieces: Stateful) -> None:
        self.pieces.extend(pieces)

    def describe(self, **fields: Any) -> None:
        """meta.json fields that describe the run rather than hold its state (the student's shape, the config)."""
        self.description.update(fields)

    def find(self, resume: str, spec: Any, engine_name: str, frozen_stages: int) -> dict[str, Any] | None:
        """``run.resume`` (``resume_rule``): '' starts fresh, 'auto' takes the newest complete checkpoint under
        the run folder (rank 0 decides, so every rank loads the same one), else the given checkpoint (or a run
        folder's newest). Every rank loads the state (DeepSpeed needs the fp32 weights on each before it wraps
        the student) and checks it fits this run, once. Returns the state, or None for a fresh run."""
        url = None
        if self.rank == 0:
            latest = latest_checkpoint(self.out_dir)
            resume = resume_rule(resume, self.restartable, latest is not None)
            url = latest if resume == "auto" else resolve(resume) if resume else None
            if resume == "auto":
                for stale in incomplete_checkpoints(self.out_dir):  # a crashed upload: never a checkpoint
                    log.warning("removing incomplete checkpoint %s (its upload never finished)", stale)
                    remove_checkpoint(stale)
        url = broadcast(url)
        if url is None:
            return None
        state = load_checkpoint(url)
        self.validate(state, spec, engine_name, url, frozen_stages)
        self.found = (url, state)
        return state

    @staticmethod
    def validate(state: dict[str, Any], spec: Any, engine_name: str, url: str, frozen_stages: int = 0) -> None:
        """The checkpoint's student has this run's shape (``spec``, a StudentSpec, compares field by field), was
        written by this run's engine and froze the same prefix (a resume that freezes another part of the trunk
        would train weights the checkpoint held fixed, and a shared teacher would read a prefix that is no longer
        its own); anything else is one line naming the field and the fix."""
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
        saved = int(((state.get("config") or {}).get("model") or {}).get("frozen_stages", 0))
        if saved != frozen_stages:
            raise ValueError(f"cannot resume from {url}: it was trained with model.frozen_stages={saved} but this "
                             f"run has model.frozen_stages={frozen_stages}; give model.frozen_stages={saved} or a "
                             "new run.out_dir")

    def weights_before_wrap(self, student: torch.nn.Module) -> None:
        """An engine that casts and partitions the student when it wraps it and keeps its own fp32 master copy
        (DeepSpeed) gets the trained weights first, so a resume that cannot use the checkpoint's ZeRO files
        (another world size, precision or stage) still continues from them."""
        if self.found is not None:
            student.load_state_dict(self.found[1]["student"])

    def restore(self, engine: Any) -> str | None:
        """Load the found checkpoint into every registered piece; on another world size tell the pieces whose
        state depends on it; then DeepSpeed's own partitions where they fit. Returns its URL (None: fresh)."""
        if self.found is None:
            return None
        url, state = self.found
        self.found = None  # the payload can be large; it is not needed again
        for piece in self.pieces:
            piece.load_state_dict(state)
        saved_world = int(state.get("world", self.world))
        self.resumed = {"from": url, "from_world": saved_world, "from_step": int(state["step"]),
                        "optimizer": "restored"}
        if saved_world != self.world:
            for piece in self.pieces:
                if hasattr(piece, "on_world_change"):
                    piece.on_world_change(url, saved_world, self.world)
        if engine.sharded_save is not None and not self.load_sharded(url, engine, saved_world):
            self.resumed["optimizer"] = "fresh"
        return url

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

    def due(self, step: int) -> bool:
        """run.checkpoint_every: a checkpoint every that many steps (the run's last step always has one)."""
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, sharded: Callable[[str], None] | None = None) -> str:
        """Start writing checkpoint ``step`` from the registered pieces (rank 0's is written; collecting them is
        a collective: RNG states are gathered, ZeRO-3 gathers the weights) and return its URL; the upload runs
        on. One nonce for every rank tells this attempt's markers from a crashed earlier one's at the same step."""
        state: dict[str, Any] = {}
        meta: dict[str, Any] = {**self.description, "world": self.world}
        for piece in self.pieces:
            state.update(piece.state_dict())
            if hasattr(piece, "meta_dict"):
                meta.update(piece.meta_dict())
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
