"""Each `bgsplit` command's flags: one dataclass a command, or a group several share.

cluster.cli adds a flag per field with data.settings.add_flags, from its type (int, float, a bool switch, a list, a
Literal's choices), its default and its ``flag`` help, so a flag is written once. `shards build`'s are
data.build.BuildRequest's fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.config import EpochMode, PadPolicy, Sampling
from data.settings import flag
from data.sources import SOURCES
from trainer.config import Precision

LOADER_HELP = ("DataLoader processes decoding images (data.num_workers in a config; 0: in the process itself); "
               "--num-workers / --workers are the old names")
"""One word a meaning across commands: --loader-workers decode, --writers write shards, --world / cluster.num_workers
count ranks (docs/user-guide.md, "Words")."""
CHECKPOINT_HELP = "a checkpoint folder, or a run folder (its newest; also RUN/latest)"
TRAINED_SIZE_HELP = "default: the training image size"
BATCH_HELP = "images each forward pass scores (per process)"


def _loader_workers(help: str = LOADER_HELP, **options) -> dict:
    return flag(help, flags=("--loader-workers", "--num-workers"), **options)


@dataclass(kw_only=True)
class RayTasks:
    ray: bool = field(default=False, metadata=flag(
        "run the per-shard work as Ray tasks over the cluster (use under `ray job submit`; paths must be reachable "
        "from every node)"))


@dataclass(kw_only=True)
class RayAddress:
    ray_address: str = field(default="", metadata=flag("Ray address; default RAY_ADDRESS or a new local cluster"))


@dataclass(kw_only=True)
class RayGpus:
    gpus_per_task: float = field(default=0.0, metadata=flag(
        "with --ray: GPUs a task holds (1 on a GPU cluster; 0 scores on the CPU)"))


@dataclass(kw_only=True)
class Trust:
    trust_checkpoint: bool = field(default=False, metadata=flag(
        "load a checkpoint of the previous format (a pickled state.pt, no meta.json) as before: this runs whatever "
        "code the file holds, so only for a file from a trusted source (sets BGSPLIT_TRUST_CHECKPOINT=1, which "
        "torchrun ranks and Ray tasks inherit)"))


@dataclass(kw_only=True)
class KeepResults:
    keep_results: bool = field(default=False, metadata=flag(
        "reuse stored run results made by another version of bgsplit's code (a study spanning sessions); results.md "
        "counts the runs per code version"))


@dataclass(kw_only=True)
class Scoring:
    """The flags of trainer.scoring.ScoringConfig, inherited by every command that scores a set (eval, mine,
    teacher-label), so they read and mean the same in each; a command with another default redeclares that one
    field alone."""

    image_size: int = field(default=0, metadata=flag(TRAINED_SIZE_HELP))
    batch_size: int = field(default=256, metadata=flag(BATCH_HELP))
    num_workers: int = field(default=0, metadata=_loader_workers())
    precision: Precision = field(default="auto", metadata=flag(
        "the forward pass's dtype (auto: bf16 on a GPU, fp16 on one without, fp32 on CPU); scores and labels are "
        "an fp32 softmax either way"))


@dataclass(kw_only=True)
class TrainArgs:
    """train one model from a config (one process; torchrun for several)"""

    config: str | None = field(default=None, metadata=flag("YAML file (configs/*.yaml)"))
    debug: bool = field(default=False, metadata=flag("single process on CPU, fp32, no loader workers"))
    overrides: list[str] = field(default_factory=list, metadata=flag(
        "dotted overrides, e.g. loss.aux_weight=0 optim.epochs=5", positional=True))
    ray: bool = field(default=False, metadata=flag(
        "train on a Ray cluster: cluster.num_workers Ray Train workers (use under `ray job submit`; sets and "
        "run.out_dir must be reachable from every node)"))


@dataclass(kw_only=True)
class EvalArgs(Scoring):
    """per-class AP, mAP, P@100, PR curves, top-scoring grid, JSON + Markdown report"""

    checkpoint: str = field(metadata=flag(CHECKPOINT_HELP))
    data: str = field(metadata=flag("evaluation shard set (folder with manifest.json)"))
    out: str = field(metadata=flag("report folder"))


@dataclass(kw_only=True)
class PlanArgs:
    """an epoch's steps, padding and shard reads for a training world"""

    data: str = field(metadata=flag("training shard set (folder or URL with manifest.json)"))
    world: int = field(metadata=flag("data-parallel ranks"))
    workers: int = field(metadata=flag(LOADER_HELP + " per rank", flags=("--loader-workers", "--workers")))
    batch_size: int = field(metadata=flag("per-rank batch (data.batch_size)"))
    mode: EpochMode = "exact"
    policy: PadPolicy = "pad"
    sampling: Sampling = "natural"
    positive_fraction: float = field(default=0.125, metadata=flag("with --sampling balanced"))
    seed: int = field(default=0, metadata=flag("run.seed (the shard order; epoch 0 is shown)"))
    json: bool = field(default=False, metadata=flag("the whole summary as JSON"))


@dataclass(kw_only=True)
class AddLabelsArgs:
    """a new version of a training set with reviewed candidates added: confirmed positives to their
    class, rejected ones as hard-negative background"""

    data: str = field(metadata=flag("the training shard set to extend (left untouched)"))
    labels: str = field(metadata=flag("labels.csv exported from review.html"))
    pool: str = field(metadata=flag(
        "the shard set the candidates were mined from (mine's OUT/pool when the pool was a source)"))
    out: str = field(metadata=flag(
        "where the new version goes (its manifest lists the parent's shards by URL: nothing existing is copied)"))


