"""Cached teacher labels equal the online teacher's on the same (centre-crop) view."""
import numpy as np
import pytest

from conftest import TEACHER_SIZE
from data.loader import ShardStream
from data.shards import read_manifest
from data.teacher_cache import TeacherCache, cache_name
from data import storage
from trainer.task import teacher_topk


def test_cached_and_online_top1_agree(tiny_sets, teacher):
    manifest = read_manifest(tiny_sets["test"])
    cache = TeacherCache(storage.join(manifest.root, cache_name("efficientnet_lite0", TEACHER_SIZE, 5)))
    assert len(cache) == manifest.count
    stream = ShardStream(manifest, train=False, image_size=TEACHER_SIZE, batch_size=64)
    agree = total = 0
    for batch in stream:
        idx, prob = teacher_topk(teacher(batch["image"]), 5)
        cached = np.stack([cache.get(k)[0] for k in batch["key"]])
        cached_p = np.stack([cache.get(k)[1] for k in batch["key"]])
        agree += int((idx[:, 0].numpy() == cached[:, 0]).sum())
        total += len(batch["key"])
        assert np.allclose(prob.numpy(), cached_p, atol=2e-3)  # fp16 storage
    assert total == manifest.count and agree == total
    assert cache.indices.dtype == np.int16 and cache.probs.dtype == np.float16


def test_teacher_labels_are_meaningful(tiny_sets):
    """The real ImageNet teacher splits Fashion-MNIST into many coherent pseudo-classes (not one constant)."""
    manifest = read_manifest(tiny_sets["train"])
    cache = TeacherCache(storage.join(manifest.root, cache_name("efficientnet_lite0", TEACHER_SIZE, 5)))
    assert len(np.unique(cache.indices[:, 0])) >= 10


def test_missing_cache_entry_is_skipped_and_counted(tiny_sets, tmp_path):
    from data.teacher_cache import write_cache

    manifest = read_manifest(tiny_sets["test"])
    full = TeacherCache(storage.join(manifest.root, cache_name("efficientnet_lite0", TEACHER_SIZE, 5)))
    keys = [str(k) for k in full.keys]
    url = str(tmp_path / "partial.npz")
    write_cache(url, keys[5:], full.indices[5:], full.probs[5:], {})
    stream = ShardStream(manifest, train=False, image_size=16, batch_size=50, teacher_cache=TeacherCache(url))
    batches = list(stream)
    assert sum(len(b.get("key", [])) for b in batches) == manifest.count - 5
    assert sum(int(b["skipped"][1]) for b in batches) == 5


def test_missing_cache_file_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="bgsplit teacher-label"):
        TeacherCache(str(tmp_path / "nope.npz"))
