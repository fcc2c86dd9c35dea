"""`bgsplit shards build` at scale: parallel writers, shards sized by bytes, resume after a crash, pre-resize,
bad source images skipped and counted, and a folder on S3 built into shards on S3."""
import io
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import RARE
from data import storage
from data.build import BuildSpec, build_set
from data.ingest import samples_per_shard
from data.loader import ShardStream
from data.config import LoaderConfig
from data.shards import MANIFEST, iter_tar, read_manifest
from data.sources import FashionMNISTSource, ImageFolderSource, make_key
from data.transforms import MAX_PIXELS, BadImage, decode_rgb
from cluster.cli import main

REPO = Path(__file__).resolve().parents[1]


def _photo(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    """A smooth gradient with a little noise: compresses like a photo, not like a flat fill."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    pixels = (base + rng.integers(0, 12, (height, width, 3))).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


def _bomb() -> bytes:
    """9000 x 9000 = 81 M pixels, over MAX_PIXELS, in a few hundred KB of PNG."""
    out = io.BytesIO()
    Image.new("L", (9000, 9000), 200).save(out, format="PNG", compress_level=1)
    return out.getvalue()


BAD = {"bg/bomb.png", "bg/truncated.jpg", "bg/garbage.png"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """root/<class>/<file>: two big photos, small ones, and three a loader could never decode."""
    root = tmp_path_factory.mktemp("photos")
    files = {"cat/wide.jpg": _photo(1200, 900, 1), "cat/small.png": _photo(200, 100, 2, "PNG"),
             "bg/tall.jpg": _photo(900, 1200, 3), "bg/small.jpg": _photo(300, 240, 4),
             **{f"cat/c{i}.jpg": _photo(160, 120, 10 + i) for i in range(3)},
             **{f"bg/b{i}.png": _photo(64, 48, 20 + i, "PNG") for i in range(8)},
             "bg/bomb.png": _bomb(), "bg/truncated.jpg": _photo(640, 480, 5)[:6000],
             "bg/garbage.png": b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _folder_spec(root, **kw) -> BuildSpec:
    return BuildSpec(f"folder:{root}", ("cat",), max_count=5, **kw)


def _stored(manifest) -> dict[str, dict[str, bytes]]:
    samples = {}
    for url in manifest.shard_urls():
        with storage.open_read(url) as f:
            samples.update(iter_tar(f))
    return samples


def _mtimes(folder: Path, suffix: str = ".tar") -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name.endswith(suffix)}


def test_parallel_build_matches_in_process_and_sizes_shards_by_bytes(tmp_path):
    spec = BuildSpec("fmnist:test", RARE, subsample=1200, seed=0, max_count=10_000, max_bytes=150_000)
    src = FashionMNISTSource("test")
    one = build_set(src, spec, str(tmp_path / "one"), progress=False)
    two = build_set(src, spec, str(tmp_path / "two"), progress=False, workers=2)
    assert one.count == two.count == 1200 and one.counts == two.counts
    assert [(s.url, s.kind, s.count, s.bytes) for s in one.shards] == [(s.url, s.kind, s.count, s.bytes)
                                                                       for s in two.shards]
    for url_one, url_two in zip(one.shard_urls(), two.shard_urls()):
        assert Path(url_one).read_bytes() == Path(url_two).read_bytes()  # same plan, same bytes, any process
    per_shard = one.meta["samples_per_shard"]
    assert 10 < per_shard < 10_000 and len(one.shards) > 8  # the byte budget, not max_count, sized the shards
    full = [s for s in one.shards if s.count == per_shard]
    assert full and all(0.8 * 150_000 < s.bytes < 1.2 * 150_000 for s in full)
    assert {s.kind for s in one.shards} == {"positive", "background"}
    assert samples_per_shard(3000.0, max_count=100, max_bytes=1 << 30) == 100
    assert samples_per_shard(3000.0, max_count=100, max_bytes=1000) == 1


def test_killed_build_leaves_no_partial_shard_and_resumes_only_the_missing_ones(tmp_path):
    """A build SIGKILLed mid-shard: no manifest, the shard in progress invisible; the re-run (in two worker
    processes) keeps every finished shard untouched and ends with the same set as an uninterrupted build."""
    spec = BuildSpec("fmnist:test", RARE, subsample=600, seed=0, max_count=60)
    out = tmp_path / "set"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from data.build import BuildSpec, build_set
from data.sources import FashionMNISTSource
reads = [0]
class Dying(FashionMNISTSource):
    def read(self, item):
        reads[0] += 1
        if reads[0] >= 330:  # after the probe (32 reads) and five shards of 60, inside the sixth
            os.kill(os.getpid(), signal.SIGKILL)
        return super().read(item)
build_set(Dying("test"), {spec!r}, {str(out)!r}, progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    names = set(os.listdir(out))
    assert MANIFEST not in names
    assert any(n.endswith(".partial") for n in names)  # the shard being written, under its temporary name only
    finished = {n[:-5] + ".tar" for n in names if n.endswith(".json")}
    assert finished and finished <= names
    kept = _mtimes(out)
    kept = {n: t for n, t in kept.items() if n in finished}
    resumed = build_set(FashionMNISTSource("test"), spec, str(out), progress=False, workers=2)
    after = _mtimes(out)
    assert {n: after[n] for n in kept} == kept  # finished shards were not rewritten
    assert len(after) == len(resumed.shards) > len(kept)
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]
    reference = build_set(FashionMNISTSource("test"), spec, str(tmp_path / "ref"), progress=False)
    assert [(s.url, s.count, s.bytes) for s in resumed.shards] == [(s.url, s.count, s.bytes)
                                                                  for s in reference.shards]
    assert _stored(resumed) == _stored(reference)


def test_a_shard_without_a_record_for_this_spec_is_rewritten(tmp_path):
    spec = BuildSpec("fmnist:test", RARE, subsample=300, seed=1, max_count=50)
    out = tmp_path / "set"
    first = build_set(FashionMNISTSource("test"), spec, str(out), progress=False)
    before = _mtimes(out)
    (out / MANIFEST).unlink()
    (out / "shard-background-000001.json").unlink()  # a crash between the tar and its record
    record = out / "shard-background-000002.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "spec": "another spec"}))
    again = build_set(FashionMNISTSource("test"), spec, str(out), progress=False)
    after = _mtimes(out)
    assert {n for n in before if before[n] != after[n]} == {"shard-background-000001.tar",
                                                            "shard-background-000002.tar"}
    assert again.counts == first.counts
    # a smaller plan later removes the shards the earlier one wrote beyond it
    fewer = build_set(FashionMNISTSource("test"), BuildSpec("fmnist:test", RARE, subsample=300, seed=1,
                                                            max_count=150), str(out), progress=False)
    assert sorted(_mtimes(out)) == sorted(s.url for s in fewer.shards)


def test_resize_shrinks_big_images_and_keeps_small_ones_bytes_for_bytes(photos, tmp_path):
    out = tmp_path / "resized"

    def build(short_side: int, workers: int) -> dict[str, dict[str, bytes]]:
        assert main(["shards", "build", "--source", f"folder:{photos}", "--rare", "cat", "--out", str(out),
                     "--resize-short-side", str(short_side), "--jpeg-quality", "90", "--workers", str(workers),
                     "--max-count", "4"]) == 0
        return _stored(read_manifest(str(out)))

    def size(stored, rel: str) -> tuple[int, int]:
        return Image.open(io.BytesIO(stored[make_key(rel)]["jpg"])).size

    stored = build(320, workers=2)
    assert size(stored, "cat/wide.jpg") == (427, 320) and size(stored, "bg/tall.jpg") == (320, 427)
    for rel in ["cat/small.png", "bg/small.jpg", "cat/c0.jpg", "bg/b3.png"]:
        assert stored[make_key(rel)][rel.rsplit(".", 1)[1]] == (photos / rel).read_bytes()
    assert read_manifest(str(out)).meta["build"]["resize_short_side"] == 320
    # other resize settings are another set: rebuilt, not mistaken for up to date
    stored = build(200, workers=0)
    assert size(stored, "cat/wide.jpg") == (267, 200) and size(stored, "bg/small.jpg") == (250, 200)


def test_a_decompression_bomb_is_refused_by_decode_rgb(photos):
    data = (photos / "bg/bomb.png").read_bytes()
    with pytest.warns(Image.DecompressionBombWarning):
        assert Image.open(io.BytesIO(data)).size == (9000, 9000)
    assert len(data) < 1 << 20 and 9000 ** 2 > MAX_PIXELS
    with pytest.raises(BadImage, match="exceeds"):
        decode_rgb(data)
    with pytest.raises(BadImage):
        decode_rgb((photos / "bg/truncated.jpg").read_bytes())


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_source_images_are_skipped_counted_and_named(photos, tmp_path, caplog, workers):
    with caplog.at_level(logging.WARNING, logger="bgsplit.data"):
        m = build_set(ImageFolderSource(photos), _folder_spec(photos), str(tmp_path / "s"), progress=False,
                      workers=workers)
    bad_keys = {make_key(rel) for rel in BAD}
    assert m.meta["skipped"]["bad_images"] == 3 and set(m.meta["skipped"]["keys"]) == bad_keys
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(key in warned for key in bad_keys) and "exceeds" in warned
    records = [json.loads((tmp_path / "s" / (s.url[:-4] + ".json")).read_text()) for s in m.shards]
    assert sum(len(r["skipped"]) for r in records) == 3  # counted in the shard each came from
    assert m.counts == [10, 5] and set(_stored(m)) == {make_key(p.relative_to(photos).as_posix())
                                                        for p in photos.rglob("*.*")} - bad_keys
    batches = list(ShardStream(m, LoaderConfig(image_size=32, batch_size=8), train=False))
    assert sum(len(b["key"]) for b in batches) == 15 and sum(int(b["skipped"].sum()) for b in batches) == 0


def test_folder_on_s3_to_shards_on_s3_in_parallel(s3, photos, tmp_path):
    prefix = f"s3://{s3.bucket}/{uuid.uuid4().hex[:8]}"
    for path in photos.rglob("*.*"):
        storage.write_bytes(f"{prefix}/src/{path.relative_to(photos).as_posix()}", path.read_bytes())
    spec = _folder_spec(f"{prefix}/src", resize_short_side=320)
    remote = build_set(ImageFolderSource(f"{prefix}/src"), spec, f"{prefix}/set", progress=False, workers=2)
    again = read_manifest(f"{prefix}/set")
    assert again.counts == remote.counts == [10, 5] and again.meta["skipped"]["bad_images"] == 3
    assert all(u.startswith("s3://") for u in again.shard_urls())
    local = build_set(ImageFolderSource(photos), _folder_spec(photos, resize_short_side=320), str(tmp_path / "local"),
                      progress=False)
    assert _stored(again) == _stored(local)  # the same samples, byte for byte, whichever storage
    listing = storage.listdir(f"{prefix}/set")
    assert build_set(ImageFolderSource(f"{prefix}/src"), spec, f"{prefix}/set", progress=False,
                     workers=2).meta["build_seconds"] == remote.meta["build_seconds"]  # up to date: a no-op
    assert storage.listdir(f"{prefix}/set") == listing
    batches = list(ShardStream(again, LoaderConfig(image_size=32, batch_size=8), train=False))
    assert sum(len(b["key"]) for b in batches) == 15
