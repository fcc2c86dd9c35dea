"""The validation carve-out (`shards build --holdout N --holdout-out VAL`, issue 10): stratified by class, seeded,
disjoint from every training set built beside it, and never a silently smaller training set.

Each test says how it fails on the code before the fix (a uniform random holdout of N source images): there a small
holdout could miss a rare class (the build then died with "rare class ... has no images in this source; check the
split file"), and a large one took rare images the training set then silently went without.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from data import storage
from data.build import BuildSpec, build_set
from data.shards import iter_tar, read_manifest
from data.sources import ImageFolderSource
from cluster.cli import main

RARE = ["ant", "bee", "cat"]
RARE_IMAGES = 6
BACKGROUND = {f"bg{i}": 75 for i in range(4)}  # 300 background images, 318 in all
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """root/<class>/<i>.png: three rare classes of 6 tiny PNGs each in 300 background ones (94% background)."""
    root = tmp_path_factory.mktemp("tiny")
    for label, count in {**{c: RARE_IMAGES for c in RARE}, **BACKGROUND}.items():
        (root / label).mkdir()
        for i in range(count):
            Image.new("L", (4, 4), (7 * i) % 256).save(root / label / f"{i}.png")
    return root


def _keys(location: str) -> set[str]:
    manifest = read_manifest(location)
    keys: set[str] = set()
    for url in manifest.shard_urls():
        with storage.open_read(url) as f:
            keys.update(key for key, _ in iter_tar(f))
    return keys


def _build(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(["shards", "build", "--workers", "0", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


def _tiny_build(tiny: Path, out: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    return _build(["--source", f"folder:{tiny}", "--rare", ",".join(RARE), "--out", str(out / "train"),
                   "--holdout-out", str(out / "val"), *extra], capsys)


def test_a_small_holdout_holds_every_rare_class(tiny, tmp_path, capsys):
    """Holdout 30 of 318 images: a uniform draw expects 0.57 of each 6-image class. The old build held out
    [25 background, 1, 2, 2] at seed 0 and died at seeds 1 and 2 ("rare class 'bee' / 'ant' has no images in
    this source; check the split file"). Now each class gives its share, at least 1, the background the rest."""
    for seed in range(3):
        out = tmp_path / f"s{seed}"
        code, err = _tiny_build(tiny, out, capsys, "--positives-per-class", "2", "--holdout", "30", "--seed",
                                str(seed))
        assert code == 0, err
        assert read_manifest(str(out / "val")).counts == [27, 1, 1, 1]
        assert read_manifest(str(out / "train")).counts[1:] == [2, 2, 2]


@pytest.mark.skipif(not FMNIST.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_fmnist_holdout_of_50_keeps_dress_sandal_and_shirt(tmp_path, capsys):
    """The issue's command, at the seed (13) where the old uniform holdout of 50 drew no Sandal: the build ended
    in "rare class '5' has no images in this source". Now the shares are 5 per rare class (a tenth of 50, as
    every Fashion-MNIST class is a tenth of the source) and 35 background."""
    code, err = _build(["--source", "fmnist:train", "--rare", "3,5,6", "--positives-per-class", "5",
                        "--max-background", "100", "--holdout", "50", "--holdout-out", str(tmp_path / "val"),
                        "--seed", "13", "--out", str(tmp_path / "train")], capsys)
    assert code == 0, err
    assert read_manifest(str(tmp_path / "val")).counts == [35, 5, 5, 5]
    assert read_manifest(str(tmp_path / "train")).counts == [100, 5, 5, 5]
    assert not _keys(str(tmp_path / "val")) & _keys(str(tmp_path / "train"))


def test_train_and_holdout_are_disjoint_within_the_source_for_every_training_cap(tiny, tmp_path):
    """One validation set beside two training sets of different caps (the demo's layout): no key in two sets,
    every key from the source. The carve-out depends on (holdout, seed) only, so no cap can move it. The old
    parts were disjoint too, but not stratified: its validation set was [25, 1, 2, 2], so this fails there."""
    source = ImageFolderSource(tiny)
    source_keys = {item.key for item in source.items()}
    spec = dict(source=f"folder:{tiny}", rare=tuple(RARE), holdout=30, seed=0)
    val = build_set(source, BuildSpec(**spec, part="holdout"), str(tmp_path / "val"), progress=False)
    val_keys = _keys(val.root)
    assert val.counts == [27, 1, 1, 1] and len(val_keys) == 30
    for positives in (2, 5):
        train = build_set(source, BuildSpec(**spec, part="rest", positives_per_class=positives),
                          str(tmp_path / f"train{positives}"), progress=False)
        train_keys = _keys(train.root)
        assert train.counts == [300 - 27, positives, positives, positives]
        assert not train_keys & val_keys and train_keys | val_keys <= source_keys
    everything = build_set(source, BuildSpec(**spec, part="rest"), str(tmp_path / "rest"), progress=False)
    assert _keys(everything.root) | val_keys == source_keys  # uncapped, the two parts are the whole source


def test_a_large_holdout_never_shrinks_the_training_positives(tiny, tmp_path, capsys):
    """Holdout 159 (half the source): each 6-image class gives 3, so 3 positives per class train. The old code
    drew about 3 of each at random and built a training set with fewer than asked without a word: 'cat' got 1
    with --positives-per-class 3, and 'ant' 3, 'cat' 1 with --positives-per-class 4 (exit status 0)."""
    code, err = _tiny_build(tiny, tmp_path / "fits", capsys, "--positives-per-class", "3", "--holdout", "159")
    assert code == 0, err
    assert read_manifest(str(tmp_path / "fits" / "train")).counts == [150, 3, 3, 3]
    assert read_manifest(str(tmp_path / "fits" / "val")).counts == [150, 3, 3, 3]
    # asking for 4 to train on: one line naming the class, what the holdout took and the two ways out
    code, err = _tiny_build(tiny, tmp_path / "short", capsys, "--positives-per-class", "4", "--holdout", "159")
    assert code == 2 and len(err) == 1, err
    assert ("rare class 'ant' has 6 images and the holdout takes 3 (its share of --holdout 159), leaving 3 to "
            "train on, fewer than --positives-per-class 4: use --holdout-positives-per-class 2 or "
            "--positives-per-class 3") in err[0]
    assert not (tmp_path / "short" / "train").exists()
    # the first fix it names works, and takes exactly what it says
    code, err = _tiny_build(tiny, tmp_path / "fixed", capsys, "--positives-per-class", "4", "--holdout", "159",
                            "--holdout-positives-per-class", "2")
    assert code == 0, err
    assert read_manifest(str(tmp_path / "fixed" / "train")).counts[1:] == [4, 4, 4]
    assert read_manifest(str(tmp_path / "fixed" / "val")).counts == [153, 2, 2, 2]


def test_a_background_fraction_beside_a_holdout_says_how_many_positives_it_got(tiny, tmp_path, caplog):
    """90% background over the 273 background images left asks for 10 positives per class; 5 are left. The old
    code built the set without a word (and its random holdout left 5, 4 and 4)."""
    spec = BuildSpec(f"folder:{tiny}", tuple(RARE), background_fraction=0.9, holdout=30, part="rest")
    with caplog.at_level(logging.WARNING, logger="bgsplit.data"):
        m = build_set(ImageFolderSource(tiny), spec, str(tmp_path / "t"), progress=False)
    assert m.counts == [273, 5, 5, 5]
    warned = [r.getMessage() for r in caplog.records]
    assert [w for w in warned if w.startswith("rare class 'ant': 5 training positives, fewer than the 10 asked")]


def test_the_carve_out_is_a_function_of_the_seed(tiny, tmp_path):
    """Same seed, same validation keys; another seed, other keys, the same per-class counts. The old code held
    out [35, 1, 2, 2] at seed 0 and died at seed 1 ("rare class 'bee' has no images in this source")."""
    source = ImageFolderSource(tiny)

    def held(seed: int, name: str) -> tuple[set[str], list[int]]:
        spec = BuildSpec(f"folder:{tiny}", tuple(RARE), holdout=40, seed=seed, part="holdout")
        m = build_set(source, spec, str(tmp_path / name), progress=False)
        return _keys(m.root), m.counts

    first, again, other = held(0, "a"), held(0, "b"), held(1, "c")
    assert first == again
    assert first[1] == other[1] == [37, 1, 1, 1] and first[0] != other[0]


@pytest.mark.parametrize(("extra", "message"), [
    (["--holdout", "318"], "--holdout 318 does not fit a source of 318 images: use 1 to 317"),
    (["--holdout", "2"], "--holdout 2 cannot hold 1 image(s) of each of the 3 rare classes: use --holdout 3 or "
                         "more"),
    (["--holdout", "30", "--holdout-positives-per-class", "6"],
     "rare class 'ant' has 6 image(s): too few to hold out 6 and train on the rest; use "
     "--holdout-positives-per-class 5 or less"),
    (["--holdout", "30", "--positives-per-class", "6"],
     "rare class 'ant' has 6 images and the holdout takes 1 (its share of --holdout 30), leaving 5 to train on, "
     "fewer than --positives-per-class 6: use --positives-per-class 5"),
    (["--holdout", "315"], "--holdout 315 would take all 300 background images: use --holdout 314 or less"),
])
def test_bad_holdouts_are_one_line_errors_naming_the_fix(tiny, tmp_path, capsys, extra, message):
    """The old code: 318 said "holdout of 318 does not fit a source of 318 items" (no fix); 2 built the training
    set, then died on "rare class 'ant' has no images in this source; check the split file", as 315 did at once;
    --positives-per-class 6 built a training set of 5, 4 and 4 without a word; the last option did not exist."""
    code, err = _tiny_build(tiny, tmp_path, capsys, *extra)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "train").exists()


def test_holdout_positives_per_class_needs_a_holdout(tiny, tmp_path, capsys):
    """(The option is new: the old parser refused it.)"""
    code, err = _build(["--source", f"folder:{tiny}", "--rare", "ant", "--out", str(tmp_path / "t"),
                        "--holdout-positives-per-class", "2"], capsys)
    assert code == 2 and len(err) == 1 and "--holdout-positives-per-class needs --holdout" in err[0]


def test_holdout_shares_follow_the_source_mix_with_a_floor_of_one():
    """The rule itself, on iNat-like sizes (no old counterpart: it did not stratify)."""
    from data.bg_construction import holdout_shares

    # iNat 2017 train: 579,184 images; three rare classes of ~100; a 1,000-image holdout gives each its 0.17 -> 1
    assert holdout_shares([100, 120, 2000], 579_184 - 2220, 1000, ["a", "b", "c"]) == ([1, 1, 3], 995)
    # Fashion-MNIST: every class is a tenth of the source
    assert holdout_shares([6000] * 3, 42_000, 1000, ["3", "5", "6"]) == ([100, 100, 100], 700)
    # floors of 1 that overfill a tiny holdout: the largest share gives one back
    assert holdout_shares([50, 2, 2], 0, 3, ["a", "b", "c"]) == ([1, 1, 1], 0)
    # never all of a class, whatever the holdout
    assert holdout_shares([4, 300], 100, 380, ["a", "b"]) == ([3, 282], 95)
    assert holdout_shares([100, 120], 10_000, 500, ["a", "b"], per_class=7) == ([7, 7], 486)


def test_a_handful_of_positives_the_newcomers_flags(tiny, tmp_path, capsys, caplog):
    """Issue 36: 6 images a class with the README's --positives-per-class 10. The refusal names the class, its
    count and a value that works; that value builds, and warns (one line a class) that validation holds 1 image of
    each; the value the warning names for a steadier validation works too and holds what it says."""
    code, err = _tiny_build(tiny, tmp_path / "a", capsys, "--positives-per-class", "10", "--holdout", "30")
    assert code == 2 and len(err) == 1, err
    assert ("rare class 'ant' has 6 images and the holdout takes 1 (its share of --holdout 30), leaving 5 to train "
            "on, fewer than --positives-per-class 10: use --positives-per-class 5") in err[0]

    def warned() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if "validation image" in r.getMessage()]
        caplog.clear()
        return lines

    with caplog.at_level(logging.WARNING, logger="bgsplit.data"):
        code, err = _tiny_build(tiny, tmp_path / "b", capsys, "--positives-per-class", "5", "--holdout", "30")
        assert code == 0, err
        lines = warned()
        assert len(lines) == 3 and all("\n" not in w for w in lines)
        assert ("rare class 'ant' has 1 validation image(s) of its 6: validation AP, and every choice made on it, "
                "rests on it; adding images of the class is the way to more") in lines[0]
        code, err = _tiny_build(tiny, tmp_path / "c", capsys, "--positives-per-class", "3", "--holdout", "30")
        assert code == 0, err
        lines = warned()
        assert "--holdout-positives-per-class 3 holds 3 and leaves 3 to train on" in lines[0]
        code, err = _tiny_build(tiny, tmp_path / "d", capsys, "--positives-per-class", "3", "--holdout", "30",
                                "--holdout-positives-per-class", "3")
        assert code == 0, err
        assert read_manifest(str(tmp_path / "d" / "val")).counts[1:] == [3, 3, 3]
        assert read_manifest(str(tmp_path / "d" / "train")).counts[1:] == [3, 3, 3]
        assert "3 validation image(s) of its 6" in warned()[0]  # still fewer than 10: still said


def test_enough_validation_positives_warn_nothing():
    from data.bg_construction import few_validation_positives

    assert few_validation_positives("a", 10, 100, 5) is None
    assert "--holdout-positives-per-class 10 holds 10" in few_validation_positives("a", 2, 100, 5)
    assert "--holdout-positives-per-class 4 holds 4 and leaves" not in few_validation_positives("a", 2, 8, None)
    assert "--holdout-positives-per-class 4 holds 4" in few_validation_positives("a", 2, 8, None)  # half trains
