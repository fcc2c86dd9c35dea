"""The `bgsplit` command. Bad input ends in one line, ``bgsplit: error: <what> ...``, and exit status 2."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from data.storage import DiskFull, StorageOutage
from trainer.config import ConfigError


def _train(args: argparse.Namespace) -> None:
    from trainer.config import load_config
    from trainer.runtime import output_location
    from trainer.run_log import result_line, run_folder_line
    from trainer.train import train

    overrides = list(args.overrides)
    if args.debug:
        overrides = ["run.device=cpu", "run.precision=fp32", "data.num_workers=0"] + overrides
    cfg = load_config(args.config, overrides)
    if cfg.probe.kind != "none":  # a probe fit (trainer/probe_model.py): a shard pass, then one fit on rank 0
        from trainer.probe_model import feature_pass, save_probe

        cfg.run.out_dir = output_location(cfg.run.out_dir, "run.out_dir")
        fp = feature_pass(cfg)
        args.gpus_per_task = cfg.cluster.gpus_per_worker if cfg.cluster.use_gpu else 0.0  # with --ray: Ray tasks
        features = _pass(fp, args)
        if features is None:  # not rank 0 under torchrun: rank 0 fits and writes
            return
        print(result_line(save_probe(cfg, fp, features)))
        print(run_folder_line(cfg.run.out_dir, probe=True), file=sys.stderr)
        return
    if args.ray:  # Ray Train workers, cluster.num_workers of them (cluster/ray_train.py)
        from cluster.ray_train import launch

        summary = launch(cfg, args.ray_address)
    else:
        cfg.run.out_dir = output_location(cfg.run.out_dir, "run.out_dir")
        summary = train(cfg)
    print(result_line(summary))  # one JSON line, the same keys either way
    print(run_folder_line(cfg.run.out_dir), file=sys.stderr)


def _pass(p, args: argparse.Namespace, more: bool = False):
    """Every shard pass's one fork: Ray tasks with --ray, else this process or, under torchrun, every rank (rank 0
    alone gets the output; the others None). ``more``: another pass follows, so torchrun's group stays up."""
    import torch.distributed as dist

    if args.ray:
        from cluster.passes import connect, ray_pass

        connect(args.ray_address)
        return ray_pass(p, gpus_per_task=args.gpus_per_task)
    from trainer.shard_pass import run_pass

    try:
        return run_pass(p)
    finally:
        if dist.is_initialized() and not more:
            dist.destroy_process_group()


def _device_for_ranks():
    """torchrun's ranks on GPUs: NCCL's object collectives use the current device."""
    import torch

    from trainer.runtime import resolve_device

    device = resolve_device("auto")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _trained_size(checkpoint: str) -> int:
    """The input size the checkpoint's run trained at (its meta.json; state.pt is not read)."""
    from trainer.checkpoint import read_meta

    return int(read_meta(checkpoint)["config"]["data"]["image_size"])


def _eval(args: argparse.Namespace) -> None:
    from trainer.evaluate import EvalPass, EvalSetup

    _trust(args)
    image_size = args.image_size or _trained_size(args.checkpoint)
    if not args.ray:
        _device_for_ranks()
    setup = EvalSetup(image_size, args.batch_size, args.num_workers, precision=args.precision)
    p = EvalPass(args.data, setup, checkpoint=args.checkpoint, report_dir=args.out,
                 title=f"bgsplit evaluation of {args.checkpoint}", extra={"checkpoint": args.checkpoint})
    results = _pass(p, args)
    if results is not None:  # rank 0 (it wrote the report), or the Ray driver
        print(f"mAP {100 * results['map']:.2f} over {len(results['ap'])} rare classes; report in "
              f"{args.out}/report.md")


def _shards_build(args: argparse.Namespace) -> None:
    from data.build import BuildRequest, build_command

    runner = None
    if args.ray:
        from cluster.passes import connect, ray_runner

        connect(args.ray_address)
        runner = ray_runner
    build_command(BuildRequest(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildRequest)}),
                  runner=runner)


def _flags_of(parser: argparse.ArgumentParser, request: type) -> None:
    """One argument per field of a request dataclass, from the field's metadata (data.build.BuildRequest)."""
    for f in dataclasses.fields(request):
        options = dict(f.metadata)
        flags = options.pop("flags", ("--" + f.name.replace("_", "-"),))
        if f.default is not dataclasses.MISSING:
            options.setdefault("default", f.default)
        parser.add_argument(*flags, dest=f.name, **options)


