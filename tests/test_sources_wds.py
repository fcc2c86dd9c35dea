"""Tests for data/sources/wds.py: shards written by another tool (here webdataset's own TarWriter) must list
as the same samples webdataset itself sees, with unique safe keys and the right labels, and every ref must
range-read exactly the image bytes that tool stored, locally and on a real S3 server."""

from __future__ import annotations

import gzip
import io
import pickle
import re
import uuid
from pathlib import Path

import pytest
import webdataset
from PIL import Image

from data import storage
from data.sources import SourceItem, WebDatasetSource, make_key, open_source

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
PATTERN = "train-{000000..000002}.tar"


def image_bytes(fmt: str, value: int, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, (7 * value) % 256)).save(buffer, format=fmt)
    return buffer.getvalue()


# (key, image field, image size, cls, extra fields) per shard. Shard 1 has string classes and a key with a
# slash (webdataset keeps `sub/img_000102` as the key); shard 2 also carries a nested json and a txt name.
SHARDS = [
    [("img_000000", "jpg", (9, 7), 0, {}), ("img_000001", "jpg", (31, 12), 1, {}),
     ("img_000002", "jpg", (16, 40), 2, {}), ("img_000003", "jpg", (5, 5), 0, {})],
    [("img_000100", "png", (11, 3), "bird", {}), ("img_000101", "png", (64, 20), "cat", {}),
     ("sub/img_000102", "png", (8, 8), "bird", {})],
    [("img_000200", "jpg", (20, 20), 5, {"json": {"annotation": {"category": 5, "id": 1}}, "txt": "heron\n"}),
     ("img_000201", "jpg", (13, 29), 6, {"json": {"annotation": {"category": "egret", "id": 2}}, "txt": "egret"}),
     ("img_000202", "jpg", (40, 9), 5, {"json": {"annotation": {"category": 5, "id": 3}}, "txt": " heron"})],
]


def write_shard(path: Path, samples) -> dict[str, bytes]:
    """Write one shard the way another tool would; return key -> image bytes."""
    images = {}
    with webdataset.TarWriter(str(path)) as sink:
        for n, (key, field, size, cls, extra) in enumerate(samples):
            data = image_bytes("JPEG" if field == "jpg" else "PNG", 40 * n + len(key), size)
            images[key] = data
            sink.write({"__key__": key, field: data, "cls": cls, **extra})
    return images


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    images = {}
    for index, samples in enumerate(SHARDS):
        for key, data in write_shard(root / f"train-{index:06d}.tar", samples).items():
            images[f"train-{index:06d}/{key}"] = data
    return root, images


def expected_keys() -> list[str]:
    return [make_key(f"train-{i:06d}/{s[0]}") for i, samples in enumerate(SHARDS) for s in samples]


def check_source(src: WebDatasetSource, images: dict[str, bytes]) -> list[SourceItem]:
    items = src.items()
    assert [item.key for item in items] == expected_keys()  # pattern order, then tar order
    assert len({item.key for item in items}) == len(items) == 10
    assert all(KEY_RE.match(item.key) for item in items)
    assert [item.label for item in items] == [str(s[3]) for samples in SHARDS for s in samples]
    assert {item.split for item in items} == {""}
    by_key = {make_key(k): v for k, v in images.items()}
    for item in items:  # every image, from every shard, byte for byte
        assert src.read(item) == by_key[item.key]
    assert src.class_names() == {"0": "0", "1": "1", "2": "2", "5": "5", "6": "6", "bird": "bird", "cat": "cat"}
    return items


def test_local_brace_pattern_lists_and_reads_every_sample(local_shards):
    root, images = local_shards
    src = WebDatasetSource(str(root / PATTERN))
    items = check_source(src, images)
    assert src.name == f"wds:{root / PATTERN}"
    assert make_key("train-000001/sub/img_000102") in {item.key for item in items}
    # items travel to worker processes pickled, and a slotted frozen dataclass must survive that
    assert pickle.loads(pickle.dumps(items)) == items
    assert not hasattr(items[0], "__dict__")


def test_listing_sees_the_samples_webdataset_itself_reads(local_shards):
    """Our tarfile walk re-implements sample grouping; webdataset's reader is the reference."""
    root, _ = local_shards
    src = WebDatasetSource(str(root / PATTERN))
    theirs = [(f"{Path(s['__url__']).stem}/{s['__key__']}", s.get("jpg", s.get("png")))
              for s in webdataset.WebDataset(str(root / PATTERN), shardshuffle=False)]
    ours = [(item.key, src.read(item)) for item in src.items()]
    assert ours == [(make_key(key), data) for key, data in theirs]


