"""The loader at the properties that matter at scale: every sample once per epoch over simulated ranks and real
worker processes, a resume that reads no more than its share, class-mixed batches after a shuffled build, and
re-sampled positives read from one node-local copy."""
import collections
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import noise_samples
from data import remote
from data.build import BuildSpec, build_set
from data.loader import LoaderState, ShardStream, make_loader
from data.config import LoaderConfig
from data.positives import PositiveStore
from data.shards import read_manifest, write_shard_set
from data.sources import ImageFolderSource


def _png(v: int, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0]), v % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """103 samples in shards of 17 (and a last one of 1), 9 of them positive."""
    root = tmp_path_factory.mktemp("uneven") / "set"
    samples = [(f"k{i:03d}", _png(i), 1 if i % 12 == 0 else 0, "x") for i in range(103)]
    write_shard_set(str(root), samples, rare_classes=["r"], class_names=["bg", "R"], max_count=17)
    return read_manifest(str(root))


@pytest.mark.parametrize("world, workers", [(1, 0), (3, 0), (3, 2), (5, 1)])
def test_every_sample_once_per_epoch_over_ranks_and_worker_processes(uneven, world, workers):
    keys, steps = collections.Counter(), set()
    for rank in range(world):
        stream = ShardStream(uneven, LoaderConfig(image_size=8, batch_size=4, num_workers=workers,
                                                  shuffle_buffer_mb=0.01),
                             train=True, seed=1, rank=rank, world=world)
        stream.epochs = 1
        batches = [b for b in make_loader(stream, workers) if "image" in b]
        steps.add(len(batches))
        keys.update(k for b in batches for k in b["key"])
    assert steps == {stream.batches_per_epoch()}  # the same number of steps on every rank
    assert set(keys) == {f"k{i:03d}" for i in range(103)}
    repeats = sum(keys.values()) - 103
    assert repeats < world * 4 and max(keys.values()) <= 2  # padding: less than a batch per rank


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """2,000 samples of ~3 KB in 10 shards: enough bytes to see what a resume reads."""
    root = tmp_path_factory.mktemp("big") / "set"
    samples = noise_samples(2000, (24, 40))
    write_shard_set(str(root), samples, rare_classes=["r"], class_names=["bg", "R"], max_count=200)
    return read_manifest(str(root))


def _bytes_read(stream) -> tuple[list, int]:
    before = remote.STATS["bytes_read"]
    batches = [b for b in make_loader(stream, 0) if "image" in b]
    return batches, remote.STATS["bytes_read"] - before


def test_a_resume_reads_only_what_is_left_plus_at_most_one_shard(big):
    def stream(start=None):
        s = ShardStream(big, LoaderConfig(image_size=8, batch_size=20, shuffle_buffer_mb=0.3, interleave=4),
                        train=True, seed=2)
        s.start, s.epochs = start or LoaderState(), 1
        return s

    full, epoch_bytes = _bytes_read(stream())
    assert len(full) == 100 and epoch_bytes >= big.bytes * 0.95
    state = LoaderState()
    for b in full[:70]:
        state.advance(b["position"], 100)
    resumed, resume_bytes = _bytes_read(stream(state))
    assert [b["key"] for b in resumed] == [b["key"] for b in full[70:]]
    shard_bytes = max(s.bytes for s in big.shards)
    # the last 30% of the epoch, plus what the shuffle buffer held, never the 70% already consumed
    assert resume_bytes <= 0.3 * epoch_bytes + shard_bytes, (resume_bytes, epoch_bytes, shard_bytes)


def test_bad_samples_do_not_shift_a_resumed_stream(tmp_path):
    """Positions count emitted samples, bad ones included, so a resume lands on the same next batch."""
    samples = [(f"k{i:03d}", _png(i), 0, "x") for i in range(90)]
    for i in (3, 17, 40, 41):
        samples[i] = (f"bad{i}", b"\x89PNG\r\n\x1a\nbroken", 0, "x")
    write_shard_set(str(tmp_path), samples, rare_classes=["r"], class_names=["bg", "R"], max_count=30)
    m = read_manifest(str(tmp_path))

    def stream(start=None):
        s = ShardStream(m, LoaderConfig(image_size=8, batch_size=5, shuffle_buffer_mb=0.005), train=True, seed=0)
        s.start, s.epochs = start or LoaderState(), 1
        return s

    full = [b for b in stream() if "image" in b]
    state = LoaderState()
    for b in full[:9]:
        state.advance(b["position"], stream().batches_per_epoch())
    resumed = [b for b in stream(state) if "image" in b]
    assert [b["key"] for b in resumed] == [b["key"] for b in full[9:]]
    assert sum(int(b["skipped"][0]) for b in full) == 4


