"""What publishing a large set costs on an object store: the key index read from every shard's completion record.

``write_manifest`` reads each listed shard's record (its key hashes) before it writes ``keys.npy`` and the
manifest. At 10M samples in 1,000-sample shards that is 10k small GETs, each paying a real region's first-byte
latency (20-80 ms): one at a time ~10k x 50 ms = 8 minutes; ``RECORD_READS_IN_FLIGHT`` at a time divides it.
This writes ``--shards`` records (``--per-shard`` keys each, as ``make_record`` writes them) to a loopback
SeaweedFS, then times ``hash_index.write_indexes`` through ``latency_proxy.py`` (``--latency-ms``) for each
``--depths``.

    .venv/bin/python bench/publish.py --shards 1000 --latency-ms 50 --json artifacts/bench/publish.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from data import hash_index, shards, storage  # noqa: E402
from data.shards import Manifest, ShardInfo, make_record, record_name, shard_name  # noqa: E402
from loader import endpoint  # noqa: E402 - bench/loader.py: s3fs pointed at another endpoint for a block


def write_records(root: str, n: int, per_shard: int) -> Manifest:
    """``n`` background shards' records (no tar: the index reads records only), written 32 at a time."""
    infos = [ShardInfo(url=shard_name("bg", "background", i), kind="background", count=per_shard, bytes=0)
             for i in range(n)]

    def put(i: int) -> None:
        keys = [f"img-{i:06d}-{j:05d}" for j in range(per_shard)]
        record = make_record(name=infos[i].url, kind="background", count=per_shard, size=0, counts=[per_shard, 0],
                             offsets=list(range(0, (per_shard + 1) * 512, 512)), labels=None, keys=keys)
        storage.write_bytes(storage.join(root, record_name(infos[i].url)), json.dumps(record).encode())

    for _ in storage.in_flight(put, range(n), 32):
        pass
    return Manifest(root=root, rare_classes=["r"], class_names=["background", "r"], shards=infos,
                    counts=[n * per_shard, 0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--depths", default="1,16")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)

    from latency_proxy import LatencyProxy
    from s3_server import SeaweedS3

    rows = []
    with tempfile.TemporaryDirectory(prefix="bgsplit-publish-") as scratch:
        server = SeaweedS3(Path(scratch) / "seaweedfs").start()
        proxy = None
        try:
            os.environ.update(server.env)
            root = f"s3://{server.bucket}/publish"
            t0 = time.time()
            manifest = write_records(root, args.shards, args.per_shard)
            print(f"{args.shards} records of {args.per_shard} keys written ({time.time() - t0:.1f} s)", flush=True)
            proxy = LatencyProxy(server.endpoint.split("://", 1)[1], args.latency_ms).start()
            with endpoint(proxy.endpoint):
                for depth in (int(d) for d in args.depths.split(",")):
                    shards.RECORD_READS_IN_FLIGHT = depth
                    start = time.perf_counter()
                    index, _ = hash_index.write_indexes(manifest.root, shards.iter_records(manifest))
                    seconds = time.perf_counter() - start
                    rows.append({"shards": args.shards, "per_shard": args.per_shard, "latency_ms": args.latency_ms,
                                 "in_flight": depth, "seconds": round(seconds, 2), "keys": index["count"],
                                 "records_s": round(args.shards / seconds, 1)})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            if proxy is not None:
                proxy.stop()
            server.stop()
    if len(rows) > 1:
        print(f"in_flight {rows[-1]['in_flight']} vs {rows[0]['in_flight']}: "
              f"{rows[0]['seconds'] / rows[-1]['seconds']:.1f}x faster", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
