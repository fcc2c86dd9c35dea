"""The README's own-data block, run as written: build → compare → train the winner → mine → label → retrain.

The README promises a user can take their own image folder through the whole loop by pasting one block. This
script holds it to that: it takes the first bash block of README's "Your own images, start to finish" section,
line for line, and runs it with `bash -e` in a fresh working directory, timing each command. The only thing it
adds is the person in the middle: the block's comment line (open review.html, mark, export labels.csv) is
played by a simulated annotator who marks a candidate yes when its hidden true class is the mined one.

The folders are Fashion-MNIST exported as a newcomer's images would be (issue 36): `photos/<class name>/` with
300 images of each background class and 8 of each rare one from the training split, `photos-test/` (100 of each
class of the test split) and a flat `unlabeled/` pool (3,000 other training images, no labels; their classes go to
a file outside the working directory, for the annotator only). Files are named as a camera names them,
`IMG_0001.png` in every folder, so the training and test folders share file names (not images). The row keeps
each command's seconds and the experiment's printed estimate beside the time it took.

    python bench/own_data_loop.py --work artifacts/own_data_loop --json artifacts/bench/own_data_loop.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.sources import FashionMNISTSource  # noqa: E402

SECTION = "## Your own images, start to finish"
REVIEW_LINE = "# open mined/review.html"
RARE = ("Dress", "Sandal", "Shirt")


def readme_block() -> list[str]:
    """The section's first bash block as its lines, continuations joined (one command a line)."""
    from cluster.docs import readme_block as block

    commands = block(ROOT)
    if commands is None:
        raise SystemExit(f"README.md has no section {SECTION!r} with a bash block")
    return commands


def folder_name(name: str) -> str:
    return name.replace("/", "_")


def photo_name(number: int) -> str:
    return f"IMG_{number:04d}.png"


def export_folders(work: Path, answers: Path, per_background: int = 300, per_rare: int = 8,
                   per_test: int = 100, pool: int = 3000) -> None:
    train, test = FashionMNISTSource("train"), FashionMNISTSource("test")
    names = train.class_names()
    taken: dict[str, int] = {}
    rest = []
    for item in train.items():
        name = names[item.label]
        want = per_rare if name in RARE else per_background
        if taken.get(name, 0) < want:
            taken[name] = taken.get(name, 0) + 1
            path = work / "photos" / folder_name(name) / photo_name(taken[name])
        else:
            rest.append(item)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(train.read(item))
    truth = {}
    for number, item in enumerate(rest[:pool], 1):
        (work / "unlabeled").mkdir(parents=True, exist_ok=True)
        (work / "unlabeled" / photo_name(number)).write_bytes(train.read(item))
        truth[Path(photo_name(number)).stem] = names[item.label]
    answers.write_text(json.dumps(truth))
    counts: dict[str, int] = {}
    for item in test.items():
        name = names[item.label]
        if counts.get(name, 0) < per_test:
            counts[name] = counts.get(name, 0) + 1
            path = work / "photos-test" / folder_name(name) / photo_name(counts[name])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(test.read(item))


def annotate(work: Path, answers: Path) -> dict[str, float]:
    """labels.csv as review.html exports it: every candidate marked, yes when its true class is the mined one."""
    truth = json.loads(answers.read_text())
    rows = [json.loads(line) for line in (work / "mined" / "candidates.jsonl").read_text().splitlines()]
    hits: dict[str, list[int]] = {}
    with open(work / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["key", "class", "class_name", "label", "score", "rank", "shard", "index"])
        w.writeheader()
        seen_yes: set[str] = set()
        for r in rows:
            # the pool key is the file name's stem plus its extension
            original = next(k for k in (r["key"].rsplit("_png", 1)[0], r["key"]) if k in truth)
            yes = truth[original] == r["class_name"] and original not in seen_yes
            seen_yes |= {original} if yes else set()
            hits.setdefault(r["class_name"], []).append(int(truth[original] == r["class_name"]))
            w.writerow({**{k: r[k] for k in ("key", "class", "class_name", "score", "rank", "shard", "index")},
                        "label": "yes" if yes else "no"})
    return {name: sum(v) / len(v) for name, v in hits.items()}


def run(command: str, work: Path, env: dict[str, str]) -> tuple[float, str]:
    """Seconds and what the command printed (shown as it runs)."""
    print(f"$ {command}", flush=True)
    start = time.time()
    done = subprocess.Popen(["bash", "-e", "-c", command], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    printed = []
    for line in done.stdout:  # type: ignore[union-attr]
        print(line, end="", flush=True)
        printed.append(line)
    if done.wait() != 0:
        raise SystemExit(f"the README command failed with {done.returncode}: {command}")
    return time.time() - start, "".join(printed)


def printed_estimate(text: str) -> float | None:
    """The experiment's "estimate: about N s|min|h MM min" line, in seconds."""
    if "  estimate: about " not in text:
        return None
    words = text.split("  estimate: about ", 1)[1].split(" on this machine", 1)[0].split()
    if words[1] == "h":
        return 3600 * float(words[0]) + 60 * float(words[2])
    return float(words[0]) * {"s": 1, "min": 60}[words[1]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="artifacts/own_data_loop")
    p.add_argument("--json", default="")
    args = p.parse_args()
    work = Path(args.work).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    answers = work.with_name(work.name + "-answers.json")  # outside the working directory: the user has none
    export_folders(work, answers)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    commands = readme_block()
    review = next(i for i, c in enumerate(commands) if c.startswith(REVIEW_LINE))
    times: list[dict[str, object]] = []
    for i, command in enumerate(commands):
        if i == review:
            precision = annotate(work, answers)
            continue
        seconds, printed = run(command, work, env)
        times.append({"command": command, "seconds": round(seconds, 1),
                      **({"estimate_printed_s": printed_estimate(printed)} if " experiment " in command else {}),
                      **({"warnings": [ln for ln in printed.splitlines() if "warning" in ln.lower()]}
                         if "shards build" in command else {})})
    reports = {v: json.loads((work / "report" / v / "report.json").read_text()) for v in ("v1", "v2")}
    row = {"bench": "own_data_loop", "commands": times, "total_seconds": round(sum(t["seconds"] for t in times), 1),
           "test_map_v1": reports["v1"]["map"], "test_map_v2": reports["v2"]["map"],
           "mined_precision_at_100": precision,
           "winner": [a["method"] for a in json.loads((work / "compare" / "results.json").read_text())["advice"]],
           "advice": json.loads((work / "compare" / "results.json").read_text())["advice"],
           "compare": {r["method"]: r for r in json.loads((work / "compare" / "results.json").read_text())["table"]}}
    print(json.dumps(row, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([row], indent=1))
        shutil.copyfile(work / "compare" / "results.md", Path(args.json).with_name("results.md"))  # its tables


if __name__ == "__main__":
    main()
