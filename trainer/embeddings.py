"""A pool's embeddings: the frozen teacher trunk's pooled features of every pool image, computed once and kept,
so that every round of mining with a probe (the cold start, or a `probe.kind` checkpoint) is a matrix product
over stored rows instead of a pass of the network over the pool.

A mining loop ranks the same pool again after each labelling round, and with a probe only the head changes: the
features of the pool's images do not. At 10M images the pass costs hours of GPU and the rows 2.5 KB an image
(fp16, 1,280 features: ~26 GB), so the rows are kept beside the pool (``<pool>/embeddings`` unless the command
says otherwise) one file pair per shard, written by the shard pass (one process, torchrun ranks or Ray tasks,
like eval) and skipped on a rerun: a killed pass resumes with the shards it had not stored.

What the rows depend on is their *space*: the trunk's weights (a digest of the tensors, so a teacher and a probe
checkpoint holding the same trunk share the rows), the input size and the eval resize ratio. Each space has its
own folder, and each shard's JSON names its space, so a file copied from another space is refused, never read.
A shard's rows are valid for the shard they were made from (its bytes and count, checked on load): a set rebuilt
in place is embedded again, not scored with the old rows. fp16 keeps ranks as fp32 rows give them (scores
differ by ~1e-3), at half the bytes; nothing is pickled (raw .npy and JSON).
"""
from __future__ import annotations

import io
import json
import logging
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from data import storage
from data.shards import Manifest, ShardInfo, read_manifest
from trainer.scoring import ScoringConfig

log = logging.getLogger("bgsplit.embeddings")

VERSION = 1


def trunk_digest(trunk: torch.nn.Module) -> str:
    """The trunk's weights as a digest (the teacher labels' rule): the rows' real identity, whatever the network
    was called or loaded from."""
    from data.teacher_labels import weights_digest

    return weights_digest(trunk.state_dict())


@dataclass(frozen=True)
class Space:
    """What an embedding row is a function of, besides its image."""

    arch: str
    trunk: str
    """trunk_digest of the network's trunk."""
    image_size: int
    resize_ratio: float = 1.15

    @classmethod
    def of(cls, arch: str, trunk: torch.nn.Module, scoring: ScoringConfig) -> Space:
        """The space of ``trunk``'s rows at ``scoring``'s size and resize: one rule for the pass that stores rows
        and the two that read them (mine's probe scores, a probe's features), so they name the same rows."""
        return cls(arch, trunk_digest(trunk), scoring.image_size, scoring.resize_ratio)

    @property
    def tag(self) -> str:
        return f"{self.arch}-{self.trunk[:10]}-{self.image_size}px-r{self.resize_ratio:g}"


def default_location(pool: str) -> str:
    return storage.join(pool, "embeddings")


