"""Bad input through the `bgsplit` command: one line on stderr naming the thing and the fix, exit status 2."""

from cluster.cli import main


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_unknown_config_key(capsys):
    code, err = _run(capsys, ["train", "loss.aux_wieght=0.3"])
    assert code == 2 and len(err) == 1 and "unknown config key 'loss.aux_wieght'" in err[0]


def test_missing_shard_set(capsys, tmp_path):
    code, err = _run(capsys, ["train", f"data.train={tmp_path / 'nowhere'}"])
    assert code == 2 and len(err) == 1 and "bgsplit shards build" in err[0]


def test_unknown_class_id_in_split_file(capsys, tmp_path):
    split = tmp_path / "split.txt"
    split.write_text("3\n42\n")
    code, err = _run(capsys, ["shards", "build", "--source", "fmnist:test", "--split-file", str(split),
                              "--out", str(tmp_path / "out")])
    assert code == 2 and len(err) == 1 and "unknown class id '42'" in err[0]
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint(capsys, tmp_path):
    code, err = _run(capsys, ["eval", "--checkpoint", str(tmp_path / "x.pt"), "--data", str(tmp_path),
                              "--out", str(tmp_path / "r")])
    assert code == 2 and len(err) == 1 and "x.pt does not exist" in err[0]


def test_shards_build_is_idempotent(capsys, tmp_path):
    argv = ["shards", "build", "--source", "fmnist:test", "--rare", "8", "--subsample", "200",
            "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()}
    assert main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()} == first
    out = capsys.readouterr().out
    assert "200 images" in out


def test_own_data_config_names_the_key_of_a_missing_set(capsys, tmp_path, tiny_sets):
    """configs/own_data.yaml holds no demo paths: each set not given, or given wrong, is named by its key."""
    code, err = _run(capsys, ["train", "--config", "configs/own_data.yaml", f"run.out_dir={tmp_path / 'run'}"])
    assert code == 2 and len(err) == 1 and "data.train is empty" in err[0] and "artifacts/demo" not in err[0]
    code, err = _run(capsys, ["train", "--config", "configs/own_data.yaml", f"data.train={tiny_sets['train']}",
                              f"data.val={tmp_path / 'no-val'}", f"run.out_dir={tmp_path / 'run'}"])
    assert code == 2 and len(err) == 1 and err[0].startswith(f"bgsplit: error: data.val={tmp_path / 'no-val'} holds")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_one_word_one_meaning_across_commands_with_the_old_names_still_parsing():
    from cluster.cli import build_parser

    parse = build_parser().parse_args
    base = {"plan": ["shards", "plan", "--data", "d", "--world", "2", "--batch-size", "8"],
            "eval": ["eval", "--checkpoint", "c", "--data", "d", "--out", "o"],
            "mine": ["mine", "--checkpoint", "c", "--pool", "p", "--out", "o"],
            "teacher-label": ["teacher-label", "--data", "d"]}
    for command, argv in base.items():
        dest = "workers" if command == "plan" else "num_workers"
        for flag in ("--loader-workers", "--workers" if command == "plan" else "--num-workers"):
            assert getattr(parse(argv + [flag, "3"]), dest) == 3, (command, flag)
    build = ["shards", "build", "--source", "fmnist:train", "--out", "o"]
    assert parse(build + ["--writers", "5"]).workers == parse(build + ["--workers", "5"]).workers == 5
    assert parse(base["mine"] + ["--writers", "2", "--loader-workers", "1"]).workers == 2
    assert parse(["train", "--ray", "--ray-address", "127.0.0.1:6379"]).ray


