"""The `bgsplit` command. Bad input ends in one line, ``bgsplit: error: <what> ...``, and exit status 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from data.settings import ConfigError, Parser, add_flags, from_args
from data.remote import StorageOutage
from data.storage import DiskFull
from trainer.scoring import ScoringConfig


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


def _scoring(args: argparse.Namespace, image_size: int) -> ScoringConfig:
    """The scoring flags (cluster.commands.Scoring) as the one object eval, mine and teacher-label hand their
    passes, so the three read the same flags the same way. ``image_size``: --image-size once the command has put
    its own default (the checkpoint's size, 224) for 0."""
    return ScoringConfig(image_size, args.batch_size, args.num_workers, precision=args.precision)


def _eval(args: argparse.Namespace) -> None:
    from trainer.evaluate import EvalPass

    _trust(args)
    image_size = args.image_size or _trained_size(args.checkpoint)
    if not args.ray:
        _device_for_ranks()
    p = EvalPass(args.data, _scoring(args, image_size), checkpoint=args.checkpoint, report_dir=args.out,
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
    build_command(from_args(BuildRequest, args), runner=runner)


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
        p = LabelPass(location=location, scoring=_scoring(args, args.image_size), topk=args.topk, arch=args.teacher,
                      weights=args.weights, overwrite=args.overwrite)
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
    scoring = _scoring(args, args.image_size or (224 if args.positives else _trained_size(args.checkpoint)))
    rank = 0
    if not args.ray:
        rank, _ = init_distributed(_device_for_ranks())
    pool = broadcast(pool_set(args.pool, args.out, args.workers) if rank == 0 else None)
    checkpoint, exclude = args.checkpoint, tuple(args.exclude)
    embeddings = _embeddings(args, pool, scoring)
    if args.positives:  # mining before any training (trainer/probe_model.py): rank 0 fits, the others wait
        from trainer.probe_model import cold_start, positives_set

        def start() -> tuple[str, str]:
            examples = positives_set(args.positives, [c for c in args.rare.split(",") if c], args.out, args.workers)
            url, _ = cold_start(examples, pool, args.out, scoring=scoring, kind=args.probe,
                                background=args.background, embeddings=embeddings)
            return url, examples

        checkpoint, examples = broadcast(start() if rank == 0 else None)
        exclude += (examples,)  # the examples are never candidates
    job = MineJob(checkpoint=checkpoint, pool=pool, out=args.out, top=args.top, scoring=scoring, exclude=exclude,
                  embeddings=embeddings)
    summary = _pass(MinePass(job), args)
    if summary is not None:
        print(json.dumps(summary, indent=1))


def _embeddings(args: argparse.Namespace, pool: str, scoring: ScoringConfig) -> str:
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
    done = _pass(EmbedPass(pool=pool, root=root, arch=arch, weights=weights, scoring=scoring), args, more=True)
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


def _trust(args: argparse.Namespace) -> None:
    """--trust-checkpoint as the variable every loader reads (Ray tasks get BGSPLIT_* from the driver)."""
    if getattr(args, "trust_checkpoint", False):
        from trainer.checkpoint import TRUST_ENV

        os.environ[TRUST_ENV] = "1"


def build_parser() -> argparse.ArgumentParser:
    """Every command's flags come from its dataclass (cluster.commands, data.build.BuildRequest) through
    data.settings.add_flags, which records them on the command's parser (``settings``)."""
    from cluster import commands as c
    from data.build import BuildRequest

    p = Parser(prog="bgsplit", description="Background Splitting: rare classes in a sea of background")
    sub = p.add_subparsers(dest="command", required=True)

    def command(parent, name: str, func, *settings: type, help: str = "") -> None:
        """A command whose help is its first dataclass's docstring, its flags every field of ``settings``."""
        parser = parent.add_parser(name, help=help or " ".join((settings[0].__doc__ or "").split()))
        add_flags(parser, *settings)
        parser.set_defaults(func=func)

    ray = (c.RayTasks, c.RayAddress, c.RayGpus)
    command(sub, "train", _train, c.TrainArgs, c.RayAddress)
    command(sub, "eval", _eval, c.EvalArgs, c.Trust, *ray)
    s = sub.add_parser("shards", help="shard-set tools").add_subparsers(dest="shards_command", required=True)
    command(s, "build", _shards_build, BuildRequest, c.RayTasks, c.RayAddress,
            help="write a -BG WebDataset shard set from a source")
    command(s, "plan", _shards_plan, c.PlanArgs)
    command(s, "add-labels", _shards_add_labels, c.AddLabelsArgs)
    command(sub, "mine", _mine, c.MineArgs, c.Trust, *ray)
    command(sub, "teacher-label", _teacher_label, c.TeacherLabelArgs, *ray)
    command(sub, "teacher-report", _teacher_report, c.TeacherReportArgs)
    command(sub, "demo", _demo, c.DemoArgs, c.KeepResults)
    command(sub, "experiment", _experiment, c.ExperimentArgs, c.KeepResults, c.ExperimentRay, c.RayAddress,
            c.TrialResources)
    command(sub, "docs", _docs, c.DocsArgs)
    command(sub, "fetch-weights", _fetch_weights, c.FetchWeightsArgs)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        args = build_parser().parse_args(argv)
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
