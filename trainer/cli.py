"""The `bgsplit` command. Bad input ends in one line, ``bgsplit: error: <what> ...``, and exit status 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from trainer.config import ConfigError


def _train(args: argparse.Namespace) -> None:
    from trainer.config import load_config
    from trainer.train import train

    overrides = list(args.overrides)
    if args.debug:
        overrides = ["run.device=cpu", "run.precision=fp32", "data.num_workers=0"] + overrides
    cfg = load_config(args.config, overrides)
    summary = train(cfg)
    val = summary.get("val")
    print(json.dumps({"checkpoint": summary["checkpoint"], "steps": summary["steps"],
                      "val_map": val["map"] if val else None, "skipped": summary["skipped"]}))


def _eval(args: argparse.Namespace) -> None:
    import torch

    from trainer.checkpoint import load_checkpoint, load_student_from_checkpoint
    from trainer.evaluate import evaluate_to_report

    state = load_checkpoint(args.checkpoint)
    image_size = args.image_size or state["config"]["data"]["image_size"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = load_student_from_checkpoint(args.checkpoint).to(device)
    results = evaluate_to_report(student, args.data, args.out, image_size=image_size, device=device,
                                 batch_size=args.batch_size, num_workers=args.num_workers,
                                 title=f"bgsplit evaluation of {args.checkpoint}",
                                 extra={"checkpoint": args.checkpoint})
    print(f"mAP {100 * results['map']:.2f} over {len(results['ap'])} rare classes; report in {args.out}/report.md")


def _shards_build(args: argparse.Namespace) -> None:
    from data.build import build_command

    build_command(args.source, args.out, split_file=args.split_file, rare=args.rare,
                  positives_per_class=args.positives_per_class, background_fraction=args.background_fraction,
                  max_background=args.max_background, seed=args.seed, holdout=args.holdout,
                  holdout_out=args.holdout_out, subsample=args.subsample,
                  max_count=args.max_count, max_bytes=int(args.max_mb * (1 << 20)),
                  resize_short_side=args.resize_short_side, jpeg_quality=args.jpeg_quality, workers=args.workers)


def _teacher_label(args: argparse.Namespace) -> None:
    import torch

    from trainer.models import build_teacher
    from trainer.teacher_label import label_shard_set

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = build_teacher(args.teacher, args.weights)
    for location in args.data:
        url = label_shard_set(teacher, location, image_size=args.image_size, topk=args.topk, device=device,
                              batch_size=args.batch_size, overwrite=args.overwrite)
        print(url)


def _demo(args: argparse.Namespace) -> None:
    from trainer.demo import run_demo

    run_demo(args.out, quick=args.quick, seeds=args.seeds, prepare_only=args.prepare_only)


def _fetch_weights(args: argparse.Namespace) -> None:
    from trainer.backbones import fetch_torchvision_weights

    print(fetch_torchvision_weights(args.model, args.weights))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bgsplit", description="Background Splitting: rare classes in a sea of background")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model from a config (one process; torchrun for several)")
    t.add_argument("--config", help="YAML file (configs/*.yaml)")
    t.add_argument("--debug", action="store_true", help="single process on CPU, fp32, no loader workers")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.aux_weight=0 optim.epochs=5")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="per-class AP, mAP, P@100, PR curves, top-scoring grid, JSON + Markdown report")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True, help="evaluation shard set (folder with manifest.json)")
    e.add_argument("--out", required=True, help="report folder")
    e.add_argument("--image-size", type=int, default=0, help="default: the training image size")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--num-workers", type=int, default=0)
    e.set_defaults(func=_eval)

    s = sub.add_parser("shards", help="shard-set tools").add_subparsers(dest="shards_command", required=True)
    b = s.add_parser("build", help="write a -BG WebDataset shard set from a source")
    b.add_argument("--source", required=True,
                   help="fmnist:train | fmnist:test | folder:ROOT | manifest:FILE.csv|jsonl | inat:ANN.json:ROOT:SPLIT")
    b.add_argument("--out", required=True, help="output folder or fsspec URL")
    b.add_argument("--split-file", help="rare class ids, one per line (data/splits/*.txt for iNat-BG)")
    b.add_argument("--rare", help="rare class ids, comma separated (instead of --split-file)")
    b.add_argument("--positives-per-class", type=int, help="cap positives per rare class (training sets)")
    b.add_argument("--background-fraction", type=float, help="or: cap positives to reach this background fraction")
    b.add_argument("--max-background", type=int, help="random subset of the background (debugging sizes)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--holdout", type=int, default=0, help="carve this many source images out as a validation set")
    b.add_argument("--holdout-out", help="where to write the validation set")
    b.add_argument("--subsample", type=int, help="uniform random subset of the source (keeps class proportions)")
    b.add_argument("--max-count", type=int, default=10000, help="samples per shard at most")
    b.add_argument("--max-mb", type=float, default=512,
                   help="target shard size in MB (samples per shard estimated from a probe of the images)")
    b.add_argument("--resize-short-side", type=int,
                   help="re-encode images whose short side is longer to JPEG at this size (never upscales)")
    b.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of re-encoded images")
    b.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="shard-writing processes (default min(8, CPUs); 0 or 1: in this process)")
    b.set_defaults(func=_shards_build)

    tl = sub.add_parser("teacher-label", help="cache the teacher's top-k labels of shard sets (sidecar files)")
    tl.add_argument("--data", nargs="+", required=True)
    tl.add_argument("--teacher", default="efficientnet_lite0")
    tl.add_argument("--weights", default="")
    tl.add_argument("--image-size", type=int, default=224)
    tl.add_argument("--topk", type=int, default=5)
    tl.add_argument("--batch-size", type=int, default=128)
    tl.add_argument("--overwrite", action="store_true")
    tl.set_defaults(func=_teacher_label)

    d = sub.add_parser("demo", help="Fashion-MNIST-BG: fine-tuning vs BG splitting vs imbalance baselines")
    d.add_argument("--out", default="artifacts/demo")
    d.add_argument("--quick", action="store_true", help="one seed, shorter runs (a smoke test)")
    d.add_argument("--seeds", type=int, default=3)
    d.add_argument("--prepare-only", action="store_true", help="build the data and teacher labels, train nothing")
    d.set_defaults(func=_demo)

    f = sub.add_parser("fetch-weights", help="download torchvision weights into torch's cache (needs a network)")
    f.add_argument("model")
    f.add_argument("weights", help="e.g. IMAGENET1K_V1")
    f.set_defaults(func=_fetch_weights)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"bgsplit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
