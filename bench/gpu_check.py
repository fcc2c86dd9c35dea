"""GPU check: the real training pipeline next to a synthetic-data step of the same model, in the same run.

Real: shards on local disk -> data.loader (decode, random-resized crop, flip in worker processes) -> the
project's Trainer.train_step (BG-split task, online or cached teacher, bf16 autocast, channels_last, optional
torch.compile). Synthetic: the same Trainer.train_step on one batch already on the GPU. The ratio real/synthetic
says whether the input pipeline keeps the GPU busy (goal >= 0.90). ../shared/performance.md has the H200
anchors (compiled ResNet-50 BG-split step with an online ResNet-50 teacher: ~5,200 img/s).

    python bench/gpu_check.py                       # on a lent GPU: ~4 minutes, prints a table, writes JSON
    python bench/gpu_check.py --device cpu --quick  # smoke check of the script itself on a CPU machine

The images are generated (smooth random colour fields with texture, 500x375 JPEG q90 like the anchor's), then
built into raw and pre-resized (short side 256) shard sets with the project's ingest, so the script needs no
dataset. Weights are random (NONE): throughput does not depend on them and nothing is downloaded.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_folder(folder: Path, count: int, size: tuple[int, int] = (500, 375)) -> None:
    """root/<class>/<file>.jpg with two classes (1 rare, 0 background at ~98%)."""
    from PIL import Image

    for i in range(count):
        label = "1" if i % 50 == 0 else "0"
        path = folder / label / f"img-{i:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        low = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(low).resize(size, Image.BICUBIC), dtype=np.float32)
        img += rng.normal(0, 12, size=img.shape)
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        path.write_bytes(buf.getvalue())


def build(folder: Path, out: Path, resize: int | None) -> str:
    from data.build import BuildRequest, build_command

    build_command(BuildRequest(f"folder:{folder}", str(out), rare="1", max_count=1000, max_mb=64,
                               resize_short_side=resize, workers=min(8, os.cpu_count() or 1)), progress=False)
    return str(out)


def job_config(train: str, args: argparse.Namespace, teacher_mode: str, compile_on: bool):
    from trainer.config import load_config

    return load_config(None, [
        f"data.train={train}", "data.val=", f"data.image_size={args.image_size}", f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}", "data.shuffle_buffer_mb=128", "data.mode=resampled",
        f"model.trunk={args.trunk}", "model.weights=NONE", f"teacher.name={args.trunk}", "teacher.weights=NONE",
        f"teacher.mode={teacher_mode}", "loss.aux_weight=0.1", "optim.lr=0.1", "optim.epochs=1000",
        "optim.warmup_epochs=0", f"run.device={args.device}", f"run.precision={args.precision}",
        "run.channels_last=true", f"engine.compile={str(compile_on).lower()}", "run.progress=false",
        f"run.out_dir={tempfile.mkdtemp(prefix='gpu-check-')}"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer, batches, steps: int, warmup: int) -> float:
    """img/s over ``steps`` optimiser steps after ``warmup`` (compile and cudnn autotune happen there)."""
    it = iter(batches)
    for _ in range(warmup):
        trainer.train_step([next(it)])
    sync(trainer.device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(it)
        images += len(batch["label"])
        trainer.train_step([batch])
    sync(trainer.device)
    return images / (time.perf_counter() - start)


def real_batches(trainer):
    from data.loader import make_loader

    for batch in make_loader(trainer.stream, trainer.cfg.data.num_workers):  # epoch after epoch, as in training
        batch.pop("skipped", None)
        if "image" in batch:
            yield batch


def synthetic_batches(trainer, template: dict[str, Any]):
    """One real batch, moved to the device once and replayed: the step without any input cost."""
    batch = trainer._to_device(template)
    while True:
        yield batch


def measure(train: str, args: argparse.Namespace, teacher_mode: str, compile_on: bool) -> dict[str, Any]:
    from trainer.train import Trainer

    trainer = Trainer.build(job_config(train, args, teacher_mode, compile_on))
    real = real_batches(trainer)
    first = next(real)
    synthetic = timed_steps(trainer, synthetic_batches(trainer, first), args.steps, args.warmup)
    pipeline = timed_steps(trainer, real, args.steps, max(args.warmup // 2, 1))
    return {"teacher": teacher_mode, "compile": compile_on, "synthetic_img_s": round(synthetic, 1),
            "real_img_s": round(pipeline, 1), "ratio": round(pipeline / synthetic, 3)}


def label(train: str, args: argparse.Namespace) -> None:
    """The cached-teacher mode reads labels written by `bgsplit teacher-label` with the same teacher."""
    from trainer.models import build_teacher
    from trainer.teacher_label import label_shard_set
    from trainer.scoring import ScoringConfig
    from trainer.runtime import seed_everything

    # random weights (no download): the same seed as Trainer.build draws them with, so the weights digest that
    # keys the labels matches the teacher the cached run builds
    seed_everything(0)
    teacher = build_teacher(args.trunk, "NONE", args.image_size)
    device = torch.device(args.device)
    label_shard_set(teacher, train, ScoringConfig(args.image_size, 256, precision=args.precision), topk=5,
                    device=device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--trunk", default="resnet50")
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=min(14, (os.cpu_count() or 2) - 1))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--compile", default="off,on", help="comma list of off/on")
    p.add_argument("--data", default="", help="keep the generated images and shard sets here")
    p.add_argument("--out", default="artifacts/bench/gpu_check.json")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.image_size, args.steps, args.warmup = 96, 8, 64, 3, 1
        args.trunk, args.workers, args.compile = "resnet18", 1, "off"
    root = Path(args.data or tempfile.mkdtemp(prefix="bgsplit-gpu-check-"))
    make_folder(root / "photos", args.images)
    sets = {"raw": build(root / "photos", root / "raw", None), "resized": build(root / "photos", root / "resized", 256)}
    label(sets["resized"], args)
    rows = []
    for compile_on in [c == "on" for c in args.compile.split(",")]:
        for shards, teacher_mode in (("raw", "online"), ("resized", "online"), ("resized", "cached")):
            row = {"shards": shards, **measure(sets[shards], args, teacher_mode, compile_on)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"\n{device}, {args.trunk}, batch {args.batch}, {args.image_size} px, {args.precision}, channels_last, "
          f"{args.workers} loader workers\n")
    print("| shards | teacher | compile | synthetic img/s | real pipeline img/s | real/synthetic |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['shards']} | {r['teacher']} | {'on' if r['compile'] else 'off'} | {r['synthetic_img_s']:,.0f} "
              f"| {r['real_img_s']:,.0f} | {r['ratio']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
