"""The training loop: build the pieces from a JobConfig, step, log on an interval, evaluate, checkpoint, resume.

The loop does not know which method runs (``task(batch, epoch)`` returns the loss) nor which data-parallel
engine wraps the student (``trainer.engine``). Losses are accumulated on the device and read back only every
``run.log_every`` steps, so there is no host sync per step. The same code runs in one process (``bgsplit
train``), under torchrun and inside Ray Train workers: rank and world come from torch.distributed.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from data import remote, storage
from data.loader import SKIP_KINDS, LoaderState, ShardStream, make_loader, one_line
from data.shards import Manifest, check_objects, read_manifest
from data.teacher_labels import LabelSpec, TeacherLabels
from trainer.checkpoint_manager import CheckpointManager
from trainer.config import JobConfig
from trainer.engine import Engine, autocast_dtype, build_engine, build_optimizer
from trainer.evaluate import evaluate_student
from trainer.head_init import broadcast_head, fit_probe_head
from trainer.models import Student, StudentSpec, Teacher, build_student, build_teacher
from trainer.schedule import build_scheduler, in_probe_phase
from trainer.scoring import ScoringConfig
from trainer.run_log import MetricsLogger, NoLogger, progress_bar
from trainer.run_state import EngineState, HeadStart, RngStates, RunProgress
from trainer.runtime import init_distributed, resolve_device, seed_everything
from trainer.task import BGSplitTask

if TYPE_CHECKING:
    from trainer.views import ViewStream

log = logging.getLogger("bgsplit.train")


def teacher_labels_for(manifest: Manifest, cfg: JobConfig, teacher: Teacher) -> TeacherLabels:
    """The label set this very teacher (architecture, input size, k and weights) wrote into the shard set."""
    size = cfg.teacher.image_size or cfg.data.image_size
    return TeacherLabels(manifest, LabelSpec(teacher.arch, size, cfg.teacher.topk, teacher.digest()))


def drw_epoch(cfg: JobConfig) -> float:
    start = cfg.loss.drw_start_epoch
    return start * cfg.optim.epochs if start < 1 else start


@dataclass
class Trainer:
    """Everything a run holds; built by ``Trainer.build`` and driven by ``fit``."""

    cfg: JobConfig
    device: torch.device
    manifest: Manifest
    teacher: Teacher | None
    student: Student
    task: BGSplitTask
    stream: "ShardStream | ViewStream"
    engine: Engine
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    total_steps: int
    rank: int = 0
    world: int = 1
    progress: RunProgress | None = None
    """Step, data position, schedule and counters: what a resume restores of the loop."""
    head: HeadStart = field(default_factory=HeadStart)
    """model.head_init=probe: the probe the main head started from and its weights at step 0."""
    checkpoints: CheckpointManager | None = None
    worker_io: dict[str, int] = field(default_factory=dict)
    teacher_shares_prefix: bool = False
    """Decided once in ``build``: a test or bench may wrap ``task`` in a plain function."""

    def __post_init__(self) -> None:
        if self.progress is None:
            self.progress = RunProgress(self.scheduler, self.steps_per_epoch)

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @classmethod
    def build(cls, cfg: JobConfig, device: torch.device | None = None, restartable: bool = False) -> "Trainer":
        """``restartable``: a Ray Train worker, whose every attempt resumes the run
        (trainer.checkpoint_manager.resume_rule)."""
        seed_everything(cfg.run.seed)
        remote.configure(outage_timeout_s=cfg.storage.outage_timeout_s)  # loader workers inherit it
        device = device or resolve_device(cfg.run.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # every training batch has one shape: let cuDNN time its algorithms once and keep the fastest
            torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
        rank, world = init_distributed(device)
        manifest = read_set(cfg.data.train, "data.train")
        if cfg.data.val:  # read at the first evaluation, maybe hours in: a wrong path fails now, naming its key
            read_set(cfg.data.val, "data.val")
        # one listing, so a shard that went missing fails here and not hours into the run; on every rank, so no
        # rank is left waiting at a collective for one that stopped
        check_objects(manifest)
        use_aux = cfg.loss.aux_weight > 0
        teacher = None
        dtype = autocast_dtype(cfg.run.precision, device)
        if use_aux or cfg.views.count:  # views store the teacher's targets: one cache serves runs with and without
            teacher = build_teacher(cfg.teacher.name, cfg.teacher.weights,
                                    cfg.teacher.image_size or cfg.data.image_size)
        spec = StudentSpec.from_config(cfg, manifest, teacher.num_classes if teacher is not None else 0)
        student = build_student(spec, teacher, weights=cfg.model.weights,
                                init_aux_from_teacher=cfg.model.init_aux_from_teacher,
                                freeze_bn_stats=cfg.model.freeze_bn_stats, dropout=cfg.model.dropout,
                                frozen_stages=cfg.model.frozen_stages).to(device)
        # decided on the weights as loaded, before the teacher is cast to the autocast dtype
        same_prefix = teacher is not None and teacher.to(device).shares_prefix(student, cfg.data.image_size)
        shared = (cfg.model.frozen_stages if same_prefix and cfg.teacher.mode == "online" and cfg.teacher.share_prefix
                  else 0)
        if device.type == "cuda" and cfg.run.channels_last:
            student = student.to(memory_format=torch.channels_last)
        labels = teacher_labels_for(manifest, cfg, teacher) if use_aux and cfg.teacher.mode == "cached" else None
        if teacher is not None and cfg.teacher.mode == "online":  # cached labels: it never runs in training
            teacher.prepare(device, dtype, channels_last=device.type == "cuda" and cfg.run.channels_last)
        checkpoints = CheckpointManager(cfg.run.out_dir, cfg.run.keep_checkpoints, rank, world,
                                        background=cfg.run.async_checkpoint, every=cfg.run.checkpoint_every,
                                        restartable=restartable)
        resume_state = checkpoints.find(cfg.run.resume, spec, cfg.engine.name, cfg.model.frozen_stages)
        if cfg.engine.name == "deepspeed":
            checkpoints.weights_before_wrap(student)
        head_init: dict[str, Any] = {}
        if cfg.model.head_init == "probe" and resume_state is None:  # a resume's head comes from its checkpoint
            if rank == 0:
                head_init = fit_probe_head(student, cfg)
            broadcast_head(student, world)
        if cfg.views.count:
            from trainer.views import ViewStream, build_views, load_views

            folder = build_views(cfg, manifest, student, teacher, shared, device, rank, world)
            stream = ViewStream(load_views(folder), cfg, seed=cfg.run.seed, rank=rank, world=world)
        else:
            stream = ShardStream(manifest, cfg.data, train=True, seed=cfg.run.seed, rank=rank, world=world,
                                 teacher_labels=labels)
        steps_per_epoch = max(stream.batches_per_epoch() // cfg.optim.grad_accum, 1)
        if stream.batches_per_epoch() < cfg.optim.grad_accum:
            raise ValueError(f"training set {manifest.root} has {manifest.count} samples: fewer than one optimiser "
                             f"step of data.batch_size * optim.grad_accum; lower the batch size")
        total = int(math.ceil(cfg.optim.epochs * steps_per_epoch))
        if cfg.run.max_steps:
            total = min(total, cfg.run.max_steps)
        if cfg.optim.trunk_lr_mult == 0:
            student.freeze_trunk()
        optimizer = build_optimizer(student, cfg)
        scheduler = build_scheduler(optimizer, steps_per_epoch, cfg.optim)
        engine = build_engine(student, optimizer, cfg, device)
        # the task runs the wrapped student (gradients are synchronised) and the bare, frozen teacher
        task = BGSplitTask(engine.model, teacher, cfg, manifest.counts, drw_epoch(cfg), teacher_dtype=dtype)
        task.shared_prefix = shared
        if cfg.model.frozen_stages:
            log.info("trunk stem and stages 1-%d frozen; the teacher %s", cfg.model.frozen_stages,
                     "runs its upper stages on the student's prefix" if shared else "runs whole")
        head = HeadStart(({k: v.detach().clone() for k, v in student.main_head.state_dict().items()}
                          if cfg.model.head_init == "probe" and resume_state is None else {}), head_init)
        trainer = cls(cfg, device, manifest, teacher, student, task, stream, engine, scheduler, steps_per_epoch,
                      total, rank, world, head=head, checkpoints=checkpoints, teacher_shares_prefix=bool(shared))
        checkpoints.register(EngineState(engine), trainer.progress, RngStates(rank, world), head)
        checkpoints.describe(student_spec=spec.to_dict(), engine_name=engine.name, config=cfg.to_dict())
        return trainer

    def maybe_resume(self) -> str | None:
        """Continue from the checkpoint ``build`` found (``run.resume``: '' starts fresh, 'auto' takes the newest
        complete one under run.out_dir, else the one given)."""
        url = self.checkpoints.restore(self.engine)
        if url is not None:
            p = self.progress
            log.info("resumed from %s at step %d (epoch %d, batch %d)", url, p.step, p.loader.epoch, p.loader.batches)
        return url

    def save(self) -> str:
        """Start writing a checkpoint of the current step (every rank calls this); the upload runs on."""
        return self.checkpoints.save(self.step, self.engine.sharded_save)

    # -- loop -----------------------------------------------------------------------------------------------
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if self.device.type == "cuda" and self.cfg.run.channels_last and "image" in out:
            out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
        return out

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """One optimiser step over ``grad_accum`` micro-batches; returns detached loss tensors (no sync)."""
        self.student.trunk_probe = in_probe_phase(self.step, self.steps_per_epoch, self.cfg.optim)
        self.engine.model.train()
        epoch = self.step / self.steps_per_epoch
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            with self.engine.autocast():
                out = self.task(self._to_device(batch), epoch)
            self.engine.backward(out["loss"], last=i == len(micro_batches) - 1, micro_batches=len(micro_batches))
            for k in ("loss", "main_loss", "aux_loss"):
                if k in out:
                    sums[k] = sums.get(k, 0) + out[k].detach() / len(micro_batches)
        self.engine.step()
        self.scheduler.step()
        self.progress.step += 1
        return sums

    def validate(self) -> dict[str, Any] | None:
        """Every rank scores its share of the validation shards with the bare student and gets the metrics of
        the whole set (a collective: every rank calls it). One rank scoring everything would keep the others
        waiting at the next collective, past NCCL's timeout on a large set. ``ranks`` in the result: images
        each rank scored. Under ZeRO-3 every forward gathers the partitioned weights from all ranks, so they
        also run the same number of forward passes (lockstep).

        Rank 0's buffers go to every rank first: each rank's last training forward moved its BatchNorm running
        statistics with its own batch (DDP re-broadcasts rank 0's only at the next forward), and the scores must
        be those of the weights rank 0 saves."""
        if not self.cfg.data.val:
            return None
        if self.world > 1:
            for buffer in self.student.buffers():
                dist.broadcast(buffer, src=0)
        zero3 = self.engine.name == "deepspeed" and self.cfg.engine.zero_stage == 3
        return evaluate_student(self.student, read_manifest(self.cfg.data.val), ScoringConfig.of(self.cfg),
                                self.device, rank=self.rank, world=self.world, lockstep=zero3)

    def fit(self, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
        """Train to the planned step. ``callbacks``: objects with any of ``before_step(trainer, micro_batches)``
        and ``after_step(trainer, losses)`` (the step's detached loss tensors): how tests and benches watch or
        perturb a run (record the batches, take the store away mid-run) without replacing the Trainer's methods."""
        before = [c.before_step for c in callbacks if hasattr(c, "before_step")]
        after = [c.after_step for c in callbacks if hasattr(c, "after_step")]
        cfg = self.cfg
        if not remote.is_remote(cfg.run.out_dir):
            os.makedirs(cfg.run.out_dir, exist_ok=True)
        logger = MetricsLogger(cfg.run.out_dir, append=bool(self.checkpoints.resumed)) if self.rank == 0 \
            else NoLogger()
        bar = progress_bar(self.total_steps, self.step, cfg.run.progress and self.rank == 0)
        eval_every = int(round(cfg.run.eval_every * self.steps_per_epoch)) if cfg.run.eval_every else 0
        window: dict[str, torch.Tensor] = {}
        window_steps, window_images, window_positives, t0 = 0, 0, 0, time.time()
        self.stream.start = LoaderState(**self.progress.loader.state_dict())
        # one pass for the whole run; cached views are gathered from memory maps in this process
        batches = iter(make_loader(self.stream, 0 if cfg.views.count else cfg.data.num_workers))
        batches_per_epoch = self.stream.batches_per_epoch()
        start_time = time.time()
        log.info("rank %d of %d, engine %s: %s; the run: %.4g epochs = %d optimiser steps (the progress bar)",
                 self.rank, self.world, self.engine.name, self.stream.describe_epoch(),
                 self.total_steps / max(self.steps_per_epoch, 1), self.total_steps)
        micro: list[dict[str, Any]] = []
        while self.step < self.total_steps:
            try:
                batch = next(batches)
            except (ValueError, OSError) as e:
                raise one_line(e) from None
            self._count_skips(batch)
            if "label" not in batch:  # skip counts only
                continue
            self.progress.loader.advance(batch["position"], batches_per_epoch)
            micro.append(batch)
            if len(micro) < cfg.optim.grad_accum:
                continue
            window_positives += sum(int((b["label"] > 0).sum()) for b in micro)  # CPU labels: no sync
            window_images += sum(len(b["label"]) for b in micro)
            for hook in before:
                hook(self, micro)
            sums = self.train_step(micro)
            for hook in after:
                hook(self, sums)
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
            self.checkpoints.check()  # a checkpoint that found the disk full stops the run now, in one line
            if eval_every and self.step % eval_every == 0 and self.step < self.total_steps:
                self._record_eval(logger)
            if self.checkpoints.due(self.step):
                self.save()
        del batches  # stops the loader workers
        bar.close()
        final = self._record_eval(logger)
        path = self.save()
        self.checkpoints.wait()  # the final checkpoint must be complete before the run says it is done
        summary = {"steps": self.step, "epochs": self.step / self.steps_per_epoch, "checkpoint": path,
                   "seconds": time.time() - start_time, "val": final, "world": self.world,
                   "engine": self.engine.name, "resumed_from": self.checkpoints.resumed.get("from"),
                   "resume": self.checkpoints.resumed,
                   "frozen_stages": cfg.model.frozen_stages, "teacher_shares_prefix": self.teacher_shares_prefix,
                   "head_init": {k: v for k, v in self.head.info.items() if k != "grid"},
                   "checkpoint_uploads": self.checkpoints.uploads(),
                   "skipped": dict(zip(SKIP_KINDS, self.progress.skipped.tolist())),
                   "skipped_by_shard": self.progress.skipped_by_shard,
                   "storage": {k: v + self.worker_io.get(k, 0) for k, v in remote.STATS.items()},
                   "train_set": {"count": self.manifest.count, "counts": self.manifest.counts,
                                 "background_fraction": self.manifest.background_fraction}}
        if any(summary["skipped"].values()):
            log.warning("skipped during training: %s; by shard: %s", summary["skipped"], summary["skipped_by_shard"])
        logger.close()
        if self.rank != 0:
            return summary
        storage.write_bytes(storage.join(cfg.run.out_dir, "summary.json"),
                            json.dumps(summary, indent=1, default=str).encode())
        return summary

    def _count_skips(self, batch: dict[str, Any]) -> None:
        """Fold a batch's skip counts and its loader worker's object-store counters into the run's."""
        self.progress.skipped += batch.pop("skipped")
        for k, n in batch.pop("storage", {}).items():
            self.worker_io[k] = self.worker_io.get(k, 0) + n
        for shard, counts in batch.pop("skipped_by_shard", {}).items():
            mine = self.progress.skipped_by_shard.setdefault(shard, dict.fromkeys(counts, 0))
            for kind, n in counts.items():
                mine[kind] += int(n)

    def _record_eval(self, logger: MetricsLogger) -> dict[str, Any] | None:
        result = self.validate()
        if result is not None:
            logger.log(self.step, {"val_map": result["map"]})
            self.progress.history.append({"step": self.step, "val_map": result["map"]})
        return result


def read_set(location: str, key: str):
    """A config's shard set, or one line naming the key that points at nothing (a config copied from the demo
    keeps the demo's folders unless each set is given)."""
    from data.shards import manifest_url

    if not location:
        raise FileNotFoundError(f"{key} is empty: give {key}=FOLDER_OR_URL, a set built by `bgsplit shards build`")
    if not storage.exists(manifest_url(location)):
        raise FileNotFoundError(f"{key}={location} holds no shard set ({manifest_url(location)} does not exist): "
                                f"give {key}= a folder or URL built by `bgsplit shards build`")
    return read_manifest(location)


def train(cfg: JobConfig) -> dict[str, Any]:
    trainer = Trainer.build(cfg)
    trainer.maybe_resume()
    return trainer.fit()
