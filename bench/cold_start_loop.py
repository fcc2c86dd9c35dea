"""Mining from a handful of positives, measured: how many of a pool's rare images three rounds of review find.

The pool: Fashion-MNIST training images, 10,000 background and 100 of each rare class (Dress, Sandal, Shirt;
~1% each), its labels hidden from the miner and known only to a simulated annotator (yes when an image's true
class is the class it was shown for). A draw starts from 2 examples of each class, taken from the Fashion-MNIST
*test* split (so they are never pool images; ``--draws`` draws of them). Each round reviews the top ``--top``
candidates of each class, and what is found is what the annotator says yes to. Three arms:

  cold      `bgsplit mine --positives`: a logistic probe (C 1e-5, balanced) on the teacher's 224-px features of
            the labels so far against a 5,000-image sample of the pool; after each round the reviewed images join
            the labels (`shards add-labels`: positives to their class, the rest as hard negatives)
  trained   round 1 is the cold start's; then a student trained once, with the 160-px study's best trained
            recipe (bench/results/fmnist_160/best/99.6-bg/lp-ft-plus-bg-split.yaml: LP-FT + BG split on a frozen
            prefix; its probe head fixed at C 1e-5 balanced, for there is no validation set with 2 positives a
            class), on round 1's labels plus 1,485 unreviewed pool images taken as background (what a user would
            add; ~3% of them are rare images labelled background), mines rounds 2 and 3
  random    ``--top`` random unreviewed pool images a class a round

It also reports the embedding pass (the pool embedded once at 224 px, reused by every cold round): images a
second on this machine's CPU and bytes a stored image.

    python bench/cold_start_loop.py --json bench/results/cold_start_loop/results.json
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RARE = ["Dress", "Sandal", "Shirt"]
RARE_IDS = ("3", "5", "6")  # their Fashion-MNIST labels
RECIPE = Path(__file__).resolve().parents[1] / "bench/results/fmnist_160/best/99.6-bg/lp-ft-plus-bg-split.yaml"


def interval(values: list[float]) -> dict[str, float]:
    """Mean and its 95% t-interval over draws."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    from cluster.experiment_stats import t_quantile_975

    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def pool_truth(pool: str) -> dict[tuple[str, int], tuple[str, int]]:
    """(absolute shard URL, index) -> (key, true class: 0 background, 1..K rare), from the set's records."""
    from data import storage
    from data.shards import read_manifest, read_record
    from data.shards import iter_tar

    manifest = read_manifest(pool)
    out = {}
    for shard in manifest.shards:
        url = storage.absolute(storage.join(manifest.root, shard.url))
        labels = read_record(manifest, shard).get("labels") or [0] * shard.count
        with storage.open_read(url) as stream:
            for i, (key, _) in enumerate(iter_tar(stream)):
                out[url, i] = (key, int(labels[i]))
    return out


def review(picks: list[tuple[str, int, int]], truth: dict, path: str) -> dict[int, int]:
    """(shard URL, index, class shown) -> labels.csv for add-labels; returns the positives found a class."""
    found = {c: 0 for c in range(1, len(RARE) + 1)}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "class", "label"])
        for url, index, cls in picks:
            key, true = truth[url, index]
            yes = true == cls
            found[cls] += yes
            w.writerow([key, cls, "yes" if yes else "no"])
    return found


def mined_picks(out: str) -> list[tuple[str, int, int]]:
    from data import storage

    rows = [json.loads(line) for line in Path(out, "candidates.jsonl").read_text().splitlines()]
    return [(storage.absolute(r["shard"]), int(r["index"]), int(r["class"])) for r in rows]


def run(argv: list[str]) -> None:
    from cluster.cli import main as cli

    code = cli(argv)
    if code != 0:
        raise SystemExit(f"bgsplit {' '.join(argv[:2])} failed ({code})")