def _shards_plan(args: argparse.Namespace) -> None:
    from data.plan import describe_plan, plan_for_manifest
    from data.shards import check_objects, read_manifest

    manifest = read_manifest(args.data)
    check_objects(manifest)  # the check training makes first: a plan for a set it would refuse is no plan
    summary = plan_for_manifest(manifest, world=args.world, workers=args.workers,
                                batch_size=args.batch_size, mode=args.mode, policy=args.policy,
                                sampling=args.sampling, positive_fraction=args.positive_fraction, seed=args.seed)
    print(json.dumps(summary, indent=1) if args.json else describe_plan(summary))


def _teacher_label(args: argparse.Namespace) -> None:
    from trainer.teacher_label import LabelPass

    if not args.ray:
        _device_for_ranks()
    for location in args.data:
        p = LabelPass(location, args.image_size, args.topk, args.teacher, args.weights, batch_size=args.batch_size,
                      num_workers=args.num_workers, precision=args.precision, overwrite=args.overwrite)
        url = _pass(p, args)
        if url is not None:
            print(url)


def _mine(args: argparse.Namespace) -> None:
    """A source that is not a shard set yet is built into OUT/pool first (by the driver, or rank 0 while the other
    ranks wait)."""
    from trainer.mine import MineJob, MinePass, pool_set
    from trainer.runtime import broadcast, init_distributed

    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    if bool(args.checkpoint) == bool(args.positives):
        raise ValueError("give --checkpoint (a trained model or a probe) or --positives (a handful of examples to "
                         "start from), one of the two")
    _trust(args)
    image_size = args.image_size or (224 if args.positives else _trained_size(args.checkpoint))
    rank = 0
    if not args.ray:
        rank, _ = init_distributed(_device_for_ranks())
    pool = broadcast(pool_set(args.pool, args.out, args.workers) if rank == 0 else None)
    checkpoint, exclude = args.checkpoint, tuple(args.exclude)
    embeddings = _embeddings(args, pool, image_size)
    if args.positives:  # mining before any training (trainer/probe_model.py): rank 0 fits, the others wait
        from trainer.probe_model import cold_start, positives_set

        def start() -> tuple[str, str]:
            examples = positives_set(args.positives, [c for c in args.rare.split(",") if c], args.out, args.workers)
            url, _ = cold_start(examples, pool, args.out, image_size=image_size, kind=args.probe,
                                background=args.background, batch_size=args.batch_size,
                                num_workers=args.num_workers, embeddings=embeddings)
            return url, examples

        checkpoint, examples = broadcast(start() if rank == 0 else None)
        exclude += (examples,)  # the examples are never candidates
    job = MineJob(checkpoint, pool, args.out, args.top, image_size, args.batch_size, args.precision, exclude,
                  args.num_workers, embeddings)
    summary = _pass(MinePass(job), args)
    if summary is not None:
        print(json.dumps(summary, indent=1))


def _embeddings(args: argparse.Namespace, pool: str, image_size: int) -> str:
    """Where a probe's pool rows are kept ("" for a trained student), after embedding every shard not kept
    yet: one pass (this process, torchrun ranks or Ray tasks) that a killed or later round resumes."""
    from trainer.mine import is_probe

    if args.embeddings == "none" or not (args.positives or is_probe(args.checkpoint)):
        return ""
    from trainer.embeddings import EmbedPass, default_location

    root = args.embeddings or default_location(pool)
    if args.positives:
        arch, weights = "efficientnet_lite0", "DEFAULT"
    else:
        from trainer.checkpoint import read_meta
        from trainer.models import teacher_weights

        teacher = read_meta(args.checkpoint)["config"]["teacher"]
        arch, weights = teacher["name"], teacher_weights(teacher["name"], teacher["weights"])
    done = _pass(EmbedPass(pool, root, arch, weights, image_size, batch_size=args.batch_size,
                           num_workers=args.num_workers), args, more=True)
    if done is not None:
        print(f"pool embeddings: {done['embeddings']} ({done['images']} image(s) embedded now)")
    return root


def _teacher_report(args: argparse.Namespace) -> None:
    from data import storage
    from trainer.teacher_report import markdown, teacher_report

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sizes {args.sizes}: give input sizes in pixels, comma-separated (e.g. 64,160,224)")
    doc = teacher_report(args.data, sizes, teacher=args.teacher, weights=args.weights, images=args.images,
                         batch_size=args.batch_size)
    text = markdown(doc)
    storage.write_bytes(storage.join(args.out, "results.json"), json.dumps(doc, indent=1).encode())
    storage.write_bytes(storage.join(args.out, "results.md"), text.encode())
    print(text)


