"""A labelled version (`shards add-labels`) lists its parent's shards so that they resolve wherever the set is read
from: relative to its own manifest's folder when both sets are local (or under one bucket), by absolute URL
otherwise. A set with shards gone says how many shards, which one, and the fix for its kind; `shards plan` checks
the same as training."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import remote, storage
from data.add_labels import LabelError, add_labels
from data.loader import ShardStream
from data.config import LoaderConfig
from data.shards import MANIFEST, SHARD_PATHS, check_objects, read_manifest, write_shard_set
from data.sources import FashionMNISTSource
from cluster.cli import main


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _keys(location: str) -> list[str]:
    return [k for batch in ShardStream(read_manifest(location), LoaderConfig(image_size=16, batch_size=8), train=False)
            for k in batch["key"]]


def _write_labels(path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["key", "class", "label"])
        w.writeheader()
        w.writerows(rows)


def _small_sets(root: Path) -> tuple[list[str], list[str]]:
    """data/train (1 positive + 4 background shards) and data/pool under ``root``; returns their keys."""
    train = [(f"t{i:03d}", _png(i), 1 if i % 10 == 0 else 0, "x") for i in range(40)]
    pool = [(f"p{i:03d}", _png(i + 7), 0, "x") for i in range(12)]
    write_shard_set(str(root / "data" / "train"), train, rare_classes=["r"], class_names=["bg", "R"], max_count=10)
    write_shard_set(str(root / "data" / "pool"), pool, rare_classes=["r"], class_names=["bg", "R"], max_count=10)
    return [k for k, *_ in train], [k for k, *_ in pool]


@pytest.fixture
def labelled(tmp_path, monkeypatch):
    """A labelled version made with relative paths from working directory A: A/data/train-v2."""
    a = tmp_path / "A"
    a.mkdir()
    train_keys, pool_keys = _small_sets(a)
    monkeypatch.chdir(a)
    _write_labels("labels.csv", [{"key": "p000", "class": 1, "label": "yes"},
                                 {"key": "p001", "class": 1, "label": "no"},
                                 {"key": "p002", "class": 1, "label": "no"}])
    assert main(["shards", "add-labels", "--data", "data/train", "--labels", "labels.csv", "--pool", "data/pool",
                 "--out", "data/train-v2"]) == 0
    elsewhere = tmp_path / "B"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return a, train_keys + ["p000", "p001", "p002"]


def test_storage_join_resolves_dot_dot_and_relative_inverts_it():
    assert storage.join("data/train-v2", "../train/s.tar") == os.path.join("data", "train", "s.tar")
    assert storage.join("/x/sets/v2", "../train/s.tar") == "/x/sets/train/s.tar"
    assert storage.join("s3://b/sets/v2", "../train/s.tar") == "s3://b/sets/train/s.tar"
    assert storage.join("s3://b/sets/v2", "/abs/s.tar") == "s3://b/sets/v2/abs/s.tar"  # a key, not a local path
    assert storage.join("s3://b/sets/v2", "s3://c/train/s.tar") == "s3://c/train/s.tar"  # a URL starts afresh
    assert storage.join("/x/v2", "/y/train/s.tar") == "/y/train/s.tar"
    assert storage.join("./data", "s.tar") == "./data/s.tar"  # names without `..` stay byte-identical
    with pytest.raises(ValueError, match="climbs above s3://b"):
        storage.join("s3://b/v2", "../../s.tar")
    for url, folder in (("/x/sets/train/s.tar", "/x/sets/v2"), ("s3://b/sets/train/s.tar", "s3://b/sets/v2"),
                        ("s3://b/s.tar", "s3://b/deep/er/v2"), ("memory://m/a/s.tar", "memory://m/b")):
        rel = storage.relative(url, folder)
        assert rel is not None and not remote.is_remote(rel) and not os.path.isabs(rel)
        assert storage.join(folder, rel) == url
    assert storage.relative("/x/train/s.tar", "s3://b/v2") is None
    assert storage.relative("s3://b/train/s.tar", "/x/v2") is None
    assert storage.relative("s3://c/train/s.tar", "s3://b/v2") is None  # another bucket
    assert storage.relative("gs://b/train/s.tar", "s3://b/v2") is None  # another scheme


def test_a_labelled_version_made_with_relative_paths_reads_from_anywhere(labelled, capsys, tmp_path, monkeypatch):
    a, keys = labelled
    doc = json.loads((a / "data" / "train-v2" / MANIFEST).read_text())
    assert doc["shard_paths"] == SHARD_PATHS and doc["meta"]["parent"] == "../train"
    kept = [s["url"] for s in doc["shards"] if "/" in s["url"]]
    assert len(kept) == 5 and all(u.startswith("../train/shard-") for u in kept)
    assert all(s["url"].startswith("labels-") for s in doc["shards"] if "/" not in s["url"])
    # from B, by an absolute and by a relative path
    for location in (str(a / "data" / "train-v2"), os.path.join("..", "A", "data", "train-v2")):
        check_objects(read_manifest(location))
        assert sorted(_keys(location)) == sorted(keys)
        rc, out, err = _cli(capsys, "shards", "plan", "--data", location, "--world", "1", "--workers", "0",
                            "--batch-size", "8")
        assert rc == 0 and "43 samples" in out, err
    # moved together to another place (another machine): still whole
    moved = tmp_path / "C" / "sets"
    shutil.move(str(a / "data"), str(moved))
    check_objects(read_manifest(str(moved / "train-v2")))
    assert sorted(_keys(str(moved / "train-v2"))) == sorted(keys)
    # a third version on top, from yet another directory: its grandparent's shards resolve too
    monkeypatch.chdir(moved)
    _write_labels(tmp_path / "more.csv", [{"key": "p003", "class": 1, "label": "yes"}])
    add_labels("train-v2", str(tmp_path / "more.csv"), "pool", "v3")
    monkeypatch.chdir(tmp_path)
    doc = json.loads((moved / "v3" / MANIFEST).read_text())
    assert {u["url"].rsplit("/", 1)[0] for u in doc["shards"] if "/" in u["url"]} == {"../train", "../train-v2"}
    assert sorted(_keys(str(moved / "v3"))) == sorted(keys + ["p003"])


def test_missing_shards_are_counted_once_and_name_the_fix(labelled, capsys, tmp_path):
    a, _ = labelled
    v2 = str(a / "data" / "train-v2")
    parent = a / "data" / "train"
    gone, record = parent / "shard-positive-000000.tar", parent / "shard-background-000001.json"
    aside = tmp_path / "aside"
    aside.mkdir()
    shutil.move(gone, aside / gone.name)
    shutil.move(record, aside / record.name)  # a shard without its completion record: one shard, not two objects
    with pytest.raises(FileNotFoundError) as e:
        check_objects(read_manifest(v2))
    msg = str(e.value)
    assert msg == (f"shard set {v2} lists 2 shard(s) that are missing or lack their completion record (first: "
                   f"{gone}): this labelled version lists its parent's shards where they are, without a copy; restore "
                   f"the parent set at {parent}, or re-run `bgsplit shards add-labels` with a new --out from a parent "
                   "that exists")
    assert "rebuild" not in msg
    # `shards plan` and `train` refuse it with the same line
    rc, out, err = _cli(capsys, "shards", "plan", "--data", v2, "--world", "1", "--workers", "0", "--batch-size", "8")
    assert rc == 2 and out == "" and err.strip() == f"bgsplit: error: {msg}" and err.count("\n") == 1
    rc, _, err = _cli(capsys, "train", "--debug", f"data.train={v2}", "data.val=", "run.out_dir=run")
    assert rc == 2 and err.strip() == f"bgsplit: error: {msg}"
    # the parent itself is a built set: rebuild it
    with pytest.raises(FileNotFoundError, match=r"^shard set .* lists 2 shard\(s\) that are missing or lack their "
                       r"completion record \(first: .*shard-positive-000000.tar\): rebuild it with `bgsplit shards "
                       r"build`"):
        check_objects(read_manifest(str(parent)))
    # the version's own shards gone: re-run add-labels
    shutil.move(aside / gone.name, gone)
    shutil.move(aside / record.name, record)
    check_objects(read_manifest(v2))
    for own in Path(v2).glob("labels-*-positive-*.tar"):
        own.unlink()
    rc, _, err = _cli(capsys, "shards", "plan", "--data", v2, "--world", "1", "--workers", "0", "--batch-size", "8")
    assert rc == 2 and err.strip() == (
        f"bgsplit: error: shard set {v2} lists 1 shard(s) that are missing (first: "
        f"{next(iter(Path(v2).glob('labels-*-positive-*.json'))).with_suffix('.tar')}): the shards this labelled "
        "version added are gone; re-run `bgsplit shards add-labels` with a new --out")


def test_a_set_of_the_old_rule_reads_where_it_resolves_and_says_why_elsewhere(labelled, monkeypatch):
    """Older add-labels wrote the parent's shards relative to the directory it ran in (`data/train/shard-...`)."""
    a, keys = labelled
    v2 = a / "data" / "train-v2"
    doc = json.loads((v2 / MANIFEST).read_text())
    doc.pop("shard_paths")
    for s in doc["shards"]:
        if s["url"].startswith("../"):
            s["url"] = "data/train/" + s["url"].rsplit("/", 1)[1]
    doc["meta"]["parent"] = "data/train"
    (v2 / MANIFEST).write_text(json.dumps(doc))
    monkeypatch.chdir(a)
    check_objects(read_manifest("data/train-v2"))
    assert sorted(_keys("data/train-v2")) == sorted(keys)
    monkeypatch.chdir(a.parent / "B")
    with pytest.raises(FileNotFoundError) as e:
        check_objects(read_manifest(str(v2)))
    assert str(e.value) == (
        f"shard set {v2} lists 5 shard(s) that are missing (first: {a.parent / 'B' / 'data/train'}/"
        "shard-positive-000000.tar): this labelled version was written by an older `bgsplit shards add-labels`, "
        "which listed its parent's shards relative to the directory it ran in; run from that directory, or re-run "
        "`bgsplit shards add-labels` with a new --out (the parent's shards are then listed relative to the new "
        "set's folder)")


