"""A probe (logistic regression or kNN on the frozen teacher's pooled features) as a model a user can ship.

`bgsplit experiment` often recommends a probe, and a recommendation that ends as a number helps nobody: here
`bgsplit train` with ``probe.kind=logistic|knn`` fits it on a whole training set and writes it as an ordinary
checkpoint (the teacher's trunk plus a main head: the logistic fit folded into one linear layer, or the kNN bank
as buffers), which eval, mine and ``teacher.name=checkpoint`` take like a trained student's; nothing new to load,
nothing pickled.

Scale. The features come from a shard pass (this process, every torchrun rank, or Ray tasks: the same split as
eval), and each part returns only the rows the fit keeps: every positive, and a sample of the background. At 10M
images a sample of 100k must not cost a read of 10M: the pass reads every positive shard, and of the background
shards only those that come first in a salted hash order of their names until they hold ``OVERREAD`` times the
sample and number at least ``MIN_SHARDS`` (``sample_shards``); within them a background image is kept when its
key hash falls under the sample over their background, and the others are dropped before their image is decoded.
Shards are written in the source's order, so their images can be alike (one folder, one camera): many shards,
not the fewest that would do, keep the sample close to a uniform one. Both choices are pure functions of names,
so the sample is the same whatever the split. The fit's memory is bounded: at the default 100k background rows
it peaks at ~3.4 GB on one process (bench/probe_fit.py: ~35 KB a row of 1,280 features, the solver's float64
copies; 0.9 GB at 25k rows, 1.7 GB at 50k). The checkpoint records how many background images were read and
how many kept.
"""
from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from data.loader import ShardStream, make_loader
from data.shards import read_manifest
from trainer.config import JobConfig
from trainer.scoring import ScoringConfig
from trainer.shard_pass import WholeSetPass, cached_model

log = logging.getLogger("bgsplit.probe")

SAMPLE_SALT = b"bgsplit-probe-background\0"


OVERREAD = 4
"""Background shards read hold this many times the sample (their images kept at 1 / OVERREAD): a sample spread
over more shards is closer to a uniform one."""
MIN_SHARDS = 64
"""... and they are at least this many (or all): a sample from a few shards would be a few folders' images."""
SHARD_SALT = b"bgsplit-probe-shards\0"


def background_rate(background: int, max_background: int) -> float:
    """The share of background images a fit keeps: all of them (1.0) when they fit ``max_background`` (0: no
    cap)."""
    if max_background <= 0 or background <= max_background:
        return 1.0
    return max_background / background


def sample_shards(manifest: Any, max_background: int, unlabelled: bool = False) -> tuple[list[int], float]:
    """Which shards a probe's feature pass reads (manifest indices, in order) and the rate at which it keeps
    the background images of those shards, for a sample of about ``max_background`` (0: all of them).

    Every positive shard is read (background a labelling round put there, hard negatives, is sampled like any).
    Background shards are taken in the order of a salted hash of their names until they hold ``OVERREAD`` times
    what the sample still needs and number ``MIN_SHARDS``. Names, not indices: a grown set keeps its choice.
    ``unlabelled``: every image counts as background (a mining pool, whatever labels its build gave it)."""
    shards = manifest.shards
    background = manifest.count if unlabelled else int(manifest.counts[0])
    if background_rate(background, max_background) >= 1.0:
        return list(range(len(shards))), 1.0
    positive = [] if unlabelled else [i for i, s in enumerate(shards) if s.kind != "background"]
    in_positive = sum(shards[i].count for i in positive) - int(sum(manifest.counts[1:]))
    pure = sorted((i for i, s in enumerate(shards) if unlabelled or s.kind == "background"),
                  key=lambda i: hashlib.sha256(SHARD_SALT + shards[i].record.encode()).digest())
    want = OVERREAD * max_background - max(in_positive, 0)
    taken, held = [], 0
    for i in pure:
        if held >= want and len(taken) >= MIN_SHARDS:
            break
        taken.append(i)
        held += shards[i].count
    read = max(in_positive, 0) + held
    return sorted(positive + taken), background_rate(read, max_background)


