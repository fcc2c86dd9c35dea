"""Shard round trip, -BG construction counts, the manifest written last, bad data skipped and counted."""
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data.bg_construction import positives_for_background_fraction, select_bg, stratified_holdout
from data.loader import ShardStream, worker_skip
from data.config import LoaderConfig
from data.shards import FORMAT, MANIFEST, read_manifest, write_shard_set


def _png(value: int, size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _samples(n, k=2):
    return [(f"s{i:04d}", _png(i % 256), i % (k + 1) if i % 10 == 0 else 0, str(i % 7)) for i in range(n)]


def test_round_trip_keeps_bytes_labels_and_keys(tmp_path):
    samples = _samples(57)
    m = write_shard_set(str(tmp_path), samples, rare_classes=["a", "b"], class_names=["background", "A", "B"],
                        max_count=10)
    assert m.count == 57 and sum(s.count for s in m.shards) == 57
    assert {s.kind for s in m.shards} == {"positive", "background"}
    back = read_manifest(str(tmp_path))
    assert back.counts == m.counts and back.class_names == ["background", "A", "B"]
    from data.shards import iter_tar

    got = {}
    for url in back.shard_urls():
        with open(url, "rb") as f:
            for key, fields in iter_tar(f):
                got[key] = fields
    assert set(got) == {s[0] for s in samples}
    for key, image, label, orig in samples:
        assert got[key]["png"] == image and int(got[key]["cls"]) == label
        assert json.loads(got[key]["json"])["orig"] == orig
    # positives live only in positive shards, background only in background shards
    for url, info in zip(back.shard_urls(), back.shards):
        with open(url, "rb") as f:
            labels = [int(fields["cls"]) for _, fields in iter_tar(f)]
        assert all((lab > 0) == (info.kind == "positive") for lab in labels)


def test_manifest_is_written_last(tmp_path):
    def failing():
        yield from _samples(25)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_shard_set(str(tmp_path), failing(), rare_classes=["a", "b"], class_names=["bg", "A", "B"], max_count=10)
    assert not (tmp_path / MANIFEST).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    with pytest.raises(FileNotFoundError, match="bgsplit shards build"):
        read_manifest(str(tmp_path))


def test_empty_and_missing_shard_lists(tmp_path):
    with pytest.raises(ValueError, match="selection is empty"):
        write_shard_set(str(tmp_path), [], rare_classes=["a"], class_names=["bg", "A"])
    doc = {"format": FORMAT, "rare_classes": ["a"], "class_names": ["bg", "A"], "counts": [0, 0], "shards": []}
    (tmp_path / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="lists no shards"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST).write_text(json.dumps({**doc, "format": "bgsplit-shards/1"}))
    with pytest.raises(ValueError, match="rebuild the set with `bgsplit shards build`"):
        read_manifest(str(tmp_path))  # a set of an older format (no byte offsets) is refused, not misread
    with pytest.raises(FileNotFoundError, match="no shard set given"):
        read_manifest("")


def test_bg_construction_counts():
    labels = [str(i % 10) for i in range(1000)]  # 100 per class
    sel = select_bg(labels, ["3", "7"], positives_per_class=5, seed=1)
    assert sel.counts == {0: 800, 1: 5, 2: 5}
    assert sel.background_fraction == pytest.approx(800 / 810)
    again = select_bg(labels, ["3", "7"], positives_per_class=5, seed=1)
    other = select_bg(labels, ["3", "7"], positives_per_class=5, seed=2)
    assert np.array_equal(sel.indices, again.indices) and not np.array_equal(sel.indices, other.indices)
    assert all(labels[i] == "3" for i in sel.indices[sel.main_labels == 1])
    evaluation = select_bg(labels, ["3", "7"])
    assert evaluation.counts == {0: 800, 1: 100, 2: 100}  # evaluation sets keep every positive
    by_fraction = select_bg(labels, ["3", "7"], background_fraction=0.99, seed=0)
    assert by_fraction.counts[1] == positives_for_background_fraction(800, 2, 0.99) == 4
    assert 0.985 < by_fraction.background_fraction < 0.995
    small = select_bg(labels, ["3"], positives_per_class=2, max_background=50, seed=0)
    assert small.counts == {0: 50, 1: 2}
    with pytest.raises(ValueError, match="rare class 'x' has no images"):
        select_bg(labels, ["x"])


def test_holdout_is_disjoint_and_seeded():
    labels = [str(i % 10) for i in range(100)]
    rest, held = stratified_holdout(labels, ["1", "2"], 30, seed=3)
    assert len(held) == 30 and len(rest) == 70 and not set(rest) & set(held)
    assert np.array_equal(held, stratified_holdout(labels, ["1", "2"], 30, seed=3)[1])


def test_worker_skip_matches_round_robin():
    for workers in (0, 1, 3):
        w = max(workers, 1)
        for done in range(10):
            delivered = [sum(1 for b in range(done) if b % w == i) for i in range(w)]
            assert [worker_skip(done, i, workers) for i in range(w)] == delivered


def _corrupt_set(tmp_path):
    samples = [(f"k{i}", _png(40 + i), 1 if i < 3 else 0, "x") for i in range(12)]
    samples[5] = ("broken", b"\x89PNG\r\n\x1a\nnot really a png", 0, "x")
    write_shard_set(str(tmp_path), samples, rare_classes=["r"], class_names=["bg", "R"], max_count=100)
    return read_manifest(str(tmp_path))


def test_corrupt_image_is_skipped_counted_and_warned(tmp_path, caplog):
    m = _corrupt_set(tmp_path)
    stream = ShardStream(m, LoaderConfig(image_size=16, batch_size=4), train=False)
    with caplog.at_level(logging.WARNING, logger="bgsplit.data"):
        batches = list(stream)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 11 and "broken" not in keys
    assert sum(int(b["skipped"][0]) for b in batches) == 1
    by_shard = [b["skipped_by_shard"] for b in batches if b["skipped_by_shard"]]
    assert by_shard == [{"shard-background-000000.tar": {"bad_images": 1, "bad_shards": 0}}]
    assert any("broken" in r.getMessage() and "shard-background-000000.tar" in r.getMessage()
               for r in caplog.records)
    assert batches[0]["image"].dtype.is_floating_point is False and batches[0]["image"].shape[1:] == (3, 16, 16)


def test_truncated_shard_is_reported_and_the_run_goes_on(tmp_path, caplog):
    m = _corrupt_set(tmp_path)
    bg = [u for u in m.shard_urls("background")][0]
    data = open(bg, "rb").read()
    open(bg, "wb").write(data[:4000])  # cut inside the second sample (the tail of a tar is padding)
    with caplog.at_level(logging.WARNING, logger="bgsplit.data"):
        batches = list(ShardStream(m, LoaderConfig(image_size=16, batch_size=4), train=False))
    assert 3 <= sum(len(b.get("key", [])) for b in batches) < 11  # the positive shard and the samples before the cut
    assert sum(int(b["skipped"][1]) for b in batches) == 1
    assert [s for b in batches for s in b.get("skipped_by_shard", {})] == [bg.rsplit("/", 1)[-1]]
    assert sum(int(b["skipped"][0]) for b in batches) == 0  # "broken" lies past the cut, never read
    # a file shorter than its record is noticed before its bytes are parsed: one warning naming the shard and why
    assert any("shard-background-000000.tar" in r.getMessage() and "4,000 bytes where its record says" in
               r.getMessage() and "rebuild the set" in r.getMessage() for r in caplog.records)


def test_balanced_sampling_repeats_positives(tmp_path):
    samples = [(f"k{i:03d}", _png(i), (i % 2) + 1 if i < 4 else 0, "x") for i in range(204)]
    write_shard_set(str(tmp_path), samples, rare_classes=["a", "b"], class_names=["bg", "A", "B"], max_count=50)
    m = read_manifest(str(tmp_path))
    stream = ShardStream(m, LoaderConfig(image_size=8, batch_size=20, sampling="balanced", positive_fraction=0.2,
                                         shuffle_buffer_mb=0.05),
                         train=True)
    stream.epochs = 1
    labels = np.concatenate([b["label"].numpy() for b in stream])
    frac = np.mean(labels > 0)
    assert 0.17 < frac < 0.23  # 4 positives, re-sampled to a fifth of the epoch
    assert abs(np.sum(labels == 1) - np.sum(labels == 2)) <= 0.3 * np.sum(labels > 0)
    assert len(labels) == stream.batches_per_epoch() * 20


@pytest.mark.parametrize("workers", [0, 3])
@pytest.mark.parametrize("done", [5, 23])
def test_resume_replays_the_same_next_batches(tmp_path, workers, done):
    """After ``done`` batches (23: into the second epoch, whose round-robin starts at another worker), a stream
    started from the loader state gives the same batches as the uninterrupted one."""
    from data.loader import LoaderState, make_loader

    samples = [(f"k{i:03d}", _png(i), 1 if i % 9 == 0 else 0, "x") for i in range(120)]
    write_shard_set(str(tmp_path), samples, rare_classes=["r"], class_names=["bg", "R"], max_count=15)
    m = read_manifest(str(tmp_path))

    def stream(start=None):
        s = ShardStream(m, LoaderConfig(image_size=8, batch_size=6, shuffle_buffer_mb=0.02, num_workers=workers),
                        train=True, seed=4)
        s.start = start or LoaderState()
        s.epochs = 2 - s.start.epoch  # both streams end with epoch 1
        return s

    full = [b for b in make_loader(stream(), workers) if "image" in b]
    state = LoaderState()
    for b in full[:done]:
        state.advance(b["position"], 20)
    assert (state.epoch, state.batches) == divmod(done, 20)
    resumed = [b for b in make_loader(stream(state), workers) if "image" in b]
    assert len(full) == 40 and len(resumed) == 40 - done
    for a, b in zip(full[done:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
