"""A damaged tar header costs its own sample and nothing else: the reader goes on at the next sample's recorded
offset (the shard's completion record). Shards whose record holds no offsets lose the rest of the range, as
they always did, counted once."""
from __future__ import annotations

import io
import json
import logging
import uuid

import numpy as np
import pytest
from PIL import Image

from data import storage
from data.loader import LoaderState, ShardStream
from data.config import LoaderConfig
from data.reader import ShardReader
from data.shards import read_manifest, read_record, write_shard_set

PER_SHARD = 20


def _png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (10, 14), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _build(root: str, shards: int = 3):
    samples = [(f"k{i:03d}", _png(i), 0, "x") for i in range(shards * PER_SHARD)]
    write_shard_set(root, samples, rare_classes=["r"], class_names=["bg", "R"], max_count=PER_SHARD)
    return read_manifest(root)


def _headers(blob: bytes, start: int, end: int) -> list[int]:
    """Offsets of the member headers of the sample stored at blob[start:end]."""
    out, at = [], start
    while at < end:
        out.append(at)
        size = int(blob[at + 124:at + 136].split(b"\0")[0].strip() or b"0", 8)
        at += 512 + -(-size // 512) * 512
    return out


def _damage(m, shard: int, sample: int, member: int, byte: int) -> str:
    """Change one byte of one member header of a sample; returns the sample's key."""
    info = m.shards[shard]
    url = storage.join(m.root, info.url)
    offsets = read_record(m, info)["offsets"]
    blob = bytearray(storage.read_bytes(url))
    header = _headers(bytes(blob), offsets[sample], offsets[sample + 1])[member]
    blob[header + byte] ^= 0x5A
    storage.write_bytes(url, bytes(blob))
    return f"k{shard * PER_SHARD + sample:03d}"


def _read_all(m, **kw) -> tuple[list[str], int, list]:
    batches = list(ShardStream(m, LoaderConfig(image_size=8, batch_size=7, **kw), train=False))
    keys = [k for b in batches for k in b.get("key", [])]
    skipped = [int(sum(int(b["skipped"][i]) for b in batches)) for i in (0, 1)]
    return keys, skipped, [b["skipped_by_shard"] for b in batches if b["skipped_by_shard"]]


# (member, byte): the image's name, mode, size and checksum fields; the 'cls' and 'json' members' headers
DAMAGE = {"first header, name": (0, 2), "first header, mode": (0, 101), "first header, size": (0, 130),
          "first header, checksum": (0, 150), "second member's header": (1, 40), "third member's header": (2, 260)}


@pytest.mark.parametrize("where", sorted(DAMAGE))
def test_one_damaged_header_in_the_middle_of_a_shard_skips_exactly_that_sample(tmp_path, caplog, where):
    m = _build(str(tmp_path / "set"))
    every = [f"k{i:03d}" for i in range(m.count)]
    victim = _damage(m, 1, 9, *DAMAGE[where])
    with caplog.at_level(logging.WARNING, logger="bgsplit.data"):
        keys, (bad_images, bad_shards), by_shard = _read_all(m)
    assert keys == [k for k in every if k != victim]  # every other sample, in order, none twice
    assert (bad_images, bad_shards) == (0, 1)
    assert by_shard == [{"shard-background-000001.tar": {"bad_images": 0, "bad_shards": 1}}]
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 1 and "shard-background-000001.tar" in warned[0] and "number 9" in warned[0]
    if where != "first header, name":  # a damaged name byte garbles the key the warning can give
        assert f"sample {victim} " in warned[0]


@pytest.mark.parametrize("sample", [0, 1, PER_SHARD - 1])
def test_damage_at_a_shard_s_first_second_and_last_sample(tmp_path, sample):
    m = _build(str(tmp_path / "set"), shards=2)
    victim = _damage(m, 0, sample, 0, 101)
    keys, (bad_images, bad_shards), _ = _read_all(m)
    assert keys == [f"k{i:03d}" for i in range(m.count) if f"k{i:03d}" != victim]
    assert (bad_images, bad_shards) == (0, 1)


def test_a_piece_starting_mid_shard_and_damage_in_several_shards(tmp_path):
    m = _build(str(tmp_path / "set"))
    victims = {_damage(m, 0, 7, 0, 101), _damage(m, 1, 3, 1, 101), _damage(m, 1, 12, 2, 101),
               _damage(m, 2, 19, 0, 130)}
    reader = ShardReader(m, m.shards)
    got = list(reader.samples(0, 5, 15))  # a piece that starts and ends mid-shard: one range, resynced inside
    assert len(got) == 10 and [s is None for s in got] == [i == 7 for i in range(5, 15)]
    assert [s.key for s in got if s is not None] == [f"k{i:03d}" for i in range(5, 15) if i != 7]
    keys, (_, bad_shards), _ = _read_all(m)
    assert sorted(keys) == sorted(set(f"k{i:03d}" for i in range(m.count)) - victims)
    assert bad_shards == len(victims)


def test_a_training_epoch_loses_only_the_damaged_sample_and_a_resume_lands_on_the_same_batches(tmp_path):
    m = _build(str(tmp_path / "set"))
    victim = _damage(m, 1, 10, 0, 101)

    def stream(start=None):
        s = ShardStream(m, LoaderConfig(image_size=8, batch_size=6, shuffle_buffer_mb=0.01, interleave=2),
                        train=True, seed=3)
        s.start, s.epochs = start or LoaderState(), 1
        return s

    full = [b for b in stream() if "image" in b]
    seen = [k for b in full for k in b["key"]]
    assert set(seen) == set(f"k{i:03d}" for i in range(m.count)) - {victim}
    state = LoaderState()
    for b in full[:4]:
        state.advance(b["position"], stream().batches_per_epoch())
    assert [b["key"] for b in stream(state) if "image" in b] == [b["key"] for b in full[4:]]


def _drop_offsets(m, shard: int) -> None:
    """A record without offsets, like a shard set whose tars were made elsewhere: nothing to resync by."""
    url = storage.join(m.root, m.shards[shard].record)
    doc = json.loads(storage.read_bytes(url))
    del doc["offsets"]
    storage.write_bytes(url, json.dumps(doc).encode())


@pytest.mark.parametrize("member", [0, 1])
def test_without_offsets_the_rest_of_the_shard_is_lost_as_before_counted_once(tmp_path, caplog, member):
    m = _build(str(tmp_path / "set"))
    _damage(m, 1, 9, member, 101)
    _drop_offsets(m, 1)
    with caplog.at_level(logging.WARNING, logger="bgsplit.data"):
        keys, (bad_images, bad_shards), _ = _read_all(m)
    before = [f"k{i:03d}" for i in range(PER_SHARD + 9)]  # shard 0 and shard 1 up to the damage
    after = [f"k{i:03d}" for i in range(2 * PER_SHARD, 3 * PER_SHARD)]
    assert keys == before + after
    assert bad_shards == 1
    # a damaged second member's header: the sample is passed on without its later members, as webdataset's
    # reader does, and the decoder counts it; a damaged first header: the tar reader stops before the sample
    assert bad_images == (1 if member == 1 else 0)
    lost_from = 9 + member
    assert any(f"unreadable from sample {lost_from} on" in r.getMessage() for r in caplog.records)


def test_resync_on_s3_across_read_ahead_ranges(s3):
    """On SeaweedFS, with read-ahead ranges smaller than the shard: the resync seeks within the prefetched
    ranges and the rest of the shard arrives as usual."""
    m = _build(f"s3://{s3.bucket}/resync/{uuid.uuid4().hex[:8]}", shards=2)
    victims = {_damage(m, 0, 4, 0, 101), _damage(m, 0, 13, 2, 101)}
    m = read_manifest(m.root)
    assert m.shards[0].bytes > 3 * (16 << 10)  # several 16 KiB ranges
    keys, (_, bad_shards), _ = _read_all(m, read_ahead_mb=16 / 1024)
    assert keys == [f"k{i:03d}" for i in range(m.count) if f"k{i:03d}" not in victims]
    assert bad_shards == 2
