"""A shard rewritten while an epoch reads it: the reader notices (its size against the shard's record, its version,
S3's ETag or a local file's inode/size/mtime, against the one the epoch first read) and skips the rest of that
shard for the epoch, with one count and one warning naming it. Samples of two versions never meet in one epoch.

Run on the suite's SeaweedFS (the object replaced by a real PUT) and on a local folder (rewritten in place)."""
from __future__ import annotations

import io
import logging
import uuid

import numpy as np
import pytest
from PIL import Image

from data import remote, storage
from data.config import LoaderConfig
from data.loader import ShardStream
from data.reader import ShardReader
from data.shards import read_manifest, read_record, write_shard_set

PER_SHARD = 20


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(params=["local", "s3"])
def shard_set(request, tmp_path):
    root = (f"s3://{request.getfixturevalue('s3').bucket}/changed/{uuid.uuid4().hex[:8]}"
            if request.param == "s3" else str(tmp_path / "set"))
    write_shard_set(root, [(f"k{i:03d}", _png(i), 0, "x") for i in range(2 * PER_SHARD)], rare_classes=["r"],
                    class_names=["bg", "R"], max_count=PER_SHARD)
    return read_manifest(root)


def _rewrite(m, shard: int, sample: int, grow: int = 0) -> None:
    """Another version of a shard: one byte of a sample's image data changed (same size: only the version
    tells), ``grow`` bytes more (a rebuilt shard of another size). Locally in place, as a careless rebuild does."""
    url = storage.join(m.root, m.shards[shard].url)
    offsets = read_record(m, m.shards[shard])["offsets"]
    blob = bytearray(storage.read_bytes(url))
    blob[offsets[sample + 1] - 600] ^= 0xFF  # inside the sample's last member's data, not a header
    blob += b"\0" * grow
    if remote.is_remote(url):
        storage.write_bytes(url, bytes(blob))
    else:
        with open(url, "r+b") as f:
            f.write(bytes(blob))


def _truth(m, shard: int) -> list[tuple[str, dict]]:
    return [(s.key, s.fields) for s in ShardReader(m, m.shards, read_ahead_mb=0).samples(shard, 0, PER_SHARD)]


def test_a_shard_rewritten_between_two_pieces_of_an_epoch_is_skipped_once_and_named(shard_set, caplog):
    m = shard_set
    before, other = _truth(m, 0), _truth(m, 1)
    counted: list[str] = []
    reader = ShardReader(m, m.shards, on_bad_shard=counted.append)
    first = list(reader.samples(0, 0, 10))  # one worker's piece, read at the first version
    assert [(s.key, s.fields) for s in first] == before[:10]
    _rewrite(m, 0, 15)
    with caplog.at_level(logging.WARNING, logger="bgsplit.data"):
        second = list(reader.samples(0, 10, PER_SHARD))  # the next piece: the other version is never read
        again = list(reader.samples(0, 0, 5))  # and nothing more of that shard in this epoch
        rest = list(reader.samples(1, 0, PER_SHARD))
    assert second == [None] * 10 and again == [None] * 5
    assert [(s.key, s.fields) for s in rest] == other  # the other shard is untouched
    assert counted == [m.shards[0].url]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and m.shards[0].url in warned[0] and "changed while it was being read" in warned[0]


def test_a_shard_of_another_size_than_its_record_is_skipped_whole_with_a_count(shard_set, caplog):
    m = shard_set
    _rewrite(m, 1, 3, grow=1024)
    with caplog.at_level(logging.WARNING, logger="bgsplit.data"):
        batches = list(ShardStream(m, LoaderConfig(image_size=8, batch_size=6), train=False))
    keys = [k for b in batches for k in b.get("key", [])]
    assert keys == [f"k{i:03d}" for i in range(PER_SHARD)]  # shard 0 whole, nothing of shard 1
    assert [int(sum(int(b["skipped"][i]) for b in batches)) for i in (0, 1)] == [0, 1]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and m.shards[1].url in warned[0] and "where its record says" in warned[0]


def test_an_object_replaced_under_a_running_reader_never_mixes_versions(s3):
    """On S3 with read-ahead ranges of 16 KiB, the object is replaced after a few samples: what was already
    fetched is the first version and is passed on; the first range of the new version stops the shard."""
    root = f"s3://{s3.bucket}/changed/{uuid.uuid4().hex[:8]}"
    write_shard_set(root, [(f"k{i:03d}", _png(i), 0, "x") for i in range(PER_SHARD)], rare_classes=["r"],
                    class_names=["bg", "R"], max_count=PER_SHARD)
    m = read_manifest(root)
    before = _truth(m, 0)
    assert m.shards[0].bytes > 5 * (16 << 10)  # several ranges
    counted: list[str] = []
    reader = ShardReader(m, m.shards, on_bad_shard=counted.append, read_ahead_mb=16 / 1024)
    samples = reader.samples(0, 0, PER_SHARD)
    got = [next(samples) for _ in range(3)]
    for i in range(3, PER_SHARD):
        _rewrite(m, 0, i)  # the new version differs in every later sample
    got += list(samples)
    assert len(got) == PER_SHARD and got[:3] != [None] * 3
    read = [i for i, s in enumerate(got) if s is not None]
    assert read == list(range(len(read))) and len(read) < PER_SHARD  # a prefix, then the rest skipped
    assert [(got[i].key, got[i].fields) for i in read] == before[:len(read)]  # every one of the first version
    assert counted == [m.shards[0].url]
