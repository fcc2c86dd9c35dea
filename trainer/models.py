"""The frozen teacher and the two-headed student.

The teacher is never trained: it stays in eval mode whatever ``.train()`` is called on, holds no
``requires_grad`` parameters, and is kept out of the optimiser and the data-parallel wrapper by construction
(it is not a submodule of the student). The student is a shared trunk with a main head over {background, K rare
classes} and an aux head over the teacher's label space; inference uses the main head only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.backbones import STAGED_TRUNKS, Backbone, TrunkStages, disable_dropout, load_backbone, trunk_stages
from trainer.checkpoint import VALID_FIX, CheckpointError, load_checkpoint
from trainer.losses import MAIN_LOSSES


@dataclass(frozen=True)
class StudentSpec:
    """The one description of a student's shape: what ``build_student`` needs to rebuild it for evaluation,
    mining or as a teacher, stored in a checkpoint's meta.json and compared field by field on resume. Built once
    per run from the config and the training set (``from_config``)."""

    trunk: str
    num_classes: int
    """Main-head outputs: background (index 0) and the rare classes."""
    aux_classes: int = 0
    """Aux-head outputs (the teacher's label space); 0: no aux head."""
    fixed_background_logit: float | None = None
    normalized_main_head: bool = False
    logit_scale: float = 30.0
    """The cosine head's scale; only meaningful with normalized_main_head."""
    class_names: tuple[str, ...] | None = None
    rare_classes: tuple[str, ...] | None = None
    knn_bank: int = 0
    """0: a linear (or cosine) main head. N: the main head is a kNN classifier over a bank of N stored features
    (a `probe.kind=knn` fit: trainer/probe_model.py), voting with knn_k neighbours at knn_temperature."""
    knn_k: int = 20
    knn_temperature: float = 0.07

    @classmethod
    def from_config(cls, cfg: Any, manifest: Any, aux_classes: int) -> "StudentSpec":
        """``cfg`` a JobConfig, ``manifest`` the training set's; ``aux_classes`` the teacher's classes (0 without
        one)."""
        normalized = bool(cfg.model.normalized_main_head or MAIN_LOSSES[cfg.loss.main].cosine_head)
        return cls(trunk=cfg.model.trunk, num_classes=int(manifest.num_classes), aux_classes=int(aux_classes),
                   fixed_background_logit=cfg.model.fixed_background_logit, normalized_main_head=normalized,
                   logit_scale=float(cfg.loss.ldam_scale) if normalized else 30.0,
                   class_names=tuple(manifest.class_names), rare_classes=tuple(manifest.rare_classes))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: tuples as lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, doc: Any, where: str) -> "StudentSpec":
        """A spec read back from a checkpoint, type-checked: a one-line CheckpointError naming the field."""
        if not isinstance(doc, dict):
            raise CheckpointError(f"{where} has no student description (student_spec); {VALID_FIX}")
        kinds = {"trunk": (str,), "num_classes": (int,), "aux_classes": (int,), "normalized_main_head": (bool,),
                 "fixed_background_logit": (int, float, type(None)), "logit_scale": (int, float),
                 "class_names": (list, tuple, type(None)), "rare_classes": (list, tuple, type(None)),
                 "knn_bank": (int,), "knn_k": (int,), "knn_temperature": (int, float)}
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in doc:
                if f.default is dataclasses.MISSING:
                    raise CheckpointError(f"{where}: its student description has no {f.name}; {VALID_FIX}")
                continue
            value = doc[f.name]
            bad_int = f.name in ("num_classes", "aux_classes", "knn_bank", "knn_k") and isinstance(value, bool)
            if not isinstance(value, kinds[f.name]) or bad_int or (
                    isinstance(value, (list, tuple)) and not all(isinstance(v, str) for v in value)):
                raise CheckpointError(f"{where}: its student description has {f.name}={value!r}, which is not a "
                                      f"valid {f.name}; {VALID_FIX}")
            values[f.name] = tuple(value) if isinstance(value, list) else value
        spec = cls(**values)
        if spec.num_classes < 2 or spec.aux_classes < 0 or spec.knn_bank < 0 or spec.knn_k < 1 \
                or spec.knn_temperature <= 0:
            raise CheckpointError(f"{where}: its student description has num_classes={spec.num_classes}, "
                                  f"aux_classes={spec.aux_classes}, knn_bank={spec.knn_bank}, knn_k={spec.knn_k}, "
                                  f"knn_temperature={spec.knn_temperature}; {VALID_FIX}")
        return spec

    def mismatch(self, saved: "StudentSpec") -> tuple[str, Any, Any] | None:
        """The first field in which ``saved`` differs from this spec: (name, saved value, this value). The
        cosine head's scale counts only where there is a cosine head."""
        for f in dataclasses.fields(self):
            if f.name == "logit_scale" and not (self.normalized_main_head or saved.normalized_main_head):
                continue
            theirs, mine = getattr(saved, f.name), getattr(self, f.name)
            if theirs != mine:
                return f.name, theirs, mine
        return None

    def check_resume(self, saved: Any, url: str) -> None:
        """Refuse to resume into a student of another shape: one line naming the field, its two values and the
        fix."""
        found = self.mismatch(StudentSpec.from_dict(saved, f"cannot resume from {url}"))
        if found is not None:
            field, theirs, mine = found
            show = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 - as meta.json writes it
            raise CheckpointError(f"cannot resume from {url}: it has {field}={show(theirs)!r} but this run has "
                                  f"{field}={show(mine)!r}; use a new run.out_dir or the matching config")


