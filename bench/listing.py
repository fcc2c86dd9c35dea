"""What the `shards build` driver holds a sample before it reads an image, at sizes bench/scale.py cannot write.

bench/scale.py measures the whole build (a 1M-sample source is 5.7 GB of tars here); this one lists synthetic
WebDataset-like items straight into a ``ListingBuilder`` in a fresh process per size, so 10M items fit in a minute,
then selects a -BG set from them and plans its shards as ``build_set`` does. It reports the peak RSS each step
adds over the process after its imports (what the driver pays), the columns' own bytes, and the
``list[SourceItem]`` the columns replaced (``--as-list-up-to``).

    .venv/bin/python bench/listing.py --sizes 1000000,10000000 --json artifacts/bench/listing.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def item(i: int, key_chars: int, random_keys: bool = False):
    """A sample of a 10k-sample source shard: a ``key_chars`` key, a ref of the shard URL plus offset and size.
    Keys are numbered in listing order (as webdataset's writers name them), or with ``random_keys`` a content
    hash's hex digits, which share nothing with their neighbours: the worst case for the front-coded keys."""
    from data.sources import SourceItem

    if random_keys:
        key = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).hexdigest()[:key_chars]
    else:
        key = f"raw-{i // 10000:06d}/{i:0{max(1, key_chars - 11)}d}"
    return SourceItem(key=key, label=f"c{i % 10}", split="",
                      ref=f"s3://bucket/raw/raw-{i // 10000:06d}.tar\t{4608 * (i % 10000)}\t4096")


def plan(listing) -> int:
    """Select 1% of the items' class as positives and plan 10k-sample shards: the driver's steps before writing."""
    from data.bg_construction import select_bg
    from data.ingest import Resize, ShardItems, plan_shards

    sel = select_bg(listing.labels, ["c3"], positives_per_class=max(1, len(listing) // 100), seed=0)
    chosen = ShardItems(listing, sel.indices, sel.main_labels)
    del sel
    tasks = plan_shards(chosen, per_shard=10000, root="/out", source="wds:bench", prefix="bench", num_classes=2,
                        spec_hash="bench", resize=Resize(0, 90))
    return sum(len(t.items) for t in tasks)


def child(n: int, key_chars: int, as_list: bool, random_keys: bool) -> dict:
    import data.ingest  # noqa: F401 - imported before the baseline: it brings torch (~0.5 GB), not a per-item cost
    from data.sources import ListingBuilder

    base = peak_rss_bytes()
    start = time.perf_counter()
    if as_list:
        held = [item(i, key_chars, random_keys) for i in range(n)]
        columns = None
    else:
        builder = ListingBuilder()
        for i in range(n):
            it = item(i, key_chars, random_keys)
            builder.append(it.key, it.label, it.split, it.ref)
        held = builder.build()
        del builder
        held.check_unique_keys("the bench's items")  # as every source does once it has listed
        columns = held.nbytes() / n
    seconds = time.perf_counter() - start
    listed = peak_rss_bytes()
    planned = None if as_list else plan(held)
    return {"items": n, "form": "list" if as_list else "columns", "key_chars": key_chars, "random_keys": random_keys,
            "peak_bytes_per_item": round((listed - base) / n, 1),
            "column_bytes_per_item": None if columns is None else round(columns, 1),
            "planned_peak_bytes_per_item": None if as_list else round((peak_rss_bytes() - base) / n, 1),
            "planned": planned, "items_per_s": round(n / seconds), "len": len(held)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000000,10000000")
    p.add_argument("--key-chars", type=int, default=31)
    p.add_argument("--as-list-up-to", type=int, default=1000000,
                   help="also measure the list of items at sizes up to this (0: never)")
    p.add_argument("--random-keys", action="store_true", help="keys of random hex digits (sharing no prefix)")
    p.add_argument("--json", default="")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--as-list", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.key_chars, a.as_list, a.random_keys)))
        return 0
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        for as_list in (False, True):
            if as_list and n > a.as_list_up_to:
                continue
            cmd = [sys.executable, __file__, "--child", str(n), "--key-chars", str(a.key_chars)]
            cmd += ["--random-keys"] * a.random_keys
            out = subprocess.run(cmd + ["--as-list"] * as_list, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        if row["form"] == "columns":
            print(f"{row['items']:>11,} items: the listing adds {row['peak_bytes_per_item']} B an item at its peak "
                  f"(columns {row['column_bytes_per_item']} B), with the selection and the shard plan "
                  f"{row['planned_peak_bytes_per_item']} B ({row['planned_peak_bytes_per_item'] * 1e7 / 2 ** 30:.2f} "
                  "GB at 10M)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
