"""Evaluation split over data-parallel ranks: who scores which shards (a pure function, on simulated worlds), and
real gloo processes under torchrun giving the very numbers one process gives."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TEACHER_SIZE
from data.loader import ShardStream, make_loader
from data.config import LoaderConfig
from data.shards import read_manifest, write_shard_set
from s3_server import free_port
from data.plan import split_shards as eval_shards
from trainer.evaluate import planned_batches
from trainer.scoring import ScoringConfig

ROOT = Path(__file__).resolve().parents[1]
# oneDNN picks its blocking by batch size and thread count: runs compared bit for bit use one thread a process
# (torchrun's own default for several processes)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

WORLDS = [1, 2, 3, 4, 7, 16]
COUNTS = {
    "equal": [100] * 8,
    "uneven": [60, 9, 3, 100, 100, 40, 1, 77],
    "one big": [5, 5, 500, 5, 5],
    "with empty": [0, 30, 0, 30, 30],
    "many small": [int(c) for c in np.random.default_rng(0).integers(50, 150, size=200)],
    "fewer than ranks": [10, 20, 30],
}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", COUNTS)
def test_every_shard_is_scored_once_and_shares_are_about_equal(name, world):
    counts = COUNTS[name]
    shares = [eval_shards(counts, rank, world) for rank in range(world)]
    assert [s for share in shares for s in share] == list(range(len(counts)))  # once each, contiguous, in order
    n = sum(counts)
    sizes = [sum(counts[s] for s in share) for share in shares]
    assert all(abs(size - n / world) < max(counts) for size in sizes), sizes
    if name == "many small":  # shards small next to a share: about equal
        assert all(abs(size - n / world) < 0.12 * n / world for size in sizes), sizes
    if sum(c > 0 for c in counts) < world:
        assert sum(1 for size in sizes if size == 0) >= world - sum(c > 0 for c in counts)


def test_bad_worlds_are_refused_in_one_line():
    for args, words in [(([10], 0, 0), "at least 1 rank"), (([10], 2, 2), "outside a world of 2"),
                        (([0, 0], 0, 1), "no samples"), (([5, -1], 0, 1), "negative")]:
        with pytest.raises(ValueError, match=words) as e:
            eval_shards(*args)
        assert "\n" not in str(e.value)


def _png(v: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), v % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """A positive shard of 8 samples, then a background one of 40: 1 batch of 8 for rank 0, 5 for rank 1."""
    root = tmp_path_factory.mktemp("uneven-eval") / "set"
    samples = [(f"k{i:03d}", _png(7 * i), 1 if i % 6 == 0 else 0, "x") for i in range(48)]
    m = write_shard_set(str(root), samples, rare_classes=["r"], class_names=["bg", "R"], max_count=40)
    assert sorted(s.count for s in m.shards) == [8, 40]
    return str(root)


def test_batches_never_span_two_shards_and_number_as_planned(uneven):
    """Fixed batch boundaries in every shard: the plan a lockstep evaluation runs on is the loader's count."""
    m = read_manifest(uneven)
    for workers in (0, 2):
        batches = [b for b in make_loader(ShardStream(m, LoaderConfig(image_size=8, batch_size=16),
                                                      train=False), workers)
                   if "image" in b]
        assert all(len({url for url, _ in b["ref"]}) == 1 for b in batches)
        assert len(batches) == planned_batches([s.count for s in m.shards], range(len(m.shards)), 16) == 4