def _shards_add_labels(args: argparse.Namespace) -> None:
    from data import storage
    from data.add_labels import add_labels

    manifest = add_labels(args.data, args.labels, args.pool, args.out)
    added = manifest.meta["added"]
    kept = manifest.shards[:len(manifest.shards) - added["new_shards"]]
    how = ("relative to the new set's folder: move the sets together" if all(
        storage.relative(s.url, manifest.root) is not None for s in kept) else "by URL")
    print(f"{args.out}: {manifest.count} images; added {added['positives']} positives and {added['hard_negatives']} "
          f"hard negatives in {added['new_shards']} new shard(s) ({added['already_known']} labelled key(s) were "
          f"already in {args.data}); the parent's shards are listed where they are ({how}), not copied")


def _demo(args: argparse.Namespace) -> None:
    from cluster.demo import run_demo

    run_demo(args.out, quick=args.quick, seeds=args.seeds, prepare_only=args.prepare_only,
             keep_results=args.keep_results)


def _docs(args: argparse.Namespace) -> None:
    from pathlib import Path

    from cluster import docs

    docs.PROVIDED["cli-reference"] = lambda: docs.cli_reference(build_parser())
    code = docs.docs_command(Path(args.root), args.check)
    if code:
        sys.exit(code)


def _fetch_weights(args: argparse.Namespace) -> None:
    from trainer.backbones import fetch_torchvision_weights

    print(fetch_torchvision_weights(args.model, args.weights))


def _experiment(args: argparse.Namespace) -> None:
    from cluster.experiment import experiment_cli

    execute = None
    if args.ray:
        from cluster.trials import tune_executor

        execute = tune_executor(args.ray_address, args.cpus_per_trial, args.gpus_per_trial,
                                os.path.join(os.path.abspath(args.out), "tune"))
    experiment_cli(args, execute)


def _keep_results_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep-results", action="store_true",
                        help="reuse stored run results made by another version of bgsplit's code (a study spanning "
                             "sessions); results.md counts the runs per code version")


def _trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true", help="load a checkpoint of the previous format "
                        "(a pickled state.pt, no meta.json) as before: this runs whatever code the file holds, so "
                        "only for a file from a trusted source (sets BGSPLIT_TRUST_CHECKPOINT=1, which torchrun "
                        "ranks and Ray tasks inherit)")


def _trust(args: argparse.Namespace) -> None:
    """--trust-checkpoint as the variable every loader reads (Ray tasks get BGSPLIT_* from the driver)."""
    if getattr(args, "trust_checkpoint", False):
        from trainer.checkpoint import TRUST_ENV

        os.environ[TRUST_ENV] = "1"


def _ray_flags(parser: argparse.ArgumentParser, gpus: bool = True) -> None:
    parser.add_argument("--ray", action="store_true", help="run the per-shard work as Ray tasks over the cluster "
                        "(use under `ray job submit`; paths must be reachable from every node)")
    parser.add_argument("--ray-address", default="", help="Ray address; default RAY_ADDRESS or a new local cluster")
    if gpus:
        parser.add_argument("--gpus-per-task", type=float, default=0.0,
                            help="with --ray: GPUs a task holds (1 on a GPU cluster; 0 scores on the CPU)")


LOADER_HELP = ("DataLoader processes decoding images (data.num_workers in a config; 0: in the process itself); "
               "--num-workers / --workers are the old names")
