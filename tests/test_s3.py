"""Shard sets, teacher caches and training data on a real S3 server (SeaweedFS on loopback), and the retry policy."""
import uuid

import pytest
import torch

from conftest import RARE, TEACHER_SIZE, tiny_config
from data import ranged, remote, storage
from data.build import BuildSpec, build_set
from data.loader import ShardStream
from data.config import LoaderConfig
from data.shards import read_manifest
from data.sources import FashionMNISTSource


def _prefix(s3) -> str:
    return f"s3://{s3.bucket}/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def s3_set(s3, tmp_path_factory):
    """The same -BG set built twice, to a local folder and to S3."""
    spec = BuildSpec("fmnist:test", RARE, subsample=120, seed=0, max_count=25)
    src = FashionMNISTSource("test")
    local = build_set(src, spec, str(tmp_path_factory.mktemp("local") / "set"), progress=False)
    on_s3 = build_set(src, spec, _prefix(s3) + "/set", progress=False)
    return local, on_s3


def test_shards_round_trip_through_s3(s3_set):
    local, on_s3 = s3_set
    again = read_manifest(on_s3.root)
    assert again.counts == local.counts and len(again.shards) == len(local.shards) > 2
    assert all(u.startswith("s3://") for u in again.shard_urls())
    a = list(ShardStream(local, LoaderConfig(image_size=32, batch_size=32), train=False))
    b = list(ShardStream(again, LoaderConfig(image_size=32, batch_size=32), train=False))
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert all(int(x["skipped"].sum()) == 0 for x in b)


def test_rebuild_to_s3_is_idempotent(s3_set):
    _, on_s3 = s3_set
    spec = BuildSpec("fmnist:test", RARE, subsample=120, seed=0, max_count=25)
    before = storage.listdir(on_s3.root)
    again = build_set(FashionMNISTSource("test"), spec, on_s3.root, progress=False)
    assert again.meta["build_seconds"] == on_s3.meta["build_seconds"]  # the manifest was not rewritten
    assert storage.listdir(on_s3.root) == before


def test_train_from_s3_with_a_cached_teacher_on_s3(s3_set, teacher, tmp_path):
    from trainer.teacher_label import label_shard_set
    from trainer.scoring import ScoringConfig
    from trainer.train import train

    local, on_s3 = s3_set
    summaries = {}
    for name, m in (("local", local), ("s3", on_s3)):
        url = label_shard_set(teacher, m.root, ScoringConfig(TEACHER_SIZE, 128), topk=5)
        assert url.startswith("s3://") == (name == "s3") and storage.exists(f"{url}/labels.json")
        sets = {"train": m.root, "test": m.root}
        summaries[name] = train(tiny_config(sets, tmp_path / name, "loss.aux_weight=0.1", "run.max_steps=3"))
    summary = summaries["s3"]
    assert summary["steps"] == 3 and summary["skipped"] == {"bad_images": 0, "bad_shards": 0}
    # the same bytes, labels and order from the object store: the same three steps, the same validation
    assert summary["val"]["map"] == pytest.approx(summaries["local"]["val"]["map"], abs=1e-6)
    assert summary["val"]["ap"] == pytest.approx(summaries["local"]["val"]["ap"], abs=1e-6)
    # and that mAP is the one of the weights the run saved: its checkpoint, loaded on its own and scored on the
    # S3 set (one process, fp32 on CPU, the run's batches), gives it to the last digit. Catches a validation of
    # other weights than those saved (a checkpoint of an earlier step, BatchNorm statistics left out), of another
    # head or transform, and AP keyed by other names than the rare classes.
    from trainer.models import load_student_from_checkpoint
    from trainer.evaluate import evaluate_student
    from trainer.scoring import ScoringConfig

    student = load_student_from_checkpoint(summary["checkpoint"])
    again = evaluate_student(student, read_manifest(on_s3.root), ScoringConfig(32, 16), torch.device("cpu"))
    assert set(again["ap"]) == set(summary["val"]["ap"]) == {"Trouser", "Bag"}  # RARE = ("1", "8")
    assert again["map"] == pytest.approx(summary["val"]["map"], abs=1e-6)
    assert again["ap"] == pytest.approx(summary["val"]["ap"], abs=1e-6)


def test_a_missing_shard_object_is_skipped_and_counted(s3, tmp_path):
    spec = BuildSpec("fmnist:test", RARE, subsample=60, seed=1, max_count=20)
    m = build_set(FashionMNISTSource("test"), spec, _prefix(s3) + "/gone", progress=False)
    victim = m.shard_urls("background")[0]
    storage.remove(victim)
    batches = list(ShardStream(read_manifest(m.root), LoaderConfig(image_size=16, batch_size=100), train=False))
    seen = sum(len(b.get("key", [])) for b in batches)
    assert seen == m.count - m.shards[[s.kind for s in m.shards].index("background")].count
    assert sum(int(b["skipped"][1]) for b in batches) == 1