def build(out: str, draws: int) -> tuple[str, list[str]]:
    from data.build import BuildSpec, build_set
    from data.shards import manifest_url
    from data import storage
    from data.sources import FashionMNISTSource

    pool = os.path.join(out, "pool")
    if not storage.exists(manifest_url(pool)):
        build_set(FashionMNISTSource("train"), BuildSpec("fmnist:train", RARE_IDS, positives_per_class=100,
                                                         max_background=10000, seed=7, max_count=500), pool)
    examples = []
    for d in range(draws):
        location = os.path.join(out, f"draw{d}", "examples")
        if not storage.exists(manifest_url(location)):
            build_set(FashionMNISTSource("test"), BuildSpec("fmnist:test", RARE_IDS, positives_per_class=2,
                                                            max_background=0, seed=0, positives_seed=100 + d),
                      location)
        examples.append(location)
    return pool, examples


def embed(pool: str) -> dict[str, float]:
    """The pool's embedding pass, timed over the shards it embeds now (a rerun after a kill resumes: its rate is
    that of the shards it did); bytes a stored image over the whole pool."""
    import torch

    from trainer.embeddings import EmbedPass, default_location
    from trainer.scoring import ScoringConfig
    from trainer.shard_pass import run_pass

    p = EmbedPass(pool=pool, root=default_location(pool), arch="efficientnet_lite0", weights="DEFAULT",
                  scoring=ScoringConfig(224, 128))
    t0 = time.time()
    done = run_pass(p, device=torch.device("cpu"), rank=0, world=1)
    seconds = time.time() - t0
    stored = sum(f.stat().st_size for f in Path(p.cache.folder).iterdir())
    return {"images_now": done["images"], "seconds": round(seconds, 1),
            "images_per_s": done["images"] / seconds if done["images"] else None,
            "bytes_per_image": stored / p.manifest.count, "threads": torch.get_num_threads()}


def cold_arm(pool, examples, truth, out, rounds, top, draw) -> list[dict[int, int]]:
    labelled, found = examples, []
    for r in range(1, rounds + 1):
        rdir = os.path.join(out, f"draw{draw}", "cold", f"round{r}")
        run(["mine", "--positives", labelled, "--pool", pool, "--out", os.path.join(rdir, "mine"), "--top", str(top),
             "--image-size", "224"])
        found.append(review(mined_picks(os.path.join(rdir, "mine")), truth, os.path.join(rdir, "labels.csv")))
        run(["shards", "add-labels", "--data", labelled, "--labels", os.path.join(rdir, "labels.csv"), "--pool",
             pool, "--out", os.path.join(rdir, "labelled")])
        labelled = os.path.join(rdir, "labelled")
    return found


