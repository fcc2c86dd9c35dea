"""Each small contract answered once (issue 33, item 4): a guard per contract that fails when a second copy
comes back, and the unified behaviour it stands for."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from data import storage

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("data", "trainer", "cluster")


def _sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for d in PRODUCT for p in sorted((ROOT / d).rglob("*.py"))}


def _where(pattern: str) -> set[str]:
    return {name for name, text in _sources().items() if re.search(pattern, text, re.M)}


# ------------------------------------------------------------------------------------------------ one atomic write


def test_files_are_published_only_by_the_storage_layer():
    """A file appears whole through data.storage.atomic_write / write_bytes; the one other rename is the views
    cache's folder (a directory made visible at once, which no file write can do)."""
    assert _where(r"\bos\.replace\(") == {"data/storage.py", "trainer/views.py"}
    assert _where(r"os\.replace\(partial, folder\)") == {"trainer/views.py"}
    assert _where(r"mkstemp|NamedTemporaryFile") == {"data/storage.py"}


def test_reports_and_scores_meet_a_full_disk_as_every_write_does(tmp_path, monkeypatch):
    """The report's JSON, Markdown and plots go through the one write: a full disk is its one DiskFull line and
    leaves neither the file nor a temporary copy."""
    from trainer.metrics import evaluate
    from trainer.report import plot_pr_curves, write_report

    def sync(f, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage, "_sync", sync)
    rng = np.random.default_rng(0)
    probs, labels = rng.dirichlet(np.ones(3), 20), np.arange(20) % 3
    with pytest.raises(storage.DiskFull, match="pr.png"):
        plot_pr_curves(probs, labels, ["bg", "a", "b"], tmp_path / "pr.png")
    with pytest.raises(storage.DiskFull, match="report.json"):
        write_report(evaluate(probs, labels, ["bg", "a", "b"]), tmp_path, "t")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ one image member


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_one_rule_says_which_member_is_the_image():
    from data.shards import IMAGE_EXTS, image_member

    assert IMAGE_EXTS[:4] == ("jpg", "jpeg", "png", "webp")
    assert image_member({"png": b"p", "cls": b"1"}) == b"p"
    assert image_member({"webp": b"w", "json": b"{}"}) == b"w"
    assert image_member({"json": b"{}", "png": b"p", "jpg": b"j"}) == b"j"  # the order of IMAGE_EXTS, not the tar's
    assert image_member({"cls": b"1", "json": b"{}"}) is None


@pytest.mark.parametrize("name", ["a.jpg", "a.JPG", "a.jpeg", "a.png", "a.PNG", "a.webp", "a.WebP"])
def test_every_reader_of_a_shard_finds_the_same_image_member(name):
    """Upper-case member names too: both tar parsers lower-case them, then the one lookup picks the image."""
    import io

    from data.reader import _TarParse
    from data.shards import image_member, iter_tar

    raw = _tar([(name, b"IMAGE"), ("a.cls", b"1"), ("a.json", b"{}")])
    (key, fields), = list(iter_tar(io.BytesIO(raw)))
    assert key == "a" and image_member(fields) == b"IMAGE"
    parse = _TarParse(io.BytesIO(raw))
    assert list(parse) == [] and parse.pending is not None  # the reader keeps the last sample pending
    key, fields = parse.pending
    assert key == "a" and image_member(fields) == b"IMAGE"


def test_the_image_member_rule_is_written_once():
    assert _where(r"\bIMAGE_EXTS\b") == {"data/shards.py"}
    users = _where(r"^from data\.shards import [^\n]*\bimage_member\b|^ +image_member,$|"
                   r"^from data\.shards import \([^)]*\bimage_member\b")
    assert {"data/loader.py", "trainer/evaluate.py", "trainer/mine.py", "data/add_labels.py"} <= users


# ------------------------------------------------------------------------------------------------ one set identity


def test_a_byte_identical_rebuild_keeps_the_studys_runs_and_mines_parts(tmp_path, monkeypatch):
    """A shard set's identity is data.shards.manifest_identity for every cache keyed by a set: the study's stored
    runs and probe features, the views cache, and mine's parts (whose own hash of the whole manifest changed
    with every rebuild's timings, so a rebuild re-mined the pool while the study reused its runs)."""
    import filecmp

    from data.build import BuildSpec, build_set
    from data.shards import MANIFEST, manifest_identity, read_manifest
    from data.sources import FashionMNISTSource
    import trainer.mine as mine

    spec = BuildSpec("fmnist:test", ("1", "8"), positives_per_class=4, max_background=30, seed=0, max_count=20)
    first = build_set(FashionMNISTSource("test"), spec, str(tmp_path / "first"), progress=False)
    again = build_set(FashionMNISTSource("test"), spec, str(tmp_path / "again"), progress=False)
    assert [s.url for s in first.shards] == [s.url for s in again.shards]
    assert all(filecmp.cmp(f"{first.root}/{s.url}", f"{again.root}/{s.url}", shallow=False) for s in first.shards)
    manifest = Path(again.root, MANIFEST)  # a rebuild never takes the same time to the millisecond
    doc = json.loads(manifest.read_text())
    doc["meta"]["build_seconds"] = read_manifest(first.root).meta["build_seconds"] + 1.0
    manifest.write_text(json.dumps(doc, indent=1))
    assert manifest_identity(first.root) == manifest_identity(again.root)  # the study's key
    monkeypatch.setattr(mine, "checkpoint_facts", lambda checkpoint: ("weights", ["bg", "1", "8"]))
    prints = [mine.MinePass(_mine_job(root, str(tmp_path / "out"))).fingerprint for root in (first.root, again.root)]
    assert prints[0] == prints[1]  # mine's parts are reused too
    other = build_set(FashionMNISTSource("test"), dataclasses.replace(spec, seed=1), str(tmp_path / "other"),
                      progress=False)
    assert manifest_identity(other.root) != manifest_identity(first.root)
    assert mine.MinePass(_mine_job(other.root, str(tmp_path / "out"))).fingerprint != prints[0]


