"""`python -m cluster.launch --config configs/X.yaml [--address ADDR] [section.key=value ...]`: the older name of
`bgsplit train --ray`, kept so that `ray job submit ... -- python -m cluster.launch ...` commands go on working.
It is nothing but that command: the same flags, one-line errors, exit codes and result line (the driver is
cluster/ray_train.py).
"""
from __future__ import annotations

import sys

from cluster.cli import main as bgsplit


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    args = [("--ray-address" + a[len("--address"):]) if a.split("=")[0] == "--address" else a for a in args]
    return bgsplit(["train", "--ray", *args])


if __name__ == "__main__":
    sys.exit(main())
