"""The teacher stays frozen, the aux head starts as the teacher's classifier, the fixed background logit is inert."""
import pytest
import torch

from trainer.config import load_config
from trainer.models import StudentSpec, build_student, build_teacher
from trainer.task import BGSplitTask


def _student(trunk, weights, num_classes, teacher, *, aux_classes=None, fixed_background_logit=None, **how):
    """A student of this shape (the aux head over the teacher's classes unless told), trunk from ``weights``."""
    aux = aux_classes if aux_classes is not None else (teacher.num_classes if teacher is not None else 0)
    spec = StudentSpec(trunk, num_classes, aux, fixed_background_logit=fixed_background_logit)
    return build_student(spec, teacher, weights=weights, **how)


def _bn_stats(module):
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n}


def test_teacher_is_frozen_through_training_steps(teacher):
    cfg = load_config(None, ["loss.aux_weight=1.0", "teacher.mode=online"])
    student = _student("efficientnet_lite0", "DEFAULT", 3, teacher)
    task = BGSplitTask(student, teacher, cfg, [10, 1, 1], drw_epoch=100)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    before = _bn_stats(teacher)
    weights = {n: p.clone() for n, p in teacher.named_parameters()}
    assert before, "the teacher must have BatchNorm statistics to check"
    teacher.train()  # a careless caller: must not switch the teacher to train mode
    student.train()
    assert not teacher.training and all(not m.training for m in teacher.modules())
    for _ in range(2):
        batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), "label": torch.tensor([0, 1, 2, 0])}
        out = task(batch, 0.0)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for n, b in _bn_stats(teacher).items():
        assert torch.equal(b, before[n]), n
    for n, p in teacher.named_parameters():
        assert torch.equal(p, weights[n]), n
    # the student did move its own BatchNorm statistics (the check above could fail)
    assert any(not torch.equal(b, s) for b, s in zip(_bn_stats(student).values(), before.values()))
    # and the teacher is no part of the student, so no optimiser or DDP wrapper can reach it
    assert not any(p is q for p in student.parameters() for q in teacher.parameters())


def test_aux_head_starts_as_the_teacher_classifier(teacher):
    student = _student("efficientnet_lite0", "DEFAULT", 3, teacher)
    assert torch.equal(student.aux_head.weight, teacher.classifier.weight)
    assert torch.equal(student.aux_head.bias, teacher.classifier.bias)
    assert student.aux_head.weight.data_ptr() != teacher.classifier.weight.data_ptr()
    off = _student("efficientnet_lite0", "DEFAULT", 3, teacher, init_aux_from_teacher=False)
    assert not torch.equal(off.aux_head.weight, teacher.classifier.weight)


def test_student_and_teacher_agree_at_start(teacher):
    """Same trunk, same weights, aux head = teacher classifier: the aux logits equal the teacher's (eval mode)."""
    student = _student("efficientnet_lite0", "DEFAULT", 3, teacher).eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(student(x)["aux"], teacher(x), atol=1e-4)


