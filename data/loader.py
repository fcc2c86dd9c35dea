"""Stream a shard set as decoded, augmented batches.

A batch is a dict: ``image`` uint8 [B,3,H,W], ``label``, ``key``, ``skipped`` (bad images and samples of
unreadable shards since the previous batch), ``skipped_by_shard`` (the same per shard file), with cached
teacher labels ``teacher_idx``/``teacher_prob``; a training batch also carries ``position`` (epoch, worker role,
samples emitted), which is what a checkpoint stores to resume exactly; an evaluation batch carries ``ref``
(shard file, sample index) per sample.

Which samples a worker reads is ``data.plan`` (a pure function of seed, epoch, world, rank, workers); the order
it reads and emits them in is ``data.order`` (pure as well); ``data.reader`` carries that order out with
byte-range reads. Each sample's augmentation is seeded by its key, so a sample gets the same crop whichever
process decodes it. A training stream runs epoch after epoch in the same worker processes (they are started
once per run, not once per epoch), and stops only when the trainer stops asking.
"""
from __future__ import annotations

import itertools
import logging
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data import remote
from data.order import OrderSpec, Ref, advance, in_order, interleaved, worker_events
from data.plan import Piece, describe_plan, for_worker, plan_summary, steps_per_epoch, worker_batches
from data.config import LoaderConfig
from data.positives import PositiveStore
from data.reader import Sample, ShardReader
from data.shards import Manifest, image_member
from data.teacher_labels import TeacherLabels
from data.transforms import BadImage, eval_transform, sample_rng, train_transform

log = logging.getLogger("bgsplit.data")
SKIP_KINDS = ("bad_images", "bad_shards")


def worker_skip(batches_done: int, worker: int, workers: int) -> int:
    """Batches a worker had delivered when the DataLoader, taking batches round-robin, gave ``batches_done``."""
    w = max(workers, 1)
    return (batches_done - worker + w - 1) // w if batches_done > worker else 0


