"""model.frozen_stages: a frozen trunk prefix that never moves, is never optimised, and that a teacher with the same
weights shares instead of computing it again (teacher.share_prefix)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from trainer.backbones import load_backbone, trunk_stages
from trainer.checkpoint import latest_checkpoint, load_checkpoint
from trainer.models import StudentSpec, build_student, build_teacher
from trainer.train import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
ONLINE = ["teacher.mode=online", "teacher.image_size=0", "loss.aux_weight=0.1"]


@pytest.mark.parametrize("name,weights", [("efficientnet_lite0", "DEFAULT"), ("resnet18", "NONE"),
                                          ("efficientnet_b0", "NONE")])
def test_prefix_then_rest_is_the_whole_trunk_at_every_split(name, weights):
    torch.manual_seed(0)
    trunk = load_backbone(name, weights).trunk.eval()
    stages = trunk_stages(trunk)
    x = torch.randn(2, 3, 64, 64)
    whole = trunk(x)
    sizes = []
    for n in range(stages.count + 1):
        h = stages.prefix(x, n)
        sizes.append(h.shape[1])
        torch.testing.assert_close(stages.rest(h, n), whole, rtol=0, atol=0)
    assert len(set(sizes)) > 2  # the splits really are at different depths
    # the prefix's modules are nested: stage n's are a superset of stage n-1's
    counts = [len(stages.prefix_modules(n)) for n in range(stages.count + 1)]
    assert counts == sorted(counts) and counts[0] == 0


def _spec(aux: int = 1000) -> StudentSpec:
    return StudentSpec("efficientnet_lite0", 3, aux)


def test_shared_prefix_teacher_logits_equal_a_whole_teacher_forward():
    teacher = build_teacher("efficientnet_lite0", "", 64)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    for n in (1, 4, 7):
        student = build_student(_spec(), teacher, weights="DEFAULT", frozen_stages=n).train()
        assert teacher.shares_prefix(student, 64)
        out = student(images, return_prefix=True)
        shared = teacher.from_prefix(out["prefix"], n)
        torch.testing.assert_close(shared, teacher(images), rtol=1e-5, atol=1e-5)
    # not the same input size, another teacher's weights, nothing frozen: never shared
    student = build_student(_spec(), teacher, weights="DEFAULT", frozen_stages=3)
    assert not teacher.shares_prefix(student, 96)
    assert not teacher.shares_prefix(build_student(_spec(), teacher, weights="DEFAULT"), 64)
    random_prefix = build_student(_spec(), teacher, weights="NONE", frozen_stages=3)
    assert not teacher.shares_prefix(random_prefix, 64)


def test_frozen_prefix_is_in_eval_mode_without_gradients_or_optimiser_state(tiny_sets, tmp_path):
    cfg = tiny_config(tiny_sets, tmp_path / "run", *ONLINE, "model.frozen_stages=4", "run.max_steps=6",
                      "optim.epochs=1")
    trainer = Trainer.build(cfg)
    assert trainer.task.shared_prefix == 4
    student = trainer.student
    prefix = {id(p) for m in student.stages().prefix_modules(4) for p in m.parameters()}
    before = {k: v.clone() for k, v in student.state_dict().items()}
    frozen_names = [k for k, p in student.named_parameters() if id(p) in prefix]
    assert frozen_names and all(not p.requires_grad for p in student.parameters() if id(p) in prefix)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimised & prefix and optimised  # the rest trains
    student.train()
    assert all(not m.training for m in student.stages().prefix_modules(4))
    assert student.trunk.model._blocks[-1].training  # the upper stages train
    summary = trainer.fit()
    assert summary["teacher_shares_prefix"] and summary["frozen_stages"] == 4
    after = load_checkpoint(summary["checkpoint"])["student"]
    moved = []
    for k, v in before.items():
        if k in frozen_names or (k.startswith("trunk.") and any(k.startswith(f) for f in _prefix_buffers(student))):
            assert torch.equal(after[k], v), f"{k} moved"
        elif v.is_floating_point() and not torch.equal(after[k], v):
            moved.append(k)
    assert any(k.startswith("trunk.model._blocks.15") for k in moved) and "main_head.weight" in moved


def _prefix_buffers(student) -> list[str]:
    """Name prefixes of the frozen modules, for their BatchNorm running statistics."""
    names = {id(m): n for n, m in student.named_modules()}
    return [names[id(m)] + "." for m in student.stages().prefix_modules(student.frozen_stages)]


def test_shared_and_separate_teacher_give_the_same_loss(tiny_sets, tmp_path):
    losses = {}
    for share in ("true", "false"):
        cfg = tiny_config(tiny_sets, tmp_path / share, *ONLINE, "model.frozen_stages=3", "model.dropout=false",
                          f"teacher.share_prefix={share}")
        trainer = Trainer.build(cfg)
        assert trainer.task.shared_prefix == (3 if share == "true" else 0)
        from data.loader import make_loader

        batch = next(iter(make_loader(trainer.stream, 0)))
        trainer.student.train()
        out = trainer.task(trainer._to_device(batch), 0.0)
        losses[share] = (float(out["loss"].detach()), float(out["aux_loss"].detach()))
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)


def test_resume_keeps_the_frozen_prefix_and_refuses_another_one(tiny_sets, tmp_path):
    over = [*ONLINE, "model.frozen_stages=5", "run.checkpoint_every=3", "optim.epochs=1"]
    first = train(tiny_config(tiny_sets, tmp_path / "r", *over, "run.max_steps=3"))
    second = train(tiny_config(tiny_sets, tmp_path / "r", *over, "run.max_steps=6", "run.resume=auto"))
    assert second["resumed_from"].endswith("step-00000003") and second["steps"] == 6
    a, b = load_checkpoint(first["checkpoint"])["student"], load_checkpoint(second["checkpoint"])["student"]
    assert torch.equal(a["trunk.model._blocks.8._project_conv.weight"], b["trunk.model._blocks.8._project_conv.weight"])
    assert not torch.equal(a["trunk.model._blocks.12._project_conv.weight"],
                           b["trunk.model._blocks.12._project_conv.weight"])
    ckpt = latest_checkpoint(str(tmp_path / "r"))
    before = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    with pytest.raises(ValueError) as e:
        train(tiny_config(tiny_sets, tmp_path / "r", *[o for o in over if "frozen" not in o],
                          "model.frozen_stages=2", "run.max_steps=9", "run.resume=auto"))
    msg = str(e.value)
    assert "\n" not in msg and "model.frozen_stages=5" in msg and "model.frozen_stages=2" in msg and ckpt in msg
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == before  # nothing lost


def test_bad_frozen_stages_are_one_line_errors(tiny_sets, tmp_path):
    from trainer.config import ConfigError

    with pytest.raises(ValueError, match=r"model.frozen_stages=8: the efficientnet_lite0 trunk has 7 stages; use 0"):
        Trainer.build(tiny_config(tiny_sets, tmp_path / "a", *ONLINE, "model.frozen_stages=8"))
    with pytest.raises(ConfigError, match="model.frozen_stages must be >= 0"):
        tiny_config(tiny_sets, tmp_path / "b", "model.frozen_stages=-1")
    spec = StudentSpec("mobilenet_v3_small", 3, 0)
    with pytest.raises(ValueError, match="does not know the stages of the trunk mobilenet_v3_small; use "
                                         "model.frozen_stages=0"):
        build_student(spec, weights="NONE", frozen_stages=2)


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (3, "fp32")])
def test_deepspeed_zero_trains_and_resumes_with_a_frozen_prefix(tiny_sets, tmp_path, stage, precision):
    """DeepSpeed in its own process (it keeps a process group): ZeRO-2 in bf16 casts every parameter, so the
    frozen prefix would reach state.pt bf16-rounded unless its fp32 weights are kept; ZeRO-3 partitions frozen
    parameters too. The frozen weights come back bit for bit, and the run resumes with its optimiser state."""
    out = tmp_path / f"ds{stage}"
    base = [f"data.train={tiny_sets['train']}", "data.val=", "data.image_size=32", "data.batch_size=16",
            "data.shuffle_buffer_mb=0.2", *ONLINE, "optim.lr=0.02", "optim.epochs=1", "optim.warmup_epochs=0.2",
            "run.progress=false", "run.device=cpu", f"run.out_dir={out}", "model.frozen_stages=4",
            "engine.name=deepspeed", f"engine.zero_stage={stage}", f"run.precision={precision}",
            "run.checkpoint_every=3"]
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}

    def run(*extra: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", *base, *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])

    first = run("run.max_steps=3")
    second = run("run.max_steps=5", "run.resume=auto")
    assert second["resumed_from"].endswith("step-00000003") and second["steps"] == 5
    pretrained = build_student(StudentSpec("efficientnet_lite0", 3, 1000), weights="DEFAULT",
                               frozen_stages=4).state_dict()
    names = [f"trunk.model._blocks.{i}._project_conv.weight" for i in (0, 6)] + ["trunk.model._conv_stem.weight",
                                                                                "trunk.model._bn0.running_mean"]
    for ckpt in (first["checkpoint"], second["checkpoint"]):
        weights = load_checkpoint(ckpt)["student"]
        for k in names:
            assert torch.equal(weights[k], pretrained[k]), f"{k} of {ckpt} is not the pre-trained weight"
        assert not torch.equal(weights["trunk.model._blocks.14._project_conv.weight"],
                               pretrained["trunk.model._blocks.14._project_conv.weight"])
