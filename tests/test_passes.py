"""`shards build`, `teacher-label`, `eval` and `mine` with --ray on a real local Ray cluster give what one process
gives."""
from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest

from conftest import RARE, TEACHER_SIZE, environ
from data.plan import shard_groups
from data.shards import read_manifest
from cluster.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_address():
    from ray_cluster import RAY_ENV, RayCluster

    cluster = RayCluster(num_cpus=2).start()
    try:
        with environ(RAY_ENV):
            yield cluster.address
            import ray  # not before RAY_ENV is set: Ray reads its auth mode at import

            ray.shutdown()
    finally:
        cluster.stop()


def test_build_label_and_eval_as_ray_tasks_match_one_process(ray_address, tmp_path, teacher, tiny_sets):
    from trainer.teacher_label import label_spec

    build = ["shards", "build", "--source", "fmnist:test", "--rare", ",".join(RARE), "--subsample", "150",
             "--max-count", "20"]
    assert main([*build, "--out", str(tmp_path / "local"), "--workers", "0"]) == 0
    assert main([*build, "--out", str(tmp_path / "ray"), "--ray", "--ray-address", ray_address]) == 0
    local, remote = read_manifest(str(tmp_path / "local")), read_manifest(str(tmp_path / "ray"))
    assert len(remote.shards) == len(local.shards) >= 8 and remote.counts == local.counts
    for s in local.shards:  # byte-identical shards, whichever machine wrote them
        assert filecmp.cmp(tmp_path / "local" / s.url, tmp_path / "ray" / s.url, shallow=False)

    label = ["teacher-label", "--image-size", str(TEACHER_SIZE), "--batch-size", "32"]
    assert main([*label, "--data", str(tmp_path / "local")]) == 0
    assert main([*label, "--data", str(tmp_path / "ray"), "--ray", "--ray-address", ray_address]) == 0
    spec = label_spec(teacher, TEACHER_SIZE, 5)
    meta = json.loads((tmp_path / "ray" / "teacher-labels" / spec.name / "labels.json").read_text())
    groups = shard_groups([s.count for s in local.shards], 4)  # the tasks: whole shards, balanced by samples
    assert meta["parts"] == len(groups) == -(-len(local.shards) // 4) and meta["labelled"] == local.count
    for s in local.shards:
        a = np.load(tmp_path / "local" / "teacher-labels" / spec.name / s.url.replace(".tar", ".npz"))
        b = np.load(tmp_path / "ray" / "teacher-labels" / spec.name / s.url.replace(".tar", ".npz"))
        assert np.mean(a["indices"][:, 0] == b["indices"][:, 0]) >= 0.99  # batch composition differs
        assert np.allclose(a["probs"][:, 0], b["probs"][:, 0], atol=2e-3)

    from trainer.config import load_config
    from trainer.train import train

    cfg = load_config(None, [f"data.train={tiny_sets['train']}", "data.val=", "data.image_size=32",
                             "data.batch_size=16", "loss.aux_weight=0", "run.max_steps=3", "run.progress=false",
                             f"run.out_dir={tmp_path / 'run'}", "run.device=cpu"])
    checkpoint = train(cfg)["checkpoint"]
    ev = ["eval", "--checkpoint", checkpoint, "--data", str(tmp_path / "local"), "--batch-size", "32"]
    assert main([*ev, "--out", str(tmp_path / "rep-local")]) == 0
    assert main([*ev, "--out", str(tmp_path / "rep-ray"), "--ray", "--ray-address", ray_address]) == 0
    a = json.loads((tmp_path / "rep-local" / "report.json").read_text())
    b = json.loads((tmp_path / "rep-ray" / "report.json").read_text())
    assert a["ranks"] == [local.count]  # one process: one part
    sizes = [s.count for s in local.shards]
    assert b["ranks"] == [sum(sizes[i] for i in g) for g in shard_groups(sizes, 4)]
    for name, ap in a["ap"].items():
        assert b["ap"][name] == pytest.approx(ap, abs=1e-6)
    assert (tmp_path / "rep-ray" / "top_scoring.png").stat().st_size > 0


def test_mine_as_ray_tasks_matches_one_process(ray_address, tmp_path, tiny_sets):
    from trainer.config import load_config
    from trainer.train import train

    cfg = load_config(None, [f"data.train={tiny_sets['train']}", "data.val=", "data.image_size=32",
                             "data.batch_size=16", "loss.aux_weight=0", "run.max_steps=3", "run.progress=false",
                             f"run.out_dir={tmp_path / 'run'}", "run.device=cpu"])
    checkpoint = train(cfg)["checkpoint"]
    mine = ["mine", "--checkpoint", checkpoint, "--pool", tiny_sets["test"], "--top", "6", "--batch-size", "32"]
    assert main([*mine, "--out", str(tmp_path / "local")]) == 0
    assert main([*mine, "--out", str(tmp_path / "ray"), "--ray", "--ray-address", ray_address]) == 0
    local = [json.loads(line) for line in (tmp_path / "local" / "candidates.jsonl").read_text().splitlines()]
    remote = [json.loads(line) for line in (tmp_path / "ray" / "candidates.jsonl").read_text().splitlines()]
    assert [(r["key"], r["class"], r["rank"]) for r in remote] == [(r["key"], r["class"], r["rank"]) for r in local]
    assert np.allclose([r["score"] for r in remote], [r["score"] for r in local], atol=1e-6)
    summary = json.loads((tmp_path / "ray" / "mine.json").read_text())
    assert summary["scored"] == read_manifest(tiny_sets["test"]).count
