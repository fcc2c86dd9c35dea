"""Training checkpoints on any fsspec URL: written in the background, visible only when complete, keep-last-k;
opening one never runs code from it. This module is the format and reading it; trainer.checkpoint_manager writes
them and picks the one a run continues from.

A checkpoint is a folder (object-store prefix) ``<out_dir>/checkpoints/step-NNNNNNNN/`` holding

- ``state.pt``: written by rank 0: tensors and plain containers only (dict, list, tuple, int, float, str, bool,
  None): the student's weights, the engine state (the optimiser under DDP), the LR schedule's state, the loader
  position, every rank's RNG state (numpy's and Python's as their parts). It is read with
  ``torch.load(..., weights_only=True)``, which builds tensors and containers and calls nothing else;
- ``meta.json``: written by rank 0: the format, the step, the student's shape (``StudentSpec``: trunk, classes,
  heads, class names), the config, the metrics history, the engine, the world, the skip counts;
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

A file that is not such a checkpoint (a foreign pickle, a truncated file, a plain state dict) is refused with a
one-line ``CheckpointError`` and nothing in it runs. A checkpoint of the previous format (``bgsplit-checkpoint/2``:
a pickled state.pt, no meta.json) is refused too, unless the caller trusts it: ``BGSPLIT_TRUST_CHECKPOINT=1``
(``bgsplit eval`` and ``bgsplit mine`` set it with ``--trust-checkpoint``; training resume reads it directly),
or ``trust=True`` here; it is then loaded as before, with ``weights_only=False``.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import re
import warnings
import zipfile
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import torch

from data import storage

log = logging.getLogger("bgsplit.checkpoint")

PATTERN = re.compile(r"^step-(\d{8})$")
INDEX, STATE, META, DEEPSPEED = "index.json", "state.pt", "meta.json", "deepspeed"
RUN_FILES = ("summary.json", "metrics.jsonl")
"""What a run folder holds beside checkpoints/: how a run that saved none is told from any other folder."""
FORMAT = "bgsplit-checkpoint/3"
LEGACY_FORMAT = "bgsplit-checkpoint/2"
TRUST_ENV = "BGSPLIT_TRUST_CHECKPOINT"
"""``1``: checkpoints of the previous format (pickled objects in state.pt) are loaded with weights_only=False."""

TRUST_FIX = (f"if you trust whoever wrote it, load it as before with {TRUST_ENV}=1 (bgsplit eval / mine: "
             "--trust-checkpoint), or use a checkpoint written by this version of bgsplit")
VALID_FIX = "give a checkpoint folder written by `bgsplit train` (<run.out_dir>/checkpoints/step-NNNNNNNN)"


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message is one line naming the file and the fix."""


def trusted(trust: bool | None = None) -> bool:
    """``trust`` when given, else the environment's BGSPLIT_TRUST_CHECKPOINT."""
    if trust is not None:
        return bool(trust)
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def checkpoint_dir(out_dir: str) -> str:
    return storage.join(out_dir, "checkpoints")


def step_url(out_dir: str, step: int) -> str:
    return storage.join(checkpoint_dir(out_dir), f"step-{step:08d}")


# -- RNG states as plain data ---------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's generators as tensors and plain values (what ``weights_only=True`` reads back): numpy's
    ``('MT19937', keys, pos, has_gauss, cached_gaussian)`` and Python's ``(version, 625 ints, gauss_next)``
    are stored as their parts; ``set_rng_state`` rebuilds the tuples bit for bit."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": None if gauss_next is None else float(gauss_next)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(saved: Any) -> Any:
    if not isinstance(saved, dict):  # a trusted checkpoint of the previous format: numpy's own tuple
        return saved
    keys = saved["keys"].numpy() if torch.is_tensor(saved["keys"]) else np.asarray(saved["keys"])
    return (saved["name"], keys.astype(np.uint32), int(saved["pos"]), int(saved["has_gauss"]),
            float(saved["cached_gaussian"]))


