"""The training loop: build the pieces from a JobConfig, step, log on an interval, evaluate, checkpoint, resume.

The loop does not know which method runs: ``task(batch, epoch)`` returns the loss. Losses are accumulated on
the device and read back only every ``run.log_every`` steps, so there is no host sync per step.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data import storage
from data.loader import LoaderState, ShardStream, make_loader
from data.shards import Manifest, read_manifest
from data.teacher_cache import TeacherCache, cache_name
from trainer.checkpoint import (check_compatible, latest_checkpoint, load_checkpoint, rng_state,
                                save_checkpoint, set_rng_state)
from trainer.config import JobConfig
from trainer.evaluate import evaluate_student
from trainer.models import Student, Teacher, build_student, build_teacher
from trainer.schedule import build_scheduler
from trainer.task import BGSplitTask

log = logging.getLogger("bgsplit.train")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device=cuda but no GPU is visible: use run.device=auto or cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on GPU by default; CPU runs in fp32 (CPU autocast is slower than fp32 on most machines)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def teacher_cache_for(manifest: Manifest, cfg: JobConfig, teacher: Teacher) -> TeacherCache:
    size = cfg.teacher.image_size or cfg.data.image_size
    return TeacherCache(storage.join(manifest.root, cache_name(teacher.arch, size, cfg.teacher.topk)))


def drw_epoch(cfg: JobConfig) -> float:
    start = cfg.loss.drw_start_epoch
    return start * cfg.optim.epochs if start < 1 else start


def model_meta(cfg: JobConfig, manifest: Manifest, student: Student) -> dict[str, Any]:
    return {"num_classes": student.num_classes, "trunk": cfg.model.trunk,
            "aux_classes": student.aux_head.out_features if student.aux_head is not None else 0,
            "fixed_background_logit": cfg.model.fixed_background_logit,
            "normalized_main_head": cfg.model.normalized_main_head or cfg.loss.main == "ldam_drw",
            "logit_scale": cfg.loss.ldam_scale, "class_names": manifest.class_names,
            "rare_classes": manifest.rare_classes}


@dataclass
class Trainer:
    """Everything a run holds; built by ``Trainer.build`` and driven by ``fit``."""

    cfg: JobConfig
    device: torch.device
    manifest: Manifest
    teacher: Teacher | None
    student: Student
    task: BGSplitTask
    stream: ShardStream
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    total_steps: int
    loader_state: LoaderState = field(default_factory=LoaderState)
    step: int = 0
    skipped: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.long))
    history: list[dict[str, Any]] = field(default_factory=list)
    scaler: torch.amp.GradScaler | None = None

    def __post_init__(self) -> None:
        # fp16 needs loss scaling; bf16 and fp32 do not
        fp16 = autocast_dtype(self.cfg.run.precision, self.device) == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)

    @classmethod
    def build(cls, cfg: JobConfig) -> "Trainer":
        seed_everything(cfg.run.seed)
        device = resolve_device(cfg.run.device)
        manifest = read_manifest(cfg.data.train)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        use_aux = cfg.loss.aux_weight > 0
        teacher = None
        if use_aux:
            teacher = build_teacher(cfg.teacher.name, cfg.teacher.weights,
                                    cfg.teacher.image_size or cfg.data.image_size).to(device)
        normalized = cfg.model.normalized_main_head or cfg.loss.main == "ldam_drw"
        student = build_student(cfg.model.trunk, cfg.model.weights, manifest.num_classes, teacher,
                                fixed_background_logit=cfg.model.fixed_background_logit,
                                normalized_main_head=normalized, logit_scale=cfg.loss.ldam_scale,
                                init_aux_from_teacher=cfg.model.init_aux_from_teacher,
                                freeze_bn_stats=cfg.model.freeze_bn_stats).to(device)
        if device.type == "cuda" and cfg.run.channels_last:
            student = student.to(memory_format=torch.channels_last)
        cache = teacher_cache_for(manifest, cfg, teacher) if use_aux and cfg.teacher.mode == "cached" else None
        stream = ShardStream(manifest, train=True, image_size=cfg.data.image_size, batch_size=cfg.data.batch_size,
                             seed=cfg.run.seed, sampling=cfg.data.sampling,
                             positive_fraction=cfg.data.positive_fraction, shuffle_buffer=cfg.data.shuffle_buffer,
                             min_scale=cfg.data.min_crop_scale, teacher_cache=cache, mode=cfg.data.mode,
                             policy=cfg.data.pad_policy, workers=cfg.data.num_workers, rank=rank, world=world)
        steps_per_epoch = max(stream.batches_per_epoch() // cfg.optim.grad_accum, 1)
        if stream.batches_per_epoch() < cfg.optim.grad_accum:
            raise ValueError(f"training set {manifest.root} has {manifest.count} samples: fewer than one optimiser "
                             f"step of data.batch_size * optim.grad_accum; lower the batch size")
        total = int(math.ceil(cfg.optim.epochs * steps_per_epoch))
        if cfg.run.max_steps:
            total = min(total, cfg.run.max_steps)
        params = [p for p in student.parameters() if p.requires_grad]
        if cfg.optim.name == "sgd":
            optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                        weight_decay=cfg.optim.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        scheduler = build_scheduler(optimizer, steps_per_epoch, cfg.optim)
        task = BGSplitTask(student, teacher, cfg, manifest.counts, drw_epoch(cfg))
        return cls(cfg, device, manifest, teacher, student, task, stream, optimizer, scheduler, steps_per_epoch,
                   total)

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "step": self.step, "student": self.student.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "loader": self.loader_state.state_dict(), "rng": rng_state(), "config": self.cfg.to_dict(),
                "model_meta": model_meta(self.cfg, self.manifest, self.student), "history": self.history,
                "scaler": self.scaler.state_dict(),
                "skipped": self.skipped.tolist()}

    def load_state_dict(self, state: dict[str, Any], url: str = "checkpoint") -> None:
        check_compatible(state, model_meta(self.cfg, self.manifest, self.student), url)
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader_state.load_state_dict(state["loader"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.skipped = torch.tensor(state.get("skipped", [0, 0, 0]), dtype=torch.long)

    def maybe_resume(self) -> str | None:
        resume = self.cfg.run.resume
        url = latest_checkpoint(self.cfg.run.out_dir) if resume == "auto" else resume or None
        if url is None:
            return None
        self.load_state_dict(load_checkpoint(url), url)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", url, self.step, self.loader_state.epoch,
                 self.loader_state.batches)
        return url

    def save(self) -> str:
        return save_checkpoint(self.cfg.run.out_dir, self.step, self.state_dict(), self.cfg.run.keep_checkpoints)

    # -- loop -----------------------------------------------------------------------------------------------
    def _autocast(self):
        dtype = autocast_dtype(self.cfg.run.precision, self.device)
        return torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if self.device.type == "cuda" and self.cfg.run.channels_last:
            out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
        return out

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """One optimiser step over ``grad_accum`` micro-batches; returns detached loss tensors (no sync)."""
        self.student.train()
        epoch = self.step / self.steps_per_epoch
        sums: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            with self._autocast():
                out = self.task(self._to_device(batch), epoch)
            self.scaler.scale(out["loss"] / len(micro_batches)).backward()
            for k in ("loss", "main_loss", "aux_loss"):
                if k in out:
                    sums[k] = sums.get(k, 0) + out[k].detach() / len(micro_batches)
        if self.cfg.optim.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.optim.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return sums

    def validate(self) -> dict[str, Any] | None:
        if not self.cfg.data.val:
            return None
        return evaluate_student(self.student, read_manifest(self.cfg.data.val), self.cfg.data.image_size,
                                self.cfg.data.batch_size, self.device, self.cfg.data.num_workers,
                                self.cfg.data.eval_resize_ratio)

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if not storage.is_remote(cfg.run.out_dir):
            os.makedirs(cfg.run.out_dir, exist_ok=True)
        logger = MetricsLogger(cfg.run.out_dir)
        bar = _progress(self.total_steps, self.step, cfg.run.progress)
        eval_every = int(round(cfg.run.eval_every * self.steps_per_epoch)) if cfg.run.eval_every else 0
        window: dict[str, torch.Tensor] = {}
        window_steps, window_images, window_positives, t0 = 0, 0, 0, time.time()
        loader = make_loader(self.stream, cfg.data.num_workers)
        start_time = time.time()
        log.info("%s", self.stream.describe_epoch())
        while self.step < self.total_steps:
            self.stream.epoch, self.stream.skip_batches = self.loader_state.epoch, self.loader_state.batches
            micro: list[dict[str, Any]] = []
            step_at_epoch_start = self.step
            for batch in loader:
                self.skipped += batch.pop("skipped")
                if "image" not in batch:
                    continue
                self.loader_state.batches += 1
                micro.append(batch)
                if len(micro) < cfg.optim.grad_accum:
                    continue
                window_positives += sum(int((b["label"] > 0).sum()) for b in micro)  # CPU labels: no sync
                window_images += sum(len(b["label"]) for b in micro)
                sums = self.train_step(micro)
                micro = []
                window_steps += 1
                for k, v in sums.items():
                    window[k] = window.get(k, 0) + v
                if self.step % cfg.run.log_every == 0 or self.step == self.total_steps:
                    rate = window_images / max(time.time() - t0, 1e-9)
                    scalars = {k: float(v) / window_steps for k, v in window.items()}  # the one sync per window
                    scalars.update(lr=self.scheduler.get_last_lr()[0], images_per_s=rate,
                                   epoch=self.step / self.steps_per_epoch,
                                   positive_fraction=window_positives / max(window_images, 1))
                    logger.log(self.step, scalars)
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}", img_s=f"{rate:.0f}")
                    window, window_steps, window_images, window_positives, t0 = {}, 0, 0, 0, time.time()
                bar.update(1)
                if eval_every and self.step % eval_every == 0 and self.step < self.total_steps:
                    self._record_eval(logger)
                if cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0:
                    self.save()
                if self.step >= self.total_steps:
                    break
            else:
                if self.step == step_at_epoch_start and self.stream.skip_batches == 0:
                    raise ValueError(f"training set {self.manifest.root} gave no full batch in epoch "
                                     f"{self.loader_state.epoch} (see the skipped-sample warnings); check the shards")
                self.loader_state.epoch += 1
                self.loader_state.batches = 0
        bar.close()
        final = self._record_eval(logger)
        path = self.save()
        summary = {"steps": self.step, "epochs": self.step / self.steps_per_epoch, "checkpoint": path,
                   "seconds": time.time() - start_time, "val": final,
                   "skipped": dict(zip(("bad_images", "missing_teacher", "bad_shards"), self.skipped.tolist())),
                   "storage": dict(storage.STATS),
                   "train_set": {"count": self.manifest.count, "counts": self.manifest.counts,
                                 "background_fraction": self.manifest.background_fraction}}
        if any(summary["skipped"].values()):
            log.warning("skipped during training: %s", summary["skipped"])
        storage.write_bytes(storage.join(cfg.run.out_dir, "summary.json"),
                            json.dumps(summary, indent=1, default=str).encode())
        logger.close()
        return summary

    def _record_eval(self, logger: "MetricsLogger") -> dict[str, Any] | None:
        result = self.validate()
        if result is not None:
            logger.log(self.step, {"val_map": result["map"]})
            self.history.append({"step": self.step, "val_map": result["map"]})
        return result


class MetricsLogger:
    """metrics.jsonl (one JSON object a log interval) plus TensorBoard scalars when tensorboard is installed."""

    def __init__(self, out_dir: str):
        self.remote = storage.is_remote(out_dir)
        self.path = storage.join(out_dir, "metrics.jsonl")
        self.lines: list[str] = []
        self.file = None if self.remote else open(self.path, "a")
        self.tb = None
        if not self.remote:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                self.tb = None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        line = json.dumps({"step": step, "time": time.time(), **scalars})
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        else:
            self.lines.append(line)
        if self.tb:
            for k, v in scalars.items():
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        else:
            storage.write_bytes(self.path, ("\n".join(self.lines) + "\n").encode())
        if self.tb:
            self.tb.close()


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)


def train(cfg: JobConfig) -> dict[str, Any]:
    trainer = Trainer.build(cfg)
    trainer.maybe_resume()
    return trainer.fit()