def keep_background(keys: list[str], rate: float) -> np.ndarray:
    """Which of these background keys the fit keeps: the first 8 bytes of a salted SHA-256 of the key, read as a
    fraction of 2^64, below ``rate``. A pure function of the key, so every split of the shards keeps the same
    rows, and a key keeps its fate across refits of a grown set."""
    if rate >= 1.0:
        return np.ones(len(keys), dtype=bool)
    limit = int(rate * 2 ** 64)
    return np.array([int.from_bytes(hashlib.sha256(SAMPLE_SALT + k.encode()).digest()[:8], "big") < limit
                     for k in keys], dtype=bool)


@dataclass(frozen=True)
class BackgroundSample:
    """The loader's filter for a probe's pass (data.loader.ShardStream ``keep``): every positive, and the
    background ``keep_background`` keeps at ``rate``, decided before the image is decoded. A small value
    object, because it travels to the loader's worker processes."""

    rate: float
    unlabelled: bool = False
    """Sample every image, whatever its label (a mining pool)."""

    def __call__(self, key: str, label: int) -> bool:
        if label != 0 and not self.unlabelled:
            return True
        return self.rate >= 1.0 or bool(keep_background([key], self.rate)[0])


@dataclass
class FeaturePass(WholeSetPass):
    """The teacher trunk's pooled features of a set's positives and sampled background (trainer.shard_pass), in
    the eval transform at ``scoring``'s size and resize, fp32 whatever its precision (the numbers the experiment's
    probes are fit on)."""

    location: str
    scoring: ScoringConfig
    arch: str
    weights: str
    max_background: int
    """About how many background images the fit keeps (0: every one): ``sample_shards``."""
    teacher: Any = field(default=None, repr=False)
    name: str = "embedded"
    unlabelled: bool = False
    """Every image is background to the fit (``sample_shards``): the cold start's pool."""
    embeddings: str = ""
    """The set's stored rows (trainer.embeddings), read instead of the images where a shard has them."""

    def __post_init__(self) -> None:
        self.manifest = read_manifest(self.location)
        self.token = uuid.uuid4().hex
        self.chosen, self.rate = sample_shards(self.manifest, self.max_background, self.unlabelled)
        if len(self.chosen) < len(self.manifest.shards):
            log.info("%s: reading %d of %d shards (every positive one) for a sample of ~%d background images",
                     self.location, len(self.chosen), len(self.manifest.shards), self.max_background)

    def shard_counts(self) -> list[int]:
        chosen = set(self.chosen)  # the split balances what is read
        return [s.count if i in chosen else 0 for i, s in enumerate(self.manifest.shards)]

    def todo(self, shards: list[int]) -> list[int]:
        chosen = set(self.chosen)
        return [s for s in shards if s in chosen]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "teacher": None}  # each Ray worker builds its own, once (cached_model)

    @torch.no_grad()
    def run(self, shards: list[int], device: torch.device) -> dict[str, Any]:
        from trainer.models import build_teacher

        teacher = self.teacher or cached_model(self.token, lambda: build_teacher(self.arch, self.weights))
        teacher = teacher.to(device).eval()
        cfg = self.scoring.loader()
        shard_index = {s.url: i for i, s in enumerate(self.manifest.shards)}
        feats, labels, order = [], [], []
        sampler = BackgroundSample(self.rate, self.unlabelled)
        streamed = shards
        if self.embeddings and shards:
            from trainer.embeddings import EmbeddingCache, Space

            cache = EmbeddingCache(self.embeddings, Space.of(self.arch, teacher.trunk, self.scoring))
            streamed = []
            for s in shards:
                got = cache.load(self.manifest.shards[s])
                if got is None:
                    streamed.append(s)
                    continue
                rows, doc = got
                keep = np.array([sampler(k, c) for k, c in zip(doc["keys"], doc["labels"])], dtype=bool)
                if keep.any():
                    feats.append(torch.from_numpy(rows[keep].astype(np.float32)))
                    labels.append(np.asarray(doc["labels"], dtype=np.int64)[keep])
                    order.extend((s, int(i)) for i, k in zip(doc["indices"], keep) if k)
        if streamed:
            stream = ShardStream(self.manifest, cfg, train=False, shards=streamed, keep=sampler)
            for batch in make_loader(stream, self.scoring.num_workers):
                if "image" not in batch:
                    continue
                x = teacher.normalize(batch["image"].to(device))
                feats.append(teacher.trunk(x).float().cpu())
                labels.append(batch["label"].numpy())
                order.extend((shard_index[url], int(i)) for url, i in batch["ref"])
        dim = feats[0].shape[1] if feats else 0
        labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
        # background read: these shards' images less their positives (every positive is kept)
        seen = sum(self.manifest.shards[s].count for s in shards)
        if not self.unlabelled:
            seen -= int((labels != 0).sum())
        return {"features": torch.cat(feats).numpy() if feats else np.zeros((0, dim), np.float32),
                "labels": labels, "order": np.array(order, dtype=np.int64).reshape(-1, 2), "background_seen": seen}

    def publish(self, parts: list[tuple[list[int], dict[str, Any]]]) -> dict[str, Any]:
        got = [p for _, p in parts if len(p["labels"])]
        if not got:
            raise ValueError(f"shard set {self.location} yielded no decodable images to fit on: check its shards")
        order = np.concatenate([p["order"] for p in got])
        rank = np.lexsort((order[:, 1], order[:, 0]))  # manifest order, whatever the split
        features = np.concatenate([p["features"] for p in got])[rank]
        labels = np.concatenate([p["labels"] for p in got])[rank]
        return {"features": features, "labels": labels,
                "background_seen": sum(p["background_seen"] for _, p in parts)}