def _python_state(saved: Any) -> Any:
    if not isinstance(saved, dict):  # the previous format: random.getstate()'s tuple
        return saved
    internal = saved["state"].tolist() if torch.is_tensor(saved["state"]) else list(saved["state"])
    return int(saved["version"]), tuple(int(v) for v in internal), saved["gauss_next"]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state(state["numpy"]))
    random.setstate(_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_plain(value: Any, where: str = "state") -> None:
    """Refuse, before anything is written, what ``weights_only=True`` would not read back: anything but tensors,
    dicts with str/int keys, lists, tuples, int, float, str, bool and None. Names the first offending path."""
    if value is None or type(value) in (bool, int, float, str):
        return
    if isinstance(value, torch.Tensor) and type(value) in (torch.Tensor, torch.nn.Parameter):
        return
    if type(value) in (dict, OrderedDict):
        for k, v in value.items():
            if type(k) not in (str, int):
                raise TypeError(f"checkpoint {where} has a key {k!r} of type {type(k).__name__}: state.pt keys are "
                                "str or int")
            check_plain(v, f"{where}[{k!r}]")
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint {where} is a {type(value).__module__}.{type(value).__qualname__}: state.pt holds "
                    "tensors and plain containers only (put it in meta.json, or convert it)")


def json_safe(value: Any) -> Any:
    """NaN and infinities (a validation mAP with no positive) as null: meta.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# -- finding ----------------------------------------------------------------------------------------------------
def _steps(out_dir: str) -> list[tuple[int, str]]:
    folder = checkpoint_dir(out_dir)
    return sorted((int(m.group(1)), storage.join(folder, n))
                  for n in storage.listdir(folder) if (m := PATTERN.match(n)))


def index_problem(url: str) -> str | None:
    """Why a checkpoint folder's index does not vouch for it (None: it does). An index.json of 0 bytes or
    unreadable JSON (a copy or a sync cut short, a disk that filled up) marks nothing complete: counted as
    present, it made a run folder resolve to a checkpoint that was then reported as not existing."""
    file = storage.join(url, INDEX)
    if not storage.exists(file):
        return f"no {INDEX}: its upload did not finish"
    data = storage.read_bytes(file)
    if not data.strip():
        return f"its {INDEX} is empty ({len(data)} bytes)"
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return f"its {INDEX} is not valid JSON ({len(data)} bytes)"
    if not isinstance(doc, dict):
        return f"its {INDEX} holds no checkpoint index"
    return None


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints (a readable index file is present), oldest first."""
    return [url for _, url in _steps(out_dir) if index_problem(url) is None]


def incomplete_checkpoints(out_dir: str) -> list[str]:
    return [url for _, url in _steps(out_dir) if index_problem(url) is not None]


def latest_checkpoint(out_dir: str) -> str | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def resolve(url: str) -> str:
    """What a user may give as a checkpoint: a checkpoint folder, a run folder (``run.out_dir``: its newest
    complete checkpoint), ``<run folder>/latest`` or ``<run folder>/checkpoints/latest`` (the same), or a .pt file.
    The step number depends on the schedule and the sampling, so a copied command need not know it."""
    url = url.rstrip("/")
    if url.endswith(".pt"):
        return url
    run = url
    if _name(url) == "latest":
        run = storage.dirname(url)
        if _name(run) == "checkpoints":
            run = storage.dirname(run)
    elif storage.exists(storage.join(url, INDEX)) or storage.exists(storage.join(url, STATE)):
        return url
    if storage.exists(checkpoint_dir(run)):
        newest = latest_checkpoint(run)
        if newest is None:
            raise FileNotFoundError(f"run folder {run} has no complete checkpoint yet ({_listing(run)}): wait for "
                                    "the run to save one, or give another run")
        return newest
    if _name(url) == "latest":
        raise FileNotFoundError(f"{url}: {run} is not a run folder (no checkpoints/ in it): give a run.out_dir or a "
                                "checkpoint folder")
    return url


def _listing(run: str) -> str:
    steps = _steps(run)[-5:]
    if not steps:
        return "no checkpoints"
    shown = []
    for _, url in steps:
        problem = index_problem(url)
        note = "" if problem is None else " (incomplete)" if problem.startswith("no ") else f" ({problem})"
        shown.append(f"{_name(url)}{note}")
    return f"checkpoints: {', '.join(shown)}"


