"""`bgsplit shards add-labels`: a person's confirmed candidates back into a training set, as a new version.

The new set's manifest lists every shard of the parent where it is, so not one existing background shard is
rewritten (at millions of images a copy would cost what the whole build did), plus new shards for what was
labelled: confirmed positives in positive shards, rejected candidates in background shards. The parent's shards
are listed relative to the new manifest's folder (``../train/shard-background-000000.tar``) when both sets are
local or under one bucket, so the pair reads the same from any working directory, machine or prefix they are
moved to together; by absolute URL when the parent is on another bucket or store. A local parent cannot be listed
by a set on an object store (no other machine could read it): that is refused, naming the fix. Rejected candidates
are the most useful background there is (hard negatives: images the model took for a rare class), which is why
they are kept rather than dropped.

Everything is checked before anything is written (an unknown key or class, a key labelled two ways, a key the
parent already holds with another label), the new shards are published whole and the manifest last, so a failed
run leaves no set that looks complete. ``meta.labelled_keys`` carries every key labelled so far, over versions,
so `bgsplit mine --exclude` never offers them again.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Any

from data import remote, storage
from data.hash_index import content_hash
from data.shards import (
    Manifest,
    ShardInfo,
    TarShard,
    check_objects,
    image_member,
    iter_tar,
    make_record,
    manifest_url,
    read_manifest,
    read_record,
    record_name,
    sample_fields,
    write_manifest,
)

PREFIX = "labels"
YES, NO = "yes", "no"
MAX_PER_SHARD = 10000


class LabelError(ValueError):
    """A labels file that cannot be applied; the message names the row and the fix."""


@dataclass(frozen=True)
class Label:
    key: str
    cls: int
    """The class it is confirmed as: 1..K for a positive, 0 for a rejected candidate (background)."""
    shard: str = ""
    index: int = -1


def parse_labels(text: str, class_names: list[str], where: str) -> list[Label]:
    """CSV rows (key, class or class_name, label yes/no[, shard, index]) -> one Label per key.

    A key marked yes for one class and no for another is that class; yes for two classes, or yes and no for the
    same class, is a conflict."""
    reader = csv.DictReader(io.StringIO(text))
    fields = set(reader.fieldnames or [])
    if not {"key", "label"} <= fields or not fields & {"class", "class_name"}:
        raise LabelError(f"labels file {where} needs the columns key, class (or class_name) and label; it has "
                         f"{sorted(fields)}: export it from review.html")
    votes: dict[str, dict[int, str]] = {}
    where_of: dict[str, tuple[str, int]] = {}
    for line, row in enumerate(reader, start=2):
        key, label = (row.get("key") or "").strip(), (row.get("label") or "").strip().lower()
        cls = _class_of(row, class_names, f"{where} line {line}")
        if not key:
            raise LabelError(f"{where} line {line}: empty key")
        if label not in (YES, NO):
            raise LabelError(f"{where} line {line}: label {label!r} for key {key}; use yes or no")
        previous = votes.setdefault(key, {}).get(cls)
        if previous is not None and previous != label:
            raise LabelError(f"{where} line {line}: key {key} is labelled both yes and no for class "
                             f"{class_names[cls]}; keep one row")
        votes[key][cls] = label
        if row.get("shard") and (row.get("index") or "").strip():
            where_of[key] = (row["shard"], int(row["index"]))
    out = []
    for key, by_class in votes.items():
        positives = sorted(c for c, v in by_class.items() if v == YES)
        if len(positives) > 1:
            raise LabelError(f"{where}: key {key} is labelled yes for {len(positives)} classes "
                             f"({', '.join(class_names[c] for c in positives)}); a sample has one class")
        shard, index = where_of.get(key, ("", -1))
        out.append(Label(key, positives[0] if positives else 0, shard, index))
    if not out:
        raise LabelError(f"labels file {where} has no labelled rows: mark candidates in review.html, then export")
    return out


def _class_of(row: dict[str, Any], class_names: list[str], where: str) -> int:
    raw_id, name = (row.get("class") or "").strip(), (row.get("class_name") or "").strip()
    if raw_id:
        if not raw_id.isdigit() or not 1 <= int(raw_id) < len(class_names):
            raise LabelError(f"{where}: unknown class id {raw_id}; this set's rare classes are "
                             f"1..{len(class_names) - 1} ({', '.join(class_names[1:])})")
        if name and name != class_names[int(raw_id)]:
            raise LabelError(f"{where}: class {raw_id} is {class_names[int(raw_id)]!r} in this set, not {name!r}: "
                             "were the candidates mined with a model of another set?")
        return int(raw_id)
    if name not in class_names[1:]:
        raise LabelError(f"{where}: unknown class {name!r}; this set's rare classes are {', '.join(class_names[1:])}")
    return class_names.index(name)


def known_labels(manifest: Manifest) -> dict[str, int]:
    """Keys whose label the set already fixes: its positives (their records hold the labels; the keys come from
    the positive shards, a small read) and every key labelled in an earlier add-labels."""
    known = {k: int(c) for k, c in manifest.meta.get("labelled_keys", {}).items()}
    for shard in manifest.of_kind("positive"):
        labels = read_record(manifest, shard)["labels"]
        with storage.open_read(storage.join(manifest.root, shard.url)) as stream:
            for (key, _), label in zip(iter_tar(stream), labels):
                known.setdefault(key, int(label))
    return known


def pool_samples(pool: Manifest, labels: list[Label]) -> dict[str, dict[str, bytes]]:
    """The labelled samples' tar members: by (shard, index) where the CSV says, else one pass over the pool."""
    from data.order import Ref
    from data.reader import ShardReader

    found: dict[str, dict[str, bytes]] = {}
    # absolute on both sides: candidates name shards independently of the working directory, and an older
    # labels.csv with paths relative to the one mine ran in still matches when run from there
    index = {storage.absolute(storage.join(pool.root, s.url)): i for i, s in enumerate(pool.shards)}
    where = {lb.key: storage.absolute(lb.shard) for lb in labels if lb.shard}
    located = {(index[where[lb.key]], lb.index): lb.key for lb in labels
               if lb.key in where and where[lb.key] in index and lb.index >= 0}
    for ref, sample in ShardReader(pool, pool.shards).fetch(Ref(s, i, 0) for s, i in located).items():
        if sample is not None and sample.key == located[ref.shard, ref.index]:
            found[sample.key] = sample.fields
    wanted = {lb.key for lb in labels} - set(found)
    for shard in pool.shards if wanted else []:
        with storage.open_read(storage.join(pool.root, shard.url)) as stream:
            for key, fields in iter_tar(stream):
                if key in wanted:
                    found[key] = fields
                    wanted.discard(key)
        if not wanted:
            break
    if wanted:
        raise LabelError(f"{len(wanted)} labelled key(s) are not in pool {pool.root} (first: {min(wanted)}): "
                         "give the pool the candidates were mined from")
    return found