def training_overrides(params: Any) -> list[str]:
    """An experiment's probe point (trainer.probe.ProbeParams) as the `bgsplit train` overrides that fit the same
    probe on a full set: its input size is the run's data.image_size."""
    return [f"probe.kind={params.kind}", f"probe.C={params.C}", f"probe.class_weight={params.class_weight}",
            f"probe.k={params.k}", f"probe.temperature={params.temperature}", f"probe.max_iter={params.max_iter}",
            f"data.image_size={params.image_size}"]


def feature_pass(cfg: JobConfig) -> FeaturePass:
    """The pass a ``probe.kind`` run makes over data.train; one-line errors for what cannot be fit."""
    from trainer.train import read_set

    if cfg.probe.kind == "none":
        raise ValueError("probe.kind is none: this run trains a student (bgsplit train), it fits no probe")
    if cfg.run.resume:
        raise ValueError(f"run.resume={cfg.run.resume}: a probe fit has nothing to resume (it is one pass and one "
                         "fit); give run.resume= (empty)")
    if cfg.teacher.name == "checkpoint":
        raise ValueError("probe.kind fits on a pre-trained network's features: give teacher.name= a registry model "
                         "(efficientnet_lite0, a torchvision model), not a checkpoint")
    manifest = read_set(cfg.data.train, "data.train")
    counts = manifest.counts
    empty = [name for name, n in zip(manifest.rare_classes, counts[1:]) if n == 0]
    if empty:
        raise ValueError(f"data.train={cfg.data.train} has no positives of {', '.join(empty)}: a probe cannot score "
                         "a class it never saw; add labelled images of it (`bgsplit shards add-labels`)")
    from trainer.models import teacher_weights

    return FeaturePass(location=cfg.data.train, scoring=ScoringConfig.of(cfg), arch=cfg.teacher.name,
                       weights=teacher_weights(cfg.teacher.name, cfg.teacher.weights),
                       max_background=cfg.probe.max_background)


