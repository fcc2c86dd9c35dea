"""The leak check by content (issue 36): sets record a content hash per image at build time, and the experiment's
check of validation and test against training compares those, so photos/x/x-0000.png and photos-test/x/x-0000.png,
two different images, are no leak, while one image copied under another name is. Sets without content hashes
(older builds) are compared by key, as before, and the warning says how to get the content check."""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from cluster.experiment_data import check_sets
from data.build import BuildSpec, build_set
from data.overlap import CONTENT, KEY, comparable, first_sample, shared
from data.hash_index import CONTENT_INDEX, content_hash, read_content_index
from data.shards import MANIFEST, read_manifest, write_shard_set
from data.sources import ImageFolderSource
from trainer.config import ConfigError

CLASSES = dict(rare_classes=["a"], class_names=["background", "A"])


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), ((37 * seed) % 256, (91 * seed) % 256, (53 * seed + 7) % 256)).save(buf, "PNG")
    return buf.getvalue()


def _set(root, named: dict[str, int]) -> str:
    """A set of ``name -> image seed``; names starting with 'pos' are class A, the rest background."""
    samples = [(k, _png(seed), int(k.startswith("pos")), "A" if k.startswith("pos") else "bg")
               for k, seed in named.items()]
    write_shard_set(str(root), samples, max_count=4, **CLASSES)
    return str(root)


def _old(location: str) -> str:
    """The set as a bgsplit before content hashes left it: no content index in the manifest."""
    path = f"{location}/{MANIFEST}"
    doc = json.loads(open(path).read())
    del doc["content_index"]
    open(path, "w").write(json.dumps(doc))
    return location


@pytest.fixture
def sets(tmp_path):
    train = {f"pos-{i:04d}": i for i in range(3)} | {f"bg-{i:04d}": 100 + i for i in range(6)}
    # same file names as training, other images (a camera's IMG_0001.jpg in every folder)
    same_names = {f"pos-{i:04d}": 50 + i for i in range(2)} | {f"bg-{i:04d}": 200 + i for i in range(4)}
    # one training image copied under a new name, among new images
    copied = {"pos-x": 60, "pos-y": 61, "bg-renamed": 102, "bg-z": 300}
    return {"mine": _set(tmp_path / "train", train), "val": _set(tmp_path / "val", same_names),
            "test": _set(tmp_path / "test", same_names), "copied": _set(tmp_path / "copied", copied)}


def test_a_set_records_the_content_hash_of_every_image(sets):
    index = read_content_index(read_manifest(sets["mine"]))
    want = np.unique(np.array([content_hash(_png(s)) for s in [0, 1, 2, 100, 101, 102, 103, 104, 105]],
                              dtype=np.uint64))
    assert np.array_equal(index, want) and json.loads(open(f"{sets['mine']}/{MANIFEST}").read())[
        "content_index"] == {"file": CONTENT_INDEX, "count": 9}