"""One word a meaning across commands: --loader-workers decode, --writers write shards, --world / cluster.num_workers
count ranks (docs/user-guide.md, "Words")."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bgsplit", description="Background Splitting: rare classes in a sea of background")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model from a config (one process; torchrun for several)")
    t.add_argument("--config", help="YAML file (configs/*.yaml)")
    t.add_argument("--debug", action="store_true", help="single process on CPU, fp32, no loader workers")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.aux_weight=0 optim.epochs=5")
    t.add_argument("--ray", action="store_true", help="train on a Ray cluster: cluster.num_workers Ray Train "
                   "workers (use under `ray job submit`; sets and run.out_dir must be reachable from every node)")
    t.add_argument("--ray-address", default="", help="Ray address; default RAY_ADDRESS or a new local cluster")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="per-class AP, mAP, P@100, PR curves, top-scoring grid, JSON + Markdown report")
    e.add_argument("--checkpoint", required=True,
                   help="a checkpoint folder, or a run folder (its newest; also RUN/latest)")
    e.add_argument("--data", required=True, help="evaluation shard set (folder with manifest.json)")
    e.add_argument("--out", required=True, help="report folder")
    e.add_argument("--image-size", type=int, default=0, help="default: the training image size")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--loader-workers", "--num-workers", dest="num_workers", type=int, default=0, help=LOADER_HELP)
    e.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="the forward pass's dtype (auto: bf16 on a GPU, fp16 on one without, fp32 on CPU); "
                   "scores are an fp32 softmax either way")
    _trust_flag(e)
    _ray_flags(e)
    e.set_defaults(func=_eval)

    s = sub.add_parser("shards", help="shard-set tools").add_subparsers(dest="shards_command", required=True)
    b = s.add_parser("build", help="write a -BG WebDataset shard set from a source")
    from data.build import BuildRequest
    from data.sources import SOURCES

    _flags_of(b, BuildRequest)
    _ray_flags(b, gpus=False)
    b.set_defaults(func=_shards_build)
    pl = s.add_parser("plan", help="an epoch's steps, padding and shard reads for a training world")
    pl.add_argument("--data", required=True, help="training shard set (folder or URL with manifest.json)")
    pl.add_argument("--world", type=int, required=True, help="data-parallel ranks")
    pl.add_argument("--loader-workers", "--workers", dest="workers", type=int, required=True,
                    help=LOADER_HELP + " per rank")
    pl.add_argument("--batch-size", type=int, required=True, help="per-rank batch (data.batch_size)")
    pl.add_argument("--mode", choices=("exact", "resampled"), default="exact")
    pl.add_argument("--policy", choices=("pad", "drop"), default="pad")
    pl.add_argument("--sampling", choices=("natural", "balanced"), default="natural")
    pl.add_argument("--positive-fraction", type=float, default=0.125, help="with --sampling balanced")
    pl.add_argument("--seed", type=int, default=0, help="run.seed (the shard order; epoch 0 is shown)")
    pl.add_argument("--json", action="store_true", help="the whole summary as JSON")
    pl.set_defaults(func=_shards_plan)

    al = s.add_parser("add-labels", help="a new version of a training set with reviewed candidates added: "
                      "confirmed positives to their class, rejected ones as hard-negative background")
    al.add_argument("--data", required=True, help="the training shard set to extend (left untouched)")
    al.add_argument("--labels", required=True, help="labels.csv exported from review.html")
    al.add_argument("--pool", required=True, help="the shard set the candidates were mined from (mine's OUT/pool "
                    "when the pool was a source)")
    al.add_argument("--out", required=True, help="where the new version goes (its manifest lists the parent's "
                    "shards by URL: nothing existing is copied)")
    al.set_defaults(func=_shards_add_labels)

    m = sub.add_parser("mine", help="score an unlabeled pool, keep the top N per rare class; candidates.jsonl, "
                       "contact sheets, review.html (one process, torchrun, or --ray)")
    m.add_argument("--checkpoint", default="",
                   help="a checkpoint folder, or a run folder (its newest; also RUN/latest); a probe's too")
    m.add_argument("--positives", default="",
                   help="instead of --checkpoint, start from a handful of examples: a shard set, or a source with "
                   "a folder per class (folder:examples, with --rare); a probe on the teacher's features of them "
                   "against a sample of the pool ranks it (written to OUT/model). A second round: the set "
                   "`shards add-labels` made from the first round's labels")
    m.add_argument("--rare", default="", help="with a --positives source: the classes to mine for (comma-separated)")
    m.add_argument("--probe", choices=("logistic", "knn"), default="logistic",
                   help="with --positives: logistic (C 1e-5, balanced) or kNN to the examples")
    m.add_argument("--background", type=int, default=5000,
                   help="with --positives: pool images (a key-hash sample) the probe fits as background")
    m.add_argument("--embeddings", default="",
                   help="with --positives or a probe checkpoint: where the pool's teacher features are kept for "
                   "every later round (default POOL/embeddings; 'none': embed afresh, keep nothing)")
    m.add_argument("--pool", required=True, help="a shard set, or any source `shards build` reads ("
                   + ", ".join(f"{scheme}:" for scheme in SOURCES) + "), local or on S3; a source is built into "
                   "OUT/pool first")
    m.add_argument("--top", type=int, default=100, help="candidates kept per rare class")
    m.add_argument("--out", required=True)
    m.add_argument("--exclude", nargs="*", default=[], help="shard sets whose keys are never candidates (the "
                   "training and validation sets; read whole, so meant for sets of up to a few million)")
    m.add_argument("--image-size", type=int, default=0, help="default: the training image size")
    m.add_argument("--batch-size", type=int, default=256)
    m.add_argument("--loader-workers", "--num-workers", dest="num_workers", type=int, default=0, help=LOADER_HELP)
    m.add_argument("--writers", "--workers", dest="workers", type=int, default=0,
                   help="shard-writing processes building a source pool into shards (as in shards build)")
    m.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="the trunk's dtype (auto: bf16 on a GPU, fp32 on CPU); scores are an fp32 softmax either way")
    _trust_flag(m)
    _ray_flags(m)
    m.set_defaults(func=_mine)

    tl = sub.add_parser("teacher-label", help="store the teacher's top-k labels in shard sets (per shard; "
                        "resumable; under torchrun every rank labels its share)")
    tl.add_argument("--data", nargs="+", required=True)
    tl.add_argument("--teacher", default="efficientnet_lite0")
    tl.add_argument("--weights", default="")
    tl.add_argument("--image-size", type=int, default=224)
    tl.add_argument("--topk", type=int, default=5)
    tl.add_argument("--batch-size", type=int, default=128)
    tl.add_argument("--loader-workers", "--num-workers", dest="num_workers", type=int, default=0,
                    help=LOADER_HELP)
    tl.add_argument("--overwrite", action="store_true")
    tl.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                    help="the teacher's compute dtype (auto: bf16 on GPU, fp32 on CPU); labels are fp32 softmax")
    _ray_flags(tl)
    tl.set_defaults(func=_teacher_label)

    tr = sub.add_parser("teacher-report", help="what the teacher makes of a set's background, per input size: "
                        "does it split it into stable groups BG splitting can learn from? (results.md, results.json)")
    tr.add_argument("--data", required=True, help="a shard set (its background images are sampled)")
    tr.add_argument("--sizes", default="64,160,224", help="input sizes to try, comma-separated")
    tr.add_argument("--images", type=int, default=1000, help="background images in the sample")
    tr.add_argument("--teacher", default="efficientnet_lite0")
    tr.add_argument("--weights", default="")
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--out", required=True, help="folder (or URL) for results.md and results.json")
    tr.set_defaults(func=_teacher_report)

    d = sub.add_parser("demo", help="Fashion-MNIST-BG: fine-tuning vs BG splitting vs imbalance baselines")
    d.add_argument("--out", default="artifacts/demo")
    d.add_argument("--quick", action="store_true", help="one seed, shorter runs (a smoke test)")
    d.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (configs/experiment_demo.yaml's otherwise)")
    d.add_argument("--prepare-only", action="store_true", help="build and check the data, train nothing")
    _keep_results_flag(d)
    d.set_defaults(func=_demo)

    x = sub.add_parser("experiment", help="tuned comparison: settings x methods x seeds, hyper-parameters chosen "
                       "on validation with one shared grid and budget, test scored once per final run")
    x.add_argument("config", help="experiment YAML (configs/experiment_fmnist.yaml)")
    x.add_argument("--out", default="artifacts/experiment")
    x.add_argument("--quick", action="store_true", help="1 setting, 2 methods, 2 grid points, 1 seed (a smoke run)")
    _keep_results_flag(x)
    x.add_argument("--ray", action="store_true", help="run each phase's train-and-score runs as Ray Tune trials in "
                   "parallel (use under `ray job submit`; --out and the sets must be reachable from every node)")
    x.add_argument("--ray-address", default="", help="Ray address; default RAY_ADDRESS or a new local cluster")
    x.add_argument("--cpus-per-trial", type=float, default=1.0, help="with --ray: CPUs (and torch threads) a trial")
    x.add_argument("--gpus-per-trial", type=float, default=0.0, help="with --ray: GPUs a trial (1 on a GPU cluster)")
    x.set_defaults(func=_experiment)

    dc = sub.add_parser("docs", help="rewrite every generated table of README.md and docs/ from the committed "
                        "results (bench/results/) and the reference pages from the code; --check changes nothing")
    dc.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 on a block that differs from its "
                    "render, or a source or cited results path that is not committed (git ls-files)")
    dc.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), help="the checkout (default: the "
                    "one bgsplit runs from)")
    dc.set_defaults(func=_docs)

    f = sub.add_parser("fetch-weights", help="download torchvision weights into torch's cache (needs a network)")
    f.add_argument("model")
    f.add_argument("weights", help="e.g. IMAGENET1K_V1")
    f.set_defaults(func=_fetch_weights)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "out", None):
            from trainer.runtime import output_location

            args.out = output_location(args.out, "--out", fan_out=getattr(args, "ray", False))
        args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, StorageOutage, DiskFull) as e:
        print(f"bgsplit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
