"""A probe as a model: `bgsplit train` with probe.kind fits it and writes a checkpoint that eval and mine take,
scoring what the experiment's probe of the same fit scores."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cluster.cli import main
from data.shards import Manifest, ShardInfo, read_manifest
from trainer.probe import Features, ProbeParams, extract_features, probe_scores
from trainer import probe_model
from trainer.probe_model import FeaturePass, background_rate, keep_background, sample_shards
from trainer.scoring import ScoringConfig

SIZE = 48


def _fit(tiny_sets, out, *overrides, capsys=None):
    code = main(["train", "--config", "configs/debug.yaml", f"data.train={tiny_sets['train']}", "data.val=",
                 f"data.image_size={SIZE}", f"run.out_dir={out}", "data.num_workers=0", *overrides])
    return code


def _scores(checkpoint, location):
    from trainer.evaluate import evaluate_student
    from trainer.models import load_student_from_checkpoint

    student = load_student_from_checkpoint(checkpoint)
    result = evaluate_student(student, location, ScoringConfig(SIZE, 64), torch.device("cpu"), keep_predictions=True)
    return result["predictions"][0]


@pytest.mark.parametrize("kind,params", [("logistic", ["probe.C=0.01", "probe.class_weight=balanced"]),
                                         ("knn", ["probe.k=7", "probe.temperature=0.1"])])
def test_a_probe_checkpoint_scores_what_the_experiments_probe_scores(tiny_sets, teacher, tmp_path, capsys, kind,
                                                                     params):
    out = tmp_path / kind
    assert _fit(tiny_sets, out, f"probe.kind={kind}", *params) == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out.strip().splitlines()[-1])
    assert line["engine"] == "probe" and line["steps"] == 0
    assert "summary.json, checkpoints/" in captured.err.strip().splitlines()[-1]  # no metrics a probe never logs
    meta = json.loads((out / "checkpoints" / "step-00000000" / "meta.json").read_text())
    assert meta["student_spec"]["aux_classes"] == 0 and meta["config"]["data"]["image_size"] == SIZE
    assert meta["probe_fit"]["background_kept"] == meta["probe_fit"]["background_seen"] == 288  # under the cap
    # the experiment's probe: cached features of both sets, fit, score
    feats = [extract_features(teacher, loc, SIZE, cache_dir=str(tmp_path / "features"), identity=loc)
             for loc in (tiny_sets["train"], tiny_sets["test"])]
    p = {k.split("=")[0].removeprefix("probe."): k.split("=")[1] for k in params}
    pp = ProbeParams(kind=kind, image_size=SIZE, C=float(p.get("C", 1.0)), class_weight=p.get("class_weight", "none"),
                     k=int(p.get("k", 20)), temperature=float(p.get("temperature", 0.07)))
    expected, _ = probe_scores(feats[0], feats[1], pp)
    got = _scores(str(out), tiny_sets["test"])
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5
    assert expected[:, 1:].max() > 0.5  # a real fit: it is confident somewhere


def test_background_sample_is_a_pure_function_of_keys_bounded_and_keeps_every_positive(tiny_sets, tmp_path,
                                                                                       capsys):
    keys = [f"img-{i:06d}" for i in range(20000)]
    kept = keep_background(keys, 0.1)
    assert 1800 < kept.sum() < 2200  # about the rate
    assert np.array_equal(keep_background(keys[::-1], 0.1)[::-1], kept)  # order (any split) does not matter
    assert keep_background(keys, 1.0).all() and background_rate(288, 100) == 100 / 288
    assert background_rate(288, 0) == background_rate(50, 100) == 1.0
    # on a real set: every positive kept, the background cut to about the cap, the same rows for any split
    p = FeaturePass(location=tiny_sets["train"], scoring=ScoringConfig(SIZE, 128), arch="efficientnet_lite0",
                    weights="DEFAULT", max_background=100)
    assert p.chosen == list(range(len(p.manifest.shards))) and p.rate == background_rate(288, 100)  # few shards
    n = len(p.manifest.shards)
    whole = p.publish([(list(range(n)), p.run(list(range(n)), torch.device("cpu")))])
    split = p.publish([([i], p.run([i], torch.device("cpu"))) for i in reversed(range(n))])
    assert np.array_equal(whole["labels"], split["labels"])
    assert np.allclose(whole["features"], split["features"], atol=1e-4)
    counts = np.bincount(whole["labels"], minlength=3)
    assert counts[1:].tolist() == read_manifest(tiny_sets["train"]).counts[1:]
    assert 60 < counts[0] < 140 and whole["background_seen"] == 288
    out = tmp_path / "capped"
    assert _fit(tiny_sets, out, "probe.kind=logistic", "probe.max_background=100") == 0
    meta = json.loads((out / "checkpoints" / "step-00000000" / "meta.json").read_text())
    assert meta["probe_fit"]["background_kept"] == counts[0] and meta["probe_fit"]["background_seen"] == 288


def test_eval_and_mine_take_a_probe_checkpoint(tiny_sets, tmp_path, capsys):
    out = tmp_path / "probe"
    assert _fit(tiny_sets, out, "probe.kind=logistic", "probe.C=0.1") == 0
    assert main(["eval", "--checkpoint", str(out), "--data", tiny_sets["test"], "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["map"] > 0.5
    assert main(["mine", "--checkpoint", str(out), "--pool", tiny_sets["test"], "--out", str(tmp_path / "mined"),
                 "--top", "10"]) == 0
    assert any((tmp_path / "mined").iterdir())


def test_bad_probe_inputs_are_one_line_errors(tiny_sets, tmp_path, capsys):
    out = tmp_path / "probe"
    assert _fit(tiny_sets, out, "probe.kind=knn") == 0
    capsys.readouterr()
    # a probe checkpoint handed to train as a resume source
    code = main(["train", "--config", "configs/debug.yaml", f"data.train={tiny_sets['train']}", "data.val=",
                 f"data.image_size={SIZE}", f"run.out_dir={tmp_path / 'student'}", f"run.resume={out}",
                 "optim.epochs=0.1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "is a probe fit (probe.kind=knn)" in err and "run.resume=" in err
    # a probe run asked to resume
    assert _fit(tiny_sets, tmp_path / "again", "probe.kind=logistic", f"run.resume={out}") == 2
    assert "nothing to resume" in capsys.readouterr().err
    # values out of range, an unknown kind
    assert _fit(tiny_sets, tmp_path / "x", "probe.kind=logistic", "probe.C=0") == 2
    assert "probe values out of range" in capsys.readouterr().err
    assert _fit(tiny_sets, tmp_path / "x", "probe.kind=svm") == 2
    assert "probe.kind" in capsys.readouterr().err and not (tmp_path / "x").exists()


def _hits(pool: str, candidates: list[dict]) -> dict[int, list[bool]]:
    """Per class, in rank order: is the candidate an image of that class (the pool's hidden labels)."""
    from data import storage
    from data.shards import read_record

    manifest = read_manifest(pool)
    labels = {}
    for shard in manifest.shards:
        record = read_record(manifest, shard)
        for i in range(shard.count):
            labels[storage.join(manifest.root, shard.url), i] = record["labels"][i] if shard.kind == "positive" else 0
    out: dict[int, list[bool]] = {}
    for c in sorted(candidates, key=lambda c: (c["class"], c["rank"])):
        url = c["shard"] if "://" in c["shard"] or c["shard"].startswith("/") else storage.join(manifest.root,
                                                                                               c["shard"])
        out.setdefault(c["class"], []).append(labels[url, c["index"]] == c["class"])
    return out


COLD_SIZE = 128  # at 48-64 px the teacher barely tells Fashion-MNIST's classes apart


@pytest.mark.parametrize("kind", ["logistic", "knn"])
def test_mining_starts_from_two_examples_a_class_before_any_training(tiny_sets, tmp_path, capsys, kind):
    from conftest import RARE
    from data.build import BuildSpec, build_set
    from data.sources import FashionMNISTSource

    examples = build_set(FashionMNISTSource("train"), BuildSpec("fmnist:train", RARE, positives_per_class=2,
                                                                max_background=0, seed=5),
                         str(tmp_path / "examples"), progress=False).root
    out = tmp_path / f"mined-{kind}"
    assert main(["mine", "--positives", examples, "--pool", tiny_sets["test"], "--out", str(out), "--top", "10",
                 "--image-size", str(COLD_SIZE), "--probe", kind, "--background", "100"]) == 0
    meta = json.loads((out / "model" / "checkpoints" / "step-00000000" / "meta.json").read_text())
    assert meta["probe_fit"]["positives"] == [2, 2] and meta["probe_fit"]["examples"] == 4
    assert 60 < meta["probe_fit"]["pool_sample"] < 140  # ~100 of the 300 by key hash
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert sorted({r["class"] for r in rows}) == [1, 2] and len(rows) == 20 and (out / "review.html").exists()
    if kind == "logistic":  # each class's top 10 hold >= 3x its share of the pool (random review's expectation)
        hits = _hits(tiny_sets["test"], rows)
        counts = read_manifest(tiny_sets["test"]).counts
        for c in (1, 2):
            assert sum(hits[c]) / len(hits[c]) >= 3 * counts[c] / sum(counts), (c, hits[c])
        # round 2: the reviewed candidates (an annotator from the hidden labels) join the examples, and the next
        # round fits on all of them, its hard negatives included; the labelled images are no longer candidates
        lines = ["key,class,label"] + [f"{r['key']},{r['class']},{'yes' if hit else 'no'}"
                                       for r in rows for hit in [hits[r["class"]][r["rank"] - 1]]]
        (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
        assert main(["shards", "add-labels", "--data", examples, "--labels", str(tmp_path / "labels.csv"),
                     "--pool", tiny_sets["test"], "--out", str(tmp_path / "round1")]) == 0
        out2 = tmp_path / "round2"
        assert main(["mine", "--positives", str(tmp_path / "round1"), "--pool", tiny_sets["test"], "--out",
                     str(out2), "--top", "10", "--image-size", str(COLD_SIZE), "--background", "100"]) == 0
        fit2 = json.loads((out2 / "model" / "checkpoints" / "step-00000000" / "meta.json").read_text())["probe_fit"]
        assert fit2["positives"] == [2 + sum(hits[1]), 2 + sum(hits[2])]
        assert fit2["examples"] == 4 + len({r["key"] for r in rows})
        again = {r["key"] for r in map(json.loads, (out2 / "candidates.jsonl").read_text().splitlines())}
        assert not again & {r["key"] for r in rows}
    else:  # the bank holds the examples: each example is its own nearest neighbour, so eval on them is perfect
        assert main(["eval", "--checkpoint", str(out / "model"), "--data", examples, "--out",
                     str(tmp_path / "ev")]) == 0
        assert json.loads((tmp_path / "ev" / "report.json").read_text())["map"] == 1.0


def test_bad_cold_start_inputs_are_one_line_errors(tiny_sets, tmp_path, capsys):
    out = str(tmp_path / "m")
    assert main(["mine", "--pool", tiny_sets["test"], "--out", out]) == 2
    assert "give --checkpoint" in capsys.readouterr().err
    assert main(["mine", "--positives", "folder:" + str(tmp_path), "--pool", tiny_sets["test"], "--out", out]) == 2
    assert "give --rare" in capsys.readouterr().err
    assert main(["mine", "--positives", str(tmp_path / "nothing"), "--pool", tiny_sets["test"], "--out", out]) == 2
    assert "neither a shard set" in capsys.readouterr().err


def _manifest(background_shards: int, per_shard: int, positive_shards: int = 2) -> Manifest:
    shards = [ShardInfo(f"pos-{i:05d}.tar", "positive", 10, 1) for i in range(positive_shards)]
    shards += [ShardInfo(f"bg-{i:06d}.tar", "background", per_shard, 1) for i in range(background_shards)]
    return Manifest("memory://set", ["a"], ["background", "a"], shards,
                    [background_shards * per_shard, 10 * positive_shards])


def test_a_probe_of_a_huge_set_reads_a_hash_chosen_fraction_of_its_background_shards():
    # 10M background images in 10,000 shards, a 100k sample: every positive shard, background shards holding
    # OVERREAD x the sample (at least MIN_SHARDS of them), and a rate that keeps ~100k of what is read
    m = _manifest(10_000, 1_000)
    chosen, rate = sample_shards(m, 100_000)
    bg = [i for i in chosen if m.shards[i].kind == "background"]
    assert chosen[:2] == [0, 1] and chosen == sorted(chosen)
    read = sum(m.shards[i].count for i in bg)
    assert read == probe_model.OVERREAD * 100_000 and rate == pytest.approx(0.25)
    assert bg != list(range(2, 2 + len(bg)))  # a hash order, not the first shards (the source's first folders)
    # a pure function of names: the same choice from a reordered manifest, and a grown set keeps most of it
    reordered = Manifest(m.root, m.rare_classes, m.class_names, m.shards[::-1], m.counts)
    again, _ = sample_shards(reordered, 100_000)
    assert {reordered.shards[i].url for i in again} == {m.shards[i].url for i in chosen}
    grown, _ = sample_shards(_manifest(11_000, 1_000), 100_000)
    assert len({m.shards[i].url for i in bg} & {f"bg-{i - 2:06d}.tar" for i in grown}) > 0.8 * len(bg)
    # a small sample still spreads over MIN_SHARDS shards; a cap the set fits reads everything
    few, rate = sample_shards(m, 1_000)
    assert len(few) - 2 == probe_model.MIN_SHARDS and rate == pytest.approx(1_000 / (probe_model.MIN_SHARDS * 1_000))
    assert sample_shards(m, 0) == (list(range(len(m.shards))), 1.0)
    assert sample_shards(m, 20_000_000) == (list(range(len(m.shards))), 1.0)
    # a pool: every shard is background, whatever the labels say
    pool, _ = sample_shards(m, 100_000, unlabelled=True)
    assert 400 <= len(pool) <= 402 and sum(m.shards[i].count for i in pool) >= 400_000


def test_a_probe_pass_reads_only_the_chosen_shards_and_decodes_only_the_kept_images(tiny_sets, monkeypatch):
    monkeypatch.setattr(probe_model, "MIN_SHARDS", 1)
    monkeypatch.setattr(probe_model, "OVERREAD", 1)
    m = read_manifest(tiny_sets["train"])
    background = [i for i, s in enumerate(m.shards) if s.kind == "background"]
    assert len(background) >= 2, "the fixture set needs several background shards"
    cap = m.shards[background[0]].count // 2
    p = FeaturePass(location=tiny_sets["train"], scoring=ScoringConfig(SIZE, 128), arch="efficientnet_lite0",
                    weights="DEFAULT", max_background=cap)
    read = [i for i in p.chosen if m.shards[i].kind == "background"]
    assert 1 <= len(read) < len(background)
    counts = p.shard_counts()
    assert all((counts[i] > 0) == (i in p.chosen) for i in range(len(m.shards)))
    decoded = []
    original = probe_model.ShardStream._decode

    def spy(self, ref, sample, epoch=0):
        decoded.append(sample.key)
        return original(self, ref, sample, epoch)

    monkeypatch.setattr(probe_model.ShardStream, "_decode", spy)
    shards = p.todo(list(range(len(m.shards))))
    assert shards == p.chosen
    out = p.publish([(shards, p.run(shards, torch.device("cpu")))])
    labels = out["labels"]
    assert np.bincount(labels, minlength=3)[1:].tolist() == m.counts[1:]  # every positive
    assert len(decoded) == len(labels)  # nothing decoded that the fit drops
    held = sum(m.shards[i].count for i in p.chosen) - sum(m.counts[1:])
    assert out["background_seen"] == held and 0 < (labels == 0).sum() < held