def test_same_name_other_bytes_is_no_leak_and_same_bytes_other_name_is(sets):
    good = {k: sets[k] for k in ("mine", "val", "test")}
    facts = check_sets(good, ["mine"])  # every validation and test name is a training name: no leak
    assert facts["test"]["count"] == 6
    with pytest.raises(ConfigError, match=r"data.sets.test \(.*copied\) shares 1 image\(s\) \(the same bytes\) with "
                                          r"data.sets.train\['mine'\] \(first: bg-renamed\)") as e:
        check_sets({**good, "test": sets["copied"]}, ["mine"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"data.sets.val .* shares 1 image\(s\) \(the same bytes\)"):
        check_sets({**good, "val": sets["copied"]}, ["mine"])


def test_a_set_without_content_hashes_falls_back_to_keys_and_says_how_to_compare_content(sets, caplog):
    _old(sets["test"])
    with caplog.at_level(logging.WARNING, logger="bgsplit.data"):
        with pytest.raises(ConfigError, match=r"data.sets.val .* shares 6 image key\(s\) \(by file name: .*rebuild "
                                              r"them with `bgsplit shards build` into a new folder .*to compare by "
                                              r"content\) with data.sets.train\[.mine.\] \(first: pos-0000\)"):
            check_sets({k: sets[k] for k in ("mine", "val", "test")}, ["mine"])
    assert "data.sets.test records no content hashes" in caplog.text
    hashes = comparable([sets["mine"], sets["test"]])
    assert {h.by for h in hashes.values()} == {KEY}
    assert shared(hashes[sets["mine"]], hashes[sets["test"]]).size == 6


def test_the_first_shared_image_is_named_by_its_record(sets):
    hashes = comparable([sets["mine"], sets["copied"]])
    assert {h.by for h in hashes.values()} == {CONTENT}
    common = shared(hashes[sets["copied"]], hashes[sets["mine"]])
    assert first_sample(sets["copied"], common, CONTENT) == "bg-renamed"
    assert first_sample(sets["mine"], common, CONTENT) == "bg-0002"


def test_a_built_set_hashes_the_source_bytes_so_resizing_keeps_the_hash(tmp_path):
    """The content hash is of the file as read, so a set stored re-encoded (--resize-short-side) and one stored as
    is still match on the same photo."""
    root = tmp_path / "photos"
    for cls, n in (("a", 3), ("bg", 4)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 30), (i * 40, 90, 7)).save(root / cls / f"IMG_{i:04d}.png")
    src = ImageFolderSource(root)
    big = build_set(src, BuildSpec(f"folder:{root}", ("a",)), str(tmp_path / "as-is"), progress=False)
    small = build_set(src, BuildSpec(f"folder:{root}", ("a",), resize_short_side=16), str(tmp_path / "small"),
                      progress=False)
    files = sorted(root.rglob("*.png"))
    want = np.unique(np.array([content_hash(p.read_bytes()) for p in files], dtype=np.uint64))
    assert np.array_equal(read_content_index(big), want) and np.array_equal(read_content_index(small), want)


def _oldest(location: str) -> str:
    """The set as the first bgsplit left it: no key or content index, no hashes in its shards' records, so every
    key comes from reading its shards."""
    path = f"{location}/{MANIFEST}"
    doc = json.loads(open(path).read())
    doc.pop("content_index", None), doc.pop("key_index", None)
    open(path, "w").write(json.dumps(doc))
    manifest = read_manifest(location)
    for shard in manifest.shards:
        record = f"{location}/{shard.record}"
        rec = json.loads(open(record).read())
        rec.pop("key_hashes", None), rec.pop("content_hashes", None)
        open(record, "w").write(json.dumps(rec))
    return location


def test_reading_the_shards_finds_the_overlap_the_key_index_finds(sets, caplog):
    """One key-overlap test (issue 33): the key index, and for a set without one the same hashes of the keys its
    shards hold; both give the same shared keys and name the same first one."""
    from data.overlap import SetHashes, key_index_of

    held = [sets["val"], sets["mine"]]
    common = shared(*(SetHashes(loc, KEY, key_index_of(loc)) for loc in held))  # by their key indexes
    named = first_sample(sets["val"], common, KEY)
    for loc in held:
        _oldest(loc)
    with caplog.at_level(logging.WARNING, logger="bgsplit.data"):
        read = comparable(held)
    assert all(read[loc].by == KEY for loc in held) and "no key index" in caplog.text
    assert np.array_equal(shared(read[held[0]], read[held[1]]), common) and common.size == 6
    assert first_sample(sets["val"], common, KEY) == named == "pos-0000"


def test_overlap_is_tested_in_one_module():
    """Keys read from shards to test overlap: data.overlap alone (mine's exclusion and the experiment's leak check
    call it)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    users = {str(p.relative_to(root)) for d in ("data", "trainer", "cluster") for p in (root / d).rglob("*.py")
             if "keys_of(" in p.read_text() or "intersect1d(" in p.read_text()}
    assert users == {"data/overlap.py"}
