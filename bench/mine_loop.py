"""The mining loop, measured: train, mine a 60,000-image pool, label the top candidates, add them, train again.

On Fashion-MNIST-BG (rare: Dress, Sandal, Shirt), starting from a 99%-background training set (5 positives a
class over the demo's 1,485 background images):

    round 0   train on the starting set; test mAP
    round r   mine the pool (all 60,000 Fashion-MNIST training images, labels hidden; the training and
              validation keys excluded) with round r-1's model, label the top N per class from the hidden labels
              (a simulated annotator: yes when the image's true class is the mined one), add them with
              `shards add-labels` (positives to their class, the rest as hard negatives), retrain; test mAP

The baseline arm labels N random pool images per class instead of the top N (the annotator says yes at the
class's base rate, 10%), adds them the same way and retrains with the same seeds. Precision@N is the fraction of
a class's N labelled images that are of that class. The test split (1,500 Fashion-MNIST test images) is scored
once per trained model and never used for any choice.

    python bench/mine_loop.py --json artifacts/bench/mine_loop.json [--rounds 2] [--top 100] [--seeds 0]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import storage
from data.add_labels import add_labels
from data.shards import iter_tar, read_manifest
from cluster.experiment_data import DataSpec, build_sets
from cluster.experiment_scorers import train_and_score
from trainer.checkpoint import latest_checkpoint
from trainer.config import load_config
from trainer.mine import CANDIDATES, ExcludedKeys, MineJob, mine, pool_set
from trainer.scoring import ScoringConfig


def hidden_labels(pool: str) -> dict[str, str]:
    """key -> the source's class id, from each sample's json (what the simulated annotator knows)."""
    out = {}
    manifest = read_manifest(pool)
    for shard in manifest.shards:
        with storage.open_read(storage.join(manifest.root, shard.url)) as stream:
            for key, fields in iter_tar(stream):
                out[key] = json.loads(fields["json"])["orig"]
    return out


def write_labels(path: str, picks: list[tuple[str, int]], truth: dict[str, str], rare: list[str]) -> dict[str, float]:
    """labels.csv for (key, class) picks; returns each class's precision (yes / picked)."""
    per_class: dict[int, list[bool]] = {}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "class", "label"])
        for key, cls in picks:
            yes = truth[key] == rare[cls - 1]
            per_class.setdefault(cls, []).append(yes)
            writer.writerow([key, cls, "yes" if yes else "no"])
    return {rare[c - 1]: sum(v) / len(v) for c, v in sorted(per_class.items())}


CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fmnist_bg.yaml"


def train_round(train: str, out: str, test: str, seeds: list[int], overrides: list[str]) -> dict:
    maps, seconds = [], 0.0
    for s in seeds:
        cfg = load_config(CONFIG, [f"data.train={train}", "data.val=", f"run.out_dir={os.path.join(out, f'seed{s}')}",
                                   f"run.seed={s}", "run.progress=false", *overrides])
        t0 = time.time()
        maps.append(train_and_score(cfg, test)["map"])
        seconds += time.time() - t0
    return {"test_map": sum(maps) / len(maps), "test_maps": maps,
            "checkpoint": latest_checkpoint(os.path.join(out, f"seed{seeds[0]}")), "train_seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="artifacts/mine_loop")
    p.add_argument("--json", default="", help="write the rows here")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--top", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--overrides", nargs="*", default=[], help="training overrides (the demo's recipe otherwise)")
    p.add_argument("--arms", nargs="+", default=["mined", "random"], choices=["mined", "random"])
    args = p.parse_args()
    started = time.time()
    spec = DataSpec(settings={"99.0% bg": 5})
    sets = build_sets(os.path.join(args.out, "data"), spec)
    rare = list(spec.rare)
    pool = pool_set("fmnist:train", os.path.join(args.out, "pool-build"))
    truth = hidden_labels(pool)
    seen = ExcludedKeys([sets["99.0% bg"], sets["val"]]).contains(list(truth))  # by the sets' key indexes
    unseen = [k for k, held in zip(truth, seen) if not held]
    rows = []
    base = train_round(sets["99.0% bg"], os.path.join(args.out, "round0"), sets["test"], args.seeds, args.overrides)
    rows.append({"arm": "start", "round": 0, "train_images": read_manifest(sets["99.0% bg"]).count, **base})
    print(json.dumps(rows[-1]), flush=True)
    rng = random.Random(0)
    for arm in args.arms:
        train, model = sets["99.0% bg"], base["checkpoint"]
        labelled: set[str] = set()
        for r in range(1, args.rounds + 1):
            rdir = os.path.join(args.out, arm, f"round{r}")
            os.makedirs(rdir, exist_ok=True)
            t0 = time.time()
            if arm == "mined":
                summary = mine(MineJob(checkpoint=model, pool=pool, out=os.path.join(rdir, "mine"), top=args.top,
                                       scoring=ScoringConfig(64, precision="auto"),
                                       exclude=(sets["99.0% bg"], sets["val"], train) if r > 1 else
                                       (sets["99.0% bg"], sets["val"])))
                cands = [json.loads(line) for line in
                         Path(rdir, "mine", CANDIDATES).read_text().splitlines()]
                picks = [(c["key"], c["class"]) for c in cands]
                mine_seconds = time.time() - t0
            else:
                free = sorted(k for k in unseen if k not in labelled)
                drawn = rng.sample(free, args.top * len(rare))
                picks = [(k, 1 + i // args.top) for i, k in enumerate(drawn)]
                summary, mine_seconds = {}, 0.0
            labelled.update(k for k, _ in picks)
            precision = write_labels(os.path.join(rdir, "labels.csv"), picks, truth, rare)
            new = add_labels(train, os.path.join(rdir, "labels.csv"), pool, os.path.join(rdir, "train"))
            result = train_round(new.root, os.path.join(rdir, "runs"), sets["test"], args.seeds, args.overrides)
            rows.append({"arm": arm, "round": r, f"precision_at_{args.top}": precision,
                         "mean_precision": sum(precision.values()) / len(precision),
                         "added": new.meta["added"], "train_images": new.count,
                         "mine_seconds": round(mine_seconds, 1), "pool_images": summary.get("scored"), **result})
            print(json.dumps(rows[-1]), flush=True)
            train, model = new.root, result["checkpoint"]
    doc = {"rows": rows, "seconds": time.time() - started, "top": args.top, "seeds": args.seeds,
           "pool": pool, "pool_images": len(truth), "base_rate": {c: sum(v == c for v in truth.values()) / len(truth)
                                                                  for c in rare}}
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: v for k, v in doc.items() if k != "rows"}))


if __name__ == "__main__":
    main()
