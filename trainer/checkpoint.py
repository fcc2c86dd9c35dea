"""Training checkpoints: collect every stateful piece's state_dict, write atomically, keep the last k.

A checkpoint is ``<out_dir>/checkpoints/step-NNNNNNNN.pt``, written under a hidden temporary name and renamed
whole, so ``latest_checkpoint`` only ever sees complete files. The student's shape (number of classes, trunk,
aux classes) is stored beside its weights so a resume into a different model is refused with a clear message
instead of a wall of size-mismatch errors.
"""
from __future__ import annotations

import io
import random
import re
from typing import Any

import numpy as np
import torch

from data import storage

PATTERN = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_dir(out_dir: str) -> str:
    return storage.join(out_dir, "checkpoints")


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


def save_checkpoint(out_dir: str, step: int, state: dict[str, Any], keep: int = 2) -> str:
    folder = checkpoint_dir(out_dir)
    url = storage.join(folder, f"step-{step:08d}.pt")
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(url, buf.getvalue())
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            storage.remove(old)
    return url


def list_checkpoints(out_dir: str) -> list[str]:
    folder = checkpoint_dir(out_dir)
    return [storage.join(folder, n) for n in storage.listdir(folder) if PATTERN.match(n)]


def latest_checkpoint(out_dir: str) -> str | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(url: str) -> dict[str, Any]:
    if not storage.exists(url):
        raise FileNotFoundError(f"checkpoint {url} does not exist: give an existing checkpoint, or run.resume=auto")
    return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=False)


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