class Normalize(nn.Module):
    """uint8 (or 0..255 float) images to the float input a network was trained on."""

    def __init__(self, norm: tuple[tuple[float, ...], tuple[float, ...]]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(norm[0]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm[1]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Normalised in fp32 (0..255 inputs lose digits in bf16), then given the dtype the network's first
        layer wants (DeepSpeed's bf16 mode casts the student's weights and expects bf16 input)."""
        out = (x.float() - self.mean.float()) / self.std.float()
        return out if dtype is None else out.to(dtype)


class Teacher(nn.Module):
    """A frozen classifier: uint8 images in, logits over its own label space out."""

    def __init__(self, arch: str, trunk: nn.Module, classifier: nn.Module, num_classes: int,
                 norm: tuple[tuple[float, ...], tuple[float, ...]], image_size: int = 0):
        super().__init__()
        self.arch = arch
        self.image_size = image_size
        self.num_classes = num_classes
        self.normalize = Normalize(norm)
        self.trunk = trunk
        self.classifier = classifier
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        """Stay in eval mode: a teacher in train mode would move its BatchNorm statistics."""
        return super().train(False)

    def digest(self) -> str:
        """A hash of the weights as loaded: what cached teacher labels are keyed by (the same name can mean other
        weights: V1 vs V2, another checkpoint). ``prepare`` keeps the digest of the weights as loaded, so a bf16 copy
        on a GPU still finds the labels its fp32 original wrote. Hashing ~100 MB takes well under a second."""
        frozen = getattr(self, "_digest_before_cast", None)
        if frozen is not None:
            return frozen
        from data.teacher_labels import weights_digest

        return weights_digest(self.state_dict())

    def prepare(self, device: torch.device, dtype: torch.dtype | None = None, channels_last: bool = False
                ) -> "Teacher":
        """Ready the frozen teacher for a run: on the device, in channels_last, and with its weights cast once
        to the autocast dtype, so autocast does not re-cast every frozen weight at every step (it is outside
        the engine, which never sees it). The input normalisation stays fp32."""
        self.to(device)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if dtype is not None and dtype != next(self.trunk.parameters()).dtype:
            self._digest_before_cast = self.digest()
            self.trunk.to(dtype)
            self.classifier.to(dtype)
        return self

    @torch.inference_mode()
    def from_prefix(self, prefix: torch.Tensor, n: int) -> torch.Tensor:
        """Logits from the output of the trunk's stage ``n``, computed by a student whose first ``n`` stages are
        these very weights (``shares_prefix``): only the upper stages run here."""
        stages = trunk_stages(self.trunk)
        weight = next(self.trunk.parameters())
        return self.classifier(stages.rest(prefix.to(weight.dtype), n)).float()

    def shares_prefix(self, student: "Student", image_size: int) -> bool:
        """Whether the student's frozen prefix computes exactly this teacher's first stages: the same network,
        the same prefix weights (as loaded, before any cast), the same input size and normalisation."""
        n = getattr(student, "frozen_stages", 0)
        if not n or self.arch != student.arch or (self.image_size and self.image_size != image_size):
            return False
        mine, theirs = trunk_stages(self.trunk), student.stages()
        if mine is None or theirs is None or mine.count != theirs.count:
            return False
        if self.normalize.mean.tolist() != student.normalize.mean.tolist() or \
                self.normalize.std.tolist() != student.normalize.std.tolist():
            return False
        return all(same_weights(a, b) for a, b in zip(mine.prefix_modules(n), theirs.prefix_modules(n)))

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        if self.image_size and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        weight = next(self.trunk.parameters(), None)
        return self.classifier(self.trunk(x if weight is None else x.to(weight.dtype))).float()


class _MainHead(nn.Module):
    """A trained student's main head used as a teacher's classifier (self-distillation from a checkpoint)."""

    def __init__(self, student: "Student"):
        super().__init__()
        self.student = student

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.student.main_logits(features)


PAPER_TEACHER_WEIGHTS = {"resnet50": "IMAGENET1K_V1"}
"""Where the paper names a teacher's weights, ``teacher.weights=""`` means those: torchvision's default for
resnet50 is V2, a different (and differently trained) teacher than the paper's."""


def teacher_weights(name: str, weights: str) -> str:
    return weights or PAPER_TEACHER_WEIGHTS.get(name, "DEFAULT")


def build_teacher(name: str, weights: str = "", image_size: int = 0) -> Teacher:
    """A registry name (efficientnet_lite0, a torchvision model) or 'checkpoint' with a bgsplit checkpoint path."""
    if name == "checkpoint":
        student = load_student_from_checkpoint(weights)
        return Teacher("checkpoint", student.trunk, _MainHead(student), student.num_classes, student.norm,
                       image_size)
    backbone = load_backbone(name, teacher_weights(name, weights))
    if backbone.classifier is None:
        raise ValueError(f"teacher '{name}' has no classifier: it cannot label images")
    return Teacher(backbone.name, backbone.trunk, backbone.classifier, backbone.classifier.out_features,
                   backbone.norm, image_size)


class NormedLinear(nn.Module):
    """Scaled cosine classifier: LDAM's margins are defined on normalised features and weights."""

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (F.normalize(x.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).t())


class KnnHead(nn.Module):
    """A kNN classifier as a main head, so a `probe.kind=knn` fit is a checkpoint eval and mine score like any
    student: the bank (L2-normalised features) and its labels are buffers, saved with the weights. Its logits are
    the log of the normalised votes, so the softmax eval and mine take is the vote share trainer.probe.predict_knn
    gives (a class no neighbour votes for: -inf, score 0)."""

    def __init__(self, feature_dim: int, bank: int, num_classes: int, k: int, temperature: float):
        super().__init__()
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.register_buffer("bank", torch.zeros(bank, feature_dim))
        self.register_buffer("labels", torch.zeros(bank, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = F.normalize(x.float(), dim=1)
        sims, idx = (q @ self.bank.float().T).topk(min(self.k, len(self.labels)), dim=1)
        votes = torch.zeros(len(q), self.num_classes, device=q.device).scatter_add_(
            1, self.labels[idx], (sims / self.temperature).exp())
        return (votes / votes.sum(1, keepdim=True)).log()


def fp32_logits(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The main head in fp32 whatever the trunk ran in: its softmax is the score AP is computed from, and bf16
    (8 bits of mantissa) collapses tens of thousands of distinct scores into a few thousand ties. The head is
    tiny (K+1 outputs), so this costs nothing; weights cast by DeepSpeed's bf16 mode are read up to fp32."""
    with torch.autocast(features.device.type, enabled=False):
        if isinstance(head, nn.Linear):
            bias = head.bias.float() if head.bias is not None else None
            return F.linear(features.float(), head.weight.float(), bias)
        return head(features.float()).float()


class Student(nn.Module):
    """Shared trunk, main head (index 0 = background) and aux head over the teacher's classes."""

    def __init__(self, backbone: Backbone, num_classes: int, aux_classes: int, *,
                 fixed_background_logit: float | None = None, normalized_main_head: bool = False,
                 logit_scale: float = 30.0, freeze_bn_stats: bool = False, knn: tuple[int, int, float] | None = None):
        super().__init__()
        self.freeze_bn_stats = freeze_bn_stats
        self.arch = backbone.name
        self.num_classes = num_classes
        self.norm = backbone.norm
        self.normalize = Normalize(backbone.norm)
        self.trunk = backbone.trunk
        self.fixed_background_logit = fixed_background_logit
        rare_outputs = num_classes - 1 if fixed_background_logit is not None else num_classes
        self.main_head = (KnnHead(backbone.feature_dim, knn[0], num_classes, knn[1], knn[2]) if knn
                          else NormedLinear(backbone.feature_dim, rare_outputs, logit_scale) if normalized_main_head
                          else nn.Linear(backbone.feature_dim, rare_outputs))
        self.aux_head = nn.Linear(backbone.feature_dim, aux_classes) if aux_classes else None

    frozen_stages: int = 0
    """The stem and the first N stages of the trunk are frozen (model.frozen_stages): eval mode, no gradients,
    no optimiser state, not in DDP's buckets, run under no_grad."""

    def stages(self) -> TrunkStages | None:
        return trunk_stages(self.trunk)

    def freeze_prefix(self, n: int) -> "Student":
        """Freeze the stem and the first ``n`` stages; a one-line ValueError naming model.frozen_stages when the
        trunk has no such stages."""
        if n == 0:
            return self
        stages = self.stages()
        if stages is None:
            raise ValueError(f"model.frozen_stages={n}: bgsplit does not know the stages of the trunk {self.arch}; "
                             f"use model.frozen_stages=0, or one of {STAGED_TRUNKS}")
        if not 0 < n <= stages.count:
            raise ValueError(f"model.frozen_stages={n}: the {self.arch} trunk has {stages.count} stages; use 0 (none "
                             f"frozen) to {stages.count}")
        for module in stages.prefix_modules(n):
            module.requires_grad_(False)
        self.frozen_stages = n
        return self.train(self.training)

    def frozen_state_names(self) -> set[str]:
        """state_dict keys of the frozen prefix (weights and BatchNorm statistics): what never changes in a run."""
        if not self.frozen_stages:
            return set()
        names = {id(m): name for name, m in self.named_modules()}
        return {f"{names[id(m)]}.{k}" for m in self.stages().prefix_modules(self.frozen_stages)
                for k in m.state_dict()}

    def freeze_trunk(self) -> "Student":
        """A linear probe (optim.trunk_lr_mult=0): the trunk is a fixed feature extractor, in eval mode (running
        BN statistics, no dropout) and without gradients, so its backward pass is not even computed."""
        self.trunk_frozen = True
        self.trunk.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "Student":
        super().train(mode)
        if mode and (getattr(self, "trunk_frozen", False) or getattr(self, "trunk_probe", False)):
            self.trunk.eval()
        if mode and self.frozen_stages:
            for module in self.stages().prefix_modules(self.frozen_stages):
                module.eval()
        if mode and self.freeze_bn_stats:
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def main_logits(self, features: torch.Tensor) -> torch.Tensor:
        logits = fp32_logits(self.main_head, features)
        if self.fixed_background_logit is None:
            return logits
        background = logits.new_full((logits.shape[0], 1), float(self.fixed_background_logit))
        return torch.cat([background, logits], dim=1)

    def forward(self, images: torch.Tensor | None = None, with_aux: bool = True, *, prefix: torch.Tensor | None = None,
                return_prefix: bool = False) -> dict[str, torch.Tensor]:
        """Main (and aux) logits of uint8 ``images``, or of ``prefix``, the frozen prefix's activations computed
        earlier (trainer.views). ``return_prefix`` adds the prefix's output as ``prefix`` for a teacher that
        shares it."""
        n = self.frozen_stages
        first = next(self.trunk.parameters())
        out: dict[str, torch.Tensor] = {}
        if prefix is None and not n:
            features = self.trunk(self.normalize(images, first.dtype))
        else:
            stages = self.stages()
            if prefix is None:
                with torch.no_grad():
                    prefix = stages.prefix(self.normalize(images, first.dtype), n)
            features = stages.rest(prefix.to(first.dtype) if prefix.is_floating_point() else prefix, n)
            if return_prefix:
                out["prefix"] = prefix
        out["main"] = self.main_logits(features)
        if with_aux and self.aux_head is not None:
            out["aux"] = self.aux_head(features)
        return out


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k].to(sb[k].dtype), sb[k])
                                          for k in sa)


def build_student(spec: StudentSpec, teacher: Teacher | None = None, *, weights: str = "NONE",
                  init_aux_from_teacher: bool = True, freeze_bn_stats: bool = False, dropout: bool = True,
                  frozen_stages: int = 0) -> Student:
    """The student ``spec`` describes, its trunk initialised from ``weights`` (NONE: random, as when the weights
    come from a checkpoint next). ``init_aux_from_teacher``, ``freeze_bn_stats`` and ``dropout`` are how it
    trains, not its shape.

    The aux head copies the teacher's classifier when the student's trunk *is* the teacher's (same network,
    same weights), so the aux loss starts near its optimum and its gradient regularises the trunk instead of first
    training a random head. Same name with other weights (V1 vs V2, random init) is not enough: that classifier
    reads features the student's trunk does not produce."""
    backbone = load_backbone(spec.trunk, weights)
    if not dropout:
        disable_dropout(backbone.trunk)
    student = Student(backbone, spec.num_classes, spec.aux_classes,
                      fixed_background_logit=spec.fixed_background_logit,
                      normalized_main_head=spec.normalized_main_head, logit_scale=spec.logit_scale,
                      freeze_bn_stats=freeze_bn_stats,
                      knn=(spec.knn_bank, spec.knn_k, spec.knn_temperature) if spec.knn_bank else None)
    student.spec = spec
    student.freeze_prefix(frozen_stages)
    student.class_names = list(spec.class_names) if spec.class_names is not None else None
    if (init_aux_from_teacher and teacher is not None and student.aux_head is not None
            and teacher.arch == spec.trunk and isinstance(teacher.classifier, nn.Linear)
            and teacher.classifier.weight.shape == student.aux_head.weight.shape
            and same_weights(student.trunk, teacher.trunk)):
        with torch.no_grad():
            student.aux_head.weight.copy_(teacher.classifier.weight)
            student.aux_head.bias.copy_(teacher.classifier.bias)
    return student


def student_from_state(state: dict[str, Any], url: str) -> Student:
    """The trained student of a loaded checkpoint (``load_checkpoint``'s dict), in eval mode; a one-line
    CheckpointError when its weights do not fit its own description."""
    spec = StudentSpec.from_dict(state.get("student_spec"), url)
    weights = state.get("student")
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise CheckpointError(f"{url} holds no student weights; {VALID_FIX}")
    student = build_student(spec)
    try:
        student.load_state_dict(weights)
    except RuntimeError as e:
        missing = sorted(set(student.state_dict()) - set(weights))
        extra = sorted(set(weights) - set(student.state_dict()))
        detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
                  (str(e).strip().splitlines() or ["shapes differ"])[-1].strip())
        raise CheckpointError(f"{url}: its weights are not those of the student it describes ({spec.trunk}, "
                              f"{spec.num_classes} classes: {detail}); {VALID_FIX}") from None
    return student.eval()


def load_student_from_checkpoint(url: str, trust: bool | None = None) -> Student:
    """Rebuild a trained student (for evaluation, mining or as a teacher) from a checkpoint alone. ``trust``:
    see ``trainer.checkpoint.load_checkpoint`` (only checkpoints of the previous format need it)."""
    return student_from_state(load_checkpoint(url, trust=trust), url)
