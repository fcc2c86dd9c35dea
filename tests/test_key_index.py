"""A set's key index (keys.npy, written with the set before its manifest) and `mine --exclude` reading it: 8
bytes a key and one read per set, instead of every shard's bytes in every rank or Ray task."""
import json
import logging

import numpy as np
import pytest

from data import storage
from data.hash_index import KEY_INDEX, _sorted_unique, key_hashes, read_key_index
from data.shards import MANIFEST, read_manifest, write_shard_set
from test_shards import _samples
from data.overlap import keys_of
from trainer.mine import ExcludedKeys

CLASSES = dict(rare_classes=["a", "b"], class_names=["background", "A", "B"])


def test_the_index_is_written_with_the_set_sorted_one_entry_a_key(tmp_path):
    m = write_shard_set(str(tmp_path), _samples(57), max_count=10, **CLASSES)
    doc = json.loads((tmp_path / MANIFEST).read_text())
    assert doc["key_index"] == {"file": KEY_INDEX, "count": 57}
    index = read_key_index(read_manifest(str(tmp_path)))
    assert index.dtype == np.uint64 and np.all(np.diff(index.astype(object)) > 0)  # sorted, unique
    assert np.array_equal(index, np.sort(key_hashes(keys_of([str(tmp_path)]))))
    assert (tmp_path / KEY_INDEX).stat().st_mtime_ns <= (tmp_path / MANIFEST).stat().st_mtime_ns
    assert m.key_index == doc["key_index"]


def test_a_failed_build_leaves_neither_index_nor_manifest(tmp_path):
    def failing():
        yield from _samples(25)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_shard_set(str(tmp_path), failing(), max_count=10, **CLASSES)
    assert not (tmp_path / MANIFEST).exists() and not (tmp_path / KEY_INDEX).exists()


def test_exclusion_by_index_drops_exactly_the_sets_keys(tmp_path):
    a = write_shard_set(str(tmp_path / "a"), _samples(40), max_count=10, **CLASSES)
    b = write_shard_set(str(tmp_path / "b"), [(f"x{i}", *s[1:]) for i, s in enumerate(_samples(30))],
                        max_count=7, **CLASSES)
    excluded = ExcludedKeys([a.root, b.root])
    assert len(excluded) == 70
    asked = [f"s{i:04d}" for i in range(0, 60, 3)] + ["x3", "x29", "x30", "y1", ""]
    old = keys_of([a.root, b.root])  # the old way: every shard read, keys as strings
    assert excluded.contains(asked).tolist() == [k in old for k in asked]
    assert excluded.contains([]).shape == (0,) and not ExcludedKeys([]).contains(["s0000"]).any()


def test_a_set_without_an_index_still_excludes_and_says_how_to_get_one(tmp_path, caplog):
    m = write_shard_set(str(tmp_path), _samples(20), max_count=10, **CLASSES)
    doc = json.loads((tmp_path / MANIFEST).read_text())
    del doc["key_index"]  # as an older bgsplit wrote it
    (tmp_path / MANIFEST).write_text(json.dumps(doc))
    (tmp_path / KEY_INDEX).unlink()
    assert read_manifest(m.root).key_index is None and read_key_index(read_manifest(m.root)) is None
    with caplog.at_level(logging.WARNING, logger="bgsplit.mine"):
        excluded = ExcludedKeys([m.root])
    assert excluded.contains(["s0003", "s0020"]).tolist() == [True, False]
    assert "has no key index" in caplog.text and "bgsplit shards build" in caplog.text


def test_an_index_that_does_not_match_its_manifest_is_not_trusted(tmp_path, caplog):
    m = write_shard_set(str(tmp_path), _samples(20), max_count=10, **CLASSES)
    storage.write_bytes(str(tmp_path / KEY_INDEX), b"not an npy file")
    with caplog.at_level(logging.WARNING, logger="bgsplit.data"):
        assert read_key_index(read_manifest(m.root)) is None
    assert "unreadable" in caplog.text
    np.save(tmp_path / KEY_INDEX, np.zeros(3, np.uint64))  # another count than the manifest's
    assert read_key_index(read_manifest(m.root)) is None
    assert ExcludedKeys([m.root]).contains(["s0007"]).tolist() == [True]  # the shards decide then


def test_a_sets_identity_for_stored_results_ignores_its_key_index(tmp_path):
    """An experiment's stored runs are keyed by their sets' manifests: a set rebuilt by this version (with an
    index) must keep the identity it had without one, or every committed result would be run again."""
    from data.shards import manifest_identity

    m = write_shard_set(str(tmp_path), _samples(20), max_count=10, **CLASSES)
    with_index = manifest_identity(m.root)
    doc = json.loads((tmp_path / MANIFEST).read_text())
    del doc["key_index"]
    del doc["content_index"]  # nor its content index (issue 36): a set from before either keeps its identity
    (tmp_path / MANIFEST).write_text(json.dumps(doc))
    assert manifest_identity(m.root) == with_index
    doc["counts"][0] += 1
    (tmp_path / MANIFEST).write_text(json.dumps(doc))
    assert manifest_identity(m.root) != with_index


def test_the_index_is_sorted_and_unique_as_np_unique_gives_it():
    rng = np.random.default_rng(0)
    for values in (np.zeros(0, np.uint64), np.array([7], np.uint64), rng.integers(0, 50, 1000).astype(np.uint64),
                   rng.integers(0, 2 ** 63, 1000).astype(np.uint64)):
        assert _sorted_unique(values.copy()).tolist() == np.unique(values).tolist()
