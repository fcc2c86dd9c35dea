"""Every header field, every position: one damaged member header costs exactly its own sample.

Issue 35 found two ways a damaged header cost more than that. A range whose last sample had a damaged later
member handed that sample on without the member (the tar reader stops silently at a bad header, which looked
like the range's normal end), and an exact epoch's padding cycle, which reads a worker's pieces again, counted
the same damaged sample a second time (113 "lost" for 101 damaged). Each case here damages one byte of one
header field of the first or last member of the first, a middle or the last sample of a shard, and reads the set
as a whole, as ranges that end, start and surround the damage, and as a training epoch that pads.
"""
from __future__ import annotations

import io
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from data import storage
from data.config import LoaderConfig
from data.loader import ShardStream
from data.reader import ShardReader
from data.shards import read_manifest, read_record, write_shard_set

PER_SHARD = 12
SHARDS = 2
FIELDS = {"name": 2, "mode": 101, "size": 130, "checksum": 150, "typeflag": 156}
"""A byte inside each ustar header field (name 0-99, mode 100-107, size 124-135, chksum 148-155, typeflag 156)."""
POSITIONS = {"first": 0, "middle": PER_SHARD // 2, "last": PER_SHARD - 1}
MEMBERS = {"first": 0, "last": -1}


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (9, 11), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One small set built once, and what every sample reads as before any damage."""
    root = tmp_path_factory.mktemp("damage") / "set"
    samples = [(f"k{i:03d}", _png(i), 0, "x") for i in range(SHARDS * PER_SHARD)]
    write_shard_set(str(root), samples, rare_classes=["r"], class_names=["bg", "R"], max_count=PER_SHARD)
    m = read_manifest(str(root))
    reader = ShardReader(m, m.shards)
    truth = [[(s.key, s.fields) for s in reader.samples(i, 0, PER_SHARD)] for i in range(SHARDS)]
    assert [k for shard in truth for k, _ in shard] == [s[0] for s in samples]
    return root, truth


def _member_headers(blob: bytes, start: int, end: int) -> list[int]:
    out, at = [], start
    while at < end:
        out.append(at)
        at += 512 + -(-int(blob[at + 124:at + 136].split(b"\0")[0].strip() or b"0", 8) // 512) * 512
    return out


def _damaged_copy(pristine, tmp_path, shard: int, sample: int, member: int, byte: int):
    src, _ = pristine
    shutil.copytree(src, tmp_path / "set")
    m = read_manifest(str(tmp_path / "set"))
    url = storage.join(m.root, m.shards[shard].url)
    offsets = read_record(m, m.shards[shard])["offsets"]
    blob = bytearray(storage.read_bytes(url))
    headers = _member_headers(bytes(blob), offsets[sample], offsets[sample + 1])
    assert len(headers) >= 2  # first and last member are different headers
    blob[headers[member] + byte] ^= 0x5A
    storage.write_bytes(url, bytes(blob))
    return m


@pytest.mark.parametrize("member", sorted(MEMBERS))
@pytest.mark.parametrize("position", sorted(POSITIONS))
@pytest.mark.parametrize("field", sorted(FIELDS))
def test_one_damaged_header_field_loses_exactly_its_sample(pristine, tmp_path, caplog, field, position, member):
    shard, victim = 1, POSITIONS[position]
    m = _damaged_copy(pristine, tmp_path, shard, victim, MEMBERS[member], FIELDS[field])
    truth = pristine[1]
    # ranges as training pieces cut them: the whole shard, ending at, starting at and around the damaged sample
    ranges = {(0, PER_SHARD), (0, victim + 1), (victim, PER_SHARD),
              (max(victim - 1, 0), min(victim + 2, PER_SHARD))}
    for start, stop in sorted(ranges):
        counted = []
        got = list(ShardReader(m, m.shards, on_bad_shard=counted.append).samples(shard, start, stop))
        assert len(got) == stop - start, (start, stop)
        for index, sample in zip(range(start, stop), got):
            if index == victim:
                assert sample is None, (start, stop)  # never passed on with a member missing
            else:
                assert sample is not None and (sample.key, sample.fields) == truth[shard][index], (start, stop, index)
        assert counted == [m.shards[shard].url], (start, stop)
    # the whole set, read once as evaluation reads it: the other shard is untouched, one count, one warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bgsplit.data"):
        batches = list(ShardStream(m, LoaderConfig(image_size=8, batch_size=5), train=False))
    keys = [k for b in batches for k in b.get("key", [])]
    assert keys == [k for s in truth for k, _ in s if k != truth[shard][victim][0]]
    assert [int(sum(int(b["skipped"][i]) for b in batches)) for i in (0, 1)] == [0, 1]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


@pytest.mark.parametrize("victims", [(0,), (0, 1)])
def test_padding_that_reads_a_damaged_sample_again_counts_it_once(pristine, tmp_path, caplog, victims):
    """An exact epoch pads by reading the worker's first pieces again, so the damaged first samples are read
    twice. The count is of samples lost (one each, once), and training still gets its planned batches."""
    src, truth = pristine
    shutil.copytree(src, tmp_path / "set")
    m = read_manifest(str(tmp_path / "set"))
    for shard in range(SHARDS):
        url = storage.join(m.root, m.shards[shard].url)
        blob = bytearray(storage.read_bytes(url))
        offsets = read_record(m, m.shards[shard])["offsets"]
        for v in victims:
            blob[offsets[v] + FIELDS["name"]] ^= 0x5A
        storage.write_bytes(url, bytes(blob))
    lost = {truth[s][v][0] for s in range(SHARDS) for v in victims}
    # 24 samples, batches of 5: 5 steps, 25 emits, so the lost ones and one more are padding, read from the
    # first piece's start (no shuffle, one piece at a time): its damaged samples are read a second time
    stream = ShardStream(m, LoaderConfig(image_size=8, batch_size=5, shuffle_buffer_mb=0, interleave=1),
                         train=True, seed=0)
    stream.epochs = 1
    with caplog.at_level(logging.WARNING, logger="bgsplit.data"):
        batches = [b for b in stream if "image" in b]
    keys = [k for b in batches for k in b["key"]]
    assert len(batches) == stream.batches_per_epoch() == 5
    assert set(keys) == {k for s in truth for k, _ in s} - lost  # every good sample, none of the damaged
    assert len(keys) - len(set(keys)) == 1 + len(lost)  # the padding: read again, damaged ones skipped again
    assert sum(int(b["skipped"][1]) for b in batches) == len(lost)
    assert len([r for r in caplog.records if "damaged" in r.getMessage()]) == len(lost)
