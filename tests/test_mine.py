"""`bgsplit mine` and `bgsplit shards add-labels` on a real trained student and real Fashion-MNIST shards.

The candidates are checked against an independent scoring of the whole pool; splitting the pool over simulated
ranks, resuming after a lost share and the bounded top N must all give the same list."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from data.add_labels import LabelError, add_labels
from data.shards import check_objects, iter_tar, read_manifest
from data.sources import FashionMNISTSource
from cluster.cli import main
from conftest import simulated_rank
from trainer.evaluate import predict
from trainer.scoring import ScoringConfig
from trainer.mine import CANDIDATES, PARTS, MineJob, MinePass, TopN, mine, pool_set
from trainer.models import load_student_from_checkpoint
from trainer.train import train

TOP = 5


@pytest.fixture(scope="module")
def checkpoint(tiny_sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("mine-train")
    summary = train(tiny_config(tiny_sets, out, "run.max_steps=30", "data.val=", "loss.aux_weight=0"))
    return summary["checkpoint"]


def _job(checkpoint, pool, out, **kw):
    return MineJob(checkpoint=checkpoint, pool=pool, out=str(out), top=kw.pop("top", TOP),
                   scoring=ScoringConfig(32, 64, precision="auto"), **kw)


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / CANDIDATES).read_text().splitlines()]


def _expected(checkpoint, pool, skip=()):
    """The top N per class from one scoring pass over the whole pool, by (score desc, shard order, index)."""
    manifest = read_manifest(pool)
    student = load_student_from_checkpoint(checkpoint)
    probs, _, keys, refs = predict(student, manifest, ScoringConfig(32, 64), torch.device("cpu"))
    order = {s.url: i for i, s in enumerate(manifest.shards)}
    out = {}
    for cls in range(1, probs.shape[1]):
        ranked = sorted((i for i in range(len(keys)) if keys[i] not in skip),
                        key=lambda i: (-probs[i, cls], order[refs[i][0]], refs[i][1]))
        out[cls] = [(keys[i], float(probs[i, cls])) for i in ranked[:TOP]]
    return out


def test_topn_keeps_the_global_best_whatever_the_split():
    rng = random.Random(0)
    rows = [(round(rng.random(), 2), f"k{i}", i // 10, i % 10) for i in range(200)]  # rounded: many ties
    whole = TopN(7, 1)
    for score, key, shard, index in rows:
        whole.push(1, score, key, f"s{shard}", index, shard)
    parts = [TopN(7, 1) for _ in range(3)]
    for j, (score, key, shard, index) in enumerate(rows):
        parts[shard % 3].push(1, score, key, f"s{shard}", index, shard)
    merged = TopN(7, 1)
    for p in reversed(parts):
        merged.merge(TopN.from_json(json.loads(json.dumps(p.to_json())), 7, 1))
    want = sorted(rows, key=lambda r: (-r[0], r[2], r[3]))[:7]
    assert [r["key"] for r in whole.ranked(1)] == [r[1] for r in want]
    assert [r["key"] for r in merged.ranked(1)] == [r[1] for r in want]
    assert all(len(h) <= 7 for h in whole.heaps.values())


def test_mine_matches_an_independent_scoring_over_any_split_and_resumes(tiny_sets, checkpoint, tmp_path):
    pool = tiny_sets["test"]
    assert len(read_manifest(pool).shards) >= 3
    want = _expected(checkpoint, pool)
    one = mine(_job(checkpoint, pool, tmp_path / "one"))
    rows = _rows(tmp_path / "one")
    assert one["candidates"] == len(rows) == TOP * 2 and one["scored"] == read_manifest(pool).count
    for cls in (1, 2):
        got = [(r["key"], r["score"]) for r in rows if r["class"] == cls]
        assert [k for k, _ in got] == [k for k, _ in want[cls]]
        assert np.allclose([s for _, s in got], [s for _, s in want[cls]], atol=1e-6)
        assert [r["rank"] for r in rows if r["class"] == cls] == list(range(1, TOP + 1))
    # two simulated ranks: each scores its share, rank 0 merges; the same list
    job2 = _job(checkpoint, pool, tmp_path / "two")
    two = MinePass(job2)
    shares = {rank: simulated_rank(two, rank, 2) for rank in (1, 0)}  # rank 1 first, as if it were faster
    assert all(shares[r][0] for r in (0, 1)) and not set(shares[0][0]) & set(shares[1][0])
    assert two.publish([shares[0], shares[1]])["this_run"]["reused"] == 0
    assert _rows(tmp_path / "two") == rows
    # a share lost (a killed worker): the rerun scores that share only, same result
    parts = sorted((tmp_path / "one" / PARTS).rglob("*.json"))
    assert len(parts) == len(read_manifest(pool).shards)
    parts[1].unlink()
    again = mine(_job(checkpoint, pool, tmp_path / "one"))
    assert again["this_run"]["shares"] == 1 and again["this_run"]["reused"] == len(parts) - 1
    assert _rows(tmp_path / "one") == rows
    # outputs a person uses
    assert (tmp_path / "one" / "review.html").stat().st_size > 0
    assert len(list((tmp_path / "one").glob("contact-*.png"))) == 2


def test_mine_excludes_training_keys_and_builds_a_source_pool(tiny_sets, checkpoint, tmp_path):
    # a folder source is built into OUT/pool, then mined: a flat folder of unlabelled images, plus a few sorted
    # into a folder named for their class, whose name must not reach the keys (the review page shows keys)
    src = FashionMNISTSource("test")
    folder = tmp_path / "images"
    (folder / "Dress").mkdir(parents=True)
    for i, item in enumerate(src.items()[:60]):
        (folder / ("Dress" if i % 10 == 0 else "") / f"{item.key}.png").write_bytes(src.read(item))
    (folder / "Dress" / f"{src.items()[1].key}.png").write_bytes(src.read(src.items()[1]))  # same name, two folders
    out = tmp_path / "from-folder"
    pool = pool_set(f"folder:{folder}", str(out))
    assert pool == str(out / "pool") and read_manifest(pool).count == 61
    keys = [k for sh in read_manifest(pool).shards for k, _ in iter_tar(open(Path(pool) / sh.url, "rb"))]
    assert len(set(keys)) == 61 and not [k for k in keys if "Dress" in k]
    assert sum(k.startswith(src.items()[1].key) for k in keys) == 2
    mine(_job(checkpoint, pool, out))
    assert len(_rows(out)) == TOP * 2
    # keys of an excluded set are never candidates: the 300-image test set shares some of the source's 60 keys
    excluded = {k for sh in read_manifest(tiny_sets["test"]).shards
                for k, _ in iter_tar(open(Path(tiny_sets["test"]) / sh.url, "rb"))}
    shared = excluded & {item.key for item in src.items()[:60]}
    assert 0 < len(shared) < 60 - TOP
    out2 = tmp_path / "excl"
    mine(_job(checkpoint, pool, out2, exclude=(tiny_sets["test"],)))
    got = _rows(out2)
    assert len(got) == TOP * 2 and not {r["key"] for r in got} & excluded
    assert _expected(checkpoint, pool, skip=excluded)[1] == [(r["key"], pytest.approx(r["score"], abs=1e-6))
                                                            for r in got if r["class"] == 1]
    assert mine(_job(checkpoint, tiny_sets["test"], tmp_path / "all", exclude=(tiny_sets["test"],)))[
        "candidates"] == 0


def test_mine_excludes_by_content_not_by_file_name(checkpoint, tmp_path, caplog):
    """Issue 36: --exclude drops a pool image that IS a training image (the same bytes, under any name) and keeps one
    that only shares a training image's file name (IMG_0000.png from another camera). A set without content hashes
    (an older build) falls back to names, and says how to get the content check."""
    import logging

    from data.shards import MANIFEST, write_shard_set

    def png(seed: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), ((41 * seed) % 256, (97 * seed) % 256, (13 * seed + 5) % 256)).save(buf, "PNG")
        return buf.getvalue()

    train = write_shard_set(str(tmp_path / "train"), [(f"IMG_{i:04d}", png(i), 0, "bg") for i in range(6)],
                            rare_classes=[], class_names=["background"]).root
    pool = write_shard_set(str(tmp_path / "pool"), [("IMG_0000", png(100), 0, ""), ("IMG_0001", png(101), 0, ""),
                                                    ("copy-of-3", png(3), 0, ""), ("new", png(102), 0, "")],
                           rare_classes=[], class_names=["background"]).root
    mine(_job(checkpoint, pool, tmp_path / "by-content", exclude=(train,), top=4))
    got = _rows(tmp_path / "by-content")
    assert {r["key"] for r in got} == {"IMG_0000", "IMG_0001", "new"} and len(got) == 3 * 2  # 2 rare classes
    doc = json.loads((Path(train) / MANIFEST).read_text())
    del doc["content_index"]  # as a bgsplit before content hashes wrote it
    (Path(train) / MANIFEST).write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="bgsplit.mine"):
        mine(_job(checkpoint, pool, tmp_path / "by-key", exclude=(train,), top=4))
    assert {r["key"] for r in _rows(tmp_path / "by-key")} == {"copy-of-3", "new"}
    assert "--exclude compares file names" in caplog.text and "to compare by content" in caplog.text


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["key", "class", "class_name", "label", "score", "rank", "shard", "index"])
        w.writeheader()
        w.writerows(rows)


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).iterdir() if p.is_file()}


def test_add_labels_writes_a_new_version_without_touching_the_parent(tiny_sets, checkpoint, tmp_path):
    pool = tiny_sets["test"]
    mine(_job(checkpoint, pool, tmp_path / "mined"))
    rows = _rows(tmp_path / "mined")
    parent = read_manifest(tiny_sets["train"])
    before = _digest(tiny_sets["train"])
    # the simulated annotator: the pool's hidden label (the sample's json "orig") decides yes or no, except that it
    # confirms class 1's top candidate whatever it shows (and only as class 1), so new positives are written even
    # when this 2-step model's candidates hold no true one (they held none in one loaded 2-core run)
    truth = {}
    for s in read_manifest(pool).shards:
        for key, fields in iter_tar(open(Path(pool) / s.url, "rb")):
            truth[key] = json.loads(fields["json"])["orig"]
    rare = parent.rare_classes
    confirmed = next(r["key"] for r in rows if r["class"] == 1 and r["rank"] == 1)

    def says_yes(r: dict) -> bool:
        return r["class"] == 1 if r["key"] == confirmed else truth[r["key"]] == rare[r["class"] - 1]

    labelled = [{**{k: r[k] for k in ("key", "class", "class_name", "score", "rank", "shard", "index")},
                 "label": "yes" if says_yes(r) else "no"} for r in rows]
    # a key in no shard/index column is found by a pass over the pool
    labelled[0] = {**labelled[0], "shard": "", "index": ""}
    _write_csv(tmp_path / "labels.csv", labelled)
    new = add_labels(tiny_sets["train"], str(tmp_path / "labels.csv"), pool, str(tmp_path / "v2"))
    final = {}
    for r in labelled:
        cls = r["class"] if r["label"] == "yes" else 0
        final[r["key"]] = max(final.get(r["key"], 0), cls)
    assert new.count == parent.count + len(final)
    assert new.counts[0] - parent.counts[0] == sum(c == 0 for c in final.values())
    for cls in (1, 2):
        assert new.counts[cls] - parent.counts[cls] == sum(c == cls for c in final.values())
    assert _digest(tiny_sets["train"]) == before  # the parent set is untouched
    kept = [s for s in new.shards if s.url.startswith(str(tiny_sets["train"]))]
    assert len(kept) == len(parent.shards) and not list((tmp_path / "v2").glob("shard-*"))
    check_objects(new)
    added = {}
    for s in new.shards[len(parent.shards):]:
        for key, fields in iter_tar(open(Path(new.root) / s.url, "rb")):
            added[key] = int(fields["cls"])
            Image.open(io.BytesIO(fields["png"])).load()
    assert added == final and any(c > 0 for c in final.values())  # positives were found and added
    # the new version trains, and a rerun with the same labels is a no-op returning the same set
    train(tiny_config({"train": str(tmp_path / "v2"), "test": tiny_sets["test"]}, tmp_path / "v2-run",
                      "run.max_steps=2", "data.val=", "loss.aux_weight=0", "teacher.mode=online"))
    again = add_labels(tiny_sets["train"], str(tmp_path / "labels.csv"), pool, str(tmp_path / "v2"))
    assert again.meta["added"] == new.meta["added"]
    # a third version on top of the second: earlier labels are known, a clash with one is refused
    key, cls = next(iter(final.items()))
    _write_csv(tmp_path / "clash.csv", [{"key": key, "class": 1 if cls == 0 else 3 - cls, "label": "yes"}])
    with pytest.raises(LabelError, match=f"key {key} is already in"):
        add_labels(str(tmp_path / "v2"), str(tmp_path / "clash.csv"), pool, str(tmp_path / "v3"))
    assert not (tmp_path / "v3").exists()


@pytest.mark.parametrize("rows, message", [
    ([{"key": "nope-1", "class": 1, "label": "yes"}], "not in pool"),
    ([{"key": "K", "class": 9, "label": "yes"}], "unknown class id 9"),
    ([{"key": "K", "class": 1, "label": "yes"}, {"key": "K", "class": 1, "label": "no"}], "both yes and no"),
    ([{"key": "K", "class": 1, "label": "yes"}, {"key": "K", "class": 2, "label": "yes"}], "yes for 2 classes"),
    ([{"key": "K", "class": 1, "label": "maybe"}], "use yes or no"),
])
def test_add_labels_bad_input_is_one_line_and_writes_nothing(tiny_sets, tmp_path, capsys, rows, message):
    pool = tiny_sets["test"]
    real_key = next(k for k, _ in iter_tar(open(Path(pool) / read_manifest(pool).shards[0].url, "rb")))
    _write_csv(tmp_path / "labels.csv", [{**r, "key": r["key"].replace("K", real_key)} for r in rows])
    code = main(["shards", "add-labels", "--data", tiny_sets["train"], "--labels", str(tmp_path / "labels.csv"),
                 "--pool", pool, "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()
