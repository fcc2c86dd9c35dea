"""The loader's settings, owned by data/ and composed by the job's config (trainer.config.DataConfig).

One object instead of a parameter list: ShardStream, evaluation, labelling and the benches take a LoaderConfig,
so a new loader setting is a field here and reaches every caller without re-typing it in each signature. No torch
import, so the config layer stays cheap to load.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

READ_AHEAD_MB = 32.0
"""Default MB fetched ahead of the decoder per open remote shard (four 8 MB ranges; see data.ranged)."""

Sampling = Literal["natural", "balanced"]
EpochMode = Literal["exact", "resampled"]
PadPolicy = Literal["pad", "drop"]
"""The loader's choices, also `bgsplit shards plan`'s --sampling, --mode and --policy (data.plan.PlanRequest)."""


def cache_root() -> str:
    """This machine's cache for what a run on object storage keeps locally (positive shards, a remote run's
    features and views): BGSPLIT_CACHE_DIR, default ~/.cache/bgsplit."""
    return os.environ.get("BGSPLIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "bgsplit")


@dataclass
class LoaderConfig:
    image_size: int = 224
    """Student input size: RandomResizedCrop size for training, centre-crop size for evaluation."""
    eval_resize_ratio: float = 1.15
    """Evaluation resizes the short side to image_size * ratio before the centre crop (the paper's 1.15)."""
    min_crop_scale: float = 0.35
    """Lower bound of the RandomResizedCrop area fraction."""
    batch_size: int = 256
    """Per-process batch size (the global batch is batch_size * world size * grad_accum)."""
    num_workers: int = 0
    """DataLoader worker processes (0 = decode in the training process)."""
    shuffle_buffer_mb: float = 64.0
    """Shuffle buffer per loader worker, in MB of stored samples (the sample count follows from the set's mean
    sample size); it emits from the start and fills as it goes."""
    interleave: int = 4
    """Shards (pieces of its plan) each loader worker reads at a time, one sample from each in turn."""
    read_ahead_mb: float = READ_AHEAD_MB
    """MB of each open remote shard fetched ahead of the decoder (four 8 MB ranges), plus the first range of the
    next shard: an object store takes 20-80 ms to the first byte of every GET, which decoding then hides instead
    of waiting on. Memory per loader worker: up to interleave x (this + 8 MB), plus 8 MB for each of up to 4
    shards about to be opened; 0 turns it off. Local shards never need it."""
    sampling: Sampling = "natural"
    """natural: every sample once per epoch; balanced: positives re-sampled, each rare class equally often."""
    positive_fraction: float = 0.125
    """Fraction of each epoch that is positives when sampling is 'balanced'."""
    mode: EpochMode = "exact"
    """exact: every sample once per epoch; resampled: shards drawn with replacement, fixed epoch length."""
    pad_policy: PadPolicy = "pad"
    """exact mode: equalise ranks by repeating samples (pad) or by leaving the surplus out (drop)."""