def fit_student(probe: Any, trunk: str, weights: str, class_names: list[str], rare_classes: list[str],
                x: np.ndarray, y: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """Features ``x`` [n, d] of the ``trunk`` network (``weights``) with labels ``y`` -> the fitted probe
    (``probe``: a ProbeConfig) as a Student (that trunk + the folded logistic head or the kNN bank) and what the
    fit did."""
    from trainer.backbones import load_backbone
    from trainer.models import Student, StudentSpec
    from trainer.probe import Features, ProbeParams, fit_logistic, fold_linear

    knn = probe.kind == "knn"
    spec = StudentSpec(trunk=trunk, num_classes=len(class_names), aux_classes=0, class_names=tuple(class_names),
                       rare_classes=tuple(rare_classes), knn_bank=len(y) if knn else 0, knn_k=probe.k,
                       knn_temperature=probe.temperature)
    student = Student(load_backbone(trunk, weights), spec.num_classes, 0,
                      knn=(len(y), probe.k, probe.temperature) if knn else None)
    student.spec, student.class_names = spec, list(class_names)
    fit: dict[str, Any] = {"kind": probe.kind, "rows": int(len(y)),
                           "positives": np.bincount(y, minlength=len(class_names))[1:].tolist()}
    with torch.no_grad():
        if knn:
            student.main_head.bank.copy_(torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=1))
            student.main_head.labels.copy_(torch.from_numpy(y))
            fit.update(k=probe.k, temperature=probe.temperature)
        else:
            model = fit_logistic(Features(x, y, list(class_names)),
                                 ProbeParams(kind="logistic", C=probe.C, class_weight=probe.class_weight,
                                             max_iter=probe.max_iter))
            weight, bias = fold_linear(model)
            student.main_head.weight.copy_(weight)
            student.main_head.bias.copy_(bias)
            fit.update(C=probe.C, class_weight=probe.class_weight,
                       **{k: model[k] for k in ("iterations", "grad_max", "loss", "converged")})
            if not model["converged"]:
                log.warning("the logistic fit stopped at probe.max_iter=%d before converging: raise it",
                            probe.max_iter)
    return student.eval(), fit