def _near(url: str) -> str:
    """What exists next to a checkpoint path that does not: the run's checkpoints, for the error to name."""
    folder = storage.dirname(url)
    run = storage.dirname(folder) if _name(folder) == "checkpoints" else url
    if storage.exists(checkpoint_dir(run)):
        return f"; {run} has {_listing(run)}, and {run} itself (or {run}/latest) means its newest"
    return ""


def state_url(url: str) -> str:
    """A checkpoint (any form ``resolve`` takes) -> its state.pt; a plain .pt file is read as it is (and must have
    meta.json beside it, unless it is trusted as a checkpoint of the previous format)."""
    url = resolve(url)
    if url.endswith(".pt"):
        return url
    problem = index_problem(url)
    if problem is not None and storage.exists(storage.join(url, INDEX)):
        raise CheckpointError(f"checkpoint {url} is damaged: {problem}, so nothing vouches that its upload "
                              f"finished; use an older checkpoint{_near(url)}")
    if problem is not None:
        if storage.exists(storage.join(url, STATE)):
            raise FileNotFoundError(f"checkpoint {url} is incomplete (no {INDEX}: its upload did not finish); "
                                    f"use an older checkpoint{_near(url)}")
        if any(storage.exists(storage.join(url, f)) for f in RUN_FILES):
            raise FileNotFoundError(f"run folder {url} has no checkpoints (no checkpoints/ in it: it stopped before "
                                    "its end, or they were removed, as a study does for its tuning runs): give a run "
                                    "that finished, or resume this one with run.resume=auto")
        if storage.exists(url):
            raise CheckpointError(f"{url} is not a bgsplit checkpoint (no {INDEX} there): {VALID_FIX}, or a run "
                                  "folder (its newest checkpoint)")
        raise FileNotFoundError(f"checkpoint {url} does not exist{_near(url)}: give an existing checkpoint folder "
                                "or a run folder")
    return storage.join(url, STATE)


def _missing_state(url: str, file: str) -> str:
    """The message for a state.pt that is not there: a checkpoint whose index vouches for it lost a file since
    (a partial copy, a prune); only a path with nothing at it does not exist."""
    folder = storage.dirname(file)
    if _name(file) == STATE and storage.exists(storage.join(folder, INDEX)):
        return (f"checkpoint {folder} has {INDEX} but no {STATE} (removed or not copied since it was written): "
                f"use an older checkpoint{_near(folder)}")
    return f"checkpoint {url} does not exist{_near(url)}: give an existing checkpoint folder or a run folder"


def meta_url(state: str) -> str:
    return storage.join(storage.dirname(state), META)


# -- reading ----------------------------------------------------------------------------------------------------
def _unsafe_globals(data: bytes) -> list[str] | None:
    """What a torch zip file's pickle would call beyond tensors and containers (read, never run); None when the
    bytes are not a complete torch zip file."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return None
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
    except Exception:  # noqa: BLE001 - a damaged archive: the caller says so
        return None


def _why_refused(data: bytes) -> str:
    if not data:
        return "it is empty"
    found = _unsafe_globals(data)
    if found is None:
        if data[:2] == b"PK":
            return "it is a truncated or damaged torch file"
        return "it is not a file written by torch.save (a raw pickle, a truncated download or another kind of file)"
    if found:
        shown = ", ".join(sorted(found)[:3]) + (", ..." if len(found) > 3 else "")
        return f"it holds pickled objects beyond tensors and containers (it would call {shown})"
    return "it is not a readable torch file"


def _weights_only(data: bytes, file: str, fix: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and containers or a one-line CheckpointError; nothing runs."""
    try:
        with warnings.catch_warnings():  # torch warns about a foreign file's pickle protocol: the refusal says it
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure of an untrusted file is the same one-line refusal
        raise CheckpointError(f"{file} was refused unread: {_why_refused(data)}; nothing in it was run; "
                              f"{fix}") from e


