"""Opening a checkpoint never runs code from it.

state.pt holds tensors and plain containers only and is read with ``weights_only=True``; the student's shape, the
config and the history are JSON beside it. A file that is not such a checkpoint (a pickle carrying a payload, a
truncated or random file, another model's state dict) is a one-line error through every path that opens one
(load_checkpoint, load_student_from_checkpoint, a checkpoint teacher, `bgsplit eval`, `bgsplit mine`, a resume
with run.resume=auto), and its payload has not run: each payload would create a marker file, checked absent. A
checkpoint of the previous format is refused unless trusted (BGSPLIT_TRUST_CHECKPOINT=1, --trust-checkpoint),
and then loads as before: there the payload does run, which shows the marker check can fail.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from trainer import checkpoint as ckpt
from trainer.checkpoint import (FORMAT, INDEX, META, STATE, TRUST_ENV, CheckpointError, latest_checkpoint, load_checkpoint, read_meta, rng_state, set_rng_state)
from trainer.checkpoint_manager import CheckpointWriter
from cluster.cli import main
from trainer.models import StudentSpec, build_teacher, load_student_from_checkpoint
from trainer.train import Trainer, train

STEPS = 2


class Payload:
    """Unpickling this (with weights_only=False) creates ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def run_dir(tiny_sets, tmp_path_factory):
    """One real (tiny) training run; tests copy it before tampering with it."""
    out = tmp_path_factory.mktemp("safety-run") / "run"
    train(tiny_config(tiny_sets, out, "loss.aux_weight=0", f"run.max_steps={STEPS}"))
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out


@pytest.fixture(autouse=True)
def untrusted(monkeypatch):
    """Not trusted unless a test says so; whatever a test (or --trust-checkpoint) sets is undone after it."""
    monkeypatch.setenv(TRUST_ENV, "0")
    monkeypatch.delenv(TRUST_ENV)


def _folder(out: Path) -> Path:
    return Path(latest_checkpoint(str(out)))


def _evil_torch_file(path: Path, marker: Path) -> None:
    """What torch.save writes for a checkpoint-like dict whose student is a payload (a zip with a pickle)."""
    torch.save({"step": 1, "student": Payload(str(marker)), "model_meta": {"num_classes": 3}}, path)


def _evil_raw_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"student": Payload(str(marker))}))


def _one_line(e: BaseException, *names: str) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, (name, msg)
    return msg


def _cli(capsys, argv) -> tuple[int, list[str]]:
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


# -- the format ---------------------------------------------------------------------------------------------------
def test_state_is_tensors_and_containers_and_the_description_is_json(run_dir):
    folder = _folder(run_dir)
    index = json.loads((folder / INDEX).read_text())
    assert index["format"] == FORMAT and set(index["files"]) == {STATE, META}
    state = torch.load(folder / STATE, map_location="cpu", weights_only=True)  # the strict loader reads all of it
    assert set(state) == {"student", "engine", "scheduler", "loader", "rng"}
    assert all(torch.is_tensor(v) for v in state["student"].values())
    assert state["scheduler"]["lr_lambdas"] == [None] * len(state["scheduler"]["lr_lambdas"])  # no functions
    rng = state["rng"][0]
    assert torch.is_tensor(rng["numpy"]["keys"]) and torch.is_tensor(rng["python"]["state"])
    meta = json.loads((folder / META).read_text())
    assert meta["format"] == FORMAT and meta["step"] == STEPS and meta["engine_name"] == "ddp"
    assert meta["config"]["data"]["image_size"] == 32 and isinstance(meta["history"], list)
    spec = StudentSpec.from_dict(meta["student_spec"], str(folder))
    assert spec.trunk == "efficientnet_lite0" and spec.num_classes == 3 and spec.aux_classes == 0
    assert spec.class_names is not None and len(spec.class_names) == 3
    # the one description rebuilds the student: same weights as written
    student = load_student_from_checkpoint(str(folder))
    assert student.spec == spec and student.class_names == list(spec.class_names)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in state["student"].items())
    assert read_meta(str(folder))["student_spec"] == meta["student_spec"]


def test_student_spec_round_trips_through_json_and_is_type_checked(tiny_sets):
    from data.shards import read_manifest

    cfg = tiny_config(tiny_sets, "unused", "loss.main=ldam_drw", "loss.ldam_scale=20", "model.trunk=resnet18")
    spec = StudentSpec.from_config(cfg, read_manifest(tiny_sets["train"]), aux_classes=7)
    assert spec.normalized_main_head and spec.logit_scale == 20.0 and spec.aux_classes == 7
    again = StudentSpec.from_dict(json.loads(json.dumps(spec.to_dict())), "here")
    assert again == spec and again.mismatch(spec) is None
    for field, bad in (("num_classes", "3"), ("trunk", None), ("class_names", [1, 2]), ("num_classes", True)):
        with pytest.raises(CheckpointError, match=field) as e:
            StudentSpec.from_dict({**spec.to_dict(), field: bad}, "ckpt-x")
        _one_line(e.value, "ckpt-x")


