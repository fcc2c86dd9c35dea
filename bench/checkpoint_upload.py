"""Checkpoint upload speed to S3 (a SeaweedFS server on loopback): one stream vs the parallel multipart upload
that data.storage.write_bytes uses. ../shared/performance.md quotes 35-39 MB/s vs 166-187 MB/s on AWS.

    .venv/bin/python bench/checkpoint_upload.py --mb 240 --repeats 2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=240)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    from s3_server import SeaweedS3

    server = SeaweedS3(Path(tempfile.mkdtemp(prefix="bgsplit-upload-"))).start()
    try:
        os.environ.update(server.env)
        from data import storage

        data = os.urandom(args.mb << 20)

        def one_stream(url: str) -> None:
            with storage.atomic_write(url) as f:
                f.write(data)

        ways = {"one stream": one_stream, "parallel multipart (write_bytes)": lambda u: storage.write_bytes(u, data)}
        print("| upload | MB/s |\n| --- | ---: |")
        for name, fn in ways.items():
            rates = []
            for i in range(args.repeats):
                start = time.perf_counter()
                fn(f"s3://{server.bucket}/upload-{i}.bin")
                rates.append(args.mb / (time.perf_counter() - start))
            print(f"| {name} | {sorted(rates)[len(rates) // 2]:.0f} |")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
