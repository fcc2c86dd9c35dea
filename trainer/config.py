"""Typed job configuration: dataclasses are the schema, YAML files and dotted CLI overrides only fill them.

data.settings loads them: an unknown key, a value of the wrong type or one outside a field's ``Literal`` (or its
registry: ``loss.main``, ``loss.aux``) is a one-line ``ConfigError`` naming the key, because a silently ignored typo
(``loss.aux_wieght``) would quietly train the fine-tune baseline instead of BG splitting.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data.config import LoaderConfig
from data.settings import ConfigError, check_all, merge, parse_override
from trainer.losses import AUX_LOSSES, MAIN_LOSSES, LossConfig

Precision = Literal["auto", "fp32", "bf16", "fp16"]
"""A forward pass's dtype: run.precision, and eval's, mine's and teacher-label's --precision."""


@dataclass
class DataConfig(LoaderConfig):
    """The job's data: which sets, plus the loader's settings (data.config.LoaderConfig, whose fields are the
    data.* keys beside these)."""

    train: str = ""
    """Manifest (manifest.json path or folder/URL holding one) of the training shards."""
    val: str = ""
    """Manifest of the validation shards (model selection; never the test split)."""
    test: str = ""
    """Manifest of the evaluation shards used by `bgsplit eval` and the final report."""


@dataclass
class TeacherConfig:
    name: str = "efficientnet_lite0"
    """Registry name (efficientnet_lite0, a torchvision model such as resnet50, or 'checkpoint')."""
    weights: str = ""
    """torchvision weights enum name (IMAGENET1K_V1), a local weights file, or a bgsplit checkpoint path."""
    mode: Literal["online", "cached"] = "online"
    """online: run the teacher on each training batch; cached: read labels written by `bgsplit teacher-label`."""
    image_size: int = 0
    """Teacher input size; 0 means the student's image size (online mode resizes the student's crop)."""
    topk: int = 5
    """Teacher top-k kept in the cache and used by the top-k soft aux loss."""
    share_prefix: bool = True
    """With model.frozen_stages=N and a teacher that is the student's own pre-trained network (same weights, same
    input size), run only the teacher's upper stages on the prefix activations the student computed: one prefix
    forward a step instead of two. The logits are the same (fp32 tolerance); false runs the whole teacher."""


@dataclass
class ModelConfig:
    trunk: str = "efficientnet_lite0"
    """efficientnet_lite0 or any torchvision classification model name (resnet50, mobilenet_v3_small, ...)."""
    weights: str = "DEFAULT"
    """Trunk weights: DEFAULT (the trunk's ImageNet weights), NONE (random init), an enum name or a file path."""
    fixed_background_logit: float | None = None
    """If set, the main head's background logit is this constant (0.0 is valid) instead of a learned one."""
    init_aux_from_teacher: bool = True
    """Copy the teacher's classifier into the aux head when the trunk matches the teacher."""
    normalized_main_head: bool = False
    """Cosine (normalised) main classifier; a loss.main that reads its logits as scale * cosine turns it on by
    itself (its entry in trainer.losses.MAIN_LOSSES says cosine_head)."""
    freeze_bn_stats: bool = False
    """Keep the trunk's BatchNorm running statistics fixed (affine weights still train): for small batches or
    data far from ImageNet, where batch statistics would pull the trunk away from the teacher's features."""
    frozen_stages: int = 0
    """Freeze the trunk's stem and first N stages (EfficientNet-Lite0: 7, ResNet: 4): eval mode, no gradients, no
    optimiser state, no DDP/DeepSpeed buckets. 0 fine-tunes the whole trunk. What a shared teacher prefix
    (teacher.share_prefix) and cached views (views.count) are computed from."""
    head_init: Literal["random", "probe"] = "random"
    """random, or probe (LP-FT as Kumar et al. publish it): before step 0 the main head becomes the converged
    logistic probe on the student's own trunk features of the training set (its input size, the eval transform),
    the standardisation folded in, C and class weighting chosen on model.probe_val."""
    probe_C: list[float] = field(default_factory=lambda: [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 0.1, 1.0])
    """head_init=probe: the inverse L2 strengths tried (scikit-learn's C; the experiment's linear-probe grid)."""
    probe_class_weight: list[str] = field(default_factory=lambda: ["none", "balanced"])
    """head_init=probe: the class weightings tried (none, balanced)."""
    probe_val: str = ""
    """head_init=probe: the set C and weighting are chosen on ('' = data.val); needed when they give several
    points. A study passes its validation split here, never its test split."""
    probe_cache_dir: str = ""
    """head_init=probe: where the trunk's features of the sets are cached ('' = <run.out_dir>/features, or
    ~/.cache/bgsplit/features when run.out_dir is a URL). Keyed by set, weights and size: a study shares one."""
    dropout: bool = True
    """Keep the trunk's own dropout and stochastic depth (EfficientNet-Lite0: 0.2 before the heads, drop-connect
    0.2). Off, the aux head sees the features the teacher's classifier was trained on, where train-mode noise
    moves the aux loss well away from the teacher's optimum (bench/aux_study.py measures it)."""


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    """sgd (momentum, the paper) or adamw."""
    lr: float = 0.01
    """Peak learning rate (for the global batch)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """Weight decay."""
    epochs: float = 90.0
    """Training length in epochs (fractions allowed)."""
    warmup_epochs: float = 1.0
    """Linear warm-up length in epochs."""
    warmup_start_lr: float = 0.001
    """LR at the start of the warm-up."""
    schedule: Literal["step", "cosine"] = "step"
    """step (x gamma at the milestones) or cosine."""
    milestones: list[float] = field(default_factory=lambda: [21.0, 41.0, 61.0, 81.0])
    """Epochs at which the step schedule multiplies the LR by gamma."""
    gamma: float = 0.1
    """Step schedule factor."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step."""
    trunk_lr_mult: float = 1.0
    """The trunk's LR as a fraction of the heads' (same schedule): < 1 keeps a pre-trained trunk near its
    features while the new main head trains; 0 is a linear probe (trunk frozen, in eval mode, no gradients)."""
    lp_epochs: float = 0.0
    """LP-FT (Kumar et al., 2022): for the first lp_epochs the trunk's LR is 0 and it runs in eval mode (a linear
    probe on the pre-trained features), then the whole student fine-tunes at the schedule's LR x trunk_lr_mult.
    The trunk's gradients are still computed during the probe, so DDP's and DeepSpeed's hooks never change."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    """Where checkpoints, metrics.jsonl, TensorBoard scalars and reports go."""
    seed: int = 0
    """Seeds the model init, the data order and the augmentation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (cuda if available), cpu or cuda."""
    precision: Precision = "auto"
    """auto (bf16 on a GPU with bf16, else fp16 with a loss scaler; fp32 on CPU), fp32, bf16 or fp16 (explicit
    bf16/fp16 are honoured on CPU too). Scores (main head, softmax) are fp32 whatever this says."""
    channels_last: bool = True
    """Use channels_last memory format on GPU (student, teacher and input batches)."""
    cudnn_benchmark: bool = True
    """Let cuDNN pick the fastest convolution algorithms for the (fixed) training input shape on GPU."""
    log_every: int = 20
    """Steps between logged scalars (the only host syncs of the loop)."""
    eval_every: float = 0.0
    """Epochs between validation runs; 0 evaluates only at the end."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 saves only at the end."""
    keep_checkpoints: int = 2
    """How many complete step checkpoints to keep (keep-last-k; older ones are deleted after a new one lands)."""
    async_checkpoint: bool = True
    """Upload checkpoints in a background thread (at most one in flight) while training goes on."""
    resume: str = ""
    """'' (fresh), 'auto' (newest complete checkpoint in out_dir) or a checkpoint path."""
    progress: bool = True
    """Show progress on rank 0: a bar on a terminal; in a log file or under `ray job submit`, one line every ~10 s
    with the steps done, the rate and the time left (data/progress.py)."""
    max_steps: int = 0
    """Stop after this many optimiser steps (0 = the full schedule); for debugging and tests."""


@dataclass
class EngineConfig:
    name: Literal["ddp", "deepspeed"] = "ddp"
    """ddp (torch DistributedDataParallel; a plain module in a single process) or deepspeed."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage 0-3 (optimizer state, gradients, parameters partitioned over ranks)."""
    compile: bool = False
    """torch.compile the student on GPU (ignored on CPU, where it only costs compile time)."""
    torch_autocast: bool = False
    """DeepSpeed only: keep fp32 weights and run the student under torch.autocast instead of DeepSpeed's own
    bf16/fp16 weight casting."""


@dataclass
class ClusterConfig:
    """Ray Train scaling for `bgsplit train --ray`; ignored by a local `bgsplit train` and torchrun."""

    num_workers: int = 2
    """Training processes (data-parallel ranks) the TorchTrainer starts."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); false runs on CPU with gloo."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker (loader workers run inside this reservation)."""
    gpus_per_worker: float = 1.0
    """GPUs Ray reserves per worker when use_gpu is true."""
    memory_per_worker_gb: float = 0.0
    """Memory Ray reserves per worker in GiB; 0 reserves none."""
    max_failures: int = 2
    """Worker-group restarts after a worker dies; each restart resumes from the newest complete checkpoint."""
    address: str = ""
    """Ray cluster address; '' uses RAY_ADDRESS (set by `ray job submit`) or starts a local cluster."""
    storage_path: str = ""
    """Where Ray Train keeps its own run state; '' uses <run.out_dir>/ray when local, else ~/ray_results."""


@dataclass
class StorageConfig:
    outage_timeout_s: float = 600.0
    """How long an object-store outage (refused, reset, timeouts, 5xx) is waited out, with back-off, before the
    run stops with an error; missing objects and corrupt data are never retried."""


@dataclass
class ViewsConfig:
    count: int = 0
    """Cached prefix views (trainer/views.py): compute the frozen prefix's output and the teacher's targets for
    this many augmented views of each training image once, and train the upper stages and heads on them, one
    view an image an epoch. 0: online (every step decodes, crops and runs the prefix). Needs model.frozen_stages;
    for a study on a CPU at the teacher's resolution (a view at 160 px, N = 4 is 16 KB)."""
    positive_count: int = 0
    """Views of each positive image (0: 8 x count): re-sampling shows a positive many times an epoch."""
    cache_dir: str = ""
    """Where caches are built ('' = <run.out_dir>/views, ~/.cache/bgsplit/views if run.out_dir is a URL), one
    folder each, named by what the views depend on: a study's runs share them. A folder holding a meta.json is
    used as the cache itself and must match this run."""
    seed: int = 0
    """The crops' seed, apart from run.seed: the runs of a study (other seeds) share one cache. View v is the
    crop the online loader takes in epoch v at run.seed = views.seed."""


@dataclass
class ProbeConfig:
    kind: Literal["none", "logistic", "knn"] = "none"
    """none: train the student. logistic or knn: `bgsplit train` fits that baseline on the frozen teacher's pooled
    features of data.train at data.image_size instead (trainer/probe_model.py) and writes it as a checkpoint that
    eval and mine take like a trained one: what `bgsplit experiment` writes to best/ when a probe wins."""
    C: float = 1.0
    """logistic: inverse L2 strength, as scikit-learn's (the experiment tunes it on validation)."""
    class_weight: Literal["none", "balanced"] = "none"
    """logistic: none or balanced."""
    k: int = 20
    """knn: neighbours that vote."""
    temperature: float = 0.07
    """knn: a neighbour votes exp(cosine / temperature)."""
    max_iter: int = 1000
    """logistic: L-BFGS iterations at most."""
    max_background: int = 100000
    """Background images the fit keeps (every positive is kept): a sample by key hash, the same whatever the
    shards' split, so the fit's memory is bounded on a 10M-image set: ~35 KB a row at 1,280 features (float64
    copies inside the solver; bench/probe_fit.py: 3.4 GB and 253 s at 100k rows on 2 cores). The checkpoint
    records how many background images were seen and how many kept; 0 keeps them all."""


@dataclass
class JobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(cfg: JobConfig) -> JobConfig:
    check_all(cfg)  # a value set in code, not through merge, is held to the same choices
    if cfg.data.shuffle_buffer_mb < 0 or cfg.data.interleave < 1:
        raise ConfigError("data.shuffle_buffer_mb must be >= 0 and data.interleave >= 1")
    if cfg.data.read_ahead_mb < 0:
        raise ConfigError(f"data.read_ahead_mb is {cfg.data.read_ahead_mb}: give 0 (no read-ahead) or more MB")
    if cfg.data.batch_size < 1 or cfg.optim.grad_accum < 1:
        raise ConfigError("data.batch_size and optim.grad_accum must be >= 1")
    if not 0.0 < cfg.data.positive_fraction < 1.0:
        raise ConfigError(f"data.positive_fraction must be in (0, 1), got {cfg.data.positive_fraction}")
    if cfg.loss.aux_weight < 0:
        raise ConfigError(f"loss.aux_weight must be >= 0, got {cfg.loss.aux_weight}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if cfg.model.frozen_stages < 0:
        raise ConfigError(f"model.frozen_stages must be >= 0 (0: nothing frozen), got {cfg.model.frozen_stages}")
    if cfg.model.head_init == "probe":
        if not cfg.model.probe_C or min(cfg.model.probe_C) <= 0:
            raise ConfigError(f"model.probe_C is {cfg.model.probe_C}: give one or more values > 0")
        weightings = cfg.model.probe_class_weight
        if not weightings or not set(weightings) <= {"none", "balanced"}:
            raise ConfigError(f"model.probe_class_weight is {weightings}: give [none], [balanced] or both")
        if cfg.model.normalized_main_head or MAIN_LOSSES[cfg.loss.main].cosine_head:
            cosine = " or ".join(f"loss.main={name}" for name, kind in MAIN_LOSSES.items() if kind.cosine_head)
            raise ConfigError("model.head_init=probe folds a logistic regression into a linear main head, and this "
                              f"run's is cosine-normalised (model.normalized_main_head or {cosine}): use "
                              "model.head_init=random with it")
    if cfg.probe.C <= 0 or cfg.probe.k < 1 or cfg.probe.temperature <= 0 or cfg.probe.max_iter < 1 \
            or cfg.probe.max_background < 0:
        raise ConfigError(f"probe values out of range: C={cfg.probe.C}, k={cfg.probe.k}, temperature="
                          f"{cfg.probe.temperature}, max_iter={cfg.probe.max_iter}, max_background="
                          f"{cfg.probe.max_background} (C > 0, k >= 1, temperature > 0, max_iter >= 1, "
                          "max_background >= 0)")
    if cfg.views.count < 0 or cfg.views.positive_count < 0:
        raise ConfigError(f"views.count and views.positive_count must be >= 0 (0: online), got {cfg.views.count} and "
                          f"{cfg.views.positive_count}")
    if cfg.views.count:
        if cfg.model.frozen_stages < 1:
            raise ConfigError("views.count caches the frozen prefix's output, and model.frozen_stages is 0: give "
                              "model.frozen_stages=N (EfficientNet-Lite0: 1-7) or views.count=0")
        if cfg.teacher.mode != "online":
            raise ConfigError("views.count stores the teacher's targets of each view beside it: use "
                              "teacher.mode=online with it (cached teacher labels are of other crops)")
        if AUX_LOSSES[cfg.loss.aux].needs_logits and cfg.loss.aux_weight > 0:
            topk = " or ".join(name for name, kind in AUX_LOSSES.items() if not kind.needs_logits)
            raise ConfigError(f"loss.aux={cfg.loss.aux} needs the teacher's whole output, and a view stores its "
                              f"top-k: use loss.aux={topk} with views.count, or views.count=0")
    if cfg.optim.trunk_lr_mult < 0 or cfg.optim.lp_epochs < 0:
        raise ConfigError(f"optim.trunk_lr_mult and optim.lp_epochs must be >= 0, got {cfg.optim.trunk_lr_mult} "
                          f"and {cfg.optim.lp_epochs}")
    if cfg.cluster.num_workers < 1 or cfg.cluster.max_failures < 0:
        raise ConfigError("cluster.num_workers must be >= 1 and cluster.max_failures >= 0")
    if cfg.storage.outage_timeout_s <= 0:
        raise ConfigError(f"storage.outage_timeout_s must be > 0, got {cfg.storage.outage_timeout_s}")
    if cfg.loss.temperature <= 0:
        raise ConfigError(f"loss.temperature must be > 0, got {cfg.loss.temperature}")
    return cfg


SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_file(path: str | Path) -> Path:
    """A config by path, or one of the shipped ones by its name (``configs/own_data.yaml``) from any working
    directory: a user's project folder holds their sets, not a copy of bgsplit's configs/."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = SHIPPED_CONFIGS / (p.relative_to("configs") if p.parts[:1] == ("configs",) else p)
    if not p.is_absolute() and shipped.is_file():
        return shipped
    raise ConfigError(f"config file {p} does not exist; the shipped ones are in {SHIPPED_CONFIGS}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Defaults, then the YAML file, then ``section.key=value`` overrides (values parsed as YAML scalars)."""
    cfg = JobConfig()
    if path:
        p = config_file(path)
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
        merge(cfg, data)
    for text in overrides or []:
        merge(cfg, parse_override(text))
    return validate(cfg)


def config_from_dict(values: dict[str, Any]) -> JobConfig:
    cfg = JobConfig()
    merge(cfg, values)
    return validate(cfg)
