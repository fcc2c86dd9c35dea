"""Stream a shard set as decoded, augmented batches.

A batch is a dict: ``image`` uint8 [B,3,H,W], ``label``, ``key``, ``skipped`` (bad images, missing teacher
entries, unreadable shards since the previous batch), ``skipped_by_shard`` (the same per shard file) and, with a
teacher cache, ``teacher_idx``/``teacher_prob``. A final dict holding only the skip counts reports skips that came
after the last batch.

The sample order is a pure function of (seed, epoch, rank, world, worker, workers): ``data.plan`` picks each
worker's shards (or samples within shards) and its exact number of batches, a seeded shuffle buffer mixes them,
and each sample's augmentation is seeded by its key. A checkpoint therefore only needs (epoch, batches consumed)
to replay the rest of an epoch exactly (exact mode) or to start a fresh seeded stream (resampled mode).

Bad samples (undecodable images, missing teacher-cache entries) and unreadable shards are skipped, counted and
warned about with their key; the run goes on.
"""
from __future__ import annotations

import itertools
import logging
import tarfile
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data import storage
from data.plan import Piece, for_worker, padding_report, steps_per_epoch
from data.shards import Manifest, iter_tar
from data.teacher_cache import TeacherCache
from data.transforms import BadImage, eval_transform, sample_rng, train_transform

log = logging.getLogger("bgsplit.data")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "img")
SKIP_KINDS = ("bad_images", "missing_teacher", "bad_shards")
SHARD_FIELD = "__shard__"
"""Added to each sample's fields by the shard reader: the shard a skipped sample is counted against."""


def worker_skip(batches_done: int, worker: int, workers: int) -> int:
    """Batches a worker had delivered when the DataLoader, taking batches round-robin, gave ``batches_done``."""
    w = max(workers, 1)
    return (batches_done - worker + w - 1) // w if batches_done > worker else 0


@dataclass
class LoaderState:
    """Where a training loader stands; the whole of what a checkpoint stores about the data."""

    epoch: int = 0
    batches: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])


def _stable_hash(key: str) -> int:
    return zlib.crc32(key.encode())