def test_every_shards_build_flag_reaches_the_build_request_by_name(monkeypatch):
    """The flags are made from data.build.BuildRequest's fields: each one, given a value other than its default,
    arrives in the request the build gets, and the parser and the request agree on every default."""
    import dataclasses

    import data.build
    from cluster.cli import build_parser
    from data.build import BuildRequest

    values = {"source": "wds:s", "out": "o", "label_field": "txt", "split_file": "f", "rare": "a,b",
              "positives_per_class": 7, "background_fraction": 0.5, "max_background": 9, "seed": 3, "holdout": 4,
              "holdout_positives_per_class": 2, "holdout_out": "v", "subsample": 11, "max_count": 13, "max_mb": 1.5,
              "resize_short_side": 64, "jpeg_quality": 80, "workers": 2}
    assert set(values) == {f.name for f in dataclasses.fields(BuildRequest)}
    argv = ["shards", "build"]
    for name, value in values.items():
        argv += ["--" + name.replace("_", "-") if name != "workers" else "--writers", str(value)]
    got = []
    monkeypatch.setattr(data.build, "build_command", lambda request, runner=None: got.append(request))
    build_parser().parse_args(argv).func(build_parser().parse_args(argv))
    assert got == [BuildRequest(**values)]
    defaults = build_parser().parse_args(["shards", "build", "--source", "s", "--out", "o"])
    for f in dataclasses.fields(BuildRequest):
        if f.name not in ("source", "out", "workers"):  # the writers' default is the machine's CPUs on the CLI
            assert getattr(defaults, f.name) == f.default, f.name


def test_a_build_request_gives_the_main_and_carved_out_specs():
    from data.build import BuildRequest, BuildSpec

    specs = BuildRequest("wds:s", "o", label_field="json:a.b", rare="x", positives_per_class=5, seed=2, holdout=10,
                         holdout_out="v", max_mb=2, holdout_positives_per_class=3).specs(("1",))
    assert specs == {
        "main": (BuildSpec("wds:s#label=json:a.b", ("1",), positives_per_class=5, seed=2, holdout=10, part="rest",
                           max_bytes=2 << 20, holdout_positives_per_class=3), "o"),
        "holdout": (BuildSpec("wds:s#label=json:a.b", ("1",), seed=2, holdout=10, part="holdout", max_bytes=2 << 20,
                              holdout_positives_per_class=3), "v")}
    import pytest

    with pytest.raises(ValueError, match="--holdout needs --holdout-out"):
        BuildRequest("s", "o", holdout=3).specs(())
    with pytest.raises(ValueError, match="--label-field applies to wds: sources"):
        BuildRequest("folder:x", "o", label_field="txt").specs(())


def test_the_old_cluster_launch_door_is_bgsplit_train_ray(capsys, monkeypatch, tmp_path):
    """`python -m cluster.launch` is only a name for `bgsplit train --ray`: its --address becomes --ray-address
    and its errors are bgsplit's one line and exit status."""
    import cluster.cli
    import cluster.launch

    seen = []
    monkeypatch.setattr(cluster.launch, "bgsplit", lambda argv: seen.append(argv) or 0)
    assert cluster.launch.main(["--config", "c.yaml", "--address", "h:1", "--address=h:2", "a.b=1"]) == 0
    assert seen == [["train", "--ray", "--config", "c.yaml", "--ray-address", "h:1", "--ray-address=h:2", "a.b=1"]]
    monkeypatch.undo()
    code, err = _run(capsys, ["train", "--ray", "loss.aux_wieght=0.3"])
    assert cluster.launch.main(["loss.aux_wieght=0.3"]) == code == 2
    assert capsys.readouterr().err.strip() == err[0] and "unknown config key 'loss.aux_wieght'" in err[0]


def test_a_local_run_prints_the_result_keys_a_ray_run_prints(capsys, tiny_sets, tmp_path):
    import json

    from trainer.run_log import result_line

    argv = ["train", "--debug", "--config", "configs/debug.yaml", f"data.train={tiny_sets['train']}", "data.val=",
            f"run.out_dir={tmp_path / 'run'}", "run.max_steps=1", "run.progress=false", "loss.aux_weight=0"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    ray_keys = json.loads(result_line({"checkpoint": "c", "steps": 1}))
    assert set(result) == set(ray_keys) and result["steps"] == 1 and result["world"] == 1
    assert result["engine"] == "ddp" and result["resumed_from"] is None
    assert captured.err.strip().splitlines()[-1].startswith(f"run folder {tmp_path / 'run'}: summary.json")
