"""The method's wiring, against values worked out by hand: the LR schedule, the train/eval image geometry, the
task's total loss and where its gradient goes, and LDAM's cosine head (docs: ../shared/method.md).

Each test says in a comment which wrong implementation it would catch."""
from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from trainer.config import OptimConfig, load_config
from trainer.models import NormedLinear, Student, StudentSpec, build_student
from trainer.schedule import build_scheduler, lr_at
from trainer.task import BGSplitTask

# -- LR schedule ------------------------------------------------------------------------------------------------

PAPER = OptimConfig()  # the recipe's defaults: 0.001 -> 0.01 over 1 epoch, x0.1 at 21/41/61/81 of 90


def test_the_papers_defaults_are_the_recipe():
    """Catches a changed default (another LR, warm-up or milestone list) that would silently change the recipe."""
    assert (PAPER.lr, PAPER.warmup_start_lr, PAPER.warmup_epochs, PAPER.epochs, PAPER.schedule, PAPER.gamma) == \
        (0.01, 0.001, 1.0, 90.0, "step", 0.1)
    assert PAPER.milestones == [21.0, 41.0, 61.0, 81.0]


# step -> LR at 10 steps an epoch, worked out by hand: warm-up 0.001 + 0.009 * step / 10, then 0.01 * 0.1^k
PAPER_LRS = {0: 0.001, 1: 0.0019, 5: 0.0055, 9: 0.0091, 10: 0.01, 11: 0.01, 209: 0.01, 210: 0.001, 409: 0.001,
             410: 1e-4, 610: 1e-5, 809: 1e-5, 810: 1e-6, 899: 1e-6}


@pytest.mark.parametrize("step, want", sorted({**PAPER_LRS, 5000: 1e-6}.items()))
def test_step_schedule_warms_up_linearly_then_steps_at_each_milestone(step, want):
    """Catches a warm-up that is not linear in steps, that ends early or late (step 9 must still be below 0.01,
    step 10 at it), a milestone applied one epoch off (step 209 vs 210), and a gamma applied once instead of once
    per milestone passed."""
    assert lr_at(step, 10, PAPER) == pytest.approx(want, rel=1e-9)


COSINE = OptimConfig(lr=0.1, warmup_start_lr=0.0, warmup_epochs=2.0, epochs=10.0, schedule="cosine")
# after 2 warm-up epochs, 0.05 * (1 + cos(pi * (epoch - 2) / 8)); 4 steps an epoch
COSINE_LRS = {0: 0.0, 4: 0.05, 8: 0.1, 16: 0.05 * (1 + math.sqrt(0.5)), 24: 0.05, 32: 0.05 * (1 - math.sqrt(0.5)),
              40: 0.0, 44: 0.0}


@pytest.mark.parametrize("step, want", sorted(COSINE_LRS.items()))
def test_cosine_schedule_after_warm_up(step, want):
    """Catches a cosine that starts at step 0 instead of after the warm-up (step 16 would be 0.085 vs 0.0732),
    one that spans all epochs instead of epochs - warm-up, and one that goes back up past the end (step 44)."""
    assert lr_at(step, 4, COSINE) == pytest.approx(want, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("cfg, steps_per_epoch, table", [(PAPER, 10, PAPER_LRS), (COSINE, 4, COSINE_LRS)])
def test_lambda_lr_driven_by_an_optimiser_gives_the_same_lrs(cfg, steps_per_epoch, table):
    """The trainer steps the scheduler once after each optimiser step; the LR the optimiser uses at step t must
    be the table's. Catches a scheduler one step late or early (the LambdaLR counter starts at 0 and step()
    is called after the update), and a base LR other than cfg.lr (the factor is lr_at / lr)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=123.0)  # build_scheduler must override whatever the optimiser was built with
    sched = build_scheduler(opt, steps_per_epoch, cfg)
    seen = {}
    for step in range(max(table) + 1):
        if step in table:
            seen[step] = opt.param_groups[0]["lr"]
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
    assert seen == pytest.approx(table, rel=1e-9, abs=1e-15)


def test_a_scheduler_restored_from_its_state_dict_continues_at_the_same_lr():
    """Catches a resume that restarts the warm-up (the LR would fall back to 0.001)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01)
    sched = build_scheduler(opt, 10, PAPER)
    for _ in range(215):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    again = build_scheduler(opt2, 10, PAPER)
    again.load_state_dict(sched.state_dict())
    again.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"]) == pytest.approx(0.001)


