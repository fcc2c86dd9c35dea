"""`bgsplit mine`: find the rare classes in an unlabeled pool, for a person to confirm and train on again.

The pool can hold millions of images, so nothing here grows with it. The unit of work is a *share*, one shard
of the pool: scoring a share keeps its top N per rare class and publishes them whole as a part file
(``parts/<fingerprint>/<shard>.json``). The merge reads the parts one at a time into a bounded top N per class.
Because a part is published only when its share is done, a killed worker loses that share only, and a rerun (or
a Ray retry) scores just the shares without a part. The fingerprint names everything that decides the scores
(checkpoint, pool, input size, N, exclusions), so parts from another checkpoint are never merged in.

``MinePass`` is the pass (trainer.shard_pass): one process, torchrun ranks and Ray tasks split the shares by the
one rule (data.plan.split_shards) and run the same ``score_shares``.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data import storage
from data import overlap
from data.overlap import CONTENT, KEY
from data.hash_index import key_hashes, read_content_index, record_hashes
from data.shards import Manifest, image_member, manifest_identity, read_manifest, read_record
from trainer.scoring import ScoringConfig

log = logging.getLogger("bgsplit.mine")

PARTS = "parts"
CANDIDATES = "candidates.jsonl"
SUMMARY = "mine.json"


@dataclass(frozen=True)
class MineJob:
    """What a worker needs to score its shares: everything is a URL or a number, so it pickles to Ray tasks."""

    checkpoint: str
    pool: str
    """The pool's shard set (a source other than a shard set is built into ``out/pool`` first)."""
    out: str
    top: int
    scoring: ScoringConfig
    """How the pool is scored (the command's size, batch, loader workers and precision); only its size enters
    the fingerprint, as it always did, so parts scored before are still reused."""
    exclude: tuple[str, ...] = ()
    """Shard sets whose keys are never candidates (the training and validation sets)."""
    embeddings: str = ""
    """Where a probe checkpoint's pool rows are kept (trainer.embeddings; "" for a trained student, whose trunk
    changes every round, or to embed afresh)."""

    def fingerprint(self, checkpoint_id: str, pool_identity: str, exclude_by: str = "key") -> str:
        """``exclude_by`` "content" enters the digest (parts excluded by key are not those); "key" leaves the
        digest of a pass before content hashes as it was, so its parts are still reused. Scores from stored fp16
        rows are not a forward pass's to the last digit, so they are other parts."""
        doc = {"checkpoint": self.checkpoint, "checkpoint_id": checkpoint_id, "pool": pool_identity, "top": self.top,
               "image_size": self.scoring.image_size, "exclude": sorted(self.exclude),
               **({"exclude_by": exclude_by} if exclude_by != "key" else {}),
               **({"from_embeddings": True} if self.embeddings else {})}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def checkpoint_facts(checkpoint: str) -> tuple[str, list[str]]:
    """The checkpoint's identity (a digest of its weights file: another checkpoint written to the same URL is
    another identity) and its class names, from its meta.json (the weights file is hashed, never unpickled)."""
    from trainer.checkpoint import read_meta, state_url
    from trainer.models import StudentSpec

    spec = StudentSpec.from_dict(read_meta(checkpoint).get("student_spec"), checkpoint)
    data = storage.read_bytes(state_url(checkpoint))
    names = list(spec.class_names or [f"class {i}" for i in range(spec.num_classes)])
    return hashlib.sha256(data).hexdigest()[:16], names


# ------------------------------------------------------------------------------------------------ top N


@dataclass
class TopN:
    """The N best (score, key, shard, index) of each rare class seen so far; memory is N x K whatever the pool.

    Ties are broken by (shard, index) ascending, so the result does not depend on how the pool was split."""

    n: int
    classes: int
    """Rare classes (the main head's outputs 1..K)."""
    heaps: dict[int, list[tuple[float, tuple[int, int], str, str, int]]] = field(default_factory=dict)

    def push(self, cls: int, score: float, key: str, shard: str, index: int, order: int) -> None:
        # the heap's root is the worst kept: lowest score, then the latest (shard order, index)
        item = (score, (-order, -index), key, shard, index)
        heap = self.heaps.setdefault(cls, [])
        if len(heap) < self.n:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)

    def add_scores(self, probs: np.ndarray, keys: list[str], shard: str, indices: list[int], order: int,
                   keep: np.ndarray | None = None) -> None:
        """One share's softmax rows (n x K+1): only each class's N best rows are pushed (of the ``keep`` rows)."""
        keep = np.ones(len(keys), dtype=bool) if keep is None else keep
        for cls in range(1, self.classes + 1):
            scores = np.where(keep, probs[:, cls], -np.inf)
            best = np.argsort(-scores, kind="stable")[: self.n]
            for i in best:
                if np.isfinite(scores[i]):
                    self.push(cls, float(scores[i]), keys[i], shard, indices[i], order)

    def merge(self, other: TopN) -> None:
        for cls, heap in other.heaps.items():
            for score, (neg_order, neg_index), key, shard, index in heap:
                self.push(cls, score, key, shard, index, -neg_order)

    def ranked(self, cls: int) -> list[dict[str, Any]]:
        """Best first."""
        rows = sorted(self.heaps.get(cls, []), reverse=True)
        return [{"key": key, "score": score, "shard": shard, "index": index, "order": -neg_order}
                for score, (neg_order, _), key, shard, index in rows]

    def to_json(self) -> dict[str, Any]:
        return {str(c): self.ranked(c) for c in range(1, self.classes + 1)}

    @classmethod
    def from_json(cls, doc: dict[str, Any], n: int, classes: int) -> TopN:
        top = cls(n, classes)
        for c, rows in doc.items():
            for r in rows:
                top.push(int(c), float(r["score"]), r["key"], r["shard"], int(r["index"]), int(r["order"]))
        return top


