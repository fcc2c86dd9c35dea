"""Tests for data/sources.py: every source must list stable, webdataset-safe
items and return the exact stored bytes, because shards are built from them."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.sources import (
    FASHION_MNIST_CLASSES,
    FashionMNISTSource,
    ImageFolderSource,
    INatSource,
    ManifestSource,
    Source,
    SourceItem,
    make_key,
    open_source,
    read_split_file,
    resolve_rare_classes,
)

REPO = Path(__file__).resolve().parents[1]
SPLITS = REPO / "data" / "splits"
FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
N1_IDS = ["2484", "5019", "3153", "4941", "776", "4813", "4297", "2704", "764", "1529"]

needs_fmnist = pytest.mark.skipif(
    not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist not installed",
)


def write_png(path: Path, value: int, size: tuple[int, int] = (5, 4)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 7)).save(path, format="PNG")
    return path.read_bytes()


def write_jpeg(path: Path, value: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (value, value, value)).save(path, format="JPEG")
    return path.read_bytes()


def assert_keys_ok(items: list[SourceItem]) -> None:
    keys = [item.key for item in items]
    assert len(set(keys)) == len(keys)
    assert all(KEY_RE.match(key) for key in keys), keys


# --------------------------------------------------------------------------
# Fashion-MNIST (real Debian package)


@pytest.fixture(scope="module")
def fmnist_train() -> FashionMNISTSource:
    return FashionMNISTSource("train", root=FMNIST_ROOT)


@pytest.fixture(scope="module")
def fmnist_test() -> FashionMNISTSource:
    return FashionMNISTSource("test", root=FMNIST_ROOT)


@needs_fmnist
def test_fmnist_counts_and_balanced_histogram(fmnist_train, fmnist_test):
    train_items, test_items = fmnist_train.items(), fmnist_test.items()
    assert len(train_items) == 60000
    assert len(test_items) == 10000
    for items, per_class in ((train_items, 6000), (test_items, 1000)):
        labels, counts = np.unique([item.label for item in items], return_counts=True)
        assert labels.tolist() == [str(i) for i in range(10)]
        assert counts.tolist() == [per_class] * 10


@needs_fmnist
def test_fmnist_keys_unique_safe_and_split(fmnist_train, fmnist_test):
    train_items, test_items = fmnist_train.items(), fmnist_test.items()
    assert_keys_ok([*train_items, *test_items])
    assert {item.split for item in train_items} == {"train"}
    assert {item.split for item in test_items} == {"test"}
    assert train_items[123].ref == "train:123"
    assert fmnist_train.name == "fmnist:train"


@needs_fmnist
def test_fmnist_read_is_inverted_grey_png(fmnist_train):
    with gzip.open(FMNIST_ROOT / "train-images-idx3-ubyte.gz", "rb") as handle:
        header = handle.read(16)
        raw_first = np.frombuffer(handle.read(28 * 28), dtype=np.uint8).reshape(28, 28)
    assert struct.unpack(">IIII", header) == (2051, 60000, 28, 28)
    with gzip.open(FMNIST_ROOT / "train-labels-idx1-ubyte.gz", "rb") as handle:
        first_label = handle.read(9)[8]

    item = fmnist_train.items()[0]
    data = fmnist_train.read(item)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    assert image.mode == "L" and image.size == (28, 28)
    assert item.label == str(first_label)
    assert raw_first.std() > 0  # a blank image would make the inversion check vacuous
    np.testing.assert_array_equal(np.asarray(image), 255 - raw_first)


@needs_fmnist
def test_fmnist_invert_false_keeps_raw_pixels(fmnist_test):
    plain = FashionMNISTSource("test", root=FMNIST_ROOT, invert=False)
    item = plain.items()[7]
    raw = np.asarray(Image.open(io.BytesIO(plain.read(item))))
    inverted = np.asarray(Image.open(io.BytesIO(fmnist_test.read(item))))
    np.testing.assert_array_equal(raw.astype(int) + inverted, 255)


@needs_fmnist
def test_fmnist_class_names_and_foreign_ref(fmnist_train):
    names = fmnist_train.class_names()
    assert names["0"] == "T-shirt/top" and names["9"] == "Ankle boot"
    assert list(names.values()) == list(FASHION_MNIST_CLASSES)
    foreign = SourceItem(key="x", label="0", split="test", ref="test:0")
    with pytest.raises(ValueError, match="does not belong"):
        fmnist_train.read(foreign)


def test_fmnist_missing_files_says_how_to_install(tmp_path):
    source = FashionMNISTSource("train", root=tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        source.items()
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "download=True" in message
    assert "\n" not in message


def test_fmnist_bad_split():
    with pytest.raises(ValueError, match="'valid'"):
        FashionMNISTSource("valid")


def _write_idx(folder: Path, images_magic: int = 2051, labels_magic: int = 2049) -> None:
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">IIII", images_magic, 2, 3, 3) + pixels.tobytes())
    )
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">II", labels_magic, 2) + bytes([4, 9]))
    )


def test_fmnist_small_synthetic_idx(tmp_path):
    _write_idx(tmp_path)
    source = FashionMNISTSource("test", root=tmp_path)
    assert [item.label for item in source.items()] == ["4", "9"]
    image = np.asarray(Image.open(io.BytesIO(source.read(source.items()[1]))))
    np.testing.assert_array_equal(image, 255 - np.arange(9, 18, dtype=np.uint8).reshape(3, 3))


@pytest.mark.parametrize(
    ("images_magic", "labels_magic", "bad_file"),
    [(2049, 2049, "t10k-images-idx3-ubyte.gz"), (2051, 2051, "t10k-labels-idx1-ubyte.gz")],
)
def test_fmnist_bad_magic_names_file(tmp_path, images_magic, labels_magic, bad_file):
    _write_idx(tmp_path, images_magic, labels_magic)
    with pytest.raises(ValueError, match="bad magic") as info:
        FashionMNISTSource("test", root=tmp_path).items()
    assert bad_file in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------
# image folder


def test_image_folder_round_trip(tmp_path):
    root = tmp_path / "folder"
    expected = {
        "cat/b.png": write_png(root / "cat" / "b.png", 10),
        "cat/a.JPG": write_jpeg(root / "cat" / "a.JPG", 20),
        "dog/sub dir/c.png": write_png(root / "dog" / "sub dir" / "c.png", 30),
    }
    (root / "dog" / "notes.txt").write_text("not an image")
    write_png(root / "stray.png", 40)  # no class folder: ignored

    source = ImageFolderSource(root, split="train")
    items = source.items()
    assert [item.label for item in items] == ["cat", "cat", "dog"]
    assert [Path(item.ref).relative_to(root).as_posix() for item in items] == sorted(expected)
    assert {item.split for item in items} == {"train"}
    assert_keys_ok(items)
    for item in items:
        assert source.read(item) == expected[Path(item.ref).relative_to(root).as_posix()]
    assert source.class_names() == {"cat": "cat", "dog": "dog"}
    assert [item.key for item in ImageFolderSource(root).items()] == [item.key for item in items]
    assert isinstance(source, Source)


def test_unlabelled_folder_is_a_pool_flat_or_nested_without_folder_names_in_keys(tmp_path):
    root = tmp_path / "pool"
    flat = write_png(root / "IMG_0001.png", 1)
    write_png(root / "Dress" / "IMG_0002.png", 2)
    write_png(root / "Shirt" / "IMG_0002.png", 3)  # the same file name in another folder stays another key
    with pytest.raises(ValueError, match="lie directly in the root") as info:  # labelled: flat files are no class
        ImageFolderSource(tmp_path / "only-flat" if write_png(tmp_path / "only-flat" / "a.png", 4) else root).items()
    assert "\n" not in str(info.value)
    source = open_source(f"folder:{root}#unlabelled")
    items = source.items()
    assert len(items) == 3 and {item.label for item in items} == {""}
    assert source.name == f"folder:{root}#unlabelled" and open_source(source.name).items() == items
    assert not [item.key for item in items if "Dress" in item.key or "Shirt" in item.key]
    assert_keys_ok(items)
    assert source.read(next(item for item in items if item.ref.endswith("IMG_0001.png"))) == flat


def test_unlabelled_manifest_needs_only_paths(tmp_path):
    _manifest_images(tmp_path)
    manifest = tmp_path / "pool.csv"
    manifest.write_text("path\nimg/one.png\nimg/two.jpg\n")
    with pytest.raises(ValueError, match="missing column 'label'"):
        open_source(f"manifest:{manifest}").items()
    items = open_source(f"manifest:{manifest}#unlabelled").items()
    assert [item.label for item in items] == ["", ""] and not [i.key for i in items if "img" in i.key]
    assert_keys_ok(items)


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope") as info:
        ImageFolderSource(tmp_path / "nope").items()
    assert "\n" not in str(info.value)


def test_image_folder_empty(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderSource(tmp_path).items()


def test_image_folder_via_fsspec_url(tmp_path):
    data = write_png(tmp_path / "a" / "x.png", 1)
    source = open_source(f"folder:file://{tmp_path}")
    (item,) = source.items()
    assert item.label == "a" and source.read(item) == data


# --------------------------------------------------------------------------
# manifests


def _manifest_images(tmp_path: Path) -> dict[str, bytes]:
    return {
        "img/one.png": write_png(tmp_path / "img" / "one.png", 1),
        "img/two.jpg": write_jpeg(tmp_path / "img" / "two.jpg", 2),
    }


def test_csv_manifest_round_trip(tmp_path):
    images = _manifest_images(tmp_path)
    manifest = tmp_path / "list.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerow(["img/one.png", "17", "train"])
        writer.writerow(["img/two.jpg", "3", "val"])
    source = ManifestSource(manifest)
    items = source.items()
    assert [(item.label, item.split) for item in items] == [("17", "train"), ("3", "val")]
    assert [source.read(item) for item in items] == list(images.values())
    assert_keys_ok(items)


def test_jsonl_manifest_round_trip_with_root(tmp_path):
    images = _manifest_images(tmp_path)
    manifest = tmp_path / "meta" / "list.jsonl"
    manifest.parent.mkdir()
    rows = [{"path": "img/one.png", "label": 5}, {"path": str(tmp_path / "img" / "two.jpg"), "label": "x"}]
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    source = ManifestSource(manifest, root=tmp_path)
    items = source.items()
    assert [(item.label, item.split) for item in items] == [("5", ""), ("x", "")]
    assert [source.read(item) for item in items] == list(images.values())
    assert_keys_ok(items)
    assert open_source(f"manifest:{manifest}", root=tmp_path).items() == items


def test_csv_manifest_missing_column(tmp_path):
    manifest = tmp_path / "bad.csv"
    manifest.write_text("path,class\nimg/one.png,1\n")
    with pytest.raises(ValueError, match="'label'") as info:
        ManifestSource(manifest).items()
    assert "bad.csv" in str(info.value) and "\n" not in str(info.value)


def test_jsonl_manifest_missing_column(tmp_path):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(json.dumps({"label": "1"}) + "\n")
    with pytest.raises(ValueError, match="'path'.*bad.jsonl"):
        ManifestSource(manifest).items()


def test_manifest_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        ManifestSource(tmp_path / "missing.csv").items()


def test_manifest_duplicate_path(tmp_path):
    manifest = tmp_path / "dup.csv"
    manifest.write_text("path,label\na.png,1\na.png,2\n")
    with pytest.raises(ValueError, match="duplicate key"):
        ManifestSource(manifest).items()


# --------------------------------------------------------------------------
# iNaturalist (synthetic COCO JSON)


@pytest.fixture()
def inat_files(tmp_path: Path) -> tuple[Path, Path, dict[int, bytes]]:
    image_root = tmp_path / "inat"
    pixels = {
        11: write_png(image_root / "train_val_images" / "Aves" / "A b" / "11.png", 11),
        12: write_png(image_root / "train_val_images" / "Aves" / "A b" / "12.png", 12),
        20: write_png(image_root / "train_val_images" / "Plantae" / "C d" / "20.png", 20),
    }
    data = {
        "images": [
            {"id": 11, "file_name": "train_val_images/Aves/A b/11.png", "width": 5, "height": 4},
            {"id": 12, "file_name": "train_val_images/Aves/A b/12.png", "width": 5, "height": 4},
            {"id": 20, "file_name": "train_val_images/Plantae/C d/20.png", "width": 5, "height": 4},
            {"id": 99, "file_name": "test_images/99.png", "width": 5, "height": 4},
        ],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 2484},
            {"id": 2, "image_id": 12, "category_id": 2484},
            {"id": 3, "image_id": 20, "category_id": 9},
        ],
        "categories": [
            {"id": 2484, "name": "A b", "supercategory": "Aves"},
            {"id": 9, "name": "C d", "supercategory": "Plantae"},
        ],
    }
    annotations = tmp_path / "val2017.json"
    annotations.write_text(json.dumps(data))
    return annotations, image_root, pixels


def test_inat_items_labels_keys_split(inat_files):
    annotations, image_root, pixels = inat_files
    source = INatSource(annotations, image_root, "val")
    items = source.items()
    assert [item.key for item in items] == ["inat-val-11", "inat-val-12", "inat-val-20"]
    assert [item.label for item in items] == ["2484", "2484", "9"]
    assert {item.split for item in items} == {"val"}
    assert [source.read(item) for item in items] == [pixels[11], pixels[12], pixels[20]]
    assert source.class_names() == {"2484": "A b", "9": "C d"}
    assert_keys_ok(items)


def test_inat_via_open_source(inat_files):
    annotations, image_root, _ = inat_files
    source = open_source(f"inat:{annotations}:{image_root}:val")
    assert isinstance(source, INatSource)
    assert source.split == "val" and len(source.items()) == 3


def test_inat_missing_key(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match="'annotations'.*bad.json"):
        INatSource(bad, tmp_path, "train").items()


# --------------------------------------------------------------------------
# split files


def test_shipped_n100_split_has_100_unique_ids():
    ids = read_split_file(SPLITS / "inat2017_n100.txt")
    assert len(ids) == 100 and len(set(ids)) == 100
    assert ids[:3] == ["1022", "115", "1506"] and ids[-1] == "9"
    assert all(i.isdigit() for i in ids)


@pytest.mark.parametrize("class_id", N1_IDS)
def test_shipped_n1_splits(class_id):
    path = SPLITS / f"inat2017_n1_{class_id}.txt"
    assert path.read_text().startswith("#")
    assert read_split_file(path) == [class_id]
    assert class_id in read_split_file(SPLITS / "inat2017_n100.txt")


def test_resolve_rare_classes_with_shipped_split():
    ids = read_split_file(SPLITS / "inat2017_n100.txt")
    labels = set(ids) | {str(i) for i in range(5089) if i % 7 == 0}
    assert resolve_rare_classes(ids, labels, "inat2017_n100.txt") == ids


def test_resolve_rare_classes_unknown_id():
    with pytest.raises(ValueError) as info:
        resolve_rare_classes(["9", "4242"], {"9", "10", "11"}, "my_split.txt")
    assert str(info.value) == (
        "unknown class id '4242' in my_split.txt: not among the 3 classes of the source (9, 10, 11); "
        "check the split file matches the dataset"
    )
    # --rare by name or id; a typo names the nearest class and lists the valid ones
    names = {"9": "moon", "10": "sun", "11": "star"}
    assert resolve_rare_classes(["Moon", "10"], {"9", "10", "11"}, "--rare", names) == ["9", "10"]
    with pytest.raises(ValueError, match=r"unknown class id 'mooon' in --rare: did you mean 'moon'\? not among the 3 "
                                         r"classes of the source \(9 \(moon\), 10 \(sun\), 11 \(star\)\); give ids"):
        resolve_rare_classes(["mooon"], {"9", "10", "11"}, "--rare", names)
    with pytest.raises(ValueError, match="duplicate class id 'moon'"):
        resolve_rare_classes(["9", "moon"], {"9", "10", "11"}, "--rare", names)


def test_resolve_rare_classes_against_inat_source(inat_files):
    annotations, image_root, _ = inat_files
    labels = {item.label for item in INatSource(annotations, image_root, "val").items()}
    assert resolve_rare_classes(["2484"], labels, "n1") == ["2484"]
    with pytest.raises(ValueError, match="'5019'"):
        resolve_rare_classes(read_split_file(SPLITS / "inat2017_n1_5019.txt"), labels, "n1")


def test_read_split_file_comments_and_whitespace(tmp_path):
    path = tmp_path / "split.txt"
    path.write_text("# header\n 3  1 # inline\n\n\t2\n")
    assert read_split_file(path) == ["3", "1", "2"]


@pytest.mark.parametrize(
    ("text", "error"),
    [("1\n2\n1\n", "duplicate class id '1'"), ("# only a comment\n\n", "no class ids"), ("", "no class ids")],
)
def test_read_split_file_errors(tmp_path, text, error):
    path = tmp_path / "split.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=error) as info:
        read_split_file(path)
    assert "split.txt" in str(info.value) and "\n" not in str(info.value)


def test_read_split_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        read_split_file(tmp_path / "absent.txt")


# --------------------------------------------------------------------------
# keys and factory


def test_make_key_is_safe_stable_and_injective_on_collisions():
    assert make_key("inat-val-11") == "inat-val-11"
    a, b = make_key("x/a.png"), make_key("x_a_png")
    assert a != b and KEY_RE.match(a)
    assert make_key("x/a.png") == a


def test_open_source_unknown_scheme_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        open_source("imagenet:/data")
    message = str(info.value)
    for scheme in ("fmnist:", "folder:", "manifest:", "inat:"):
        assert scheme in message
    assert "\n" not in message


@needs_fmnist
def test_open_source_fmnist_is_lazy():
    source = open_source("fmnist:test", root=FMNIST_ROOT)
    assert isinstance(source, FashionMNISTSource) and source.split == "test"
    assert source._images is None  # nothing decoded until items()/read()