def _mine_job(pool: str, out: str):
    from trainer.mine import MineJob
    from trainer.scoring import ScoringConfig

    return MineJob(checkpoint="ckpt", pool=pool, out=out, top=5, scoring=ScoringConfig(32, precision="auto"))


def test_mines_fingerprint_is_the_one_before_scoring_config():
    """MineJob took its size, batch, workers and precision as its own fields until they became one ScoringConfig
    (issue 33); these digests were computed by that code, so parts and studies mined before are still reused."""
    from trainer.mine import MineJob
    from trainer.scoring import ScoringConfig

    job = MineJob(checkpoint="s3://b/run/ckpt", pool="s3://b/pool", out="s3://b/mine", top=50,
                  scoring=ScoringConfig(160, 64, 3, precision="bf16"), exclude=("s3://b/train", "s3://b/val"))
    assert job.fingerprint("abc123", "pool-id-1") == "4a488421ced9"
    assert job.fingerprint("abc123", "pool-id-1", "content") == "8b0ed02d8223"
    rows = MineJob(checkpoint="/c", pool="/p", out="/o", top=10, scoring=ScoringConfig(224), embeddings="/e")
    assert rows.fingerprint("d", "p") == "2740d9af2d46"


def test_a_sets_identity_is_one_function():
    assert _where(r"^def \w*identity\(") == {"data/shards.py"}
    assert {"trainer/mine.py", "cluster/experiment_store.py", "trainer/views.py"} <= _where(r"\bmanifest_identity\(")


# ------------------------------------------------------------------------------------------------ one fan-out rule


def _in_ray_job_copy(tmp_path, monkeypatch) -> Path:
    from trainer.runtime import RAY_JOB_ENV

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_e0d4550517"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv(RAY_JOB_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_e0d4550517.zip"}}))
    return copy


def test_work_that_fans_out_refuses_rays_temporary_working_dir_everywhere(tmp_path, monkeypatch):
    """Ray Train's workers, Tune's trials and an experiment's data.sets make paths absolute by one rule
    (trainer.runtime.output_location with fan_out): against the driver's directory, refused in Ray's copy."""
    from cluster.experiment_spec import parse_spec
    from trainer.config import load_config
    from trainer.runtime import fanned_out

    cfg = load_config(None, ["data.train=sets/train", "data.val=s3://b/val", "run.out_dir=runs/x"])
    monkeypatch.chdir(tmp_path)
    made = fanned_out(cfg)
    assert (made.data.train, made.data.val, made.run.out_dir) == (f"{tmp_path}/sets/train", "s3://b/val",
                                                                   f"{tmp_path}/runs/x")
    assert cfg.data.train == "sets/train"  # a copy: the caller's config stays as given
    spec = {"data": {"sets": {"train": {"A": "rel/a"}, "val": "s3://b/val", "test": "/abs/t"}}, "methods": {"x": {}}}
    assert parse_spec(spec).data.sets["train"]["A"] == f"{tmp_path}/rel/a"
    _in_ray_job_copy(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="run.out_dir=runs/x is relative.*temporary copy"):
        fanned_out(cfg)
    with pytest.raises(ValueError, match="data.sets=rel/a is relative.*temporary copy"):
        parse_spec(spec)


def test_paths_are_made_absolute_for_fanned_out_work_by_one_rule():
    """os.path.abspath in trainer/ and cluster/ outside the rule: the CLI's own flags (cluster/cli.py), the run
    folder line (a display), and Ray Train's storage under a run folder the rule already made absolute."""
    assert {n for n in _where(r"os\.path\.abspath\(") if not n.startswith("data/")} <= {
        "trainer/runtime.py", "cluster/cli.py", "trainer/run_log.py", "cluster/ray_train.py"}
    assert not _where(r"def absolute_paths\(|def fix\(")
    assert {"cluster/ray_train.py", "cluster/trials.py"} <= _where(r"\bfanned_out\(")
    assert {"cluster/experiment_data.py", "cluster/experiment.py"} <= _where(r"\boutput_location\(")


# ------------------------------------------------------------------------------------------------ one Ray connect


def test_one_connect_joins_once(monkeypatch):
    """Training, Tune's trials and the shard passes join a cluster through one function, which leaves an existing
    connection alone (the passes' connect did; Ray Train's called ray.init again)."""
    import sys
    import types

    import cluster.passes
    import cluster.ray_train as ray_train

    assert cluster.passes.connect is ray_train.connect
    calls = []
    fake = types.SimpleNamespace(is_initialized=lambda: bool(calls), init=lambda **kw: calls.append(kw))
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(ray_train, "worker_env", lambda: {"A": "1"})
    ray_train.connect("10.0.0.1:6379")
    ray_train.connect("10.0.0.1:6379")
    assert calls == [{"address": "10.0.0.1:6379", "runtime_env": {"env_vars": {"A": "1"}}, "log_to_driver": True}]


def test_ray_is_joined_in_one_place():
    assert _where(r"^def connect\(") == {"cluster/ray_train.py"}
    assert _where(r"\bray\.init\(") == {"cluster/ray_train.py"}