def test_retries_transient_errors_and_counts_them(monkeypatch):
    monkeypatch.setattr(remote, "STATS", dict.fromkeys(remote.STATS, 0))
    monkeypatch.setattr(remote, "BACKOFF_START_S", 0.001)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert remote.with_retries(flaky, "get x") == "ok"
    assert len(calls) == 3 and (remote.STATS["retries"], remote.STATS["failures"]) == (2, 0)

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/x")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        remote.with_retries(missing, "get y")
    assert len(calls) == 1  # a permanent error is not retried

    def down():
        raise TimeoutError("read timed out")

    with pytest.raises(remote.StorageOutage, match="get z"):
        remote.with_retries(down, "get z", outage_timeout_s=0.05)
    assert remote.STATS["retries"] > 2 and remote.STATS["failures"] == 1
    assert remote.STATS["outage_seconds"] > 0.05


def test_retries_in_loader_worker_processes_reach_the_training_process(s3_set, monkeypatch):
    """Each shard's first range request fails with a connection reset in the worker process; the batches carry
    the worker's retry count back (the training process's own counter never sees it)."""
    from data.loader import make_loader

    _, on_s3 = s3_set
    manifest = read_manifest(on_s3.root)
    real_fetch, failed = ranged._fetch_range, set()

    def flaky_fetch(fs, path, start, end):
        if path.endswith(".tar") and path not in failed:
            failed.add(path)
            raise ConnectionResetError(f"reset while reading {path}")
        return real_fetch(fs, path, start, end)

    monkeypatch.setattr(ranged, "_fetch_range", flaky_fetch)  # inherited by the forked worker
    monkeypatch.setattr(remote, "BACKOFF_START_S", 0.001)
    before = dict(remote.STATS)
    stream = ShardStream(manifest, LoaderConfig(image_size=32, batch_size=32), train=False)
    batches = list(make_loader(stream, 1))
    assert sum(len(b.get("key", [])) for b in batches) == on_s3.count
    worker = [b["storage"] for b in batches if "storage" in b]
    assert sum(w["retries"] for w in worker) == len(on_s3.shards)
    assert sum(w["bytes_read"] for w in worker) >= sum(s.bytes for s in on_s3.shards)
    assert not failed  # the parent did not read the shards: only the reported counts show the retries
    assert (remote.STATS["retries"], remote.STATS["failures"]) == (before["retries"], before["failures"])


def test_mine_an_s3_pool_into_s3_and_add_labels_there(s3, s3_set, tiny_sets, tmp_path):
    """The pool, the mined outputs and the new training-set version all on the object store: the same candidates
    as from the local copy of the pool, and a new version whose manifest lists its parent's S3 shards."""
    import csv
    import json

    from data.add_labels import add_labels
    from data.shards import check_objects
    from trainer.mine import CANDIDATES, MineJob, mine
    from trainer.scoring import ScoringConfig
    from trainer.train import train

    local, on_s3 = s3_set
    checkpoint = train(tiny_config(tiny_sets, tmp_path / "run", "run.max_steps=3", "data.val=",
                                   "loss.aux_weight=0"))["checkpoint"]
    prefix = _prefix(s3)
    rows = {}
    for name, pool, where in (("local", local.root, str(tmp_path / "mined")), ("s3", on_s3.root, f"{prefix}/mined")):
        summary = mine(MineJob(checkpoint=checkpoint, pool=pool, out=where, top=4,
                               scoring=ScoringConfig(32, 32, precision="auto")))
        assert summary["scored"] == local.count
        rows[name] = [json.loads(line) for line in storage.read_bytes(storage.join(where, CANDIDATES)).splitlines()]
    assert [(r["key"], r["class"]) for r in rows["s3"]] == [(r["key"], r["class"]) for r in rows["local"]]
    assert all(r["shard"].startswith("s3://") for r in rows["s3"])
    assert storage.exists(f"{prefix}/mined/review.html")
    parent = build_set(FashionMNISTSource("train"), BuildSpec("fmnist:train", RARE, subsample=60, max_count=25),
                       f"{prefix}/train", progress=False)
    picked = list({r["key"]: r for r in rows["s3"]}.values())[:3]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.DictWriter(f, ["key", "class", "label", "shard", "index"])
        w.writeheader()
        w.writerows({"key": r["key"], "class": r["class"], "label": "no", "shard": r["shard"], "index": r["index"]}
                    for r in picked)
    new = add_labels(parent.root, str(labels), on_s3.root, f"{prefix}/train-v2")
    assert new.count == parent.count + 3 and new.counts[0] == parent.counts[0] + 3
    assert [s.url for s in new.shards[:len(parent.shards)]] == parent.shard_urls()
    check_objects(read_manifest(f"{prefix}/train-v2"))