@pytest.mark.slow
def test_lockstep_ranks_run_the_same_forwards_and_score_as_one_process(uneven, tmp_path):
    """A model whose every forward is a collective (ZeRO-3's gathering): the rank with 1 batch runs 4 dummy
    forwards beside the rank with 5, and the gathered scores are one process's, in manifest order."""
    job = Path(__file__).with_name("eval_lockstep_job.py")
    proc = subprocess.run([sys.executable, str(job), uneven, str(free_port()), str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["forwards"] == 5 and r["ranks"] == [8, 40] and r["same_scores"]
        assert r["keys"] == r["alone_keys"] == [f"k{i:03d}" for i in range(48) if i % 6 == 0] + [
            f"k{i:03d}" for i in range(48) if i % 6 != 0]  # positives' shard first, as the manifest lists it


@pytest.fixture(scope="module")
def checkpoint(tiny_sets, tmp_path_factory):
    from trainer.config import load_config
    from trainer.train import train

    out = tmp_path_factory.mktemp("eval-run")
    cfg = load_config(None, [f"data.train={tiny_sets['train']}", "data.val=", "data.image_size=32",
                             "data.batch_size=16", "loss.aux_weight=0", "run.max_steps=3", "run.progress=false",
                             f"run.out_dir={out}", "run.device=cpu"])
    return train(cfg)["checkpoint"]


def test_a_ranks_share_scores_the_same_bits_as_the_whole_set(checkpoint, tiny_sets):
    """Why a 2-rank report can equal a 1-rank one exactly. CPU kernels (oneDNN convolutions, the MKL GEMM of the
    head) give a sample other low bits when its batch holds other images or has another size: with batches of 24
    that ran across shard boundaries, 20 of these 300 scores differed (by up to 2e-7) between a rank's share and
    the whole set. Batches cut per shard hold the same images however the shards are split."""
    from trainer.models import load_student_from_checkpoint
    from trainer.evaluate import merge_predictions, predict

    m, cpu = read_manifest(tiny_sets["test"]), torch.device("cpu")
    student, counts = load_student_from_checkpoint(checkpoint), [s.count for s in m.shards]
    whole = merge_predictions(m, [predict(student, m, ScoringConfig(32, 24), cpu)])
    shared = merge_predictions(m, [predict(student, m, ScoringConfig(32, 24), cpu, shards=eval_shards(counts, r, 2))
                                   for r in range(2)])
    assert all(eval_shards(counts, r, 2) for r in range(2))
    assert whole[2] == shared[2] and np.array_equal(whole[0], shared[0])  # bit for bit


def _cli(*args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())] if ranks > 1 else []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, *launcher, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env={**env, **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_ranks_report_the_same_ap_as_one_to_the_last_digit(checkpoint, tiny_sets, tmp_path):
    """`torchrun --nproc_per_node 2 -m cluster.cli eval`: each rank scores about half the set, rank 0 alone
    writes the report, and AP and mAP equal one process's exactly. Batch 24 does not divide the shards, so batches
    that ran across shard boundaries would hold other images on 2 ranks than on 1."""
    test = read_manifest(tiny_sets["test"])
    ev = ["eval", "--checkpoint", checkpoint, "--data", tiny_sets["test"], "--batch-size", "24"]
    _cli(*ev, "--out", str(tmp_path / "one"))
    proc = _cli(*ev, "--out", str(tmp_path / "two"), ranks=2)
    assert proc.stdout.count("mAP") == 1  # one rank prints
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert one["ranks"] == [test.count] and one["num_images"] == test.count
    assert len(two["ranks"]) == 2 and sum(two["ranks"]) == test.count
    assert all(0.35 <= r / test.count <= 0.65 for r in two["ranks"]), two["ranks"]
    assert two["ap"] == one["ap"] and two["map"] == one["map"]  # exact, not approx
    assert two["precision_at_k"] == one["precision_at_k"]
    scores = [json.loads((tmp_path / d / "scores.json").read_text()) for d in ("one", "two")]
    assert scores[0] == scores[1]  # keys and labels in the same (manifest) order


@pytest.mark.slow
def test_validation_in_a_two_rank_ddp_run_is_shared_and_matches_one_process(tiny_sets, tmp_path):
    """Trainer.validate under `torchrun --nproc_per_node 2 -m cluster.cli train`: both ranks score about half the
    validation set, and the metrics are those of one process scoring all of it with the saved weights."""
    from trainer.models import load_student_from_checkpoint
    from trainer.evaluate import evaluate_student

    out = tmp_path / "run"
    _cli("train", "--debug", f"data.train={tiny_sets['train']}", f"data.val={tiny_sets['test']}",
         "data.image_size=32", "data.batch_size=16", f"teacher.image_size={TEACHER_SIZE}", "teacher.mode=cached",
         "run.max_steps=2", f"run.out_dir={out}", "run.progress=false", ranks=2)
    summary = json.loads((out / "summary.json").read_text())
    val, n = summary["val"], read_manifest(tiny_sets["test"]).count
    assert summary["world"] == 2 and summary["engine"] == "ddp"
    assert len(val["ranks"]) == 2 and sum(val["ranks"]) == val["num_images"] == n
    assert all(0.35 <= r / n <= 0.65 for r in val["ranks"]), val["ranks"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun processes ran
    try:
        alone = evaluate_student(load_student_from_checkpoint(summary["checkpoint"]),
                                 read_manifest(tiny_sets["test"]), ScoringConfig(32, 16), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert alone["ranks"] == [n] and alone["ap"] == val["ap"] and alone["map"] == val["map"]


def test_fp32_is_the_cpu_default_and_bf16_autocast_still_gives_fp32_scores(checkpoint, tiny_sets, tmp_path):
    from trainer.models import load_student_from_checkpoint
    from cluster.cli import main
    from trainer.engine import autocast_dtype
    from trainer.evaluate import predict

    ev = ["eval", "--checkpoint", checkpoint, "--data", tiny_sets["test"], "--batch-size", "64"]
    assert main([*ev, "--out", str(tmp_path / "auto")]) == 0
    assert main([*ev, "--out", str(tmp_path / "fp32"), "--precision", "fp32"]) == 0
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("auto", "fp32")]
    assert reports[0]["ap"] == reports[1]["ap"] and reports[0]["map"] == reports[1]["map"]

    cpu = torch.device("cpu")
    student, m = load_student_from_checkpoint(checkpoint), read_manifest(tiny_sets["test"])
    fp32 = predict(student, m, ScoringConfig(32, 64, precision="fp32"), cpu, shards=[0])[0]
    bf16 = predict(student, m, ScoringConfig(32, 64, precision="bf16"), cpu, shards=[0])[0]
    assert autocast_dtype("bf16", cpu) == ScoringConfig(32, precision="bf16").dtype(cpu) == torch.bfloat16
    assert fp32.dtype == bf16.dtype == np.float32
    assert not np.array_equal(fp32, bf16)  # the forward did run in bf16...
    assert np.abs(fp32 - bf16).max() < 0.05  # ...and scores stay close


@pytest.mark.slow
def test_mine_under_torchrun_gives_one_process_candidates(checkpoint, tiny_sets, tmp_path):
    """`torchrun --nproc_per_node 2 -m cluster.cli mine`: each rank scores its shares, rank 0 alone merges and
    publishes; the candidates equal one process's (batches are cut per shard, so the scores are the same bits)."""
    mine = ["mine", "--checkpoint", checkpoint, "--pool", tiny_sets["test"], "--top", "7", "--batch-size", "24"]
    _cli(*mine, "--out", str(tmp_path / "one"))
    proc = _cli(*mine, "--out", str(tmp_path / "two"), ranks=2)
    assert proc.stdout.count('"pool_images"') == 1  # one rank publishes
    one, two = ((tmp_path / d / "candidates.jsonl").read_text() for d in ("one", "two"))
    assert one == two and len(one.splitlines()) == 7 * (len(read_manifest(tiny_sets["test"]).class_names) - 1)
    assert len(list((tmp_path / "two" / "parts").rglob("*.json"))) == len(read_manifest(tiny_sets["test"]).shards)