def _read_meta_file(file: str) -> dict[str, Any] | None:
    """meta.json beside a state.pt, or None when there is none (the previous format, or not a checkpoint)."""
    if not storage.exists(file):
        return None
    try:
        meta = json.loads(storage.read_bytes(file))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); {VALID_FIX}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), str):
        raise CheckpointError(f"{file} is not a bgsplit checkpoint description (no format field); {VALID_FIX}")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{file} is format {meta['format']!r}; this bgsplit reads {FORMAT!r}: use the bgsplit "
                              "version that wrote it, or " + VALID_FIX)
    return meta


def _legacy(file: str, data: bytes, trust: bool | None) -> dict[str, Any]:
    """A state.pt without meta.json: the previous format (pickled), a bare weights file, or something else."""
    found = _unsafe_globals(data)
    if found == []:  # only tensors and containers: safe to read, but it must describe a student to be of use
        state = _weights_only(data, file, VALID_FIX)
        if isinstance(state, dict) and isinstance(state.get("model_meta"), dict) and "student" in state:
            return _from_legacy(state)
        raise CheckpointError(f"{file} is a plain tensor file, not a bgsplit checkpoint (no {META} beside it, no "
                              f"student description in it); {VALID_FIX}")
    if found is None:  # not a torch zip file (bgsplit has only ever written those): no trust makes it one
        raise CheckpointError(f"{file} was refused unread: {_why_refused(data)}; nothing in it was run; {VALID_FIX}")
    if not trusted(trust):
        raise CheckpointError(f"{file} was refused unread: a checkpoint of the previous format (a pickled "
                              f"state.pt, no {META}) or a foreign pickle; nothing in it was run; {TRUST_FIX}")
    log.warning("%s: loading a checkpoint of the previous format with weights_only=False (%s=1): this runs "
                "whatever code the file holds", file, TRUST_ENV)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{file} is not a readable checkpoint ({first}); {VALID_FIX}") from e
    if not isinstance(state, dict) or "student" not in state or not isinstance(state.get("model_meta"), dict):
        raise CheckpointError(f"{file} is not a bgsplit checkpoint (no student weights or description); {VALID_FIX}")
    return _from_legacy(state)


def _from_legacy(state: dict[str, Any]) -> dict[str, Any]:
    """The previous format's keys in this format's names (its model_meta has StudentSpec's field names)."""
    return {"format": LEGACY_FORMAT, **state, "student_spec": dict(state["model_meta"])}


def read_meta(url: str, trust: bool | None = None) -> dict[str, Any]:
    """A checkpoint's meta.json (format, step, ``student_spec``, config, history, ...) without reading
    state.pt; for a trusted checkpoint of the previous format, the same fields out of its pickle."""
    file = state_url(url)
    meta = _read_meta_file(meta_url(file))
    if meta is not None:
        return meta
    if not storage.exists(file):
        raise FileNotFoundError(_missing_state(url, file))
    state = _legacy(file, storage.read_bytes(file), trust)
    return {k: v for k, v in state.items() if k not in ("student", "engine", "scheduler", "rng", "loader")}


def load_checkpoint(url: str, trust: bool | None = None) -> dict[str, Any]:
    """state.pt (read with weights_only=True) and meta.json as one dict: meta.json's fields, then state.pt's.

    ``trust`` (default: BGSPLIT_TRUST_CHECKPOINT) only concerns checkpoints of the previous format."""
    file = state_url(url)
    if not storage.exists(file):
        raise FileNotFoundError(_missing_state(url, file))
    meta = _read_meta_file(meta_url(file))
    data = storage.read_bytes(file)
    if meta is None:
        return _legacy(file, data, trust)
    state = _weights_only(data, file, "the checkpoint is damaged or was replaced: use another one (an older step, "
                          "or run.resume=auto once this folder is removed)")
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a checkpoint's state; {VALID_FIX}")
    return {**meta, **state}


def download_folder(url: str, local: str, keep: Callable[[str], bool] = lambda name: True) -> str:
    """Copy the files directly under ``url`` that ``keep`` accepts into the local folder ``local``."""
    os.makedirs(local, exist_ok=True)
    for name in storage.listdir(url):
        if keep(name):
            with open(os.path.join(local, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(url, name)))
    return local


def remove_checkpoint(url: str) -> None:
    """Index first, so a reader never sees an indexed checkpoint with files missing."""
    storage.remove(storage.join(url, INDEX))
    storage.remove(url, recursive=True)