@dataclass
class EmbeddingCache:
    """One space's rows under ``root`` (the cache folder a command names; the space adds its own folder)."""

    root: str
    space: Space

    @property
    def folder(self) -> str:
        return storage.join(self.root, self.space.tag)

    def _urls(self, shard: ShardInfo) -> tuple[str, str]:
        base = storage.join(self.folder, shard.record.rsplit("/", 1)[-1].removesuffix(".json"))
        return base + ".npy", base + ".json"

    def stored(self, shard: ShardInfo) -> dict[str, Any] | None:
        """The shard's keys, labels and indices if its rows are stored for this version of it (a set rebuilt in
        place is embedded again); None otherwise."""
        _, doc_url = self._urls(shard)
        if not storage.exists(doc_url):
            return None
        try:
            doc = json.loads(storage.read_bytes(doc_url))
        except ValueError:
            raise ValueError(f"embedding file {doc_url} is not JSON: delete it, the next pass writes it again")
        if doc.get("space") != asdict(self.space):
            raise ValueError(f"embedding file {doc_url} holds rows of another network or input size "
                             f"({doc.get('space')}, this pass wants {asdict(self.space)}): delete the folder "
                             f"{self.folder} or name another with --embeddings")
        if doc.get("bytes") != shard.bytes or doc.get("count") != shard.count:
            log.warning("embeddings of shard %s were made from another version of it: embedding it again",
                        shard.url)
            return None
        return doc

    def load(self, shard: ShardInfo) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The shard's rows [n, d] (fp16) and ``stored``'s facts; None where ``stored`` says so."""
        doc = self.stored(shard)
        if doc is None:
            return None
        rows_url, _ = self._urls(shard)
        rows = np.load(io.BytesIO(storage.read_bytes(rows_url)), allow_pickle=False)
        if rows.shape[0] != len(doc["keys"]):
            raise ValueError(f"embedding file {rows_url} holds {rows.shape[0]} rows for {len(doc['keys'])} keys: "
                             "delete it and its .json, the next pass writes them again")
        return rows, doc

    def store(self, shard: ShardInfo, rows: np.ndarray, keys: list[str], labels: list[int],
              indices: list[int]) -> None:
        """Rows first, then the JSON that makes them count: a pass killed between the two leaves a shard that
        the next pass embeds again, never rows without their keys."""
        rows_url, doc_url = self._urls(shard)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(rows, dtype=np.float16), allow_pickle=False)
        storage.write_bytes(rows_url, buf.getvalue())
        doc = {"version": VERSION, "space": asdict(self.space), "shard": shard.url, "bytes": shard.bytes,
               "count": shard.count, "keys": keys, "labels": labels, "indices": indices}
        storage.write_bytes(doc_url, json.dumps(doc).encode())


def embed_shards(cache: EmbeddingCache, manifest: Manifest, shards: list[int], encode, *, batch_size: int = 128,
                 num_workers: int = 0, chunk: int = 8) -> int:
    """Embed and store the given shards, ``chunk`` at a time (one DataLoader a chunk; memory is a chunk's rows).
    ``encode``: uint8 images [b, 3, s, s] -> pooled features [b, d]. Returns the images embedded."""
    from data.config import LoaderConfig
    from data.loader import ShardStream, make_loader

    from data.progress import progress

    cfg = LoaderConfig(image_size=cache.space.image_size, batch_size=batch_size, num_workers=num_workers,
                       eval_resize_ratio=cache.space.resize_ratio)
    done = 0
    bar = progress(sum(manifest.shards[s].count for s in shards), unit="img", desc="embed")
    for start in range(0, len(shards), chunk):
        group = shards[start:start + chunk]
        per: dict[str, dict[str, list]] = {manifest.shards[s].url: {"rows": [], "keys": [], "labels": [], "at": []}
                                           for s in group}
        with torch.inference_mode():
            for batch in make_loader(ShardStream(manifest, cfg, train=False, shards=group), num_workers):
                if "image" not in batch:
                    continue
                feats = encode(batch["image"]).float().cpu().numpy()
                bar.update(len(batch["key"]))
                for j, (url, i) in enumerate(batch["ref"]):
                    part = per[url]
                    part["rows"].append(feats[j])
                    part["keys"].append(batch["key"][j])
                    part["labels"].append(int(batch["label"][j]))
                    part["at"].append(int(i))
        for s in group:
            part = per[manifest.shards[s].url]
            rows = np.stack(part["rows"]) if part["rows"] else np.zeros((0, 0), np.float16)
            cache.store(manifest.shards[s], rows, part["keys"], part["labels"], part["at"])
            done += len(part["keys"])
    bar.close()
    return done


@dataclass
class EmbedPass:
    """Embed every shard of a pool not stored yet (trainer.shard_pass; Ray tasks through cluster.passes)."""

    pool: str
    root: str
    arch: str
    weights: str
    scoring: ScoringConfig
    """Its size and resize name the rows' Space. Its precision is not used: rows are an fp32 forward pass, so
    stored rows do not depend on the command that embedded them."""
    name: str = "embedded"
    space: Space | None = field(default=None)

    def __post_init__(self) -> None:
        self.manifest = read_manifest(self.pool)
        self.token = uuid.uuid4().hex
        if self.space is None:
            self.space = Space.of(self.arch, self._teacher().trunk, self.scoring)
        self.cache = EmbeddingCache(self.root, self.space)

    def _teacher(self):
        from trainer.models import build_teacher
        from trainer.shard_pass import cached_model

        return cached_model(self.token, lambda: build_teacher(self.arch, self.weights))

    def shard_counts(self) -> list[int]:
        return [s.count for s in self.manifest.shards]

    def todo(self, shards: list[int]) -> list[int]:
        return [s for s in shards if self.cache.stored(self.manifest.shards[s]) is None]

    def begin(self) -> None:
        return None

    def run(self, shards: list[int], device: torch.device) -> dict[str, int]:
        teacher = self._teacher().to(device).eval()

        def encode(images: torch.Tensor) -> torch.Tensor:
            return teacher.trunk(teacher.normalize(images.to(device)))

        return {"images": embed_shards(self.cache, self.manifest, shards, encode, batch_size=self.scoring.batch_size,
                                       num_workers=self.scoring.num_workers), "shards": len(shards)}

    def publish(self, parts: list[tuple[list[int], dict[str, int]]]) -> dict[str, Any]:
        done = {"images": sum(p["images"] for _, p in parts), "shards": sum(p["shards"] for _, p in parts)}
        log.info("embeddings of %s at %s: %d image(s) of %d shard(s) embedded now, %d shard(s) stored before",
                 self.pool, self.cache.folder, done["images"], done["shards"],
                 len(self.manifest.shards) - done["shards"])
        return {"embeddings": self.cache.folder, **done}
