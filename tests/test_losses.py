"""Loss values against cases computed by hand (plain math, not the functions under test)."""
import math

import pytest
import torch

from trainer.config import LossConfig
from trainer.losses import aux_hard, aux_soft, aux_topk, build_main_loss, class_balanced_weights, ldam_margins

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
LABELS = torch.tensor([0, 2])


def _ce(row, y, w=None):
    lse = math.log(sum(math.exp(v) for v in row))
    return lse - row[y]


def test_cross_entropy():
    loss = build_main_loss(LossConfig(main="ce"), [10, 1, 1], 0)(LOGITS, LABELS, 0.0)
    want = (_ce([2, 0, -1], 0) + _ce([0.5, 1.5, 0], 2)) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)


def test_class_balanced_weights_and_loss():
    beta = 0.9
    counts = [100, 10, 1]
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]
    want_w = [r / sum(raw) * 3 for r in raw]
    assert class_balanced_weights(counts, beta).tolist() == pytest.approx(want_w, rel=1e-6)
    loss = build_main_loss(LossConfig(main="class_balanced", cb_beta=beta), counts, 0)(LOGITS, LABELS, 0.0)
    want = (want_w[0] * _ce([2, 0, -1], 0) + want_w[2] * _ce([0.5, 1.5, 0], 2)) / 2  # mean of w_y * CE
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_class_balanced_loss_keeps_its_weight_on_an_all_background_batch():
    """At 99.9% background most batches hold no positive. Cui et al.'s loss is then w_0 * CE; a loss divided by
    the batch's weight sum (F.cross_entropy(weight=w)) would cancel w_0 and train like plain CE."""
    counts, beta = [99_900, 50, 50], 0.999
    w0 = class_balanced_weights(counts, beta)[0].item()
    logits, labels = torch.tensor([[1.0, 0.5, -0.5], [0.2, 0.1, 0.0]]), torch.tensor([0, 0])
    plain = build_main_loss(LossConfig(main="ce"), counts, 0)(logits, labels, 0.0).item()
    cb = build_main_loss(LossConfig(main="class_balanced", cb_beta=beta), counts, 0)(logits, labels, 0.0).item()
    assert w0 < 0.1 and cb == pytest.approx(w0 * plain, rel=1e-6)


def test_focal_reduces_to_ce_at_gamma_zero_and_downweights_easy():
    ce = build_main_loss(LossConfig(main="ce"), [1, 1, 1], 0)(LOGITS, LABELS, 0.0)
    f0 = build_main_loss(LossConfig(main="focal", focal_gamma=0.0), [1, 1, 1], 0)(LOGITS, LABELS, 0.0)
    assert f0.item() == pytest.approx(ce.item(), abs=1e-6)
    gamma = 2.0
    p0 = math.exp(-_ce([2, 0, -1], 0))
    p1 = math.exp(-_ce([0.5, 1.5, 0], 2))
    want = ((1 - p0) ** gamma * -math.log(p0) + (1 - p1) ** gamma * -math.log(p1)) / 2
    f2 = build_main_loss(LossConfig(main="focal", focal_gamma=gamma), [1, 1, 1], 0)(LOGITS, LABELS, 0.0)
    assert f2.item() == pytest.approx(want, rel=1e-6)


def test_logit_adjustment_adds_tau_log_prior():
    counts = [8, 1, 1]
    loss = build_main_loss(LossConfig(main="logit_adjust", logit_adjust_tau=1.0), counts, 0)(LOGITS, LABELS, 0.0)
    prior = [math.log(c / 10) for c in counts]
    rows = [[v + p for v, p in zip(r, prior)] for r in LOGITS.tolist()]
    want = (_ce(rows[0], 0) + _ce(rows[1], 2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_ldam_margins_and_deferred_reweighting():
    counts = [81, 16, 1]
    m = ldam_margins(counts, 0.5).tolist()
    assert m == pytest.approx([0.5 / 3, 0.5 / 2, 0.5], rel=1e-6)  # n^(-1/4) = 1/3, 1/2, 1, scaled to max 0.5
    cfg = LossConfig(main="ldam_drw", ldam_max_margin=0.5, ldam_scale=10.0, cb_beta=0.9)
    loss_fn = build_main_loss(cfg, counts, drw_epoch=5.0)
    logits = torch.tensor([[5.0, 1.0, -2.0], [0.0, 3.0, 4.0]])  # already scale * cosine
    rows = [[5.0 - 10 * m[0], 1.0, -2.0], [0.0, 3.0, 4.0 - 10 * m[2]]]
    before = (_ce(rows[0], 0) + _ce(rows[1], 2)) / 2
    assert loss_fn(logits, LABELS, 0.0).item() == pytest.approx(before, rel=1e-6)
    w = class_balanced_weights(counts, 0.9).tolist()
    after = (w[0] * _ce(rows[0], 0) + w[2] * _ce(rows[1], 2)) / (w[0] + w[2])
    assert loss_fn(logits, LABELS, 5.0).item() == pytest.approx(after, rel=1e-6)


def test_aux_hard_is_ce_on_teacher_top1():
    aux = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    idx = torch.tensor([[1, 2]])
    assert aux_hard(aux, idx).item() == pytest.approx(_ce([1, 2, 3, 0], 1), rel=1e-6)


def test_aux_soft_kl_with_temperature():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0, 0.0]])
    tau = 2.0
    ps = [math.exp(v / tau) for v in s[0].tolist()]
    pt = [math.exp(v / tau) for v in t[0].tolist()]
    ps = [v / sum(ps) for v in ps]
    pt = [v / sum(pt) for v in pt]
    want = sum(q * math.log(q / p) for p, q in zip(ps, pt)) * tau * tau
    assert aux_soft(s, t, tau).item() == pytest.approx(want, rel=1e-5)
    assert aux_soft(t, t, tau).item() == pytest.approx(0.0, abs=1e-6)


def test_aux_topk_renormalises_the_truncated_teacher():
    s = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    idx = torch.tensor([[3, 0]])
    prob = torch.tensor([[0.6, 0.2]])
    logp = [v - math.log(sum(math.exp(u) for u in s[0].tolist())) for v in s[0].tolist()]
    want = -(0.75 * logp[3] + 0.25 * logp[0])
    assert aux_topk(s, idx, prob, 1.0).item() == pytest.approx(want, rel=1e-6)


def test_trunk_lr_multiplier_scales_the_trunk_group_through_the_schedule():
    """optim.trunk_lr_mult gives the trunk its own parameter group at a fraction of the heads' LR, on the same
    schedule; every trainable parameter is in exactly one group."""
    from trainer.config import load_config
    from trainer.engine import build_optimizer
    from trainer.models import StudentSpec, build_student
    from trainer.schedule import build_scheduler, lr_at

    cfg = load_config(None, ["optim.trunk_lr_mult=0.1", "optim.lr=0.01", "optim.warmup_epochs=1",
                             "optim.warmup_start_lr=0.001"])
    student = build_student(StudentSpec("resnet18", 3))
    opt = build_optimizer(student, cfg)
    sched = build_scheduler(opt, 10, cfg.optim)
    trunk, heads = opt.param_groups
    assert {id(p) for p in trunk["params"]} == {id(p) for p in student.trunk.parameters()}
    assert len(trunk["params"]) + len(heads["params"]) == len(list(student.parameters()))
    for step in range(12):
        want = lr_at(step, 10, cfg.optim)
        assert heads["lr"] == pytest.approx(want) and trunk["lr"] == pytest.approx(0.1 * want)
        opt.step()
        sched.step()
    single = build_optimizer(student, load_config(None, []))
    assert len(single.param_groups) == 1