def test_the_readme_loop_with_relative_paths_then_retrained_from_elsewhere(tmp_path, monkeypatch, capsys):
    """`shards build` -> `train` -> `mine` (a folder pool) -> labels.csv -> `shards add-labels` -> `train`, the
    README's commands with its relative paths, in working directory A; the new version then planned, read whole and
    trained from B. Tiny sizes (2 training steps, a 40-image pool) so it runs in the suite."""
    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir()
    b.mkdir()
    monkeypatch.chdir(a)
    src = FashionMNISTSource("test")
    for item in src.items()[:40]:
        os.makedirs(f"unlabeled/{item.label}", exist_ok=True)
        Path(f"unlabeled/{item.label}/{item.key}.png").write_bytes(src.read(item))
    quick = ["data.val=", "data.image_size=32", "data.batch_size=8", "data.shuffle_buffer_mb=0.2",
             "run.max_steps=2", "loss.aux_weight=0", "teacher.mode=online", "run.progress=false"]
    assert main(["shards", "build", "--source", "fmnist:train", "--rare", "1,8", "--positives-per-class", "4",
                 "--max-background", "40", "--max-count", "20", "--workers", "0", "--out", "data/train"]) == 0
    rc, out, err = _cli(capsys, "train", "--debug", "data.train=data/train", "run.out_dir=runs/x", *quick)
    assert rc == 0, err
    checkpoint = json.loads(out.strip().splitlines()[-1])["checkpoint"]
    rc, _, err = _cli(capsys, "mine", "--checkpoint", checkpoint, "--pool", "folder:unlabeled", "--top", "5",
                      "--exclude", "data/train", "--out", "mined/")
    assert rc == 0, err
    rows = [json.loads(line) for line in Path("mined/candidates.jsonl").read_text().splitlines()]
    assert rows and storage.exists("mined/pool/manifest.json")
    assert all(os.path.isabs(r["shard"]) and os.path.exists(r["shard"]) for r in rows)  # from any directory
    yes: set[str] = set()
    with open("labels.csv", "w", newline="") as f:  # what review.html exports
        w = csv.DictWriter(f, ["key", "class", "class_name", "label", "score", "rank", "shard", "index"])
        w.writeheader()
        for r in rows:  # each class's first candidate confirmed, the rest rejected (hard negatives)
            label = "yes" if r["rank"] == 1 and r["key"] not in yes else "no"
            if label == "yes":
                yes.add(r["key"])
            w.writerow({**{k: r[k] for k in ("key", "class", "class_name", "score", "rank", "shard", "index")},
                        "label": label})
    rc, out, err = _cli(capsys, "shards", "add-labels", "--data", "data/train", "--labels", "labels.csv", "--pool",
                        "mined/pool", "--out", "data/train-v2")
    assert rc == 0, err
    labelled = {r["key"] for r in rows}
    parent_keys = _keys("data/train")
    monkeypatch.chdir(b)
    v2 = str(a / "data" / "train-v2")
    rc, out, err = _cli(capsys, "shards", "plan", "--data", v2, "--world", "1", "--workers", "0", "--batch-size", "8")
    assert rc == 0 and f"{len(parent_keys) + len(labelled)} samples" in out, err
    assert sorted(_keys(v2)) == sorted(parent_keys + list(labelled))
    rc, out, err = _cli(capsys, "train", "--debug", f"data.train={v2}", "run.out_dir=runs/v2", *quick)
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["steps"] == 2, err