def test_unlabelled_wds_pool_needs_no_label_member(tmp_path):
    images = write_shard(tmp_path / "pool-000000.tar", [("a", "jpg", (8, 8), 0, {}), ("b", "png", (8, 8), 1, {})])
    pattern = str(tmp_path / "pool-000000.tar")
    with pytest.raises(ValueError, match="no 'txt' field"):
        open_source(f"wds:{pattern}#label=txt").items()
    src = open_source(f"wds:{pattern}#label=txt#unlabelled")
    items = src.items()
    assert [item.label for item in items] == ["", ""] and src.name.endswith("#unlabelled")
    assert [src.read(item) for item in items] == [images["a"], images["b"]]


def test_spec_label_suffix_and_reopen_by_name(local_shards):
    root, images = local_shards
    one = str(root / "train-000002.tar")
    by_json = open_source(f"wds:{one}#label=json:annotation.category")
    assert [item.label for item in by_json.items()] == ["5", "egret", "5"]  # an int and a string alike
    by_txt = open_source(f"wds:{one}", label_field="txt")
    assert [item.label for item in by_txt.items()] == ["heron", "egret", "heron"]
    assert by_txt.name == f"wds:{one}#label=txt"
    # a worker reopens the source from its name alone and reads without listing first
    for src in (by_json, by_txt):
        worker = open_source(src.name)
        assert worker.label_field == src.label_field
        item = src.items()[1]
        assert worker.read(item) == images["train-000002/img_000201"]
    cls = open_source(f"wds:{root / PATTERN}#label=cls")
    assert cls.name == f"wds:{root / PATTERN}" and [i.key for i in cls.items()] == expected_keys()
    with pytest.raises(ValueError, match="give it once"):
        open_source(f"wds:{one}#label=txt", label_field="cls")


def test_s3_brace_pattern(s3, local_shards, monkeypatch):
    import s3fs

    root, images = local_shards
    prefix = f"s3://{s3.bucket}/{uuid.uuid4().hex[:8]}"
    for index in range(len(SHARDS)):
        name = f"train-{index:06d}.tar"
        storage.write_bytes(f"{prefix}/{name}", (root / name).read_bytes())
    src = open_source(f"wds:{prefix}/{PATTERN}")
    # listing streams each shard in big blocks: one GET per shard here, never one per member (10 samples)
    fetches = []
    real_fetch = s3fs.core.S3File._fetch_range
    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range",
                        lambda self, start, end: fetches.append(self.path) or real_fetch(self, start, end))
    src.items()
    assert sorted(fetches) == [f"{prefix[5:]}/train-{i:06d}.tar" for i in range(len(SHARDS))]
    monkeypatch.undo()
    items = check_source(src, images)
    assert all(item.ref.startswith(f"{prefix}/train-") for item in items)
    by_json = open_source(f"wds:{prefix}/train-000002.tar#label=json:annotation.category")
    assert [item.label for item in by_json.items()] == ["5", "egret", "5"]
    assert open_source(by_json.name).read(by_json.items()[2]) == images["train-000002/img_000202"]
    with pytest.raises(FileNotFoundError) as missing:
        WebDatasetSource(f"{prefix}/train-{{000000..000004}}.tar").items()
    assert f"{prefix}/train-000003.tar" in str(missing.value) and "2 of 5" in str(missing.value)


# ---------------------------------------------------------------- bad input


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_sample_without_the_label_field_names_shard_key_and_fields(tmp_path):
    write_shard(tmp_path / "a-000000.tar", SHARDS[0])
    samples = list(SHARDS[2])
    key, field, size, _, extra = samples[1]
    with webdataset.TarWriter(str(tmp_path / "a-000001.tar")) as sink:
        for n, (k, f, s, cls, ex) in enumerate(samples):
            sample = {"__key__": k, f: image_bytes("JPEG", n, s), **ex}
            if k != key:
                sample["cls"] = cls
            sink.write(sample)
    with pytest.raises(ValueError) as error:
        WebDatasetSource(str(tmp_path / "a-{000000..000001}.tar")).items()
    text = one_line(error)
    assert str(tmp_path / "a-000001.tar") in text and f"'{key}'" in text and "'cls'" in text
    assert "jpg, json, txt" in text