def probe_student(cfg: JobConfig, fp: FeaturePass, features: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The probe ``cfg`` asks for, fit on a FeaturePass's output over data.train."""
    manifest = fp.manifest
    student, fit = fit_student(cfg.probe, cfg.teacher.name, fp.weights, list(manifest.class_names),
                               list(manifest.rare_classes), features["features"], features["labels"])
    fit.update(background_seen=int(features["background_seen"]),
               background_kept=int((features["labels"] == 0).sum()), background_rate=fp.rate,
               image_size=fp.scoring.image_size)
    return student, fit


def write_probe(out_dir: str, student: Any, cfg: JobConfig, fit: dict[str, Any], val: dict[str, Any] | None,
                keep: int = 2) -> str:
    """The probe as checkpoint step 0 under ``out_dir`` (complete or absent, like any checkpoint)."""
    from trainer.checkpoint_manager import CheckpointWriter

    meta = {"student_spec": student.spec.to_dict(), "engine_name": "probe", "world": 1, "steps_per_epoch": 0,
            "config": cfg.to_dict(), "history": [], "probe_fit": fit, "val": val}
    writer = CheckpointWriter(out_dir, keep=keep, background=False)
    return writer.save(0, {"student": {k: v.detach().cpu() for k, v in student.state_dict().items()}},
                       uuid.uuid4().hex, meta=meta)


def save_probe(cfg: JobConfig, fp: FeaturePass, features: dict[str, Any]) -> dict[str, Any]:
    """Fit, write the checkpoint (step 0, complete or absent, like any) and summary.json; score data.val if set.
    Returns the summary ``result_line`` prints."""
    import json

    from data import storage
    from trainer.evaluate import evaluate_student

    student, fit = probe_student(cfg, fp, features)
    log.info("probe %s fit on %d rows (%d background of %d read, rate %.4g; positives %s)", cfg.probe.kind,
             fit["rows"], fit["background_kept"], fit["background_seen"], fp.rate, fit["positives"])
    val = None
    if cfg.data.val:
        # in this process and in fp32, as the probe's features were computed
        scoring = replace(fp.scoring, num_workers=0, precision="fp32")
        val = evaluate_student(student, cfg.data.val, scoring, torch.device("cpu"))
        val = {"map": val["map"], "ap": val["ap"]}
        log.info("probe validation mAP %.2f on %s", 100 * val["map"], cfg.data.val)
    url = write_probe(cfg.run.out_dir, student, cfg, fit, val, cfg.run.keep_checkpoints)
    summary = {"checkpoint": url, "steps": 0, "world": 1, "engine": "probe", "val": val, "resumed_from": None,
               "skipped": None, "probe_fit": fit}
    storage.write_bytes(storage.join(cfg.run.out_dir, "summary.json"),
                        json.dumps(summary, indent=1, default=float).encode())
    return summary


# ------------------------------------------------------------------------------------------------ cold start

COLD_START_C = 1e-5
"""The cold start's logistic C (balanced weights): the probe's best point in every 99.6% study at 2 positives a
class (bench/results/fmnist_160: C 1e-5, balanced, 224 px), nearly a class-mean classifier, which is what a
handful of examples supports."""


def positives_set(positives: str, rare: list[str], out: str, workers: int = 0) -> str:
    """The examples as a shard set: itself, or a labelled source (folder:examples with a folder per class, ...)
    built into ``out/positives`` with ``rare`` as its classes and no background."""
    from data import storage
    from data.shards import manifest_url

    if storage.exists(manifest_url(positives)):
        return positives
    if ":" not in positives or positives.split(":", 1)[0] in ("s3", "gs", "file", "memory"):
        raise FileNotFoundError(f"--positives {positives} is neither a shard set (no manifest.json there) nor a "
                                "source spec such as folder:/path (a folder per class)")
    if not rare:
        raise ValueError(f"--positives {positives} is a source: give --rare with the class names to mine for "
                         "(its folder names)")
    from data.build import BuildSpec, build_set
    from data.sources import open_source

    location = storage.join(out, "positives")
    build_set(open_source(positives), BuildSpec(positives, tuple(rare), max_background=0), location,
              workers=workers)
    return location


def cold_start(positives: str, pool: str, out: str, *, scoring: ScoringConfig, kind: str = "logistic",
               background: int = 5000, teacher: str = "efficientnet_lite0", weights: str = "",
               embeddings: str = "") -> tuple[str, dict[str, Any]]:
    """Mining before any training: the probe ``kind`` fit on the teacher's features of the ``positives`` set (all
    its images, its background too: hard negatives a labelling round added) against a key-hash sample of
    ``background`` pool images, taken as background because a pool of a rare-class problem is ~99% background
    (its few positives in the sample cost the fit little). Written as ``out/model`` (a checkpoint mine ranks
    the pool with; eval takes it too). ``embeddings``: the pool's stored rows (trainer.embeddings), read instead
    of its images. Returns the checkpoint URL and what the fit did."""
    from data import storage
    from trainer.config import JobConfig
    from trainer.models import teacher_weights
    from trainer.shard_pass import run_pass
    from trainer.train import read_set

    if kind not in ("logistic", "knn"):
        raise ValueError(f"--probe {kind}: choose logistic or knn")
    if background < 1:
        raise ValueError(f"--background {background}: give the number of pool images to fit against (>= 1)")
    manifest = read_set(positives, "--positives")
    empty = [name for name, n in zip(manifest.rare_classes, manifest.counts[1:]) if n == 0]
    if empty:
        raise ValueError(f"--positives {positives} holds no images of {', '.join(empty)}: give at least one "
                         "example of each class to mine for")
    weights = teacher_weights(teacher, weights)
    read_set(pool, "--pool")  # its one-line error before any work
    device = torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda")
    passes = [FeaturePass(location=positives, scoring=scoring, arch=teacher, weights=weights, max_background=0),
              FeaturePass(location=pool, scoring=scoring, arch=teacher, weights=weights, max_background=background,
                          unlabelled=True, embeddings=embeddings)]
    shown, sampled = [run_pass(p, device=device, rank=0, world=1) for p in passes]
    x = np.concatenate([shown["features"], sampled["features"]])
    y = np.concatenate([shown["labels"], np.zeros(len(sampled["labels"]), np.int64)])
    cfg = JobConfig()
    image_size = scoring.image_size
    cfg.data.train, cfg.data.image_size, cfg.teacher.name = positives, image_size, teacher
    cfg.probe.kind, cfg.probe.C, cfg.probe.class_weight = kind, COLD_START_C, "balanced"
    student, fit = fit_student(cfg.probe, teacher, weights, list(manifest.class_names), list(manifest.rare_classes),
                               x, y)
    fit.update(cold_start=True, pool=pool, pool_sample=int(len(sampled["labels"])), image_size=image_size,
               examples=int(len(shown["labels"])))
    url = write_probe(storage.join(out, "model"), student, cfg, fit, None)
    log.info("cold start: a %s probe on %d example(s) (%s a class) against %d pool images, at %d px: %s", kind,
             fit["examples"], fit["positives"], fit["pool_sample"], image_size, url)
    return url, fit