def trained_arm(pool, truth, out, rounds, top, draw, first: list[dict[int, int]], epochs: float) -> tuple:
    """Round 1 is the cold arm's; a student trained on its labels + unreviewed pool background mines the rest."""
    rng = random.Random(1000 + draw)
    cold1 = os.path.join(out, f"draw{draw}", "cold", "round1")
    tdir = os.path.join(out, f"draw{draw}", "trained")
    os.makedirs(tdir, exist_ok=True)
    reviewed = {(u, i) for u, i, _ in mined_picks(os.path.join(cold1, "mine"))}
    free = sorted(k for k in truth if k not in reviewed)
    background = rng.sample(free, 1485)
    with open(os.path.join(tdir, "background.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "class", "label"])
        for k in background:
            w.writerow([truth[k][0], 1, "no"])
    train_set = os.path.join(tdir, "train")
    run(["shards", "add-labels", "--data", os.path.join(cold1, "labelled"), "--labels",
         os.path.join(tdir, "background.csv"), "--pool", pool, "--out", train_set])
    t0 = time.time()
    run(["train", "--config", str(RECIPE), f"data.train={train_set}", "data.val=", "data.test=",
         "model.probe_val=", "model.probe_C=[1e-5]", "model.probe_class_weight=[balanced]",
         f"optim.epochs={epochs}", f"run.out_dir={os.path.join(tdir, 'run')}", f"run.seed={draw}",
         "run.progress=false"])  # the recipe's cached prefix views (views.count=10), as the study trained it
    train_seconds = time.time() - t0
    found, exclude = list(first), [train_set]
    labelled = train_set
    for r in range(2, rounds + 1):
        rdir = os.path.join(tdir, f"round{r}")
        run(["mine", "--checkpoint", os.path.join(tdir, "run"), "--pool", pool, "--out", os.path.join(rdir, "mine"),
             "--top", str(top), "--exclude", *exclude])
        found.append(review(mined_picks(os.path.join(rdir, "mine")), truth, os.path.join(rdir, "labels.csv")))
        run(["shards", "add-labels", "--data", labelled, "--labels", os.path.join(rdir, "labels.csv"), "--pool",
             pool, "--out", os.path.join(rdir, "labelled")])
        labelled = os.path.join(rdir, "labelled")
        exclude = [labelled]
    return found, train_seconds


def random_arm(truth, rounds, top, draw) -> list[dict[int, int]]:
    rng = random.Random(2000 + draw)
    left = sorted(truth)
    found = []
    for _ in range(rounds):
        got = {c: 0 for c in range(1, len(RARE) + 1)}
        for c in got:
            picks = rng.sample(left, top)
            taken = set(picks)
            left = [k for k in left if k not in taken]
            got[c] = sum(truth[k][1] == c for k in picks)
        found.append(got)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="artifacts/cold_start_loop")
    p.add_argument("--json", default="", help="write the rows here")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--top", type=int, default=100)
    p.add_argument("--arms", nargs="+", default=["cold", "trained", "random"], choices=["cold", "trained", "random"])
    p.add_argument("--epochs", type=float, default=30.0, help="the trained arm's epochs (the recipe's: 30)")
    args = p.parse_args()
    started = time.time()
    pool, examples = build(args.out, args.draws)
    truth = pool_truth(pool)
    in_pool = {c: sum(t == c for _, t in truth.values()) for c in range(1, len(RARE) + 1)}
    embedding = embed(pool)
    print(json.dumps({"embedding": embedding}), flush=True)
    per_arm: dict[str, list[list[dict[int, int]]]] = {a: [] for a in args.arms}
    train_seconds = []
    for d in range(args.draws):
        cold = cold_arm(pool, examples[d], truth, args.out, args.rounds, args.top, d)
        if "cold" in per_arm:
            per_arm["cold"].append(cold)
        if "trained" in per_arm:
            found, seconds = trained_arm(pool, truth, args.out, args.rounds, args.top, d, cold[:1], args.epochs)
            per_arm["trained"].append(found)
            train_seconds.append(seconds)
        if "random" in per_arm:
            per_arm["random"].append(random_arm(truth, args.rounds, args.top, d))
        print(json.dumps({"draw": d, **{a: v[-1] for a, v in per_arm.items()}}), flush=True)
    rows = []
    for arm, draws in per_arm.items():
        for r in range(args.rounds):
            cumulative = [sum(sum(f[c] for c in f) for f in found[:r + 1]) for found in draws]
            by_class = {RARE[c - 1]: [sum(f[c] for f in found[:r + 1]) for found in draws] for c in in_pool}
            rows.append({"config": f"{arm} round {r + 1}", "arm": arm, "round": r + 1, "draws": len(draws),
                         "found_total": interval(cumulative), "found_per_class": by_class,
                         "found_this_round": [sum(found[r].values()) for found in draws],
                         "recall": interval([n / sum(in_pool.values()) for n in cumulative])})
    ratio = None
    if "cold" in per_arm and "random" in per_arm:
        first = [(sum(c[0].values()), sum(r[0].values())) for c, r in zip(per_arm["cold"], per_arm["random"])]
        ratio = [a / max(b, 1) for a, b in first]
    doc = {"rows": rows, "embedding": embedding, "pool_images": len(truth), "rare_in_pool": in_pool,
           "top": args.top, "rounds": args.rounds, "draws": args.draws, "round1_cold_over_random": ratio,
           "trained_seconds": train_seconds, "trained_epochs": args.epochs, "seconds": round(time.time() - started)}
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=1))
    for row in rows:
        t = row["found_total"]
        print(f"{row['config']:<18} found {t['mean']:6.1f} [{t['lo']:.1f}, {t['hi']:.1f}] of "
              f"{sum(in_pool.values())} (recall {100 * row['recall']['mean']:.1f}%)")


if __name__ == "__main__":
    main()
