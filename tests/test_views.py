"""views.count: cached prefix views. Which image and view each rank trains on is a pure function (simulated
worlds); step 0 on a cached view gives the online path's loss on that very crop; a cache is reused, refused when
it was built for other settings, and a run on views resumes where it stopped."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from conftest import tiny_config
from data.loader import make_loader, set_samples
from data.shards import read_manifest
from data.transforms import sample_rng, train_transform
from trainer.config import ConfigError
from trainer.train import Trainer
from trainer.views import view_epoch

VIEWS = ["teacher.mode=online", "teacher.image_size=0", "loss.aux_weight=0.1", "model.frozen_stages=3",
         "views.count=2", "views.positive_count=3"]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_natural_epochs_cover_every_image_once_and_walk_through_the_views(world):
    labels = np.array([0] * 40 + [1] * 3 + [2] * 2)
    nviews = np.where(labels > 0, 5, 2)
    for epoch in (0, 1, 2):
        parts = [view_epoch(labels, nviews, seed=4, epoch=epoch, sampling="natural", positive_fraction=0.5,
                            batch_size=4, rank=r, world=world) for r in range(world)]
        assert len({len(i) for i, _ in parts}) == 1 and len(parts[0][0]) % 4 == 0  # equal steps on every rank
        images = np.concatenate([i for i, _ in parts])
        views = np.concatenate([v for _, v in parts])
        assert set(images.tolist()) == set(range(len(labels)))
        assert len(images) - len(labels) < world * 4  # padding by wrap only
        np.testing.assert_array_equal(views, epoch % nviews[images])
        again = view_epoch(labels, nviews, seed=4, epoch=epoch, sampling="natural", positive_fraction=0.5,
                           batch_size=4, rank=0, world=world)
        np.testing.assert_array_equal(again[0], parts[0][0])  # a pure function
    one = view_epoch(labels, nviews, seed=4, epoch=0, sampling="natural", positive_fraction=0.5, batch_size=4)[0]
    other = view_epoch(labels, nviews, seed=4, epoch=1, sampling="natural", positive_fraction=0.5, batch_size=4)[0]
    assert not np.array_equal(one, other)


def test_balanced_epochs_take_every_background_image_once_and_positives_in_equal_shares():
    labels = np.array([0] * 600 + [1] * 2 + [2] * 5)
    nviews = np.where(labels > 0, 16, 4)
    images, views = view_epoch(labels, nviews, seed=0, epoch=3, sampling="balanced", positive_fraction=0.25,
                               batch_size=8)
    background = images[labels[images] == 0]
    assert sorted(set(background.tolist())) == list(range(600)) and len(background) <= 600 + 8
    positives = images[labels[images] > 0]
    assert abs(len(positives) - 200) <= 8  # 600 x 0.25 / 0.75
    shares = np.bincount(labels[positives], minlength=3)[1:] / len(positives)
    assert np.all(np.abs(shares - 0.5) < 0.1)  # classes equal, whatever their sizes
    assert len(set(views[labels[images] > 0].tolist())) > 8  # re-drawn positives see many crops
    assert np.all(views[labels[images] == 0] == 3 % 4)


def _online_batch(cfg, keys, views):
    """The crops the cache says it stored, decoded again from the shards by the online transform."""
    data = {k: d for k, _, d, _ in set_samples(read_manifest(cfg.data.train))}
    return torch.stack([train_transform(data[k], cfg.data.image_size,
                                        sample_rng(cfg.views.seed, int(v), zlib.crc32(k.encode())),
                                        cfg.data.min_crop_scale) for k, v in zip(keys, views)])


def test_step0_on_a_cached_view_gives_the_online_loss_on_that_crop(tiny_sets, tmp_path):
    cfg = tiny_config(tiny_sets, tmp_path / "run", *VIEWS, "model.dropout=false")
    trainer = Trainer.build(cfg)
    assert type(trainer.stream).__name__ == "ViewStream"
    batch = next(iter(make_loader(trainer.stream, 0)))
    assert batch["prefix"].dtype == torch.float32 and batch["teacher_idx"].shape[1] == cfg.teacher.topk
    images, views = trainer.stream._epoch(0)
    assert [trainer.stream.views.keys[i] for i in images[:cfg.data.batch_size]] == batch["key"]
    trainer.student.train()
    cached = trainer.task(batch, 0.0)
    online_batch = {"image": _online_batch(cfg, batch["key"], views[:cfg.data.batch_size]), "label": batch["label"]}
    online = trainer.task(online_batch, 0.0)
    for k in ("main_loss", "aux_loss", "loss"):
        assert float(cached[k].detach()) == pytest.approx(float(online[k].detach()), rel=1e-2, abs=1e-4), k
    # the teacher's stored top-1 is the one it gives on the crop now
    assert (cached["teacher_top1"] == online["teacher_top1"]).float().mean() > 0.9
    # another view of the same images is another crop: the check above could fail
    other = {"image": _online_batch(cfg, batch["key"], views[:cfg.data.batch_size] + 1), "label": batch["label"]}
    another = float(trainer.task(other, 0.0)["aux_loss"].detach())
    assert another != pytest.approx(float(online["aux_loss"].detach()), rel=1e-3)


def test_a_cache_is_reused_and_one_built_for_other_settings_is_refused(tiny_sets, tmp_path):
    cfg = tiny_config(tiny_sets, tmp_path / "run", *VIEWS)
    folder = Trainer.build(cfg).stream.views.folder
    meta_time = (tmp_path / "run" / "views").stat().st_mtime_ns
    again = Trainer.build(tiny_config(tiny_sets, tmp_path / "run", *VIEWS, "run.seed=5"))
    assert again.stream.views.folder == folder  # another run seed: the same views
    assert not list((tmp_path / "run" / "views").glob("*.partial"))
    assert (tmp_path / "run" / "views").stat().st_mtime_ns == meta_time
    other = Trainer.build(tiny_config(tiny_sets, tmp_path / "run", *VIEWS, "views.seed=1")).stream.views.folder
    assert other != folder
    with pytest.raises(ValueError, match="model.frozen_stages=3, this run has 2") as err:
        Trainer.build(tiny_config(tiny_sets, tmp_path / "run", *VIEWS, "model.frozen_stages=2",
                                  f"views.cache_dir={folder}"))
    assert "\n" not in str(err.value) and "views.cache_dir" in str(err.value)
    for bad, word in ((["model.frozen_stages=0"], "model.frozen_stages"), (["teacher.mode=cached"], "teacher.mode"),
                      (["loss.aux=soft"], "loss.aux"), (["views.count=-1"], "views.count")):
        with pytest.raises(ConfigError, match=word):
            tiny_config(tiny_sets, tmp_path / "x", *VIEWS, *bad)


def test_a_run_on_views_resumes_at_the_same_step(tiny_sets, tmp_path):
    over = [*VIEWS, "run.max_steps=4", "run.checkpoint_every=4", "optim.epochs=1", "data.sampling=balanced"]
    uninterrupted = Trainer.build(tiny_config(tiny_sets, tmp_path / "a", *over))
    summary = uninterrupted.fit()
    assert summary["steps"] == 4
    from data.loader import LoaderState

    def next_loss(trainer):
        trainer.stream.start = LoaderState(**trainer.progress.loader.state_dict())
        return float(trainer.train_step([next(iter(make_loader(trainer.stream, 0)))])["loss"])

    want = next_loss(uninterrupted)
    resumed = Trainer.build(tiny_config(tiny_sets, tmp_path / "a", *over, "run.resume=auto"))
    assert resumed.maybe_resume() is not None and resumed.step == 4
    assert next_loss(resumed) == pytest.approx(want, rel=1e-5, abs=1e-6)