def test_rng_states_round_trip_bit_for_bit_through_a_written_checkpoint(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.normal(), random.gauss(0, 1)  # both generators now hold a cached Gaussian: part of the state
    saved = rng_state()
    assert np.random.get_state()[3] == 1 and random.getstate()[2] is not None
    want = (torch.rand(5), np.random.rand(5), np.random.normal(), [random.random() for _ in range(5)],
            random.gauss(0, 1))
    CheckpointWriter(str(tmp_path), background=False).save(1, {"student": {}, "rng": [saved]}, nonce="n")
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(load_checkpoint(ckpt.step_url(str(tmp_path), 1))["rng"][0])
    got = (torch.rand(5), np.random.rand(5), np.random.normal(), [random.random() for _ in range(5)],
           random.gauss(0, 1))
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2:] == want[2:]


def test_the_writer_refuses_a_pickled_object_before_anything_is_written(tmp_path):
    writer = CheckpointWriter(str(tmp_path), background=False)
    with pytest.raises(TypeError, match=r"state\['rng'\]\['numpy'\]\[1\] is a numpy.ndarray"):
        writer.save(1, {"student": {}, "rng": {"numpy": np.random.get_state()}}, nonce="n")
    assert latest_checkpoint(str(tmp_path)) is None and not (tmp_path / "checkpoints").exists()


# -- files that are not checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [_evil_torch_file, _evil_raw_pickle], ids=["torch-zip", "raw-pickle"])
def test_a_payload_in_state_pt_is_refused_and_never_runs_on_any_path(run_copy, tmp_path, tiny_sets, capsys,
                                                                      monkeypatch, make):
    folder = _folder(run_copy)
    marker = tmp_path / "payload-ran"
    make(folder / STATE, marker)
    state_file = str(folder / STATE)
    calls = [lambda: load_checkpoint(str(folder)), lambda: load_checkpoint(state_file),
             lambda: load_student_from_checkpoint(str(folder)), lambda: build_teacher("checkpoint", str(folder)),
             lambda: train(tiny_config(tiny_sets, run_copy, "loss.aux_weight=0", f"run.max_steps={STEPS + 2}",
                                       "run.resume=auto"))]
    for call in calls:
        with pytest.raises(CheckpointError) as e:
            call()
        _one_line(e.value, state_file, "nothing in it was run")
    for argv in (["eval", "--checkpoint", str(folder), "--data", tiny_sets["test"], "--out", str(tmp_path / "r")],
                 ["mine", "--checkpoint", str(folder), "--pool", tiny_sets["test"], "--out", str(tmp_path / "m")]):
        code, err = _cli(capsys, argv)
        assert code == 2 and len(err) == 1 and state_file in err[0], err
    # trusting old checkpoints does not open this one unsafely: it has meta.json, so it is read weights-only
    monkeypatch.setenv(TRUST_ENV, "1")
    with pytest.raises(CheckpointError):
        load_student_from_checkpoint(str(folder))
    code, err = _cli(capsys, ["eval", "--trust-checkpoint", "--checkpoint", str(folder), "--data",
                              tiny_sets["test"], "--out", str(tmp_path / "r")])
    assert code == 2 and len(err) == 1
    assert not marker.exists()
    assert not (tmp_path / "r").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_a_damaged_state_pt_is_a_one_line_error(run_copy, damage):
    folder = _folder(run_copy)
    data = (folder / STATE).read_bytes()
    (folder / STATE).write_bytes({"truncated": data[:len(data) // 2], "random": os.urandom(4096),
                                  "empty": b""}[damage])
    with pytest.raises(CheckpointError) as e:
        load_student_from_checkpoint(str(folder))
    msg = _one_line(e.value, str(folder / STATE), "use another one")
    assert {"truncated": "truncated or damaged", "random": "not a file written by torch.save",
            "empty": "empty"}[damage] in msg


def test_another_models_state_dict_is_refused(run_copy, tmp_path):
    import torchvision

    other = torchvision.models.resnet18(weights=None).state_dict()
    # as a file of its own: tensors only, so it is read safely, but it describes no student
    bare = tmp_path / "resnet18.pt"
    torch.save(other, bare)
    with pytest.raises(CheckpointError) as e:
        load_student_from_checkpoint(str(bare))
    _one_line(e.value, str(bare), "plain tensor file", "bgsplit train")
    # as the state.pt of a checkpoint folder: the weights do not fit the student meta.json describes
    folder = _folder(run_copy)
    torch.save({"student": other}, folder / STATE)
    with pytest.raises(CheckpointError) as e:
        load_student_from_checkpoint(str(folder))
    _one_line(e.value, str(folder), "not those of the student it describes", "efficientnet_lite0")


def test_a_folder_that_is_not_a_checkpoint_and_a_bad_meta_json(run_copy, tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path))
    _one_line(e.value, str(tmp_path), "not a bgsplit checkpoint")
    folder = _folder(run_copy)
    (folder / META).write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(folder))
    _one_line(e.value, str(folder / META))
    (folder / META).write_text(json.dumps({"format": "bgsplit-checkpoint/9"}))
    with pytest.raises(CheckpointError) as e:
        read_meta(str(folder))
    _one_line(e.value, "bgsplit-checkpoint/9", FORMAT)