def test_a_class_sorted_source_gives_class_mixed_shards_and_batches(tmp_path):
    """A folder source lists class by class; a shard cut in that order would hold one class. After the build's
    shuffle every background shard holds most classes, and so does every batch."""
    root = tmp_path / "folder"
    for c in range(8):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(40):
            (root / f"c{c}" / f"{i:03d}.png").write_bytes(_png(c * 40 + i))
    spec = BuildSpec(f"folder:{root}", ("c0",), positives_per_class=5, max_count=35)
    m = build_set(ImageFolderSource(str(root)), spec, str(tmp_path / "set"), progress=False)
    stream = ShardStream(m, LoaderConfig(image_size=8, batch_size=16, shuffle_buffer_mb=0.01), train=True, seed=0)
    stream.epochs = 1
    origs = []
    for batch in make_loader(stream, 0):
        origs.append({k.split("_", 1)[0] for k in batch["key"]})  # folder keys start with the class folder
    assert np.mean([len(o) for o in origs]) >= 5  # of 8 classes, in batches of 16
    for info in m.of_kind("background"):
        labels = {json.loads(f["json"])["orig"] for _, f in _iter(m, info)}
        assert len(labels) >= 5


def _iter(manifest, info):
    from data.shards import iter_tar

    with open(os.path.join(manifest.root, info.url), "rb") as f:
        yield from iter_tar(f)


def test_positives_on_s3_are_copied_once_per_node_and_read_by_offset(s3, tmp_path, monkeypatch):
    import uuid

    from conftest import RARE
    from data.sources import FashionMNISTSource

    monkeypatch.setenv("BGSPLIT_CACHE_DIR", str(tmp_path / "cache"))
    spec = BuildSpec("fmnist:test", RARE, subsample=200, seed=0, max_count=16)
    m = build_set(FashionMNISTSource("test"), spec, f"s3://{s3.bucket}/{uuid.uuid4().hex[:8]}/set", progress=False)
    store = PositiveStore(m)
    again = PositiveStore(m)  # a second rank on the node: the copy is reused, not fetched again
    cached = sorted(p for p in os.listdir(tmp_path / "cache" / os.listdir(tmp_path / "cache")[0])
                    if p.endswith(".tar"))
    assert cached == sorted(s.url for s in m.of_kind("positive"))
    assert store.paths == again.paths
    n = len(store.label)
    assert n == sum(m.counts[1:]) and sorted(len(p) for p in store.pools()) == sorted(m.counts[1:])
    table_bytes = sum(a.nbytes for a in (store.shard_of, store.index_of, store.offset, store.size, store.label))
    assert table_bytes <= 40 * n  # offsets and labels, never image bytes
    for row in (0, n // 2, n - 1):
        sample = store.get(row)
        assert int(sample.fields["cls"]) == store.label[row] > 0
    stream = ShardStream(m, LoaderConfig(image_size=8, batch_size=10, sampling="balanced", positive_fraction=0.25,
                                         shuffle_buffer_mb=0.05, num_workers=2),
                         train=True)
    stream.epochs = 1
    labels = np.concatenate([b["label"].numpy() for b in make_loader(stream, 2) if "image" in b])
    assert abs(np.mean(labels > 0) - 0.25) < 0.03


def test_training_loader_workers_live_for_the_whole_run(tiny_sets, tmp_path, monkeypatch):
    """Two loader worker processes start once for a three-epoch run, not once per epoch."""
    import data.loader
    from conftest import tiny_config
    from trainer.train import train

    starts = tmp_path / "starts"
    real = data.loader._forget_inherited_s3_sessions

    def record(worker_id):
        with open(starts, "a") as f:
            f.write(f"{os.getpid()}\n")
        real(worker_id)

    monkeypatch.setattr(data.loader, "_forget_inherited_s3_sessions", record)
    cfg = tiny_config(tiny_sets, tmp_path / "run", "loss.aux_weight=0", "optim.epochs=3", "data.num_workers=2",
                      "data.val=")
    summary = train(cfg)
    assert summary["epochs"] == 3
    assert len(starts.read_text().split()) == 2
