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

from data import storage
from data.loader import SKIP_KINDS, LoaderState, ShardStream, make_loader, one_line
from data.shards import Manifest, check_objects, read_manifest
from data.teacher_labels import LabelSpec, TeacherLabels
from trainer.checkpoint import rng_state, set_rng_state
from trainer.checkpoint_manager import CheckpointManager
from trainer.config import JobConfig
from trainer.engine import Engine, autocast_dtype, build_engine, build_optimizer
from trainer.evaluate import evaluate_student
from trainer.head_init import broadcast_head, fit_probe_head
from trainer.models import Student, StudentSpec, Teacher, build_student, build_teacher
from trainer.schedule import build_scheduler, in_probe_phase
from trainer.scoring import ScoringConfig
from trainer.run_log import MetricsLogger, NoLogger, progress_bar
from trainer.runtime import gather, init_distributed, resolve_device, seed_everything
from trainer.task import BGSplitTask

if TYPE_CHECKING:
    from trainer.views import ViewStream

log = logging.getLogger("bgsplit.train")


def teacher_labels_for(manifest: Manifest, cfg: JobConfig, teacher: Teacher) -> TeacherLabels:
    """The label set this very teacher (architecture, input size, k and weights) wrote into the shard set."""
    size = cfg.teacher.image_size or cfg.data.image_size
    return TeacherLabels(manifest, LabelSpec(teacher.arch, size, cfg.teacher.topk, teacher.digest()))


