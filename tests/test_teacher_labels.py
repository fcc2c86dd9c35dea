"""Teacher labels stored per shard, in sample order: equal to the online teacher's, keyed by the teacher's weights,
refused when made by another teacher or for another build, resumable per shard, and split over ranks."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import RARE, TEACHER_SIZE
from data import storage
from data.build import BuildSpec, build_set
from data.loader import ShardStream
from data.config import LoaderConfig
from data.shards import read_manifest
from data.sources import FashionMNISTSource
from data.teacher_labels import META, TeacherLabels, set_url, shard_labels_url
from s3_server import free_port
from trainer.task import teacher_topk
from conftest import simulated_rank
from trainer.scoring import ScoringConfig
from trainer.teacher_label import LabelPass, label_shard_set, label_spec


def _labels(manifest, teacher, size=TEACHER_SIZE, k=5):
    return TeacherLabels(manifest, label_spec(teacher, size, k))


def test_stored_labels_equal_the_online_teacher_on_the_same_view(tiny_sets, teacher):
    manifest = read_manifest(tiny_sets["test"])
    labels = _labels(manifest, teacher)
    stream = ShardStream(manifest, LoaderConfig(image_size=TEACHER_SIZE, batch_size=64),
                         train=False, teacher_labels=labels)
    total = 0
    for batch in stream:
        idx, prob = teacher_topk(teacher(batch["image"]), 5)
        assert torch.equal(batch["teacher_idx"][:, 0], idx[:, 0])
        assert torch.allclose(batch["teacher_prob"], prob, atol=2e-3)  # fp16 storage
        total += len(batch["key"])
    assert total == manifest.count
    indices, probs = labels.shard(manifest.shards[0].url)
    assert indices.dtype == np.int16 and probs.dtype == np.float16 and indices.shape == (manifest.shards[0].count, 5)


def test_teacher_labels_are_meaningful(tiny_sets, teacher):
    """The real ImageNet teacher splits Fashion-MNIST into many coherent pseudo-classes (not one constant)."""
    manifest = read_manifest(tiny_sets["train"])
    labels = _labels(manifest, teacher)
    top1 = np.concatenate([labels.shard(s.url)[0][:, 0] for s in manifest.shards])
    assert len(top1) == manifest.count and len(np.unique(top1)) >= 10


def test_labels_of_other_weights_size_or_k_are_refused_in_one_line(tiny_sets, teacher):
    manifest = read_manifest(tiny_sets["test"])
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert other.digest() != teacher.digest() and other.arch == teacher.arch
    with pytest.raises(FileNotFoundError, match="made by other weights of efficientnet_lite0") as e:
        _labels(manifest, other)
    assert "\n" not in str(e.value) and "bgsplit teacher-label" in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"no teacher labels for efficientnet_lite0 at 96px, top-5") as e:
        _labels(manifest, teacher, size=96)
    assert f"efficientnet_lite0-{TEACHER_SIZE}px-top5-{teacher.digest()}" in str(e.value)  # says what is there
    with pytest.raises(FileNotFoundError, match="top-3"):
        _labels(manifest, teacher, k=3)


def test_labels_of_another_build_of_the_set_are_refused(tiny_sets, teacher, tmp_path):
    manifest = read_manifest(tiny_sets["test"])
    spec = label_spec(teacher, TEACHER_SIZE, 5)
    meta_url = storage.join(set_url(manifest.root, spec), META)
    meta = json.loads(storage.read_bytes(meta_url))
    try:
        first = next(iter(meta["shards"]))
        storage.write_bytes(meta_url, json.dumps({**meta, "shards": {**meta["shards"], first: 1}}).encode())
        with pytest.raises(ValueError, match="another build"):
            TeacherLabels(manifest, spec)
    finally:
        storage.write_bytes(meta_url, json.dumps(meta).encode())


@pytest.fixture()
def small_set(tmp_path):
    spec = BuildSpec("fmnist:test", RARE, subsample=90, seed=3, max_count=20)
    return build_set(FashionMNISTSource("test"), spec, str(tmp_path / "set"), progress=False)


def test_labelling_resumes_per_shard_and_ranks_split_the_shards(small_set, teacher):
    """Two simulated ranks label disjoint halves; after a crash (one shard file and labels.json gone) a re-run
    labels only that shard; the result equals a single process's labels."""
    m = small_set
    spec = label_spec(teacher, TEACHER_SIZE, 5)
    # rank 1 first (as if it were faster), then rank 0, which publishes the set
    two = LabelPass(location=m.root, scoring=ScoringConfig(TEACHER_SIZE, 128), teacher=teacher)
    shares = {1: simulated_rank(two, 1, 2)}
    done = sorted(os.listdir(set_url(m.root, spec)))
    assert done == sorted(m.shards[i].url.replace(".tar", ".npz") for i in shares[1][0])
    assert 0 < len(shares[1][0]) < len(m.shards)
    shares[0] = simulated_rank(two, 0, 2)
    assert two.publish([shares[0], shares[1]]) == set_url(m.root, spec)
    two_ranks = {s.url: _labels(m, teacher).shard(s.url)[0].copy() for s in m.shards}
    victim = shard_labels_url(m.root, spec, m.shards[1].url)
    os.remove(victim)
    os.remove(storage.join(set_url(m.root, spec), META))
    mtimes = {p: os.path.getmtime(os.path.join(set_url(m.root, spec), p)) for p in os.listdir(set_url(m.root, spec))}
    label_shard_set(teacher, m.root, ScoringConfig(TEACHER_SIZE, 128))
    for name, mtime in mtimes.items():
        assert os.path.getmtime(os.path.join(set_url(m.root, spec), name)) == mtime  # kept, not relabelled
    assert os.path.exists(victim)
    again = _labels(m, teacher)
    for s in m.shards:
        assert np.array_equal(again.shard(s.url)[0], two_ranks[s.url])
    os.remove(storage.join(set_url(m.root, spec), META))
    with pytest.raises(FileNotFoundError):  # every shard labelled, but unpublished: not usable
        TeacherLabels(m, spec)