def test_resume_into_another_trunk_names_the_field(run_copy, tiny_sets):
    cfg = tiny_config(tiny_sets, run_copy, "loss.aux_weight=0", "model.trunk=resnet18", "model.weights=NONE",
                      "run.resume=auto", f"run.max_steps={STEPS + 2}")
    with pytest.raises(CheckpointError) as e:
        Trainer.build(cfg)
    _one_line(e.value, "trunk='efficientnet_lite0'", "trunk='resnet18'", "run.out_dir")


# -- the previous format ------------------------------------------------------------------------------------------
def _make_legacy(folder: Path) -> None:
    """Rewrite a checkpoint folder as bgsplit-checkpoint/2 wrote it: one pickled state.pt with numpy's RNG tuple
    and the description inside, no meta.json."""
    state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    meta = json.loads((folder / META).read_text())
    rngs = [{**r, "numpy": ckpt._numpy_state(r["numpy"]), "python": ckpt._python_state(r["python"])}
            for r in state["rng"]]
    legacy = {"version": 2, "step": meta["step"], "steps_per_epoch": meta["steps_per_epoch"],
              "engine_name": meta["engine_name"], "student": state["student"], "engine": state["engine"],
              "scheduler": state["scheduler"], "loader": state["loader"], "rng": rngs, "world": meta["world"],
              "config": meta["config"], "model_meta": meta["student_spec"], "history": meta["history"],
              "skipped": meta["skipped"], "skipped_by_shard": meta["skipped_by_shard"]}
    torch.save(legacy, folder / STATE)
    (folder / META).unlink()
    index = json.loads((folder / INDEX).read_text())
    (folder / INDEX).write_text(json.dumps({**index, "format": "bgsplit-checkpoint/2", "files": [STATE]}))


def test_a_previous_format_checkpoint_is_refused_unless_trusted(run_copy, tiny_sets, tmp_path, capsys,
                                                                monkeypatch):
    folder = _folder(run_copy)
    want = torch.load(folder / STATE, map_location="cpu", weights_only=True)["student"]
    _make_legacy(folder)
    resume = tiny_config(tiny_sets, run_copy, "loss.aux_weight=0", f"run.max_steps={STEPS + 1}", "run.resume=auto")
    for call in (lambda: load_student_from_checkpoint(str(folder)), lambda: read_meta(str(folder)),
                 lambda: train(resume)):
        with pytest.raises(CheckpointError) as e:
            call()
        _one_line(e.value, str(folder / STATE), "previous format", f"{TRUST_ENV}=1", "--trust-checkpoint")
    code, err = _cli(capsys, ["eval", "--checkpoint", str(folder), "--data", tiny_sets["test"], "--out",
                              str(tmp_path / "r")])
    assert code == 2 and len(err) == 1 and TRUST_ENV in err[0]
    # trusted: loads as before
    student = load_student_from_checkpoint(str(folder), trust=True)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in want.items())
    code, err = _cli(capsys, ["eval", "--trust-checkpoint", "--checkpoint", str(folder), "--data",
                              tiny_sets["test"], "--out", str(tmp_path / "r")])
    assert code == 0 and (tmp_path / "r" / "report.json").exists()
    assert os.environ.get(TRUST_ENV) == "1"  # what the flag did (torchrun ranks and Ray tasks inherit it)
    summary = train(resume)  # the variable covers training resume too
    assert summary["resumed_from"] == str(folder) and summary["steps"] == STEPS + 1
    # and what it writes is this format
    assert json.loads((_folder(run_copy) / META).read_text())["format"] == FORMAT


def test_trusting_a_file_is_what_lets_its_payload_run(tmp_path):
    """The marker check is real: a trusted file without meta.json is unpickled as before, payload and all."""
    bare, marker = tmp_path / "old.pt", tmp_path / "payload-ran"
    _evil_torch_file(bare, marker)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(bare))
    _one_line(e.value, str(bare), TRUST_ENV)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"  # not a torch file at all (bgsplit never wrote one): refused even when trusted
    _evil_raw_pickle(raw, marker)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(raw), trust=True)
    _one_line(e.value, str(raw), "not a file written by torch.save")
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # it runs, then is found to describe no student
        load_student_from_checkpoint(str(bare), trust=True)
    assert marker.exists()