def test_s3_versions_list_parents_relative_in_a_bucket_absolute_across_stores(s3, tmp_path, monkeypatch):
    import uuid

    prefix = f"s3://{s3.bucket}/{uuid.uuid4().hex[:8]}"
    train = [(f"t{i:03d}", _png(i), 1 if i % 10 == 0 else 0, "x") for i in range(30)]
    pool = [(f"p{i:03d}", _png(i + 7), 0, "x") for i in range(6)]
    for root in (f"{prefix}/sets/train", str(tmp_path / "local-train")):
        write_shard_set(root, train, rare_classes=["r"], class_names=["bg", "R"], max_count=10)
    write_shard_set(f"{prefix}/pool", pool, rare_classes=["r"], class_names=["bg", "R"], max_count=10)
    _write_labels(tmp_path / "labels.csv", [{"key": "p000", "class": 1, "label": "yes"}])
    want = sorted([k for k, *_ in train] + ["p000"])
    # S3 parent, S3 version under the same bucket: relative, so the prefix can be copied elsewhere whole
    add_labels(f"{prefix}/sets/train", str(tmp_path / "labels.csv"), f"{prefix}/pool", f"{prefix}/sets/train-v2")
    doc = json.loads(storage.read_bytes(f"{prefix}/sets/train-v2/{MANIFEST}"))
    assert all(s["url"].startswith("../train/") for s in doc["shards"] if "/" in s["url"])
    check_objects(read_manifest(f"{prefix}/sets/train-v2"))
    assert sorted(_keys(f"{prefix}/sets/train-v2")) == want
    # S3 parent, local version: absolute URLs
    monkeypatch.chdir(tmp_path)
    add_labels(f"{prefix}/sets/train", "labels.csv", f"{prefix}/pool", "local-v2")
    doc = json.loads((tmp_path / "local-v2" / MANIFEST).read_text())
    assert all(s["url"].startswith(f"{prefix}/sets/train/") for s in doc["shards"] if "/" in s["url"])
    assert sorted(_keys(str(tmp_path / "local-v2"))) == want
    # local parent, S3 version: refused before anything is written
    with pytest.raises(LabelError, match="on an object store, where no other machine could read them: copy the "
                       "parent set there first"):
        add_labels("local-train", "labels.csv", f"{prefix}/pool", f"{prefix}/sets/bad")
    assert storage.listdir(f"{prefix}/sets/bad") == []
