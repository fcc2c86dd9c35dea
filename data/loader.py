"""Stream a shard set as decoded, augmented batches.

A batch is a dict: ``image`` uint8 [B,3,H,W], ``label``, ``key``, ``skipped`` (bad images, missing teacher
entries, unreadable shards since the previous batch) and, with a teacher cache, ``teacher_idx``/``teacher_prob``.
A final dict holding only ``skipped`` reports skips that came after the last batch.

The sample order is a pure function of (seed, epoch, rank, world, worker, workers): ``assign_shards`` picks each
worker's shards, a seeded shuffle buffer mixes them, and each sample's augmentation is seeded by its key. A
checkpoint therefore only needs (epoch, batches consumed) to replay the rest of an epoch exactly.

Bad samples (undecodable images, missing teacher-cache entries) and unreadable shards are skipped, counted and
warned about with their key; the run goes on.
"""
from __future__ import annotations

import logging
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data import storage
from data.shards import Manifest, iter_tar
from data.teacher_cache import TeacherCache
from data.transforms import BadImage, eval_transform, sample_rng, train_transform

log = logging.getLogger("bgsplit.data")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "img")


def assign_shards(num_shards: int, *, seed: int, epoch: int, rank: int, world: int, worker: int,
                  workers: int, shuffle: bool) -> list[int]:
    """Shards for one loader worker of one rank: a seeded per-epoch permutation dealt round-robin to slots."""
    order = np.random.default_rng([seed, epoch]).permutation(num_shards) if shuffle else np.arange(num_shards)
    slots = world * max(workers, 1)
    slot = rank * max(workers, 1) + worker
    return [int(i) for i in order[slot::slots]]


def worker_skip(batches_done: int, worker: int, workers: int) -> int:
    """Batches a worker already delivered when the DataLoader (which takes batches round-robin) gave ``batches_done``."""
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
                 teacher_cache: TeacherCache | None = None):
        super().__init__()
        self.manifest = manifest
        self.train, self.image_size, self.batch_size = train, image_size, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.sampling, self.positive_fraction = sampling, positive_fraction
        self.shuffle_buffer, self.min_scale, self.eval_resize_ratio = shuffle_buffer, min_scale, eval_resize_ratio
        self.teacher_cache = teacher_cache
        self.epoch = 0
        self.skip_batches = 0
        self._positives: list[list[tuple[str, dict[str, bytes]]]] | None = None
        if sampling == "balanced" and not manifest.shard_urls("positive"):
            raise ValueError(f"sampling 'balanced' needs positive shards; {manifest.root} has none")

    def epoch_length(self) -> int:
        """Samples in one epoch over all ranks (balanced sampling adds re-sampled positives to the background)."""
        if self.train and self.sampling == "balanced":
            return int(self.manifest.counts[0] / (1.0 - self.positive_fraction))
        return self.manifest.count

    def batches_per_epoch(self) -> int:
        n = self.epoch_length() // self.world
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    # -- raw sample streams ----------------------------------------------------------------------------------
    def _read_shards(self, urls: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
        for url in urls:
            try:
                with storage.open_read(url) as stream:
                    yield from iter_tar(stream)
            except (tarfile.TarError, OSError, EOFError) as e:
                log.warning("shard %s is unreadable past this point (%s: %s); skipping the rest of it",
                            url, type(e).__name__, e)
                self._stats["bad_shards"] += 1

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

    def _raw_stream(self, worker: int, workers: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        kind = "background" if self.train and self.sampling == "balanced" else None
        urls = self.manifest.shard_urls(kind)
        mine = assign_shards(len(urls), seed=self.seed, epoch=self.epoch, rank=self.rank, world=self.world,
                             worker=worker, workers=workers, shuffle=self.train)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
        stream = self._shuffled(self._read_shards([urls[i] for i in mine]), rng)
        if kind == "background":
            stream = self._balanced(stream, rng)
        return stream

    # -- decoding and batching -------------------------------------------------------------------------------
    def _decode(self, key: str, fields: dict[str, bytes]) -> dict[str, Any] | None:
        ext = next((e for e in IMAGE_EXTS if e in fields), None)
        source_key = key.split("#", 1)[0]
        try:
            if ext is None:
                raise BadImage("no image field")
            if self.train:
                occurrence = int(key.split("#", 1)[1]) if "#" in key else 0
                rng = sample_rng(self.seed, self.epoch, _stable_hash(key) * 1000 + occurrence % 1000)
                image = train_transform(fields[ext], self.image_size, rng, self.min_scale)
            else:
                image = eval_transform(fields[ext], self.image_size, self.eval_resize_ratio)
        except BadImage as e:
            log.warning("skipping sample %s: undecodable image (%s)", source_key, e)
            self._stats["bad_images"] += 1
            return None
        sample = {"image": image, "label": int(fields["cls"]), "key": source_key}
        if self.teacher_cache is not None:
            entry = self.teacher_cache.get(source_key)
            if entry is None:
                log.warning("skipping sample %s: no entry in teacher cache %s", source_key, self.teacher_cache.url)
                self._stats["missing_teacher"] += 1
                return None
            sample["teacher_idx"], sample["teacher_prob"] = entry
        return sample

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "image": torch.stack([s["image"] for s in samples]),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "key": [s["key"] for s in samples],
            "skipped": torch.tensor([self._stats[k] for k in ("bad_images", "missing_teacher", "bad_shards")]),
        }
        if self.teacher_cache is not None:
            batch["teacher_idx"] = torch.from_numpy(np.stack([s["teacher_idx"] for s in samples]).astype(np.int64))
            batch["teacher_prob"] = torch.from_numpy(np.stack([s["teacher_prob"] for s in samples]).astype(np.float32))
        self._stats = dict.fromkeys(self._stats, 0)
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 0)
        self._stats = {"bad_images": 0, "missing_teacher": 0, "bad_shards": 0}
        skip = worker_skip(self.skip_batches, worker, workers)
        raw = self._raw_stream(worker, workers)
        if skip:  # replaying an epoch after a resume: drop whole batches before decoding anything
            for _ in range(skip * self.batch_size):
                if next(raw, None) is None:
                    return
        pending: list[dict[str, Any]] = []
        for key, fields in raw:
            sample = self._decode(key, fields)
            if sample is None:
                continue
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self._collate(pending)
                pending = []
        if pending and not self.train:
            yield self._collate(pending)
        elif any(self._stats.values()):  # report skips that happened after the last full batch
            yield {"skipped": torch.tensor([self._stats[k] for k in ("bad_images", "missing_teacher", "bad_shards")])}


def make_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    """A DataLoader over pre-batched samples. It gets its own generator: drawing worker seeds from the global RNG
    would shift dropout masks and make a resumed run differ from an uninterrupted one."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=4 if num_workers else None,
                      generator=torch.Generator().manual_seed(stream.seed))