# ------------------------------------------------------------------------------------------------ shares


def part_url(out: str, fingerprint: str, shard_url: str) -> str:
    return storage.join(out, PARTS, fingerprint, os.path.basename(shard_url).rsplit(".", 1)[0] + ".json")


class Excluded:
    """The images of the ``--exclude`` sets (data.overlap): one sorted uint64 array of their content hashes (8 B an
    image), read once per process from each set's content index (one GET), tested a share at a time by binary
    search against the share's hashes from its shard record. By key instead (each set's key index, or its keys
    read from its shards) where the pool or an excluded set records no content hashes (``exclusion_kind``)."""

    def __init__(self, locations: Iterable[str], by: str = KEY):
        locations = list(locations)
        self.by = by
        if by == CONTENT:
            parts = [read_content_index(read_manifest(loc)) for loc in locations]
            if any(p is None for p in parts):
                raise ValueError("an excluded set lost its content index since the pass began: rerun `bgsplit mine`")
        else:
            parts = [overlap.key_index_of(loc) for loc in locations]
        self.hashes = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)

    def __len__(self) -> int:
        return int(self.hashes.size)

    def contains(self, keys: list[str], contents: np.ndarray | None = None) -> np.ndarray:
        """One bool per sample (``keys``, and their content hashes when the exclusion is by content): is it in an
        excluded set (see data.hash_index.key_hashes for the collision odds)."""
        if not keys or not self.hashes.size:
            return np.zeros(len(keys), dtype=bool)
        if self.by == CONTENT:
            if contents is None:
                raise ValueError("an exclusion by content needs the samples' content hashes")
            return overlap.contains(self.hashes, contents)
        return overlap.contains(self.hashes, key_hashes(keys))


ExcludedKeys = Excluded
"""The old name: an exclusion by key."""


def exclusion_kind(pool: Manifest, exclude: Iterable[str], *, warn: bool = True) -> str:
    """CONTENT where the pool and every excluded set record content hashes (manifests only: cheap on every rank),
    else KEY, with a warning saying which set to rebuild."""
    exclude = list(exclude)
    if not exclude:
        return KEY
    lacking = [loc for loc in exclude if not read_manifest(loc).content_index]
    lacking += [f"the pool {pool.root}"] if not pool.content_index else []
    if lacking and warn:
        log.warning("--exclude compares file names, not images: %s record%s no content hashes (built by an older "
                    "bgsplit), so a pool image named like a training image is dropped even if it differs; %s",
                    ", ".join(lacking), "s" if len(lacking) == 1 else "", overlap.REBUILD.replace("rebuild it",
                                                                                                 "rebuild each"))
    return KEY if lacking else CONTENT


