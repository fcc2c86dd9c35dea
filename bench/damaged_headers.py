"""What one damaged tar header costs: change one byte of one member header of one sample in each of N shards of a
built set, read the set once (ShardStream, evaluation order: every sample once, or with --train one training
epoch, which pads by reading pieces again) and count the good samples lost and the skips counted. With recorded
offsets the reader resyncs at the next sample, so both should equal the samples damaged.

    OMP_NUM_THREADS=1 .venv/bin/python bench/damaged_headers.py --shards 101 --per-shard 12 [--json OUT]
    # issue 35's case: the name field of a member of each shard's 6th sample, one training epoch
    OMP_NUM_THREADS=1 .venv/bin/python bench/damaged_headers.py --shards 101 --per-shard 30 --sample 5 \
        --field name --train
"""
import argparse
import io
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.loader import ShardStream  # noqa: E402
from data.config import LoaderConfig
from data.shards import read_manifest, read_record, write_shard_set  # noqa: E402


FIELDS = {"name": (0, 100), "mode": (100, 108), "size": (124, 136), "checksum": (148, 156), "typeflag": (156, 157)}
"""Byte ranges of the ustar header fields a damaged byte can be put in (--field)."""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", type=int, default=101)
    p.add_argument("--per-shard", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", type=int, default=-1, help="the damaged sample's index in each shard (-1: random)")
    p.add_argument("--member", type=int, default=-2, help="the damaged member of it (-2: random; -1: the last)")
    p.add_argument("--field", choices=["any", *FIELDS], default="any",
                   help="the header field the changed byte lies in (any: a random byte of the header)")
    p.add_argument("--train", action="store_true", help="read one training epoch (exact, padded) instead")
    p.add_argument("--json", default="", help="write one row: shards, samples, damaged, read, lost, good_lost")
    a = p.parse_args()
    logging.disable(logging.WARNING)
    rng = np.random.default_rng(a.seed)
    root = Path(tempfile.mkdtemp(prefix="issue19-damage-")) / "set"
    samples = []
    for i in range(a.shards * a.per_shard):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (12, 10), dtype=np.uint8)).save(buf, format="PNG")
        samples.append((f"s{i:05d}", buf.getvalue(), 0, "x"))
    write_shard_set(str(root), samples, rare_classes=["r"], class_names=["bg", "R"], max_count=a.per_shard)
    m = read_manifest(str(root))
    damaged = set()
    for info in m.shards:
        offsets = read_record(m, info)["offsets"]
        path = root / info.url
        blob = bytearray(path.read_bytes())
        j = int(rng.integers(len(offsets) - 1)) if a.sample < 0 else a.sample  # the damaged sample
        # its member headers: walk them from the sample's offset
        headers, at = [], offsets[j]
        while at < offsets[j + 1]:
            size = int(blob[at + 124:at + 136].split(b"\0")[0].strip() or b"0", 8)
            headers.append(at)
            at += 512 + -(-size // 512) * 512
        h = headers[int(rng.integers(len(headers))) if a.member == -2 else a.member]
        lo, hi = FIELDS.get(a.field, (0, 512))
        byte = h + int(rng.integers(lo, hi))
        blob[byte] ^= 1 + int(rng.integers(255))
        path.write_bytes(bytes(blob))
        damaged.add(f"s{int(info.url.rsplit('-', 1)[1].split('.')[0]) * a.per_shard + j:05d}")
    stream = ShardStream(m, LoaderConfig(image_size=8, batch_size=16 if a.train else 64, shuffle_buffer_mb=0.5),
                         train=a.train)
    stream.epochs = 1
    seen, skipped = set(), 0
    for batch in stream:
        seen.update(batch.get("key", []))
        skipped += int(batch["skipped"].sum())
    lost = m.count - len(seen)
    good_lost = len(set(s[0] for s in samples) - seen - damaged)
    print(f"{len(m.shards)} shards x {a.per_shard} samples = {m.count}; one header byte changed in each shard "
          f"({len(damaged)} samples damaged): {len(seen)} read, {lost} lost, of which {good_lost} good samples "
          f"({good_lost / len(damaged):.2f} per damaged one); damaged samples read anyway: "
          f"{len(damaged & seen)}; skip counts {skipped}")
    if a.json:
        row = {"bench": "damaged_headers", "read_as": "training epoch" if a.train else "evaluation",
               "sample": a.sample, "member": a.member, "field": a.field,
               "shards": len(m.shards), "samples": m.count, "damaged": len(damaged),
               "read": len(seen), "lost": lost, "good_lost": good_lost, "skip_counts": skipped}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps([row], indent=1))


if __name__ == "__main__":
    main()