@dataclass
class LoaderState:
    """Where a training loader stands; the whole of what a checkpoint stores about the data."""

    epoch: int = 0
    batches: int = 0
    """Batches of this epoch the trainer consumed."""
    positions: dict[int, int] = field(default_factory=dict)
    """Per worker role: samples its order had emitted (bad ones included) by its last consumed batch."""

    def advance(self, position: tuple[int, int, int], batches_per_epoch: int) -> None:
        """Account for one consumed batch, produced at ``position`` = (epoch, role, emitted)."""
        epoch, role, emitted = (int(v) for v in position)
        if epoch != self.epoch:
            raise RuntimeError(f"loader gave a batch of epoch {epoch} while the trainer is in epoch {self.epoch}")
        self.positions[role] = emitted
        self.batches += 1
        if self.batches == batches_per_epoch:
            self.epoch, self.batches, self.positions = self.epoch + 1, 0, {}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, "positions": dict(self.positions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.positions = {int(k): int(v) for k, v in state.get("positions", {}).items()}


def _stable_hash(key: str) -> int:
    return zlib.crc32(key.encode())


class ShardStream(IterableDataset):
    """One rank's share of a shard set, as batches (dicts of tensors)."""

    def __init__(self, manifest: Manifest, cfg: LoaderConfig, *, train: bool, seed: int = 0, rank: int = 0,
                 world: int = 1, teacher_labels: TeacherLabels | None = None, shards: list[int] | None = None,
                 keep: Callable[[str, int], bool] | None = None):
        super().__init__()
        self.manifest, self.cfg, self.train = manifest, cfg, train
        """``cfg``: how to read and transform (data.* of the job); the rest is who reads which part, and with
        which cached labels."""
        self.seed, self.rank, self.world = seed, rank, world
        self.teacher_labels = teacher_labels
        self.eval_shards = shards
        self.keep = keep
        """Evaluation only: (key, label) -> whether to decode the sample at all (a probe's background sample
        reads whole shards and decodes a fraction of them); picklable, it runs in the loader's workers."""
        self.start = LoaderState()
        """Where a training stream starts (a resumed run sets it from its checkpoint)."""
        self.epochs: int | None = None
        """Training epochs to stream before stopping (None: until the consumer stops)."""
        self.positives = PositiveStore(manifest, teacher_labels) if self._kind == "background" else None

    @property
    def _kind(self) -> str | None:
        return "background" if self.train and self.cfg.sampling == "balanced" else None

    @property
    def _emit_ratio(self) -> float:
        """Samples emitted per planned sample: balanced sampling adds re-sampled positives to the background."""
        return 1.0 / (1.0 - self.cfg.positive_fraction) if self._kind == "background" else 1.0

    def _counts(self) -> list[int]:
        return [s.count for s in self.manifest.of_kind(self._kind)]

    @property
    def buffer_samples(self) -> int:
        """Shuffle-buffer capacity: data.shuffle_buffer_mb over the set's mean stored sample size."""
        mean = self.manifest.bytes / max(self.manifest.count, 1)
        return max(1, int(self.cfg.shuffle_buffer_mb * (1 << 20) / max(mean, 1.0)))

    def batches_per_epoch(self) -> int:
        """Training: the same number on every rank and every epoch (see data.plan); evaluation: all samples."""
        if not self.train:
            return -(-self.manifest.count // self.cfg.batch_size)
        c = self.cfg
        return steps_per_epoch(self._counts(), world=self.world, batch_size=c.batch_size, mode=c.mode,
                               policy=c.pad_policy, emit_ratio=self._emit_ratio)

    def describe_epoch(self) -> str:
        if not self.train:
            return f"evaluation: {self.manifest.count} samples"
        c = self.cfg
        summary = plan_summary(self._counts(), world=self.world, workers=c.num_workers, batch_size=c.batch_size,
                               mode=c.mode, policy=c.pad_policy, emit_ratio=self._emit_ratio, seed=self.seed)
        return (f"{describe_plan(summary)}; shuffle buffer {self.buffer_samples} samples "
                f"({self.cfg.shuffle_buffer_mb:g} MB) per worker, {self.cfg.interleave} shards read at a time")

    # -- training: epoch after epoch, exactly as planned ----------------------------------------------------
    def _train(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        steps, w = self.batches_per_epoch(), max(workers, 1)
        e0, b0 = self.start.epoch, self.start.batches

        def share(epoch: int) -> tuple[int, int, int]:
            """This worker's (plan role, samples already emitted, batches to give) in ``epoch``. The DataLoader
            takes batches round-robin from its workers across epoch boundaries: worker w gives the run's batches
            w, w + W, ..., which in this epoch are those of plan role ``role``."""
            role = (worker + b0 - (epoch - e0) * steps) % w
            skip = worker_skip(b0, role, workers) if epoch == e0 else 0
            emitted = self.start.positions.get(role, skip * self.cfg.batch_size) if epoch == e0 else 0
            return role, emitted, worker_batches(steps, role, workers) - skip

        reader = ShardReader(self.manifest, self.manifest.of_kind(self._kind), self.teacher_labels,
                             self._bad_shard, self.cfg.read_ahead_mb)
        try:
            for epoch in itertools.count(e0):
                if self.epochs is not None and epoch >= e0 + self.epochs:
                    return
                role, emitted, quota = share(epoch)
                if quota <= 0:
                    continue
                then = None  # the next epoch's first pieces are fetched while this one ends
                if self.epochs is None or epoch + 1 < e0 + self.epochs:
                    next_role, _, next_quota = share(epoch + 1)
                    if next_quota > 0:
                        then = (self._events(epoch + 1, next_role, workers), next_quota * self.cfg.batch_size)
                yield from self._worker_epoch(reader, epoch, role, workers, emitted, quota, then)
        finally:
            reader.close()

    def _events(self, epoch: int, role: int, workers: int) -> Iterator[Any]:
        """The worker's read order for one epoch, as integers (data.order): nothing is read yet."""
        counts, c = self._counts(), self.cfg
        plan = for_worker(counts, seed=self.seed, epoch=epoch, world=self.world, rank=self.rank, worker=role,
                          workers=workers, batch_size=c.batch_size, mode=c.mode, policy=c.pad_policy,
                          emit_ratio=self._emit_ratio)
        spec = OrderSpec(c.mode, self.buffer_samples, c.interleave, (self.seed, epoch, self.rank, role),
                         self._emit_ratio - 1.0)
        return worker_events(spec, plan.pieces, counts, self.positives.pools() if self.positives else None)

    def _worker_epoch(self, reader: ShardReader, epoch: int, role: int, workers: int, emitted: int,
                      quota: int, then: tuple[Iterator[Any], int] | None = None) -> Iterator[dict[str, Any]]:
        events = self._events(epoch, role, workers)
        # a resumed worker replays its order on integers and fetches only what its buffer held
        position = advance(events, emitted) if emitted else None
        samples = reader.run(events, position, self.positives, emits=quota * self.cfg.batch_size, then=then)
        produced, pending, bad_streak = 0, [], 0
        give_up = 2 * max(self.manifest.count, self.cfg.batch_size)
        try:
            while produced < quota:
                item = next(samples, None)
                if item is None:
                    raise ValueError(f"training set {self.manifest.root}: worker {role} of rank {self.rank} ran out of"
                                     f" samples in epoch {epoch} after {produced} of {quota} batches; check the shards")
                emitted += 1
                sample = self._decode(*item, epoch=epoch)
                if sample is None:
                    bad_streak += 1
                    if bad_streak > give_up:
                        raise ValueError(f"training set {self.manifest.root} gave no decodable sample in the last "
                                         f"{bad_streak} read (see the skipped-sample warnings); check the shards")
                    continue
                bad_streak = 0
                pending.append(sample)
                if len(pending) == self.cfg.batch_size:
                    yield {**self._collate(pending), "position": (epoch, role, emitted)}
                    produced += 1
                    pending = []
        finally:
            samples.close()

    # -- evaluation: every sample once, in shard order; a batch never spans two shards -----------------------
    def _eval(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        shards = self.manifest.shards
        mine = list(range(len(shards)) if self.eval_shards is None else self.eval_shards)[worker::max(workers, 1)]
        reader = ShardReader(self.manifest, shards, self.teacher_labels, self._bad_shard, self.cfg.read_ahead_mb)
        events = in_order(interleaved(((Piece(s, 0, shards[s].count), 0) for s in mine), 1))
        pending: list[dict[str, Any]] = []
        shard = -1
        for ref, sample in reader.run(events):
            if pending and ref.shard != shard:
                # batches cut at fixed places of each shard hold the same samples however the shards are split
                # over ranks, workers or Ray tasks; CPU and GPU kernels pick their blocking by batch size, so only
                # then is a sample's score the same to the last bit whichever process scores it
                yield self._collate(pending)
                pending = []
            shard = ref.shard
            if self.keep is not None and sample is not None and not self._wanted(sample):
                continue
            decoded = self._decode(ref, sample)
            if decoded is None:
                continue
            decoded["ref"] = (shards[ref.shard].url, ref.index)
            pending.append(decoded)
            if len(pending) == self.cfg.batch_size:
                yield self._collate(pending)
                pending = []
        if pending:
            yield self._collate(pending)
        elif any(self._stats.values()):  # report skips that came after the last batch
            yield self._skips()

    def _wanted(self, sample: Sample) -> bool:
        try:
            label = int(sample.fields["cls"])
        except (KeyError, ValueError):
            return True  # _decode counts it as undecodable
        return self.keep(sample.key, label)

    # -- decoding and batching -------------------------------------------------------------------------------
    def _decode(self, ref: Ref, sample: Sample | None, epoch: int = 0) -> dict[str, Any] | None:
        if sample is None:  # lost to a corrupt shard: the reader counted it against the shard
            return None
        fields = sample.fields
        data = image_member(fields)
        try:
            if data is None:
                raise BadImage("no image field")
            if self.train:  # repeats (padding, re-sampled positives) get their own crop
                key = sample.key if ref.tag == 0 else f"{sample.key}#{ref.tag}"
                image = train_transform(data, self.cfg.image_size,
                                        sample_rng(self.seed, epoch, _stable_hash(key)), self.cfg.min_crop_scale)
            else:
                image = eval_transform(data, self.cfg.image_size, self.cfg.eval_resize_ratio)
            label = int(fields["cls"])
        except (BadImage, KeyError, ValueError) as e:
            log.warning("skipping sample %s of shard %s: undecodable (%s)", sample.key, sample.shard, e)
            self._count_skip("bad_images", sample.shard)
            return None
        out = {"image": image, "label": label, "key": sample.key}
        if self.teacher_labels is not None:
            out["teacher_idx"], out["teacher_prob"] = sample.teacher
        return out

    def _bad_shard(self, shard: str) -> None:
        self._count_skip("bad_shards", shard)

    def _count_skip(self, kind: str, shard: str | None) -> None:
        self._stats[kind] += 1
        name = (shard or "?").rsplit("/", 1)[-1]
        self._by_shard.setdefault(name, dict.fromkeys(SKIP_KINDS, 0))[kind] += 1

    def _skips(self) -> dict[str, Any]:
        """The skips since the last batch (then reset): totals as a tensor, and per shard file. A worker process
        also reports its object-store counters, which the training process cannot see otherwise."""
        out = {"skipped": torch.tensor([self._stats[k] for k in SKIP_KINDS]), "skipped_by_shard": self._by_shard}
        self._stats, self._by_shard = dict.fromkeys(SKIP_KINDS, 0), {}
        if get_worker_info() is not None:
            out["storage"] = {k: remote.STATS[k] - self._io_seen.get(k, 0) for k in remote.STATS}
            self._io_seen = dict(remote.STATS)
        return out

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "image": torch.stack([s["image"] for s in samples]),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "key": [s["key"] for s in samples],
            **self._skips(),
        }
        if "ref" in samples[0]:
            batch["ref"] = [s["ref"] for s in samples]
        if self.teacher_labels is not None:
            batch["teacher_idx"] = torch.from_numpy(np.stack([s["teacher_idx"] for s in samples]).astype(np.int64))
            batch["teacher_prob"] = torch.from_numpy(np.stack([s["teacher_prob"] for s in samples]).astype(np.float32))
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 0)
        self._stats, self._by_shard = dict.fromkeys(SKIP_KINDS, 0), {}
        self._io_seen = dict(remote.STATS)  # a forked worker starts with a copy of its parent's counts
        return self._train(worker, workers) if self.train else self._eval(worker, workers)


def one_line(error: BaseException) -> BaseException:
    """A loader worker's ValueError or OSError (a StorageOutage among them) comes back from the DataLoader with
    the worker's traceback in its message; the run should end with the worker's own one-line message."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1 or not isinstance(error, (ValueError, OSError)):
        return error
    last = lines[-1]
    prefix = f"{type(error).__name__}: "
    try:
        return type(error)(last[len(prefix):] if last.startswith(prefix) else last)
    except TypeError:  # an exception type that needs other arguments keeps its message
        return error


def _forget_inherited_s3_sessions(worker_id: int) -> None:
    """A forked worker inherits the parent's s3fs sessions, bound to an event-loop thread that does not exist in
    the child; closing them at the worker's exit fails with 'attached to a different loop' tracebacks. The
    parent owns and closes them: the child only forgets them (it opens its own on first use)."""
    for finalizer in list(weakref.finalize._registry):  # type: ignore[attr-defined]
        info = finalizer.peek()
        if info is not None and getattr(info[1], "__name__", "") == "close_session":
            finalizer.detach()


def make_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    """A DataLoader over pre-batched samples. It gets its own generator: drawing worker seeds from the global RNG
    would shift dropout masks and make a resumed run differ from an uninterrupted one. A training stream is
    iterated once per run, so its workers live for the whole run."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=4 if num_workers else None,
                      generator=torch.Generator().manual_seed(stream.seed),
                      worker_init_fn=_forget_inherited_s3_sessions if num_workers else None)


def set_samples(manifest: Manifest, shards: list[int] | None = None, read_ahead_mb: float = 0.0
                ) -> Iterator[tuple[str, int, bytes | None, str]]:
    """(key, main label, encoded image, shard file) of every sample of the given shards (all: None), in manifest
    order, undecoded: for a pass that transforms each image its own way (trainer.views crops each one many
    times). The image is None where the sample has no image member or a readable label; samples lost to a corrupt
    shard are not yielded (the reader logs them)."""
    chosen = range(len(manifest.shards)) if shards is None else shards
    reader = ShardReader(manifest, manifest.shards, read_ahead_mb=read_ahead_mb)
    events = in_order(interleaved(((Piece(s, 0, manifest.shards[s].count), 0) for s in chosen), 1))
    try:
        for _, sample in reader.run(events):
            if sample is None:
                continue
            data = image_member(sample.fields)
            try:
                label = int(sample.fields["cls"])
            except (KeyError, ValueError):
                data, label = None, -1
            yield sample.key, label, data, sample.shard
    finally:
        reader.close()
