"""A source's listing as columns: the same items a list held, a selection as indices into it, a shard task that
pickles only its own items, and duplicates still found (data.sources.listing)."""
import pickle

import numpy as np
import pytest

from data.bg_construction import main_labels_for
from data.ingest import ShardItems
from data.sources import Listing, SourceItem, positions


def _items(n):
    return [SourceItem(key=f"k{i:05d}", label=f"c{i % 7}", split=("train", "val")[i % 2],
                       ref=(f"s3://b/shards/src-{i // 100:04d}.tar\t{512 * i}\t{300 + i}" if i % 3 else
                            f"/data/photos/c{i % 7}/img {i}.jpg")) for i in range(n)]


def test_the_listing_holds_exactly_the_items_in_order():
    items = _items(1000)
    listing = Listing.from_items(items)
    assert len(listing) == 1000 and listing == items and list(listing) == items
    assert listing[0] == items[0] and listing[-1] == items[-1] and listing[10:20] == items[10:20]
    with pytest.raises(IndexError):
        listing[1000]
    picked = np.array([999, 0, 500, 500, 3])
    assert listing.take(picked) == [items[i] for i in picked]
    assert listing.take(np.array([], dtype=np.int64)) == []
    assert main_labels_for(listing.labels, ["c3", "c5"]).tolist() == main_labels_for(
        [it.label for it in items], ["c3", "c5"]).tolist()


def test_the_columns_cost_tens_of_bytes_an_item_not_hundreds():
    listing = Listing.from_items(_items(20000))
    # keys of 6 B and ref tails of ~12 B (a WebDataset ref's shard URL is one code) or a file name
    assert listing.nbytes() / len(listing) < 40


def test_a_code_column_widens_when_its_table_outgrows_a_byte():
    # 70,000 files in 70,000 folders: 70,000 heads need 4-byte codes, 7 labels and 2 splits stay at 1 byte
    items = [SourceItem(key=f"k{i}", label=f"c{i % 7}", split=("train", "val")[i % 2], ref=f"/d/{i}/a.jpg")
             for i in range(70000)]
    listing = Listing.from_items(items)
    assert listing == items and listing.take(np.array([69999, 256, 255, 65536])) == [
        items[i] for i in (69999, 256, 255, 65536)]
    assert listing.labels.codes.dtype == np.uint8 and listing.nbytes() < 70000 * 30
    few = Listing.from_items(items[:300])
    assert few == items[:300] and few.labels.codes.dtype == np.uint8


def test_selection_and_plan_hold_4_byte_indices_into_the_listing():
    from data.bg_construction import select_bg
    from data.ingest import Resize, plan_shards

    mask = np.random.default_rng(0).random(10000) < 0.3
    assert positions(mask).dtype == np.int32 and positions(mask).tolist() == np.flatnonzero(mask).tolist()
    listing = Listing.from_items(_items(7000))
    sel = select_bg(listing.labels, ["c3", "c5"], positives_per_class=50, seed=1)
    assert sel.indices.dtype == np.int32 and sel.main_labels.dtype == np.int16
    tasks = plan_shards(ShardItems(listing, sel.indices, sel.main_labels), per_shard=400, root="/r", source="s",
                        prefix="p", num_classes=3, spec_hash="h", resize=Resize(0, 90))
    assert {t.items.indices.dtype for t in tasks} == {np.dtype(np.int32)}
    planned = sorted(it.key for t in tasks for it, _ in t.items)
    assert planned == sorted(listing.key(int(i)) for i in sel.indices)  # every selected item once


def test_a_shard_task_pickles_its_own_items_only():
    listing = Listing.from_items(_items(5000))
    chosen = ShardItems(listing, np.arange(0, 5000, 2), np.arange(2500) % 3)
    shard = chosen.subset(np.arange(10, 20))
    assert [(it.key, lab) for it, lab in shard] == [(f"k{2 * i:05d}", i % 3) for i in range(10, 20)]
    wire = pickle.dumps(shard)
    assert len(wire) < 3000 < len(pickle.dumps(listing))  # 10 items travel, not the 5,000 of the listing
    back = pickle.loads(wire)
    assert list(back) == list(shard) and len(back.listing) == 10