def score_shares(job: MineJob, fingerprint: str, shards: list[int], chunk: int = 8, *, device=None,
                 token: str = "") -> dict[str, int]:
    """Score the given shares of the pool (those without a part), publishing one part per share.

    Shares are scored ``chunk`` at a time (one DataLoader, its workers started once per chunk). ``token``: the
    pass whose model and exclusions this process may keep between calls (trainer.shard_pass.cached_model)."""
    import uuid

    import torch

    from trainer.evaluate import predict
    from trainer.models import load_student_from_checkpoint
    from trainer.runtime import resolve_device
    from trainer.shard_pass import cached_model

    manifest = read_manifest(job.pool)
    todo = [s for s in shards if not storage.exists(part_url(job.out, fingerprint, manifest.shards[s].url))]
    if not todo:
        return {"scored": 0, "shares": 0, "reused": len(shards)}
    device = device or resolve_device("auto")
    token = token or uuid.uuid4().hex
    student = cached_model(token, lambda: load_student_from_checkpoint(job.checkpoint).to(device))
    classes = student.num_classes - 1
    excluded = cached_model(token, lambda: Excluded(job.exclude, exclusion_kind(manifest, job.exclude)), "exclude")
    cache = cached_model(token, lambda: probe_rows(job, student), "embeddings") if job.embeddings else None
    scored = 0
    from data.progress import progress

    bar = progress(sum(manifest.shards[s].count for s in todo), unit="img", desc="mine")
    for start in range(0, len(todo), chunk):
        group = todo[start:start + chunk]
        with torch.inference_mode():
            if cache is None:
                probs, _, keys, refs = predict(student, manifest, job.scoring, device, shards=group,
                                               progress=bar.update)
            else:
                probs, keys, refs = score_rows(student, cache, manifest, group, device, job)
                bar.update(len(keys))
        scored += len(keys)
        urls = np.array([u for u, _ in refs]) if refs else np.array([], dtype=str)
        for s in group:
            url = manifest.shards[s].url
            rows = np.flatnonzero(urls == url)
            top = TopN(job.top, classes)
            share_keys = [keys[i] for i in rows]
            indices = [refs[i][1] for i in rows]
            contents = None
            if excluded.by == CONTENT and len(excluded):  # the share's hashes: its record, one small read
                contents = record_hashes(read_record(manifest, manifest.shards[s]), "content_hashes")[indices]
            top.add_scores(probs[rows], share_keys, storage.absolute(storage.join(manifest.root, url)),
                           indices, s, ~excluded.contains(share_keys, contents))
            doc = {"shard": url, "scored": len(rows), "count": manifest.shards[s].count, "top": top.to_json()}
            storage.write_bytes(part_url(job.out, fingerprint, url), json.dumps(doc).encode())
    bar.close()
    return {"scored": scored, "shares": len(todo), "reused": len(shards) - len(todo)}


def probe_rows(job: MineJob, student: Any) -> Any:
    """The pool's stored rows for this probe's trunk (trainer.embeddings)."""
    from trainer.embeddings import EmbeddingCache, Space

    return EmbeddingCache(job.embeddings, Space.of(student.spec.trunk, student.trunk, job.scoring))


def score_rows(student: Any, cache: Any, manifest: Manifest, shards: list[int], device: Any, job: MineJob
               ) -> tuple[Any, list[str], list[tuple[str, int]]]:
    """A probe's scores of these shares from the pool's stored rows (embedding first the shares without): the
    head alone runs, so a round of mining over a pool embedded once costs a matrix product."""
    import torch

    from trainer.embeddings import embed_shards

    missing = [s for s in shards if cache.stored(manifest.shards[s]) is None]
    if missing:
        embed_shards(cache, manifest, missing, lambda x: student.trunk(student.normalize(x.to(device))),
                     batch_size=job.scoring.batch_size, num_workers=job.scoring.num_workers)
    probs, keys, refs = [], [], []
    for s in shards:
        rows, doc = cache.load(manifest.shards[s])
        if not len(doc["keys"]):
            continue
        features = torch.from_numpy(rows.astype(np.float32)).to(device)
        probs.append(student.main_logits(features).float().softmax(dim=1))
        keys.extend(doc["keys"])
        refs.extend((manifest.shards[s].url, int(i)) for i in doc["indices"])
    width = student.num_classes
    return (torch.cat(probs).cpu().numpy() if probs else np.zeros((0, width), np.float32)), keys, refs


def is_probe(checkpoint: str) -> bool:
    """A `probe.kind` fit (trainer.probe_model): its trunk is the frozen teacher's, so its pool rows can be kept."""
    from trainer.checkpoint import read_meta

    return read_meta(checkpoint).get("engine_name") == "probe"


def merge_parts(job: MineJob, fingerprint: str, manifest: Manifest, classes: int) -> tuple[TopN, int]:
    """All shares' parts into one top N per class, one part in memory at a time; refuses a missing part."""
    top, scored = TopN(job.top, classes), 0
    missing = [s.url for s in manifest.shards if not storage.exists(part_url(job.out, fingerprint, s.url))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} share(s) of pool {manifest.root} are not scored yet (first: "
                                f"{missing[0]}): run `bgsplit mine` again, it scores only those")
    for s in manifest.shards:
        doc = json.loads(storage.read_bytes(part_url(job.out, fingerprint, s.url)))
        top.merge(TopN.from_json(doc["top"], job.top, classes))
        scored += doc["scored"]
    return top, scored


def candidates(top: TopN, class_names: list[str]) -> Iterator[dict[str, Any]]:
    for cls in range(1, top.classes + 1):
        for rank, row in enumerate(top.ranked(cls), start=1):
            yield {"key": row["key"], "class": cls, "class_name": class_names[cls], "score": row["score"],
                   "rank": rank, "shard": row["shard"], "index": row["index"], "url": f"{row['shard']}#{row['key']}"}