def _image(key: str, fields: dict[str, bytes]) -> bytes:
    image = image_member(fields)
    if image is None:
        raise LabelError(f"pool sample {key} has no image member: rebuild the pool")
    return image


def _write_shards(out: str, tag: str, kind: str, samples: list[tuple[Label, bytes]], class_names: list[str],
                  num_classes: int) -> list[ShardInfo]:
    infos = []
    for n, start in enumerate(range(0, len(samples), MAX_PER_SHARD)):
        chunk = samples[start:start + MAX_PER_SHARD]
        name = f"{PREFIX}-{tag}-{kind}-{n:06d}.tar"
        counts = [0] * num_classes
        # the pool's stored bytes: its source's bytes (what a content hash is of) unless the pool was built re-encoded
        contents = [content_hash(image) for _, image in chunk]
        with storage.atomic_write(storage.join(out, name)) as f:
            tar = TarShard(f)
            for label, image in chunk:
                tar.add(label.key, sample_fields(label.key, image, label.cls, class_names[label.cls]))
                counts[label.cls] += 1
            offsets = tar.close()
            size = f.tell()
        record = make_record(name=name, kind=kind, count=len(chunk), size=size, counts=counts, offsets=offsets,
                             labels=[lb.cls for lb, _ in chunk], keys=tar.keys, source="add-labels",
                             contents=contents)
        storage.write_bytes(storage.join(out, record_name(name)), json.dumps(record).encode())
        infos.append(ShardInfo(url=name, kind=kind, count=len(chunk), bytes=size))
    return infos