class ShardStream(IterableDataset):
    """One rank's share of a shard set, as batches (dicts of tensors), for one epoch at a time."""

    def __init__(self, manifest: Manifest, *, train: bool, image_size: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1, sampling: str = "natural", positive_fraction: float = 0.125,
                 shuffle_buffer: int = 2000, min_scale: float = 0.35, eval_resize_ratio: float = 1.15,
                 teacher_cache: TeacherCache | None = None, mode: str = "exact", policy: str = "pad",
                 workers: int = 0):
        super().__init__()
        self.manifest = manifest
        self.train, self.image_size, self.batch_size = train, image_size, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.sampling, self.positive_fraction = sampling, positive_fraction
        self.shuffle_buffer, self.min_scale, self.eval_resize_ratio = shuffle_buffer, min_scale, eval_resize_ratio
        self.teacher_cache = teacher_cache
        self.mode, self.policy, self.workers = mode, policy, workers
        self.epoch = 0
        self.skip_batches = 0
        self._positives: list[list[tuple[str, dict[str, bytes]]]] | None = None
        if sampling == "balanced" and not manifest.shard_urls("positive"):
            raise ValueError(f"sampling 'balanced' needs positive shards; {manifest.root} has none")

    @property
    def _kind(self) -> str | None:
        return "background" if self.train and self.sampling == "balanced" else None

    @property
    def _emit_ratio(self) -> float:
        """Samples emitted per planned sample: balanced sampling adds re-sampled positives to the background."""
        return 1.0 / (1.0 - self.positive_fraction) if self._kind == "background" else 1.0

    def _counts(self) -> list[int]:
        return [s.count for s in self.manifest.shards if self._kind is None or s.kind == self._kind]

    def batches_per_epoch(self) -> int:
        """Training: the same number on every rank (see data.plan); evaluation: all samples, last batch partial."""
        if not self.train:
            return -(-self.manifest.count // self.batch_size)
        return steps_per_epoch(self._counts(), world=self.world, batch_size=self.batch_size, mode=self.mode,
                               policy=self.policy, emit_ratio=self._emit_ratio, seed=self.seed, epoch=self.epoch,
                               workers=self.workers)

    def describe_epoch(self) -> str:
        if not self.train:
            return f"evaluation: {self.manifest.count} samples"
        if self.mode == "resampled":
            return (f"resampled mode: {self.batches_per_epoch()} steps per rank per epoch, shards drawn with "
                    "replacement")
        rep = padding_report(self._counts(), world=self.world, workers=self.workers, batch_size=self.batch_size,
                             seed=self.seed, epoch=self.epoch, policy=self.policy, emit_ratio=self._emit_ratio)
        return (f"exact mode ({self.policy}): {rep['steps']} steps per rank; {rep['padded']} samples repeated and "
                f"{rep['dropped']} left out this epoch to give every rank the same number of steps")

    # -- raw sample streams ----------------------------------------------------------------------------------
    def _read_shards(self, urls: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
        for url in urls:
            try:
                with storage.open_read(url) as stream:
                    for key, fields in iter_tar(stream):
                        fields[SHARD_FIELD] = url  # so a skip is counted against its shard
                        yield key, fields
            except (tarfile.TarError, OSError, EOFError) as e:
                log.warning("shard %s is unreadable past this point (%s: %s); skipping the rest of it",
                            url, type(e).__name__, e)
                self._count_skip("bad_shards", url)

    def _shuffled(self, samples: Iterator, rng: np.random.Generator) -> Iterator:
        if not self.train or self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _positive_pool(self) -> list[list[tuple[str, dict[str, bytes]]]]:
        """Positives per rare class, held as encoded bytes: they are few by definition."""
        if self._positives is None:
            pools: list[list] = [[] for _ in range(self.manifest.num_classes - 1)]
            for key, fields in self._read_shards(self.manifest.shard_urls("positive")):
                pools[int(fields["cls"]) - 1].append((key, fields))
            self._positives = [p for p in pools if p]
        return self._positives

    def _balanced(self, background: Iterator, rng: np.random.Generator) -> Iterator:
        """Interleave re-sampled positives, each rare class equally often, at ``positive_fraction``."""
        pools = self._positive_pool()
        ratio = self.positive_fraction / (1.0 - self.positive_fraction)
        orders = [rng.permutation(len(p)) for p in pools]
        cursor = [0] * len(pools)
        emitted = 0
        for n_bg, sample in enumerate(background, start=1):
            yield sample
            while emitted < int(n_bg * ratio):
                c = int(rng.integers(len(pools)))
                if cursor[c] == len(orders[c]):
                    orders[c], cursor[c] = rng.permutation(len(pools[c])), 0
                key, fields = pools[c][orders[c][cursor[c]]]
                cursor[c] += 1
                emitted += 1
                yield f"{key}#{emitted}", fields

    def _read_pieces(self, urls: list[str], pieces: tuple[Piece, ...]) -> Iterator[tuple[str, dict[str, bytes]]]:
        for piece in pieces:
            yield from itertools.islice(self._read_shards([urls[piece.shard]]), piece.start, piece.stop)

    def _planned(self, worker: int, workers: int) -> tuple[Iterator, int]:
        """This worker's training stream (endless; the caller takes its quota) and its quota of batches."""
        urls = self.manifest.shard_urls(self._kind)
        plan = for_worker(self._counts(), seed=self.seed, epoch=self.epoch, world=self.world, rank=self.rank,
                          worker=worker, workers=workers, batch_size=self.batch_size, mode=self.mode,
                          policy=self.policy, emit_ratio=self._emit_ratio)
        skip = worker_skip(self.skip_batches, worker, workers)
        # a resampled stream resumed mid-epoch is a fresh seeded draw (nonce = batches done), not a replay
        nonce = skip if self.mode == "resampled" else 0
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1, nonce])

        def background() -> Iterator:
            for cycle in itertools.count():
                if self.mode == "resampled":
                    shards = [int(i) for i in rng.integers(len(urls), size=max(len(urls), 1))]
                    stream = self._read_shards([urls[i] for i in shards])
                else:  # exact: the planned pieces, repeated only when padding is needed
                    stream = self._read_pieces(urls, plan.pieces)
                got = 0
                for sample in self._shuffled(stream, rng):
                    got += 1
                    yield sample if cycle == 0 else (f"{sample[0]}#pad{cycle}", sample[1])
                if got == 0:
                    return  # nothing readable: stop rather than spin

        stream = background()
        if self._kind == "background":
            stream = self._balanced(stream, rng)
        if skip and self.mode == "exact":  # replaying an epoch: drop whole batches before decoding anything
            for _ in itertools.islice(stream, skip * self.batch_size):
                pass
            return stream, plan.batches - skip
        if skip:
            log.info("resampled mode: resuming epoch %d with a fresh seeded stream after %d batches", self.epoch,
                     self.skip_batches)
        return stream, plan.batches - skip

    # -- decoding and batching -------------------------------------------------------------------------------
    def _decode(self, key: str, fields: dict[str, bytes]) -> dict[str, Any] | None:
        ext = next((e for e in IMAGE_EXTS if e in fields), None)
        source_key = key.split("#", 1)[0]
        try:
            if ext is None:
                raise BadImage("no image field")
            if self.train:  # re-sampled and padded repeats carry a '#' suffix, so they get their own crop
                rng = sample_rng(self.seed, self.epoch, _stable_hash(key))
                image = train_transform(fields[ext], self.image_size, rng, self.min_scale)
            else:
                image = eval_transform(fields[ext], self.image_size, self.eval_resize_ratio)
        except BadImage as e:
            log.warning("skipping sample %s of shard %s: undecodable image (%s)", source_key,
                        fields.get(SHARD_FIELD), e)
            self._count_skip("bad_images", fields.get(SHARD_FIELD))
            return None
        sample = {"image": image, "label": int(fields["cls"]), "key": source_key}
        if self.teacher_cache is not None:
            entry = self.teacher_cache.get(source_key)
            if entry is None:
                log.warning("skipping sample %s of shard %s: no entry in teacher cache %s", source_key,
                            fields.get(SHARD_FIELD), self.teacher_cache.url)
                self._count_skip("missing_teacher", fields.get(SHARD_FIELD))
                return None
            sample["teacher_idx"], sample["teacher_prob"] = entry
        return sample

    def _count_skip(self, kind: str, shard: str | None) -> None:
        self._stats[kind] += 1
        name = (shard or "?").rsplit("/", 1)[-1]
        self._by_shard.setdefault(name, dict.fromkeys(SKIP_KINDS, 0))[kind] += 1

    def _skips(self) -> dict[str, Any]:
        """The skips since the last batch (then reset): totals as a tensor, and per shard file. A worker process
        also reports its object-store retries and failures, which the training process cannot see otherwise."""
        out = {"skipped": torch.tensor([self._stats[k] for k in SKIP_KINDS]), "skipped_by_shard": self._by_shard}
        self._stats, self._by_shard = dict.fromkeys(SKIP_KINDS, 0), {}
        if get_worker_info() is not None:
            out["storage"] = {k: storage.STATS[k] - self._io_seen[k] for k in storage.STATS}
            self._io_seen = dict(storage.STATS)
        return out

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "image": torch.stack([s["image"] for s in samples]),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "key": [s["key"] for s in samples],
            **self._skips(),
        }
        if self.teacher_cache is not None:
            batch["teacher_idx"] = torch.from_numpy(np.stack([s["teacher_idx"] for s in samples]).astype(np.int64))
            batch["teacher_prob"] = torch.from_numpy(np.stack([s["teacher_prob"] for s in samples]).astype(np.float32))
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 0)
        self._stats, self._by_shard = dict.fromkeys(SKIP_KINDS, 0), {}
        self._io_seen = dict(storage.STATS)  # a forked worker starts with a copy of its parent's counts
        if self.train:
            # a fresh DataLoader asks worker 0 first; after a resume the next batch in round-robin order belongs
            # to worker (batches done) % workers, so each process takes over the role of that shifted worker
            role = (worker + self.skip_batches) % workers if workers else 0
            raw, quota = self._planned(role, workers)
        else:
            urls = self.manifest.shard_urls()
            raw, quota = self._read_shards(urls[worker::max(workers, 1)]), -1
        produced, bad_streak = 0, 0
        give_up = 2 * max(self.manifest.count, self.batch_size)  # a training stream repeats: stop if nothing decodes
        pending: list[dict[str, Any]] = []
        for key, fields in raw:
            if produced == quota:
                break
            sample = self._decode(key, fields)
            if sample is None:
                bad_streak += 1
                if bad_streak > give_up:
                    log.error("no decodable sample in the last %d read from %s; stopping this worker's epoch",
                              bad_streak, self.manifest.root)
                    break
                continue
            bad_streak = 0
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self._collate(pending)
                produced += 1
                pending = []
        if pending and not self.train:
            yield self._collate(pending)
        elif any(self._stats.values()):  # report skips that happened after the last full batch
            yield self._skips()


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
    would shift dropout masks and make a resumed run differ from an uninterrupted one."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=4 if num_workers else None,
                      generator=torch.Generator().manual_seed(stream.seed),
                      worker_init_fn=_forget_inherited_s3_sessions if num_workers else None)