def fetch_images(manifest: Manifest, rows: list[dict[str, Any]]) -> dict[str, dict[str, bytes]]:
    """key -> the sample's tar members (image, cls, json), read back by byte range for the winners only."""
    from data.order import Ref
    from data.reader import ShardReader

    index = {storage.absolute(storage.join(manifest.root, s.url)): i for i, s in enumerate(manifest.shards)}
    wanted = {(index[storage.absolute(r["shard"])], r["index"]): r["key"] for r in rows}
    fetched = ShardReader(manifest, manifest.shards).fetch(Ref(s, i, 0) for s, i in wanted)
    return {sample.key: sample.fields for ref, sample in fetched.items() if sample is not None}


def publish(job: MineJob, fingerprint: str, manifest: Manifest, class_names: list[str]) -> dict[str, Any]:
    """candidates.jsonl, contact sheets and review.html from the merged parts; mine.json last (it marks done)."""
    from data.review import write_review

    top, scored = merge_parts(job, fingerprint, manifest, len(class_names) - 1)
    rows = list(candidates(top, class_names))
    storage.write_bytes(storage.join(job.out, CANDIDATES),
                        "".join(json.dumps(r) + "\n" for r in rows).encode())
    fields = fetch_images(manifest, rows)
    thumbs = {k: img for k, f in fields.items() if (img := image_member(f)) is not None}
    review = write_review(job.out, rows, thumbs, class_names, scored=scored)
    summary = {"pool": manifest.root, "pool_images": manifest.count, "scored": scored, "shares": len(manifest.shards),
               "checkpoint": job.checkpoint, "top": job.top, "classes": class_names[1:], "candidates": len(rows),
               "fingerprint": fingerprint, "outputs": {"candidates": storage.join(job.out, CANDIDATES), **review}}
    storage.write_bytes(storage.join(job.out, SUMMARY), json.dumps(summary, indent=1).encode())
    return summary


def pool_set(pool: str, out: str, workers: int = 0) -> str:
    """The pool as a shard set: itself, or a source spec (folder:, manifest:, wds:, fmnist:...) built into
    ``out/pool`` as an unlabelled source (a flat folder, a manifest of paths, shards without a label member),
    every image background, and keys free of folder names."""
    from data.shards import manifest_url

    if storage.exists(manifest_url(pool)):
        return pool
    if ":" not in pool or pool.split(":", 1)[0] in ("s3", "gs", "file", "memory"):
        raise FileNotFoundError(f"pool {pool} is neither a shard set (no manifest.json there) nor a source spec "
                                "such as folder:/path, manifest:/list.csv or wds:PATTERN")
    from data.build import BuildSpec, build_set
    from data.sources import open_source

    from data.sources.open import UNLABELLED

    spec = pool if pool.endswith(UNLABELLED) else pool + UNLABELLED  # a pool needs no labels, shows none in keys
    location = storage.join(out, "pool")
    build_set(open_source(spec), BuildSpec(spec, ()), location, workers=workers)
    return location


@dataclass
class MinePass:
    """Score the pool's shares, then merge their parts and publish the candidates (trainer.shard_pass)."""

    job: MineJob
    name: str = "scored"

    def __post_init__(self) -> None:
        import uuid

        self.manifest = read_manifest(self.job.pool)
        checkpoint_id, self.class_names = checkpoint_facts(self.job.checkpoint)  # once, on the driver or a rank
        self.fingerprint = self.job.fingerprint(checkpoint_id, manifest_identity(self.manifest.root),
                                                exclusion_kind(self.manifest, self.job.exclude, warn=False))
        self.token = uuid.uuid4().hex

    def shard_counts(self) -> list[int]:
        return [s.count for s in self.manifest.shards]

    def todo(self, shards: list[int]) -> list[int]:
        return [s for s in shards
                if not storage.exists(part_url(self.job.out, self.fingerprint, self.manifest.shards[s].url))]

    def begin(self) -> None:
        return None

    def run(self, shards: list[int], device) -> dict[str, int]:
        return score_shares(self.job, self.fingerprint, shards, device=device, token=self.token)

    def publish(self, parts: list[tuple[list[int], dict[str, int]]]) -> dict[str, Any]:
        totals = {"scored": 0, "shares": 0, "reused": 0}
        for _, done in parts:
            for k in totals:
                totals[k] += done[k]
        totals["reused"] = len(self.manifest.shards) - totals["shares"]  # shares skipped before any work ran
        return {**publish(self.job, self.fingerprint, self.manifest, self.class_names),
                "this_run": {**totals, "parts": len(parts)}}


def mine(job: MineJob, **how: Any) -> dict[str, Any] | None:
    """Mine in this process (or as one rank of torchrun's group): rank 0's summary, None on the other ranks."""
    from trainer.shard_pass import run_pass

    return run_pass(MinePass(job), **how)