def add_labels(data: str, labels_csv: str, pool: str, out: str) -> Manifest:
    """Write ``out``: ``data``'s shards (by URL) plus the labelled samples of ``pool``. Idempotent: the same
    inputs to the same ``out`` return the existing set."""
    parent = read_manifest(data)
    kept_urls = [storage.absolute(storage.join(parent.root, s.url)) for s in parent.shards]
    local = next((u for u in kept_urls if not remote.is_remote(u)), None)
    if remote.is_remote(out) and local is not None:
        there = f"{storage.dirname(out.rstrip('/'))}/{os.path.basename(storage.dirname(local))}"
        raise LabelError(f"--data {data} has shards on the local disk ({local}) but --out {out} is on an object "
                         "store, where no other machine could read them: copy the parent set there first (e.g. "
                         f"`aws s3 sync {storage.dirname(local)} {there}`) and give that as --data, or give a local "
                         "--out")
    check_objects(parent)  # a version of a set with shards gone would be broken from the start
    if not storage.exists(labels_csv):
        raise LabelError(f"labels file {labels_csv} does not exist: export it from review.html")
    text = storage.read_bytes(labels_csv).decode("utf-8-sig")
    # the parent's absolute location: the same inputs give the same digest from any working directory
    digest = hashlib.sha256(json.dumps([storage.absolute(manifest_url(data)), text]).encode()).hexdigest()[:12]
    if storage.exists(manifest_url(out)):
        existing = read_manifest(out)
        if existing.meta.get("added", {}).get("digest") == digest:
            return existing
        raise LabelError(f"{out} already holds a shard set (not made from these labels): give a new --out")
    labels = parse_labels(text, parent.class_names, labels_csv)
    known = known_labels(parent)
    clashes = [lb for lb in labels if lb.key in known and known[lb.key] != lb.cls]
    if clashes:
        lb = clashes[0]
        raise LabelError(f"key {lb.key} is already in {parent.root} as {parent.class_names[known[lb.key]]}, but "
                         f"{labels_csv} says {parent.class_names[lb.cls]} ({len(clashes)} such key(s)): fix the CSV")
    new = [lb for lb in labels if lb.key not in known]
    fields = pool_samples(read_manifest(pool), new) if new else {}
    samples = [(lb, _image(lb.key, fields[lb.key])) for lb in sorted(new, key=lambda lb: lb.key)]
    num_classes = len(parent.class_names)
    # absolute here; write_manifest lists them relative to the new manifest's folder (data.shards._stored_url)
    shards = [ShardInfo(url=url, kind=s.kind, count=s.count, bytes=s.bytes)
              for url, s in zip(kept_urls, parent.shards)]
    kept = len(shards)
    shards += _write_shards(out, digest, "positive", [s for s in samples if s[0].cls > 0], parent.class_names,
                            num_classes)
    shards += _write_shards(out, digest, "background", [s for s in samples if s[0].cls == 0], parent.class_names,
                            num_classes)
    counts = list(parent.counts)
    for lb, _ in samples:
        counts[lb.cls] += 1
    # the parent as the shards are listed (relative to the new set's folder where possible); labels and pool where
    # they were when this version was made
    parent_at = storage.relative(storage.absolute(parent.root), out) or storage.absolute(parent.root)
    added = {"digest": digest, "labels": storage.absolute(labels_csv), "pool": storage.absolute(pool),
             "parent": parent_at,
             "positives": {parent.class_names[c]: sum(lb.cls == c for lb, _ in samples) for c in range(1, num_classes)},
             "hard_negatives": sum(lb.cls == 0 for lb, _ in samples), "already_known": len(labels) - len(new),
             "new_shards": len(shards) - kept}
    meta = {"parent": parent_at, "parent_meta": {k: v for k, v in parent.meta.items() if k != "labelled_keys"},
            "added": added,
            "labelled_keys": {**parent.meta.get("labelled_keys", {}), **{lb.key: lb.cls for lb in labels}}}
    manifest = Manifest(root=out, rare_classes=list(parent.rare_classes), class_names=list(parent.class_names),
                        shards=shards, counts=counts, meta=meta)
    write_manifest(manifest)
    return manifest