def set_schedule_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a LambdaLR at ``step`` (the LR it would have there), as if it had been stepped that often."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


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
    loader_state: LoaderState = field(default_factory=LoaderState)
    step: int = 0
    skipped: torch.Tensor = field(default_factory=lambda: torch.zeros(len(SKIP_KINDS), dtype=torch.long))
    skipped_by_shard: dict[str, dict[str, int]] = field(default_factory=dict)
    worker_io: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None
    checkpoints: CheckpointManager | None = None
    resume_url: str | None = None
    """The checkpoint this run continues from (decided in ``build``, before the engine wraps the student)."""
    resume_state: dict[str, Any] | None = None
    resume_info: dict[str, Any] = field(default_factory=dict)
    teacher_shares_prefix: bool = False
    """Decided once in ``build``: a test or bench may wrap ``task`` in a plain function."""
    head_init: dict[str, Any] = field(default_factory=dict)
    """model.head_init=probe: the probe the main head started from (C, weighting, validation mAP, grid)."""
    init_head: dict[str, torch.Tensor] = field(default_factory=dict)
    """The main head's weights at step 0 (model.head_init=probe), kept in every checkpoint: WiSE-FT's theta_0."""

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @classmethod
    def build(cls, cfg: JobConfig, device: torch.device | None = None) -> "Trainer":
        seed_everything(cfg.run.seed)
        storage.configure(outage_timeout_s=cfg.storage.outage_timeout_s)  # loader workers inherit it
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
                                        background=cfg.run.async_checkpoint)
        resume_url, resume_state = checkpoints.find(cfg.run.resume)
        if resume_state is not None:
            checkpoints.validate(resume_state, spec, cfg.engine.name, resume_url)
            check_frozen_stages(resume_state, cfg, resume_url)
            if cfg.engine.name == "deepspeed":
                # DeepSpeed casts and partitions the student when it wraps it and keeps its own fp32 master
                # copy: the trained weights go in first, so a resume that cannot use the checkpoint's ZeRO
                # files (another world size, precision or stage) still continues from them
                student.load_state_dict(resume_state["student"])
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
        return cls(cfg, device, manifest, teacher, student, task, stream, engine, scheduler, steps_per_epoch,
                   total, rank, world, checkpoints=checkpoints, resume_url=resume_url, resume_state=resume_state,
                   teacher_shares_prefix=bool(shared), head_init=head_init,
                   init_head=({k: v.detach().clone() for k, v in student.main_head.state_dict().items()}
                              if cfg.model.head_init == "probe" and resume_state is None else {}))

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Rank 0's state.pt: tensors and plain containers only (``meta`` holds the rest). A collective call (RNG
        states are gathered from every rank, ZeRO-3 gathers the weights): every rank calls it, the other ranks'
        return value is not written."""
        rngs = gather(rng_state())
        state = {"student": self.engine.student_state_dict(), "engine": self.engine.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "loader": self.loader_state.state_dict(), "rng": rngs}
        if self.init_head:
            state["init_head"] = {k: v.detach().cpu() for k, v in self.init_head.items()}
        return state

    def meta(self) -> dict[str, Any]:
        """Rank 0's meta.json: what describes the checkpoint (the writer adds the format and the step)."""
        return {"student_spec": self.student.spec.to_dict(), "engine_name": self.engine.name, "world": self.world,
                "steps_per_epoch": self.steps_per_epoch, "config": self.cfg.to_dict(), "history": self.history,
                "skipped": self.skipped.tolist(), "skipped_by_shard": self.skipped_by_shard,
                "head_init": self.head_init}

    def load_state_dict(self, state: dict[str, Any], url: str = "checkpoint") -> None:
        """Everything but DeepSpeed's partitioned files (``_load_sharded``). A checkpoint of another world size
        resumes too: DDP's state.pt holds the whole optimiser; the data order and the step count depend on the
        world, so the run restarts the interrupted epoch in the new world's order (nothing of it is skipped;
        what was done of it is done again) with the step and the LR schedule at that epoch's start."""
        self.checkpoints.validate(state, self.student.spec, self.engine.name, url)
        if self.engine.name == "ddp":
            self.student.load_state_dict(state["student"])
            self.engine.load_state_dict(state["engine"] if "engine" in state else state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader_state.load_state_dict(state["loader"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        # the same world gets each rank's own generators back; another world size starts ranks from rank 0's
        set_rng_state(rngs[self.rank] if len(rngs) == self.world else rngs[0])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.skipped = torch.tensor(state.get("skipped", [0] * len(SKIP_KINDS)), dtype=torch.long)
        self.skipped_by_shard = dict(state.get("skipped_by_shard", {}))
        self.init_head = dict(state.get("init_head") or {})
        self.head_init = dict(state.get("head_init") or {})
        saved_world = int(state.get("world", self.world))
        self.resume_info = {"from": url, "from_world": saved_world, "from_step": self.step}
        if saved_world != self.world:
            epoch = self.loader_state.epoch
            self.loader_state = LoaderState(epoch=epoch)
            self.step = epoch * self.steps_per_epoch
            set_schedule_step(self.scheduler, self.step)
            log.warning("%s was written by %d ranks, this run has %d: restarting its epoch %d from the start in "
                        "this world's order (step %d -> %d)", url, saved_world, self.world, epoch,
                        self.resume_info["from_step"], self.step)

    def maybe_resume(self) -> str | None:
        """Continue from the checkpoint ``build`` found (``run.resume``: '' starts fresh, 'auto' takes the newest
        complete one under run.out_dir, else the one given)."""
        url, state = self.resume_url, self.resume_state
        if url is None or state is None:
            return None
        self.load_state_dict(state, url)
        self.resume_info["optimizer"] = "restored"
        if self.engine.sharded_save is not None and not self.checkpoints.load_sharded(
                url, self.engine, self.resume_info["from_world"]):
            self.resume_info["optimizer"] = "fresh"
        self.resume_state = None  # the payload can be large; it is not needed again
        self.resumed_from = url
        log.info("resumed from %s at step %d (epoch %d, batch %d)", url, self.step, self.loader_state.epoch,
                 self.loader_state.batches)
        return url

    def save(self) -> str:
        """Start writing a checkpoint of the current step (every rank calls this); the upload runs on."""
        state = self.state_dict()
        return self.checkpoints.save(self.step, state, self.meta() if self.rank == 0 else {},
                                     self.engine.sharded_save)

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
        self.step += 1
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
        if not storage.is_remote(cfg.run.out_dir):
            os.makedirs(cfg.run.out_dir, exist_ok=True)
        logger = MetricsLogger(cfg.run.out_dir, append=self.resumed_from is not None) if self.rank == 0 \
            else NoLogger()
        bar = progress_bar(self.total_steps, self.step, cfg.run.progress and self.rank == 0)
        eval_every = int(round(cfg.run.eval_every * self.steps_per_epoch)) if cfg.run.eval_every else 0
        window: dict[str, torch.Tensor] = {}
        window_steps, window_images, window_positives, t0 = 0, 0, 0, time.time()
        self.stream.start = LoaderState(**self.loader_state.state_dict())
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
            self.loader_state.advance(batch["position"], batches_per_epoch)
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
            if cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0:
                self.save()
        del batches  # stops the loader workers
        bar.close()
        final = self._record_eval(logger)
        path = self.save()
        self.checkpoints.wait()  # the final checkpoint must be complete before the run says it is done
        summary = {"steps": self.step, "epochs": self.step / self.steps_per_epoch, "checkpoint": path,
                   "seconds": time.time() - start_time, "val": final, "world": self.world,
                   "engine": self.engine.name, "resumed_from": self.resumed_from, "resume": self.resume_info,
                   "frozen_stages": cfg.model.frozen_stages, "teacher_shares_prefix": self.teacher_shares_prefix,
                   "head_init": {k: v for k, v in self.head_init.items() if k != "grid"},
                   "checkpoint_uploads": self.checkpoints.uploads(),
                   "skipped": dict(zip(SKIP_KINDS, self.skipped.tolist())),
                   "skipped_by_shard": self.skipped_by_shard,
                   "storage": {k: v + self.worker_io.get(k, 0) for k, v in storage.STATS.items()},
                   "train_set": {"count": self.manifest.count, "counts": self.manifest.counts,
                                 "background_fraction": self.manifest.background_fraction}}
        if any(summary["skipped"].values()):
            log.warning("skipped during training: %s; by shard: %s", summary["skipped"], self.skipped_by_shard)
        logger.close()
        if self.rank != 0:
            return summary
        storage.write_bytes(storage.join(cfg.run.out_dir, "summary.json"),
                            json.dumps(summary, indent=1, default=str).encode())
        return summary

    def _count_skips(self, batch: dict[str, Any]) -> None:
        """Fold a batch's skip counts and its loader worker's object-store counters into the run's."""
        self.skipped += batch.pop("skipped")
        for k, n in batch.pop("storage", {}).items():
            self.worker_io[k] = self.worker_io.get(k, 0) + n
        for shard, counts in batch.pop("skipped_by_shard", {}).items():
            mine = self.skipped_by_shard.setdefault(shard, dict.fromkeys(counts, 0))
            for kind, n in counts.items():
                mine[kind] += int(n)

    def _record_eval(self, logger: MetricsLogger) -> dict[str, Any] | None:
        result = self.validate()
        if result is not None:
            logger.log(self.step, {"val_map": result["map"]})
            self.history.append({"step": self.step, "val_map": result["map"]})
        return result


def check_frozen_stages(state: dict[str, Any], cfg: JobConfig, url: str) -> None:
    """A run continues with the prefix it froze: a resume that freezes another part of the trunk would train
    weights the checkpoint held fixed (and a shared teacher would read a prefix that is no longer its own)."""
    saved = int(((state.get("config") or {}).get("model") or {}).get("frozen_stages", 0))
    if saved != cfg.model.frozen_stages:
        raise ValueError(f"cannot resume from {url}: it was trained with model.frozen_stages={saved} but this run "
                         f"has model.frozen_stages={cfg.model.frozen_stages}; give model.frozen_stages={saved} or "
                         "a new run.out_dir")


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
