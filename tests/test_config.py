import pytest

from trainer.config import ConfigError, load_config


def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert cfg.loss.aux_weight == 0.1 and cfg.loss.aux == "hard"
    assert cfg.optim.lr == 0.01 and cfg.optim.milestones == [21.0, 41.0, 61.0, 81.0] and cfg.optim.epochs == 90


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: {aux_weight: 0.5}\noptim: {epochs: 3}\n")
    cfg = load_config(path, ["optim.epochs=7", "model.fixed_background_logit=0", "optim.milestones=[1, 2]"])
    assert cfg.loss.aux_weight == 0.5 and cfg.optim.epochs == 7.0
    assert cfg.model.fixed_background_logit == 0.0  # 0 is a valid constant, not "unset"
    assert cfg.optim.milestones == [1.0, 2.0]


@pytest.mark.parametrize("override, fragment", [
    (["loss.aux_wieght=0.1"], "unknown config key 'loss.aux_wieght'"),
    (["nosuch.key=1"], "unknown config key 'nosuch'"),
    (["optim.epochs=ten"], "config key 'optim.epochs' must be float"),
    (["run.seed=1.5"], "config key 'run.seed' must be int"),
    (["loss.main=ldam"], "config key 'loss.main' is 'ldam'; choose one of"),
    (["optim.lr"], "not of the form"),
    (["loss=3"], "'loss' is a section"),
    (["engine.zero_stage=5"], "config key 'engine.zero_stage' is 5; choose one of 0, 1, 2, 3"),  # was a TypeError
])
def test_bad_keys_and_types_are_one_line_errors(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {trian: x}\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.trian'"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    from cluster.experiment_spec import load_spec

    configs = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"debug.yaml", "fmnist_bg.yaml", "inat_bg_100.yaml", "inat_bg_1.yaml",
                                         "experiment_fmnist.yaml"}
    for p in configs:  # experiment specs (settings x methods x seeds) have their own schema
        load_spec(str(p)) if p.name.startswith("experiment_") else load_config(p)
    configs = [p for p in configs if not p.name.startswith("experiment_")]
    inat = load_config(configs[[p.name for p in configs].index("inat_bg_100.yaml")])
    assert inat.model.trunk == "resnet50" and inat.teacher.weights == "IMAGENET1K_V1"
    assert inat.data.batch_size == 256 and inat.optim.epochs == 90


def test_scientific_notation_without_a_dot_is_a_float():
    from trainer.config import load_config

    assert load_config(None, ["optim.lr=3e-4"]).optim.lr == 3e-4
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=fast"])


def test_a_shipped_config_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    from cluster.experiment_spec import load_spec
    from trainer.config import ConfigError, config_file, load_config

    monkeypatch.chdir(tmp_path)
    assert load_config("configs/own_data.yaml").data.sampling == "balanced"
    assert load_spec("configs/experiment_own_data.yaml").data.sets["val"] == str(tmp_path / "data" / "val")  # cwd
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "own_data.yaml").write_text("optim: {epochs: 3}\n")
    assert load_config("configs/own_data.yaml").optim.epochs == 3  # the user's own file comes first
    with pytest.raises(ConfigError, match="does not exist") as info:
        config_file("configs/nope.yaml")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["debug.yaml", "fmnist_bg.yaml"])
def test_the_demo_configs_point_at_sets_the_demo_builds(name):
    """`bgsplit train --config configs/debug.yaml --debug` after `./run.sh demo`: its sets are the demo's."""
    from cluster.experiment_spec import load_spec
    from cluster.experiment_data import slug

    cfg = load_config(f"configs/{name}")
    demo = load_spec("configs/experiment_demo.yaml")
    built = {f"artifacts/demo/data/train-{slug(s)}" for s in demo.data.settings} | {"artifacts/demo/data/val"}
    assert cfg.data.train in built and cfg.data.val in built, (cfg.data.train, built)