def test_a_duplicate_key_is_named():
    items = _items(300)
    items.append(SourceItem(key="k00042", label="c1", split="", ref="/x.jpg"))
    with pytest.raises(ValueError, match="duplicate key 'k00042' in here; every image must appear once"):
        Listing.from_items(items).check_unique_keys("here")
    Listing.from_items(_items(300)).check_unique_keys("here")


def test_a_builder_absorbs_another_renumbering_its_codes_and_widening_ours():
    from data.sources import ListingBuilder

    # the second part lists its labels in another order and brings 300 new folders, so our head codes outgrow a byte
    first = [SourceItem(key=f"a{i}", label=("cat", "dog")[i % 2], split="", ref=f"/a/{i % 3}/x.jpg") for i in range(50)]
    second = [SourceItem(key=f"b{i}", label=("dog", "eel", "cat")[i % 3], split="v", ref=f"/b/{i}/y.jpg")
              for i in range(300)]
    ours, theirs = ListingBuilder(), ListingBuilder()
    ours.extend(first)
    theirs.extend(second)
    ours.absorb(theirs)
    listing = ours.build()
    assert listing == first + second and listing.labels.names == ["cat", "dog", "eel"]
    assert listing.labels.codes.tolist() == Listing.from_items(first + second).labels.codes.tolist()
    empty = ListingBuilder()
    empty.absorb(ListingBuilder())
    assert len(empty.build()) == 0


def test_items_whose_hashes_collide_are_told_apart_by_their_keys(monkeypatch):
    listing = Listing.from_items(_items(50))
    listing.check_unique_keys("here")
    # every key hashed alike: each hash repeats, so every item is a candidate and only its key can clear it
    monkeypatch.setattr(Listing, "_key_hashes", lambda self: np.full(len(self), 7, dtype=np.uint64))
    listing.check_unique_keys("here")
    twice = Listing.from_items(_items(50) + _items(50)[30:31])
    real = Listing._key_hashes
    monkeypatch.setattr(Listing, "_key_hashes", lambda self: real(self) % np.uint64(4))  # collisions and a repeat
    with pytest.raises(ValueError, match="duplicate key 'k00030' in here"):
        twice.check_unique_keys("here")


def test_front_coded_text_reads_back_every_string_whatever_it_shares():
    from data.sources.listing import TextBuilder

    rng = np.random.default_rng(3)
    long = "x" * 300
    values = ["", "", "a", "ab", "abc", "ab", "é1", "è2", "日本", "日本語", long, long + "y", long[:-1], "z" * 9000,
              *(f"raw-{i // 37:06d}/{rng.integers(0, 10 ** 6):07d}" for i in range(500))]
    values = [v.encode() for v in values]
    first, second = TextBuilder(), TextBuilder()
    for v in values[:23]:  # 23: the absorbed strings start mid-block
        first.append(v)
    for v in values[23:]:
        second.append(v)
    first.absorb(second)
    column = first.build()
    assert list(column) == values and [column[i] for i in range(len(values))] == values
    assert column.lengths.dtype == np.uint16  # a suffix of 300 B widened the lengths
    picked = rng.integers(0, len(values), 400)
    assert list(column.take(picked)) == [values[i] for i in picked]
    assert list(column.take(np.sort(picked))) == [values[i] for i in np.sort(picked)]
    assert list(TextBuilder().build()) == [] and len(column.take(np.zeros(0, np.int64))) == 0


def test_keys_that_share_a_prefix_cost_their_suffix():
    # 100k WebDataset-like keys: 31 characters, of which consecutive ones share all but the last digits
    items = [SourceItem(key=f"raw-{i // 10000:06d}/{i:020d}", label="", split="", ref=f"s3://b/r.tar\t{4608 * i}\t4096")
             for i in range(100000)]
    listing = Listing.from_items(items)
    assert listing._keys.nbytes() / len(listing) < 8 and listing.nbytes() / len(listing) < 24
    assert listing[99999] == items[99999] and listing.take(np.array([5, 99998, 17])) == [items[5], items[99998],
                                                                                      items[17]]
    backwards = np.arange(99999, -1, -3)  # more than one gather's worth, each string found from its block's start
    assert listing.take(backwards) == [items[i] for i in backwards]