@pytest.mark.parametrize("constant", [0.0, 2.5])
def test_fixed_background_logit_has_no_gradient(constant):
    student = _student("efficientnet_lite0", "DEFAULT", 3, None, fixed_background_logit=constant)
    assert student.main_head.out_features == 2  # rare classes only: the background has no weights
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    logits = student(x)["main"]
    assert logits.shape == (3, 3) and torch.all(logits[:, 0] == constant)
    params = [p for p in student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(logits[:, 0].sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    grads_rare = torch.autograd.grad(logits[:, 1].sum(), [student.main_head.weight])
    assert torch.count_nonzero(grads_rare[0]) > 0


def test_missing_weights_file_is_a_one_line_error(tmp_path):
    missing = str(tmp_path / "resnet50.pth")
    with pytest.raises(FileNotFoundError) as e:
        build_teacher("resnet50", missing)
    assert missing in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="bgsplit fetch-weights resnet50 IMAGENET1K_V1"):
        build_teacher("resnet50", "IMAGENET1K_V1")


def test_torchvision_backbone_from_a_local_weights_file(tmp_path):
    import torchvision

    model = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    path = tmp_path / "mnv3.pth"
    torch.save(model.state_dict(), path)
    t = build_teacher("mobilenet_v3_small", str(path))
    assert t.num_classes == 1000 and not any(p.requires_grad for p in t.parameters())
    assert torch.equal(t.classifier.weight, model.classifier[-1].weight)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet5000'"):
        build_teacher("resnet5000")


def test_torchvision_trunk_student_has_both_heads():
    student = _student("mobilenet_v3_small", "NONE", 4, None, aux_classes=10)
    out = student(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert out["main"].shape == (2, 4) and out["aux"].shape == (2, 10)
    assert student.arch == "mobilenet_v3_small"


def test_autocast_dtype_honours_the_precision_on_every_device():
    from trainer.engine import autocast_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device name needs no GPU
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", gpu) is None
    assert autocast_dtype("auto", gpu, bf16_supported=True) == torch.bfloat16
    assert autocast_dtype("auto", gpu, bf16_supported=False) == torch.float16  # V100/T4: fp16 + scaler
    assert autocast_dtype("bf16", cpu) == torch.bfloat16 and autocast_dtype("fp16", cpu) == torch.float16


def test_main_head_scores_stay_fp32_when_the_trunk_runs_in_bf16():
    """Under bf16 autocast, and with the weights themselves cast to bf16 (DeepSpeed's bf16 mode), the main
    logits are the fp32 head applied to the fp32-cast features: not bf16 logits with 8-bit mantissas."""
    import torch.nn.functional as F

    student = _student("resnet18", "NONE", 3, None).eval()
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = student.trunk(student.normalize(x))
        main = student(x)["main"]
    assert features.dtype == torch.bfloat16 and main.dtype == torch.float32
    head = student.main_head
    assert torch.equal(main, F.linear(features.float(), head.weight, head.bias))
    assert len(set(main[:, 1].tolist())) == 64  # 64 distinct scores (bf16 logits would tie many)
    student.to(torch.bfloat16)
    with torch.no_grad():
        cast = student(x)["main"]
    assert cast.dtype == torch.float32 and student.normalize.mean.dtype == torch.bfloat16
    torch.testing.assert_close(cast, main, atol=0.5, rtol=0.1)  # the same network, one rounding apart


def test_teacher_prepared_for_a_gpu_is_cast_once_and_channels_last(tiny_sets):
    """prepare() casts the frozen weights once (autocast would re-cast them every step) and lays convolutions
    out channels_last, keeping the input normalisation and the weights digest of the fp32 original; its top-1
    labels on real images agree with the fp32 teacher's."""
    from conftest import TEACHER_SIZE
    from data.loader import ShardStream, make_loader
    from data.config import LoaderConfig
    from data.shards import read_manifest

    stream = ShardStream(read_manifest(tiny_sets["test"]), LoaderConfig(image_size=TEACHER_SIZE, batch_size=96),
                         train=False)
    batch = next(iter(make_loader(stream, 0)))
    reference = build_teacher("efficientnet_lite0", "", TEACHER_SIZE)
    teacher = build_teacher("efficientnet_lite0", "", TEACHER_SIZE)
    digest = teacher.digest()
    teacher.prepare(torch.device("cpu"), torch.bfloat16, channels_last=True)
    assert teacher.digest() == digest
    assert all(p.dtype == torch.bfloat16 for p in teacher.trunk.parameters())
    assert teacher.normalize.mean.dtype == torch.float32
    convs = [m.weight for m in teacher.trunk.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    logits = teacher(batch["image"])
    assert logits.dtype == torch.float32
    agree = (logits.argmax(1) == reference(batch["image"]).argmax(1)).float().mean()
    assert agree >= 0.85, f"bf16 teacher agrees with fp32 on {agree:.0%} of top-1 labels"


def test_aux_head_is_not_copied_from_a_teacher_with_other_weights(teacher):
    """Same architecture name, other weights (here a randomly initialised trunk): the teacher's classifier reads
    features this trunk does not make, so the aux head starts fresh."""
    random_trunk = _student("efficientnet_lite0", "NONE", 3, teacher)
    assert not torch.equal(random_trunk.aux_head.weight, teacher.classifier.weight)
    assert torch.equal(_student("efficientnet_lite0", "DEFAULT", 3, teacher).aux_head.weight,
                       teacher.classifier.weight)


def test_an_unset_teacher_weights_means_the_papers_resnet50_v1():
    from trainer.models import teacher_weights

    assert teacher_weights("resnet50", "") == "IMAGENET1K_V1"  # torchvision's DEFAULT would be V2
    assert teacher_weights("resnet50", "IMAGENET1K_V2") == "IMAGENET1K_V2"
    assert teacher_weights("efficientnet_lite0", "") == "DEFAULT"


def test_inat_configs_use_the_authors_crop_scale():
    from pathlib import Path

    for name in ("inat_bg_1.yaml", "inat_bg_100.yaml"):
        cfg = load_config(str(Path(__file__).parents[1] / "configs" / name), [])
        assert cfg.data.min_crop_scale == 0.08, name  # torchvision's RandomResizedCrop default (0.08, 1)


def test_model_dropout_false_turns_off_dropout_and_stochastic_depth():
    """With frozen BN statistics the only train-mode randomness is dropout and drop-connect: off, train mode
    gives eval mode's output; on (the default), it does not (so the check can fail). torchvision trunks keep
    theirs in Dropout and StochasticDepth modules."""
    from torchvision.ops import StochasticDepth

    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    for dropout in (True, False):
        torch.manual_seed(0)
        student = _student("efficientnet_lite0", "DEFAULT", 3, None, freeze_bn_stats=True, dropout=dropout)
        with torch.no_grad():
            evaluated = student.eval()(x)["main"]
            trained = student.train()(x)["main"]
        assert torch.allclose(trained, evaluated, atol=1e-5) is (not dropout), dropout
    for dropout in (True, False):
        trunk = _student("efficientnet_b0", "NONE", 3, None, dropout=dropout).trunk
        rates = [m.p for m in trunk.modules() if isinstance(m, (torch.nn.Dropout, StochasticDepth))]
        assert rates and (max(rates) > 0) is dropout