# -- image geometry -------------------------------------------------------------------------------------------

def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _quadrants(width: int, height: int, margin: int = 0) -> np.ndarray:
    """R on the left half, B on the right half, G on the top half; ``margin`` columns (landscape) or rows
    (portrait) at both ends of the long side are mid grey, for a centre crop to remove."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, : width // 2, 0] = 255
    img[:, width // 2:, 2] = 255
    img[: height // 2, :, 1] = 255
    if margin and width > height:
        img[:, :margin] = img[:, width - margin:] = 128
    elif margin:
        img[:margin] = img[height - margin:] = 128
    return img


def test_eval_resizes_the_short_side_then_centre_crops_a_landscape_image():
    """60 wide x 30 high, size 16, ratio 1.15: the short side goes to round(18.4) = 18, so the image to 36 x 18,
    and the centre crop is the box (10, 1, 26, 17) of that: worked out by hand, then done with plain PIL calls.

    Catches: H and W transposed (the authors' defect: red would be on top), a squash to 16 x 16 (the grey
    margins would show), a crop from the corner instead of the centre, a resize of the long side, or another
    ratio (other pixels)."""
    from data.transforms import eval_transform

    img = _quadrants(60, 30, margin=10)
    out = eval_transform(_png(img), 16, 1.15)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    want = Image.fromarray(img).resize((36, 18), Image.BILINEAR).crop((10, 1, 26, 17))
    assert torch.equal(out, torch.from_numpy(np.array(want)).permute(2, 0, 1))
    hwc = out.permute(1, 2, 0).numpy().astype(int)
    # the quadrants away from the (blended) centre lines: rows/columns 0-6 and 9-15
    top, bottom, left, right = slice(0, 7), slice(9, 16), slice(0, 7), slice(9, 16)
    for rows, cols, colour in [(top, left, (255, 255, 0)), (top, right, (0, 255, 255)),
                               (bottom, left, (255, 0, 0)), (bottom, right, (0, 0, 255))]:
        assert (np.abs(hwc[rows, cols] - colour) <= 2).all(), (rows, cols, colour)
    # the 10-pixel grey margins lie outside the crop (kept: x from 16.7 to 43.3 of 60)
    assert not (np.abs(hwc - 128) <= 40).all(axis=2).any()


def test_eval_keeps_a_portrait_image_upright():
    """30 wide x 60 high: the short side (width) goes to 18 -> 18 x 36, centre crop (1, 10, 17, 26). Catches
    code that assumes landscape input, or swaps the axes of a portrait image."""
    from data.transforms import eval_transform

    img = _quadrants(30, 60, margin=10)
    out = eval_transform(_png(img), 16, 1.15)
    want = Image.fromarray(img).resize((18, 36), Image.BILINEAR).crop((1, 10, 17, 26))
    assert torch.equal(out, torch.from_numpy(np.array(want)).permute(2, 0, 1))
    hwc = out.permute(1, 2, 0).numpy().astype(int)
    # top rows are the image's top half (G), left columns its left half (R)
    assert (hwc[0, 0] == (255, 255, 0)).all() and (hwc[15, 15] == (0, 0, 255)).all()
    assert not (np.abs(hwc - 128) <= 40).all(axis=2).any()


def test_eval_ratio_sets_how_much_is_cropped_away():
    """At ratio 1.0 the 16-pixel short side is not cropped at all and the long side loses 8 + 8 of 32 resized
    columns; at 1.5 more of both is cut. Catches a resize_ratio that is ignored."""
    from data.transforms import eval_transform

    img = _quadrants(60, 30)
    data = _png(img)
    for ratio, (w, h) in [(1.0, (32, 16)), (1.5, (48, 24))]:
        left, top = (w - 16) // 2, (h - 16) // 2
        want = Image.fromarray(img).resize((w, h), Image.BILINEAR).crop((left, top, left + 16, top + 16))
        assert torch.equal(eval_transform(data, 16, ratio), torch.from_numpy(np.array(want)).permute(2, 0, 1))
    assert not torch.equal(eval_transform(data, 16, 1.0), eval_transform(data, 16, 1.5))


class _Flip:
    """A numpy Generator whose flip draw (``random()``, the last draw of ``train_transform``) is fixed."""

    def __init__(self, seed: int, flip: bool):
        self.rng, self.flip = np.random.default_rng(seed), flip

    def uniform(self, *a):
        return self.rng.uniform(*a)

    def integers(self, *a):
        return self.rng.integers(*a)

    def random(self):
        return 0.0 if self.flip else 0.99


def _monotone(a: np.ndarray, axis: int, increasing: bool) -> bool:
    d = np.diff(a.astype(int), axis=axis)
    return bool((d >= 0).all() if increasing else (d <= 0).all())


@pytest.mark.parametrize("flip", [False, True])
def test_train_crop_is_square_upright_and_flips_only_left_right(flip):
    """A 60 x 30 image, R on the left, B on the right, G on top; bilinear resampling of a step is monotone, so in
    every crop R must fall left to right and B rise (reversed when flipped), and G must fall top to bottom
    whatever the flip. Catches a transposed image (the authors' defect), a vertical flip, a crop box read as
    (top, left) instead of (left, top), and a flip applied when it should not be (or never)."""
    from data.transforms import crop_params, train_transform

    img = _quadrants(60, 30)
    data = _png(img)
    both = 0
    for seed in range(60):
        out = train_transform(data, 24, _Flip(seed, flip), min_scale=0.08).numpy()
        assert out.shape == (3, 24, 24)
        # the same box, (left, top, width, height) of a PIL image, cut and resized with plain PIL calls
        left, top, w, h = crop_params(60, 30, np.random.default_rng(seed), (0.08, 1.0))
        want = Image.fromarray(img).resize((24, 24), Image.BILINEAR, box=(left, top, left + w, top + h))
        want = want.transpose(Image.FLIP_LEFT_RIGHT) if flip else want
        assert (out == np.array(want).transpose(2, 0, 1)).all(), seed
        r, g, b = out.astype(int)
        assert _monotone(r, 1, increasing=flip) and _monotone(b, 1, increasing=not flip), seed
        assert _monotone(g, 0, increasing=False), seed
        # R and B depend on the column only, G on the row only: a transposed crop varies them the other way
        assert (r == r[:1]).all() and (b == b[:1]).all() and (g == g[:, :1]).all(), seed
        both += int(r.max() == 255 and b.max() == 255 and g.max() == 255 and g.min() == 0)
    assert both >= 10  # enough crops straddle both edges for the checks above to bite


def test_train_crop_box_follows_random_resized_crop_and_flips_half_the_time():
    """Over many seeds the box keeps an area fraction in [min_scale, 1] and an aspect in [3/4, 4/3] (up to pixel
    rounding) inside the image, and about half the samples are flipped. Catches boxes outside the image, a
    scale range read wrongly, and a flip that is always or never on."""
    from data.transforms import crop_params, sample_rng, train_transform

    for seed in range(300):
        left, top, w, h = crop_params(60, 30, np.random.default_rng(seed), (0.35, 1.0))
        assert 0 <= left and left + w <= 60 and 0 <= top and top + h <= 30
        assert 0.35 * 1800 * 0.9 <= w * h <= 1800 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1, (left, top, w, h)
    data = _png(_quadrants(60, 30))
    flipped = 0
    for position in range(200):
        r = train_transform(data, 16, sample_rng(0, 0, position), min_scale=0.35).numpy()[0].astype(int)
        flipped += int(r[:, -1].mean() > r[:, 0].mean())  # red (the image's left) ended up on the right
    assert 70 <= flipped <= 130  # binomial(200, 0.5): 5 standard deviations either side


# -- task: total loss and gradient paths ----------------------------------------------------------------------

AUX_CLASSES = 10


_STUDENT: list[Student] = []


def _student() -> Student:
    """A fresh copy of one small random-init student (building resnet18 takes seconds on a small CPU)."""
    if not _STUDENT:
        torch.manual_seed(0)
        _STUDENT.append(build_student(StudentSpec("resnet18", 3, AUX_CLASSES)))
    return copy.deepcopy(_STUDENT[0]).train()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(AUX_CLASSES, generator=g)[:3] for _ in range(6)])
    prob = torch.tensor([[0.6, 0.3, 0.1]]).repeat(6, 1)
    return {"image": torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g),
            "label": torch.tensor([0, 0, 1, 0, 2, 0]), "teacher_idx": idx, "teacher_prob": prob}


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy written out: log-sum-exp minus the target logit."""
    logits = logits.double()
    return (logits.logsumexp(dim=1) - logits.gather(1, target[:, None]).squeeze(1)).mean()


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_total_loss_is_main_plus_lambda_aux(lam):
    """With cached teacher labels (no teacher needed): loss = CE(main, label) + lambda * CE(aux, teacher top-1),
    each recomputed here from the returned logits. Catches lambda applied to the main loss, a missing or
    doubled lambda, the aux loss against the teacher's k-th instead of top-1 class, and a main loss computed
    on other logits than the ones returned."""
    cfg = load_config(None, [f"loss.aux_weight={lam}", "teacher.mode=cached", "loss.aux=hard"])
    batch = _batch()
    out = BGSplitTask(_student(), None, cfg, [90, 5, 5], drw_epoch=100)(batch, 0.0)
    main = _ce(out["main_logits"], batch["label"])
    aux = _ce(out["aux_logits"], batch["teacher_idx"][:, 0])
    assert out["main_loss"].item() == pytest.approx(main.item(), rel=1e-5)
    assert out["aux_loss"].item() == pytest.approx(aux.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((main + lam * aux).item(), rel=1e-5)
    assert torch.equal(out["teacher_top1"], batch["teacher_idx"][:, 0])


def test_lambda_zero_is_the_main_loss_and_leaves_the_aux_head_untouched():
    """The fine-tuning baseline: loss is the main loss itself, the aux head is not run and gets no gradient, the
    trunk still does. Catches an aux loss added with weight 0 (a needless teacher, and DDP's unused-parameter
    bookkeeping would differ) and a baseline that trains the aux head anyway."""
    cfg = load_config(None, ["loss.aux_weight=0", "teacher.mode=cached"])
    student = _student()
    batch = _batch()
    out = BGSplitTask(student, None, cfg, [90, 5, 5], drw_epoch=100)(batch, 0.0)
    assert "aux_loss" not in out and "aux_logits" not in out and out["loss"] is out["main_loss"]
    assert out["loss"].item() == pytest.approx(_ce(out["main_logits"], batch["label"]).item(), rel=1e-5)
    out["loss"].backward()
    assert student.aux_head.weight.grad is None and student.aux_head.bias.grad is None
    assert student.trunk.conv1.weight.grad.abs().sum() > 0 and student.main_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("aux", ["hard", "topk"])
def test_the_aux_gradient_reaches_the_trunk_with_weight_lambda(aux):
    """d(loss)/d(trunk) = d(main)/d(trunk) + lambda * d(aux)/d(trunk), with d(aux)/d(trunk) non-zero: the aux head
    regularises the shared trunk, which is the method. The aux loss gives the main head nothing. Catches the aux
    head fed detached features (trunk gradient from aux = 0), an aux head on a separate trunk, lambda missing
    from the gradient, and the aux loss leaking into the main head."""
    lam = 0.3
    cfg = load_config(None, [f"loss.aux_weight={lam}", "teacher.mode=cached", f"loss.aux={aux}"])
    student = _student()
    out = BGSplitTask(student, None, cfg, [90, 5, 5], drw_epoch=100)(_batch(), 0.0)
    trunk = [p for p in student.trunk.parameters() if p.requires_grad]
    heads = [student.main_head.weight, student.aux_head.weight]
    g_total = torch.autograd.grad(out["loss"], trunk + heads, retain_graph=True)
    g_main = torch.autograd.grad(out["main_loss"], trunk + heads, retain_graph=True, allow_unused=True)
    g_aux = torch.autograd.grad(out["aux_loss"], trunk + heads, allow_unused=True)
    n = len(trunk)
    g_main, g_aux = ([torch.zeros_like(p) if g is None else g for g, p in zip(gs, trunk + heads)]
                     for gs in (g_main, g_aux))  # None: the loss does not reach that parameter at all
    aux_trunk = torch.cat([g.flatten() for g in g_aux[:n]])
    main_trunk = torch.cat([g.flatten() for g in g_main[:n]])
    assert aux_trunk.norm() > 1e-3 * main_trunk.norm() > 0  # the aux loss moves the trunk, not only its head
    first = next(i for i, p in enumerate(trunk) if p is student.trunk.conv1.weight)
    assert g_aux[first].abs().sum() > 0  # down to the first layer
    total_trunk = torch.cat([g.flatten() for g in g_total[:n]])
    # fp32 sums in another order differ element-wise in the last bits (relative 1e-2 where terms cancel), so the
    # identity is checked on the whole trunk's gradient vector; lambda off by a factor of 2 misses it by ~1e-1
    err = (total_trunk - (main_trunk + lam * aux_trunk)).norm() / total_trunk.norm()
    assert err < 1e-5, err
    for wrong in (0.0, 2 * lam, 1.0):
        assert (total_trunk - (main_trunk + wrong * aux_trunk)).norm() / total_trunk.norm() > 1e-3, wrong
    assert not g_aux[n].any()  # main head: nothing from the aux loss
    assert not g_main[n + 1].any()  # aux head: nothing from the main loss
    torch.testing.assert_close(g_total[n + 1], lam * g_aux[n + 1])


# -- LDAM: cosine head, its scale, margins and deferred re-weighting -------------------------------------------

def test_normed_linear_is_scale_times_cosine():
    """Hand case: weights (1,0), (0,2), (1,1) and x = (3,4): cosines 3/5, 4/5, 7/(5 sqrt 2). Catches a head
    that normalises only x or only the weights, or forgets the scale."""
    head = NormedLinear(2, 3, scale=7.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    got = head(torch.tensor([[3.0, 4.0], [30.0, 40.0]]))
    want = [7 * 3 / 5, 7 * 4 / 5, 7 * 7 / (5 * math.sqrt(2))]
    assert got[0].tolist() == pytest.approx(want, rel=1e-6)
    assert got[1].tolist() == pytest.approx(want, rel=1e-6)  # the feature's norm does not matter


def test_ldam_builds_a_cosine_main_head_with_the_configured_scale_and_its_margins(tiny_sets, tmp_path):
    """Through Trainer.build, as a run makes it: loss.main=ldam_drw gives the student a NormedLinear main head of
    scale loss.ldam_scale (its logits bounded by +-scale), the task's main loss subtracts scale * margin_y from
    the true class's logit with margins n_c^(-1/4) scaled to ldam_max_margin, and switches to class-balanced
    weights at drw_start_epoch * epochs; the checkpoint's student comes back with the same head. Catches LDAM on
    a plain linear head (margins in unbounded logit units), a scale taken from elsewhere (default 30), margins
    not multiplied by the scale, DRW from the start or never, and a checkpoint that rebuilds a linear head."""
    from trainer.models import load_student_from_checkpoint
    from trainer.train import Trainer

    scale, epochs = 7.0, 4.0
    cfg = tiny_config(tiny_sets, tmp_path / "ldam", "loss.main=ldam_drw", f"loss.ldam_scale={scale}",
                      "loss.ldam_max_margin=0.5", "loss.cb_beta=0.99", "loss.drw_start_epoch=0.5",
                      f"optim.epochs={epochs}", "loss.aux_weight=0", "model.trunk=resnet18", "model.weights=NONE",
                      "run.max_steps=1", "data.val=")
    trainer = Trainer.build(cfg)
    head = trainer.student.main_head
    assert isinstance(head, NormedLinear) and head.scale == scale
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    trainer.student.eval()
    with torch.no_grad():
        logits = trainer.student(images, with_aux=False)["main"]
    assert logits.abs().max() <= scale + 1e-4
    # a feature along a weight row gets exactly +scale on that class
    with torch.no_grad():
        assert head(head.weight[1:2].detach() * 5)[0, 1].item() == pytest.approx(scale, rel=1e-5)

    counts = trainer.manifest.counts
    assert len(counts) == 3 and counts[0] > counts[1]
    inv = [c ** -0.25 for c in counts]
    margins = [0.5 * v / max(inv) for v in inv]
    raw = [(1 - 0.99) / (1 - 0.99 ** c) for c in counts]
    weights = [v / sum(raw) * 3 for v in raw]
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 0, 2])
    rows = logits.double().tolist()
    adjusted = [[v - (scale * margins[y] if j == y else 0.0) for j, v in enumerate(row)]
                for row, y in zip(rows, labels.tolist())]
    ce = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(adjusted, labels.tolist())]
    plain = sum(ce) / len(ce)
    reweighted = sum(weights[y] * c for y, c in zip(labels.tolist(), ce)) / sum(weights[y] for y in labels.tolist())
    assert plain != pytest.approx(reweighted, rel=1e-3)  # the two regimes differ on this batch
    loss = trainer.task.main_loss
    before, drw = epochs * 0.5 - 0.01, epochs * 0.5
    assert loss(logits, labels, before).item() == pytest.approx(plain, rel=1e-5)
    assert loss(logits, labels, drw).item() == pytest.approx(reweighted, rel=1e-5)

    summary = trainer.fit()
    again = load_student_from_checkpoint(summary["checkpoint"])
    assert isinstance(again.main_head, NormedLinear) and again.main_head.scale == scale
    trainer.student.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(images, with_aux=False)["main"],
                                   trainer.student(images, with_aux=False)["main"])