def test_json_without_the_key_lists_the_keys_it_has(local_shards):
    root, _ = local_shards
    with pytest.raises(ValueError) as error:
        open_source(f"wds:{root / 'train-000002.tar'}#label=json:annotation.species").items()
    text = one_line(error)
    assert "'img_000200'" in text and "annotation.species" in text and "category, id" in text
    with pytest.raises(ValueError) as error:  # shards without any json member
        open_source(f"wds:{root / PATTERN}#label=json:annotation.category").items()
    assert "train-000000.tar" in one_line(error) and "'img_000000'" in str(error.value)


def test_missing_shard_in_the_range(local_shards):
    root, _ = local_shards
    with pytest.raises(FileNotFoundError) as error:
        WebDatasetSource(str(root / "train-{000000..000003}.tar")).items()
    text = one_line(error)
    assert str(root / "train-000003.tar") in text and "1 of 4" in text


@pytest.mark.parametrize("field", ["json:", "json:annotation.", "json:a..b", "json", "jpg", "", "a b", "x:y"])
def test_bad_label_field_is_refused_before_any_io(field):
    with pytest.raises(ValueError, match="label field"):
        WebDatasetSource("/does/not/exist-{0..9}.tar", label_field=field)
    if field:
        with pytest.raises(ValueError, match="label field"):
            open_source(f"wds:/does/not/exist.tar#label={field}")


def test_empty_pattern_is_refused():
    with pytest.raises(ValueError, match="expands to no shards"):
        WebDatasetSource("")
    with pytest.raises(ValueError, match="bad source spec"):
        open_source("wds:")


def test_sample_without_an_image(tmp_path):
    with webdataset.TarWriter(str(tmp_path / "b.tar")) as sink:
        sink.write({"__key__": "img_000000", "jpg": image_bytes("JPEG", 1, (4, 4)), "cls": 1})
        sink.write({"__key__": "img_000001", "txt": "no picture", "cls": 2})
    with pytest.raises(ValueError) as error:
        WebDatasetSource(str(tmp_path / "b.tar")).items()
    text = one_line(error)
    assert "'img_000001'" in text and "b.tar" in text and "no image" in text


def test_same_shard_stem_in_two_folders_is_a_duplicate_key(local_shards, tmp_path):
    root, _ = local_shards
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train-000000.tar").write_bytes((root / "train-000000.tar").read_bytes())
    with pytest.raises(ValueError, match="duplicate key"):
        WebDatasetSource(str(tmp_path / "{x,y}" / "train-000000.tar")).items()


def test_compressed_shard_is_refused(local_shards, tmp_path):
    """Offsets inside a gzip stream cannot be range-read, so this must fail at listing, not at build."""
    root, _ = local_shards
    path = tmp_path / "c.tar.gz"
    path.write_bytes(gzip.compress((root / "train-000000.tar").read_bytes()))
    with pytest.raises(ValueError, match="gz-compressed"):
        WebDatasetSource(str(path)).items()


def test_shards_build_from_wds_with_a_json_label_field(tmp_path):
    """`bgsplit shards build --source wds:... --label-field json:KEY` end to end: the rare class is found by the
    json label, every sample lands once in the set, and a missing field stops the build before anything is
    written."""
    import json

    from data.shards import iter_tar, read_manifest
    from cluster.cli import main

    raw = tmp_path / "raw"
    raw.mkdir()
    for s in range(2):
        with webdataset.TarWriter(str(raw / f"part-{s:06d}.tar")) as sink:
            for i in range(30):
                cat = "heron" if i % 10 == 0 else f"other{i % 3}"
                sink.write({"__key__": f"img_{s}_{i:03d}", "png": image_bytes("PNG", i, (8, 6)),
                            "json": {"meta": {"category": cat}}})
    out = tmp_path / "set"
    args = ["shards", "build", "--source", f"wds:{raw}/part-{{000000..000001}}.tar", "--rare", "heron",
            "--max-count", "16", "--workers", "0"]
    assert main([*args, "--label-field", "json:meta.category", "--out", str(out)]) == 0
    m = read_manifest(str(out))
    assert m.counts == [54, 6] and m.class_names == ["background", "heron"]
    keys = []
    for s in m.shards:
        with open(out / s.url, "rb") as f:
            keys += [json.loads(fields["json"])["orig"] for _, fields in iter_tar(f)]
    assert sorted(keys).count("heron") == 6 and len(keys) == 60
    assert main([*args, "--label-field", "json:meta.nope", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
