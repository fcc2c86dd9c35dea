"""A BG-split training step with a frozen, shared trunk prefix against full fine-tuning, side by side in one run.

Three ways to take the same step (student forward + backward + SGD update, online teacher forward):
  full           model.frozen_stages=0: the whole trunk trains; the teacher runs whole
  frozen         model.frozen_stages=N, teacher.share_prefix=false: the prefix runs without gradients, the teacher
                 still runs whole
  frozen+shared  model.frozen_stages=N: the teacher runs only its upper stages on the student's prefix
Images per second of each at each input size, and the ratio to full fine-tuning in the same run (quote ratios:
the machine is shared). Synthetic uint8 batches already on the device: the step alone, no input pipeline.

    python bench/prefix_step.py --json bench/results/prefix_step/results.json          # CPU, 160 and 224 px
    python bench/prefix_step.py --device cuda --batch 256 --precision bf16 --steps 30  # a lent GPU
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODES = {"full": (False, True), "frozen": (True, False), "frozen+shared": (True, True)}
"""mode -> (prefix frozen, teacher allowed to share it)"""


def build_step(args: argparse.Namespace, size: int, mode: str, frozen_stages: int):
    """The project's own pieces (task, engine, optimiser) around a student and its teacher, as Trainer.build
    wires them; returns step() and whether the teacher really shares the prefix."""
    from trainer.config import load_config
    from trainer.engine import DDPEngine, autocast_dtype, build_optimizer
    from trainer.models import StudentSpec, build_student, build_teacher
    from trainer.task import BGSplitTask

    frozen, share = MODES[mode]
    n = frozen_stages if frozen else 0
    cfg = load_config(None, [f"model.trunk={args.trunk}", f"model.weights={args.weights}",
                             f"teacher.name={args.trunk}", f"teacher.weights={args.weights}", "teacher.image_size=0",
                             f"data.image_size={size}", f"data.batch_size={args.batch}", "loss.aux_weight=0.1",
                             f"model.frozen_stages={n}", f"teacher.share_prefix={str(share).lower()}",
                             f"run.precision={args.precision}", f"run.device={args.device}", "optim.lr=0.01"])
    device = torch.device(args.device)
    torch.manual_seed(0)  # random weights (NONE) drawn the same for both networks: the prefix can be shared
    teacher = build_teacher(args.trunk, args.weights, size)
    torch.manual_seed(0)
    spec = StudentSpec(args.trunk, 4, teacher.num_classes)
    student = build_student(spec, teacher, weights=args.weights, frozen_stages=n).to(device)
    shared = n if share and n and teacher.to(device).shares_prefix(student, size) else 0
    dtype = autocast_dtype(args.precision, device)
    channels_last = device.type == "cuda"
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    teacher.prepare(device, dtype, channels_last=channels_last)
    engine = DDPEngine(student, build_optimizer(student, cfg), cfg, device)
    task = BGSplitTask(engine.model, teacher, cfg, [1000, 10, 10, 10], 1e9, teacher_dtype=dtype)
    task.shared_prefix = shared
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    batch = {"image": images, "label": torch.randint(0, 4, (args.batch,), generator=g).to(device)}
    student.train()

    def step() -> torch.Tensor:
        with engine.autocast():
            out = task(batch, 0.0)
        engine.backward(out["loss"], last=True, micro_batches=1)
        engine.step()
        return out["loss"].detach()

    return step, bool(shared)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step, args: argparse.Namespace) -> list[float]:
    """Seconds per step over ``repeats`` blocks of ``steps`` steps (after ``warmup``), one figure a block."""
    for _ in range(args.warmup):
        step()
    blocks = []
    for _ in range(args.repeats):
        sync(args.device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(args.device)
        blocks.append((time.perf_counter() - start) / args.steps)
    return blocks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--trunk", default="efficientnet_lite0")
    p.add_argument("--weights", default="DEFAULT", help="DEFAULT (offline for efficientnet_lite0) or NONE")
    p.add_argument("--sizes", default="160,224")
    p.add_argument("--frozen-stages", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--steps", type=int, default=4, help="steps a timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks a mode (the median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default="", help="write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or "cpu")
    rows: list[dict[str, Any]] = []
    for size in [int(s) for s in args.sizes.split(",")]:
        # interleaved rounds: each mode timed once a round, so a load change on a shared machine hits all alike
        steps = {mode: build_step(args, size, mode, args.frozen_stages) for mode in MODES}
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode, (step, _) in steps.items():
                times[mode] += time_steps(step, argparse.Namespace(**{**vars(args), "repeats": 1}))
        full = statistics.median(times["full"])
        for mode, (_, shared) in steps.items():
            sec = statistics.median(times[mode])
            row = {"device": device, "trunk": args.trunk, "image_size": size, "mode": mode,
                   "frozen_stages": args.frozen_stages if mode != "full" else 0, "teacher_shares_prefix": shared,
                   "batch": args.batch, "precision": args.precision, "step_ms": round(1000 * sec, 1),
                   "img_s": round(args.batch / sec, 1), "speedup_vs_full": round(full / sec, 2),
                   "block_ms": [round(1000 * t, 1) for t in times[mode]]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{device}, {args.trunk}, batch {args.batch}, {args.precision}, frozen_stages {args.frozen_stages}\n")
    print("| px | mode | img/s | step ms | speed-up vs full |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['image_size']} | {r['mode']} | {r['img_s']:,.1f} | {r['step_ms']:,.1f} | "
              f"{r['speedup_vs_full']:.2f}x |")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