@pytest.mark.slow
def test_teacher_label_under_torchrun_splits_the_shards_over_two_processes(small_set, teacher):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "cluster.cli", "teacher-label", "--data", small_set.root,
           "--image-size", str(TEACHER_SIZE), "--batch-size", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = label_spec(teacher, TEACHER_SIZE, 5)
    assert proc.stdout.strip().splitlines() == [set_url(small_set.root, spec)]  # rank 0 alone prints
    log = proc.stderr
    assert "rank 0 of 2 labelled" in log and "rank 1 of 2 labelled" in log  # each its share (trainer.shard_pass)
    labels = _labels(small_set, teacher)
    stream = ShardStream(small_set, LoaderConfig(image_size=TEACHER_SIZE, batch_size=64),
                         train=False, teacher_labels=labels)
    for batch in stream:
        assert torch.equal(batch["teacher_idx"][:, 0], teacher_topk(teacher(batch["image"]), 5)[0][:, 0])



def test_training_batches_carry_each_samples_own_labels_positives_included(tiny_sets, teacher):
    """Labels are looked up by position, not key: check every sample of a re-sampled training epoch against the
    labels an evaluation pass gives the same key."""
    manifest = read_manifest(tiny_sets["train"])
    labels = _labels(manifest, teacher)
    by_key = {}
    for batch in ShardStream(manifest, LoaderConfig(image_size=16, batch_size=64), train=False, teacher_labels=labels):
        by_key.update(zip(batch["key"], batch["teacher_idx"]))
    stream = ShardStream(manifest, LoaderConfig(image_size=16, batch_size=16, sampling="balanced",
                                                positive_fraction=0.25, shuffle_buffer_mb=0.05),
                         train=True, teacher_labels=labels)
    stream.epochs = 1
    positives = 0
    for batch in stream:
        for key, label, idx in zip(batch["key"], batch["label"], batch["teacher_idx"]):
            assert torch.equal(idx, by_key[key])
            positives += int(label > 0)
    assert positives > 0.2 * stream.batches_per_epoch() * 16