@dataclass(kw_only=True)
class MineArgs(Scoring):
    """score an unlabeled pool, keep the top N per rare class; candidates.jsonl, contact sheets,
    review.html (one process, torchrun, or --ray)"""

    checkpoint: str = field(default="", metadata=flag(CHECKPOINT_HELP + "; a probe's too"))
    positives: str = field(default="", metadata=flag(
        "instead of --checkpoint, start from a handful of examples: a shard set, or a source with a folder per "
        "class (folder:examples, with --rare); a probe on the teacher's features of them against a sample of the "
        "pool ranks it (written to OUT/model). A second round: the set `shards add-labels` made from the first "
        "round's labels"))
    rare: str = field(default="", metadata=flag(
        "with a --positives source: the classes to mine for (comma-separated)"))
    probe: Literal["logistic", "knn"] = field(default="logistic", metadata=flag(
        "with --positives: logistic (C 1e-5, balanced) or kNN to the examples"))
    background: int = field(default=5000, metadata=flag(
        "with --positives: pool images (a key-hash sample) the probe fits as background"))
    embeddings: str = field(default="", metadata=flag(
        "with --positives or a probe checkpoint: where the pool's teacher features are kept for every later round "
        "(default POOL/embeddings; 'none': embed afresh, keep nothing)"))
    pool: str = field(metadata=flag(
        "a shard set, or any source `shards build` reads (" + ", ".join(f"{scheme}:" for scheme in SOURCES)
        + "), local or on S3; a source is built into OUT/pool first"))
    top: int = field(default=100, metadata=flag("candidates kept per rare class"))
    out: str
    exclude: list[str] = field(default_factory=list, metadata=flag(
        "shard sets whose keys are never candidates (the training and validation sets; read whole, so meant for "
        "sets of up to a few million)"))
    workers: int = field(default=0, metadata=flag(
        "shard-writing processes building a source pool into shards (as in shards build)",
        flags=("--writers", "--workers")))


@dataclass(kw_only=True)
class TeacherLabelArgs(Scoring):
    """store the teacher's top-k labels in shard sets (per shard; resumable; under torchrun every
    rank labels its share)"""

    data: list[str]
    teacher: str = "efficientnet_lite0"
    weights: str = ""
    image_size: int = field(default=224, metadata=flag("the teacher's input size; it names the label set"))
    batch_size: int = field(default=128, metadata=flag(BATCH_HELP))
    topk: int = 5
    overwrite: bool = False


@dataclass(kw_only=True)
class TeacherReportArgs:
    """what the teacher makes of a set's background, per input size: does it split it into stable
    groups BG splitting can learn from? (results.md, results.json)"""

    data: str = field(metadata=flag("a shard set (its background images are sampled)"))
    sizes: str = field(default="64,160,224", metadata=flag("input sizes to try, comma-separated"))
    images: int = field(default=1000, metadata=flag("background images in the sample"))
    teacher: str = "efficientnet_lite0"
    weights: str = ""
    batch_size: int = 64
    out: str = field(metadata=flag("folder (or URL) for results.md and results.json"))


@dataclass(kw_only=True)
class DemoArgs:
    """Fashion-MNIST-BG: fine-tuning vs BG splitting vs imbalance baselines"""

    out: str = "artifacts/demo"
    quick: bool = field(default=False, metadata=flag("one seed, shorter runs (a smoke test)"))
    seeds: int | None = field(default=None, metadata=flag(
        "seeds 0..N-1 (configs/experiment_demo.yaml's otherwise)"))
    prepare_only: bool = field(default=False, metadata=flag("build and check the data, train nothing"))


@dataclass(kw_only=True)
class ExperimentArgs:
    """tuned comparison: settings x methods x seeds, hyper-parameters chosen on validation with one
    shared grid and budget, test scored once per final run"""

    config: str = field(metadata=flag("experiment YAML (configs/experiment_fmnist.yaml)", positional=True))
    out: str = "artifacts/experiment"
    quick: bool = field(default=False, metadata=flag(
        "1 setting, 2 methods, 2 grid points, 1 seed (a smoke run)"))


@dataclass(kw_only=True)
class ExperimentRay:
    ray: bool = field(default=False, metadata=flag(
        "run each phase's train-and-score runs as Ray Tune trials in parallel (use under `ray job submit`; --out and "
        "the sets must be reachable from every node)"))


@dataclass(kw_only=True)
class TrialResources:
    cpus_per_trial: float = field(default=1.0, metadata=flag("with --ray: CPUs (and torch threads) a trial"))
    gpus_per_trial: float = field(default=0.0, metadata=flag("with --ray: GPUs a trial (1 on a GPU cluster)"))


@dataclass(kw_only=True)
class DocsArgs:
    """rewrite every generated table of README.md and docs/ from the committed results
    (bench/results/) and the reference pages from the code; --check changes nothing"""

    check: bool = field(default=False, metadata=flag(
        "rewrite nothing; exit 1 on a block that differs from its render, or a source or cited results path that "
        "is not committed (git ls-files)"))
    root: str = field(default=str(Path(__file__).resolve().parents[1]), metadata=flag(
        "the checkout (default: the one bgsplit runs from)"))


@dataclass(kw_only=True)
class FetchWeightsArgs:
    """download torchvision weights into torch's cache (needs a network)"""

    model: str = field(metadata=flag(positional=True))
    weights: str = field(metadata=flag("e.g. IMAGENET1K_V1", positional=True))
