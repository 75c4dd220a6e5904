"""Every source shape, in a folder and inside each archive format, imported end to end."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    ARCHIVE_FORMATS,
    BLUE,
    CLASS_COLOURS,
    GREEN,
    RED,
    make_archive,
    make_class_tree,
    save_image,
    write_cifar10,
    write_cifar100,
)
from imgclf.data import import_dataset, load_dataset
from imgclf.data.scan import scan_source
from imgclf.errors import DataError


def per_split_counts(ds) -> dict[str, dict[str, int]]:
    return {s: {c: n for c, n in counts.items() if n} for s, counts in ds.counts().items()}


def assert_colours_match_labels(ds) -> None:
    """Each image is its class colour: labels and pixels stayed together."""
    for img, label in zip(ds.images, ds.labels, strict=True):
        assert tuple(img[0, 0]) == CLASS_COLOURS[ds.classes[label]]


# ---------------------------------------------------------------- class tree


def test_class_tree_counts_classes_and_pixels(tmp_path):
    make_class_tree(tmp_path / "src", {"cat": 3, "dog": 4, "bird": 2})
    ds = import_dataset(tmp_path / "src", "pets", val_fraction=0)
    assert ds.classes == ["bird", "cat", "dog"]
    assert ds.meta["source_shape"] == "class-tree"
    assert ds.split_names == ["train"]
    assert per_split_counts(ds) == {"train": {"bird": 2, "cat": 3, "dog": 4}}
    assert ds.images.shape == (9, 8, 8, 3) and ds.images.dtype == np.uint8
    assert_colours_match_labels(ds)


def test_nested_subfolders_inside_a_class_count_for_that_class(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, {"cat": 2, "dog": 2})
    save_image(src / "cat" / "indoor" / "a.png", RED)
    save_image(src / "cat" / "indoor" / "deeper" / "b.png", RED)
    ds = import_dataset(src, "pets", val_fraction=0)
    assert ds.classes == ["cat", "dog"]
    assert per_split_counts(ds) == {"train": {"cat": 4, "dog": 2}}
    assert str(src / "cat" / "indoor" / "deeper" / "b.png") in ds.files()
    assert_colours_match_labels(ds)


def test_images_beside_class_folders_are_reported_not_guessed(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, {"cat": 2, "dog": 2})
    save_image(src / "loose.png")
    ds = import_dataset(src, "pets", val_fraction=0)
    assert len(ds.labels) == 4
    assert ds.skipped() == [{"path": str(src / "loose.png"), "reason": "not inside a class folder"}]


# ---------------------------------------------------------------- split tree


def test_split_tree_keeps_train_val_test(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src / "train", {"cat": 4, "dog": 3})
    make_class_tree(src / "val", {"cat": 2, "dog": 1})
    make_class_tree(src / "test", {"cat": 1, "dog": 2})
    ds = import_dataset(src, "pets", val_fraction=0.5)  # val exists: fraction is unused
    assert ds.meta["source_shape"] == "split-tree"
    assert ds.split_names == ["train", "val", "test"]
    assert per_split_counts(ds) == {
        "train": {"cat": 4, "dog": 3},
        "val": {"cat": 2, "dog": 1},
        "test": {"cat": 1, "dog": 2},
    }
    assert ds.meta["val_split"] == {"from": "source"}
    # The val split is exactly the files of the source's val folder.
    files = np.array(ds.files())
    val_files = sorted(files[ds.indices("val")])
    assert val_files == sorted(str(p) for p in (src / "val").rglob("*.png"))
    assert_colours_match_labels(ds)


@pytest.mark.parametrize("folder", ["valid", "validation", "Valid"])
def test_valid_folder_is_the_val_split(tmp_path, folder):
    src = tmp_path / "src"
    make_class_tree(src / "train", {"cat": 3, "dog": 3})
    make_class_tree(src / folder, {"cat": 1, "dog": 2})
    ds = import_dataset(src, "pets")
    assert ds.split_names == ["train", "val"]
    assert per_split_counts(ds)["val"] == {"cat": 1, "dog": 2}
    assert per_split_counts(ds)["train"] == {"cat": 3, "dog": 3}


def test_split_tree_without_val_gets_a_stratified_val_from_train(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src / "train", {"cat": 10, "dog": 20})
    make_class_tree(src / "test", {"cat": 2, "dog": 2})
    ds = import_dataset(src, "pets", val_fraction=0.1, seed=3)
    assert ds.split_names == ["train", "test", "val"]
    assert per_split_counts(ds) == {
        "train": {"cat": 9, "dog": 18},
        "test": {"cat": 2, "dog": 2},
        "val": {"cat": 1, "dog": 2},
    }
    assert ds.meta["val_split"] == {"from": "train", "fraction": 0.1, "seed": 3, "stratified": True}


def test_split_tree_class_only_in_one_split_is_still_a_class(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src / "train", {"cat": 2, "dog": 2})
    make_class_tree(src / "val", {"cat": 1, "dog": 1, "bird": 1})
    ds = import_dataset(src, "pets")
    assert ds.classes == ["bird", "cat", "dog"]
    assert per_split_counts(ds)["val"] == {"bird": 1, "cat": 1, "dog": 1}


def test_val_and_valid_together_is_an_error(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "val", "valid"):
        make_class_tree(src / split, {"cat": 1, "dog": 1})
    with pytest.raises(DataError, match="split 'val' given twice"):
        import_dataset(src, "pets")


# ---------------------------------------------------------------- flat folder + CSV


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def make_flat(src: Path, labels: dict[str, str]) -> None:
    """Kaggle's CIFAR-10 shape: ``1.png, 2.png …`` in one folder."""
    for stem, label in labels.items():
        save_image(src / f"{stem}.png", CLASS_COLOURS[label])


KAGGLE_LABELS = {"1": "cat", "2": "dog", "3": "cat", "4": "bird", "5": "dog", "10": "cat"}


def test_kaggle_csv_ids_are_file_stems(tmp_path):
    src = tmp_path / "src"
    make_flat(src, KAGGLE_LABELS)
    write_csv(src / "trainLabels.csv", ["id", "label"], list(KAGGLE_LABELS.items()))
    ds = import_dataset(src, "kaggle", val_fraction=0)
    assert ds.meta["source_shape"] == "csv"
    assert ds.classes == ["bird", "cat", "dog"]
    assert per_split_counts(ds) == {"train": {"bird": 1, "cat": 3, "dog": 2}}
    assert_colours_match_labels(ds)
    # The labels CSV is the labels, not a skipped file; nothing else is left over.
    assert ds.skipped() == []


def test_filename_label_csv(tmp_path):
    src = tmp_path / "src"
    make_flat(src, KAGGLE_LABELS)
    rows = [(f"{stem}.png", label) for stem, label in KAGGLE_LABELS.items()]
    write_csv(src / "labels.csv", ["filename", "label"], rows)
    save_image(src / "unlabelled.png")
    (src / "notes.txt").write_text("x")
    ds = import_dataset(src, "kaggle", val_fraction=0)
    assert per_split_counts(ds) == {"train": {"bird": 1, "cat": 3, "dog": 2}}
    assert_colours_match_labels(ds)
    assert sorted((r["path"], r["reason"]) for r in ds.skipped()) == [
        (str(src / "notes.txt"), "not an image file extension"),
        (str(src / "unlabelled.png"), "not listed in the labels CSV"),
    ]


def test_labels_option_names_a_csv_outside_the_folder(tmp_path):
    src = tmp_path / "train"
    make_flat(src, KAGGLE_LABELS)
    labels = write_csv(tmp_path / "trainLabels.csv", ["id", "label"], list(KAGGLE_LABELS.items()))
    ds = import_dataset(src, "kaggle", labels_csv=labels, val_fraction=0)
    assert per_split_counts(ds) == {"train": {"bird": 1, "cat": 3, "dog": 2}}
    assert_colours_match_labels(ds)


def test_labels_option_naming_a_csv_inside_the_folder_does_not_report_it(tmp_path):
    src = tmp_path / "train"
    make_flat(src, KAGGLE_LABELS)
    labels = write_csv(src / "trainLabels.csv", ["id", "label"], list(KAGGLE_LABELS.items()))
    ds = import_dataset(src, "kaggle", labels_csv=labels, val_fraction=0)
    assert len(ds.labels) == 6
    assert ds.skipped() == []


def test_flat_folder_without_csv_says_to_pass_labels(tmp_path):
    make_flat(tmp_path / "src", KAGGLE_LABELS)
    with pytest.raises(DataError, match=r"no labels CSV; pass --labels"):
        import_dataset(tmp_path / "src", "kaggle")


def test_csv_naming_missing_files(tmp_path):
    src = tmp_path / "src"
    make_flat(src, {"1": "cat", "2": "dog"})
    write_csv(src / "labels.csv", ["id", "label"], [("1", "cat"), ("2", "dog"), ("77", "dog")])
    with pytest.raises(DataError) as err:
        import_dataset(src, "kaggle")
    msg = str(err.value)
    assert msg.startswith(f"{src / 'labels.csv'}: 1 listed files not found")
    assert "77" in msg and "fix the CSV" in msg


def test_csv_lacking_columns(tmp_path):
    src = tmp_path / "src"
    make_flat(src, {"1": "cat", "2": "dog"})
    write_csv(src / "labels.csv", ["picture", "kind"], [("1", "cat"), ("2", "dog")])
    with pytest.raises(DataError, match=r"labels\.csv: CSV columns \['picture', 'kind'\] lack"):
        import_dataset(src, "kaggle")


# ---------------------------------------------------------------- CIFAR batches


def test_cifar10_batches(tmp_path):
    truth = write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=4)
    ds = import_dataset(tmp_path / "cifar-10-batches-py", "c10", val_fraction=0)
    assert ds.meta["source_shape"] == "cifar10"
    assert ds.classes == ["class0", "class1", "class2"]
    assert ds.split_names == ["train", "test"]
    assert ds.image_size == (32, 32)
    for split in ("train", "test"):
        idx = ds.indices(split)
        images, labels = truth[split]
        np.testing.assert_array_equal(ds.images[idx], images)
        np.testing.assert_array_equal(ds.labels[idx], labels)
    assert len(ds.indices("train")) == 20 and len(ds.indices("test")) == 4
    assert ds.files()[0].endswith("cifar-10-batches-py/data_batch_1#0")
    assert ds.skipped() == []  # batches.meta and readme.html belong to the batches


def test_stray_file_beside_cifar_batches_is_reported(tmp_path):
    write_cifar10(tmp_path / "c", per_batch=2)
    (tmp_path / "c" / "notes.txt").write_text("mine")
    ds = import_dataset(tmp_path / "c", "c10", val_fraction=0)
    assert ds.skipped() == [
        {"path": str(tmp_path / "c" / "notes.txt"), "reason": "not a CIFAR batch file"}
    ]


def test_cifar10_gets_a_val_split_from_train(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=6)
    ds = import_dataset(tmp_path / "cifar-10-batches-py", "c10", val_fraction=0.2)
    assert ds.split_names == ["train", "test", "val"]
    assert len(ds.indices("val")) == 6  # 10 per class × 0.2, 3 classes
    assert len(ds.indices("test")) == 6


def test_cifar100_batches(tmp_path):
    truth = write_cifar100(tmp_path / "cifar-100-python")
    ds = import_dataset(tmp_path / "cifar-100-python", "c100", val_fraction=0)
    assert ds.meta["source_shape"] == "cifar100"
    assert ds.classes == ["fine0", "fine1", "fine2", "fine3"]
    for split in ("train", "test"):
        images, labels = truth[split]
        np.testing.assert_array_equal(ds.images[ds.indices(split)], images)
        np.testing.assert_array_equal(ds.labels[ds.indices(split)], labels)


def test_cifar_parent_folder_is_found(tmp_path):
    """torchvision's download root holds ``cifar-10-batches-py/`` beside the archive."""
    write_cifar10(tmp_path / "root" / "cifar-10-batches-py", per_batch=2)
    (tmp_path / "root" / "cifar-10-python.tar.gz").write_bytes(b"")
    scanned = scan_source(tmp_path / "root")
    assert scanned.shape == "cifar10"


def test_cifar_missing_batch_is_an_error(tmp_path):
    write_cifar10(tmp_path / "c", per_batch=2)
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3: missing CIFAR batch"):
        import_dataset(tmp_path / "c", "c10")


def test_corrupt_cifar_batch_is_an_error(tmp_path):
    write_cifar10(tmp_path / "c", per_batch=2)
    (tmp_path / "c" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"data_batch_2: not a readable CIFAR batch"):
        import_dataset(tmp_path / "c", "c10")


# ---------------------------------------------------------------- archives


def build_shape(shape: str, root: Path) -> dict:
    """One source of each shape in ``root``; returns the expected classes and counts."""
    if shape == "class-tree":
        make_class_tree(root, {"cat": 3, "dog": 2})
        return {"classes": ["cat", "dog"], "counts": {"train": {"cat": 3, "dog": 2}}}
    if shape == "split-tree":
        make_class_tree(root / "train", {"cat": 2, "dog": 2})
        make_class_tree(root / "valid", {"cat": 1, "dog": 1})
        make_class_tree(root / "test", {"dog": 1, "bird": 1})
        return {
            "classes": ["bird", "cat", "dog"],
            "counts": {
                "train": {"cat": 2, "dog": 2},
                "val": {"cat": 1, "dog": 1},
                "test": {"bird": 1, "dog": 1},
            },
        }
    if shape == "csv":
        make_flat(root, KAGGLE_LABELS)
        write_csv(root / "trainLabels.csv", ["id", "label"], list(KAGGLE_LABELS.items()))
        return {
            "classes": ["bird", "cat", "dog"],
            "counts": {"train": {"bird": 1, "cat": 3, "dog": 2}},
        }
    if shape == "cifar100":
        write_cifar100(root / "cifar-100-python", n_train=10, n_test=4, num_classes=4)
        return {
            "classes": ["fine0", "fine1", "fine2", "fine3"],
            "counts": {
                "train": {"fine0": 3, "fine1": 2, "fine2": 2, "fine3": 3},
                "test": {"fine0": 1, "fine1": 1, "fine2": 1, "fine3": 1},
            },
        }
    assert shape == "cifar10"
    write_cifar10(root / "cifar-10-batches-py", per_batch=3, num_classes=3)
    return {
        "classes": ["class0", "class1", "class2"],
        "counts": {
            "train": {"class0": 5, "class1": 5, "class2": 5},
            "test": {"class0": 1, "class1": 1, "class2": 1},
        },
    }


SHAPES = ["class-tree", "split-tree", "csv", "cifar10", "cifar100"]


@pytest.mark.parametrize("fmt", ARCHIVE_FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_archive_of_every_shape(tmp_path, shape, fmt):
    want = build_shape(shape, tmp_path / "src")
    archive = make_archive(tmp_path / "src", tmp_path / f"data{fmt}")
    ds = import_dataset(archive, val_fraction=0)
    assert ds.name == "data"  # the archive's name without its suffix
    assert ds.meta["source_shape"] == shape
    assert ds.classes == want["classes"]
    assert per_split_counts(ds) == want["counts"]
    # The same pixels as importing the unpacked folder.
    plain = import_dataset(tmp_path / "src", "plain", val_fraction=0)
    np.testing.assert_array_equal(ds.images, plain.images)
    np.testing.assert_array_equal(ds.labels, plain.labels)
    assert all(f.startswith(f"{archive}/") for f in ds.files())


@pytest.mark.parametrize("fmt", ARCHIVE_FORMATS)
def test_archive_with_one_top_level_folder_is_read_through_it(tmp_path, fmt):
    """The shape of ``cifar10-train-jpg.tar.gz``: ``cifar10/train/<class>/NNNN.jpg``."""
    make_class_tree(tmp_path / "src" / "train", {"cat": 3, "dog": 2}, ext=".jpg")
    archive = make_archive(tmp_path / "src", tmp_path / f"cifar{fmt}", arcroot="cifar10")
    ds = import_dataset(archive, "c", val_fraction=0)
    assert ds.meta["source_shape"] == "split-tree"
    assert per_split_counts(ds) == {"train": {"cat": 3, "dog": 2}}
    assert ds.files()[0] == f"{archive}/cifar10/train/cat/000.jpg"


@pytest.mark.parametrize("shape", SHAPES)
def test_folder_with_one_top_level_folder_is_read_through_it(tmp_path, shape):
    want = build_shape(shape, tmp_path / "src" / "wrapper")
    ds = import_dataset(tmp_path / "src", "w", val_fraction=0)
    assert ds.meta["source_shape"] == shape
    assert ds.classes == want["classes"]
    assert per_split_counts(ds) == want["counts"]


def test_zip_with_macos_metadata(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src / "pets", {"cat": 2, "dog": 2})
    (src / "__MACOSX" / "pets").mkdir(parents=True)
    (src / "__MACOSX" / "pets" / "._cat").write_bytes(b"\0")
    (src / "pets" / "cat" / ".DS_Store").write_bytes(b"\0")
    archive = make_archive(src, tmp_path / "pets.zip")
    ds = import_dataset(archive, val_fraction=0)
    assert per_split_counts(ds) == {"train": {"cat": 2, "dog": 2}}
    assert sorted(r["path"] for r in ds.skipped()) == [
        f"{archive}/__MACOSX/pets/._cat",
        f"{archive}/pets/cat/.DS_Store",
    ]
    assert {r["reason"] for r in ds.skipped()} == {"hidden file or OS metadata"}


def test_tar_with_long_member_names(tmp_path):
    """Names over 100 bytes use pax/GNU headers; both must keep the full path."""
    src = tmp_path / "src"
    deep = "d" * 120
    save_image(src / "cat" / deep / "x.png", RED)
    save_image(src / "dog" / "y.png", GREEN)
    for fmt in ("gnu", "pax"):
        import tarfile

        archive = tmp_path / f"{fmt}.tar"
        with tarfile.open(archive, "w", format=getattr(tarfile, f"{fmt.upper()}_FORMAT")) as tf:
            for p in sorted(src.rglob("*.png")):
                tf.add(p, p.relative_to(src).as_posix())
        ds = import_dataset(archive, val_fraction=0)
        assert sorted(ds.files()) == [f"{archive}/cat/{deep}/x.png", f"{archive}/dog/y.png"]


def cut_points(archive: Path) -> dict[str, int]:
    """Where to cut a tar: inside the last member's data, and just before its header."""
    import tarfile

    with tarfile.open(archive) as tf:
        last = tf.getmembers()[-1]
    return {"inside-member": last.offset_data + 10, "at-a-header": last.offset}


@pytest.mark.parametrize(
    "fmt, cut", [(".tar", "inside-member"), (".tar", "at-a-header"), (".tar.gz", 0), (".zip", 0)]
)
def test_truncated_archive_is_an_error(tmp_path, fmt, cut):
    make_class_tree(tmp_path / "src", {"cat": 3, "dog": 3}, size=(16, 16))
    archive = make_archive(tmp_path / "src", tmp_path / f"data{fmt}")
    raw = archive.read_bytes()
    end = cut_points(archive)[cut] if cut else len(raw) * 2 // 3
    archive.write_bytes(raw[:end])
    with pytest.raises(DataError, match=r"cannot read archive .*is it complete\?"):
        import_dataset(archive, "d")


def test_gzip_with_several_members(tmp_path):
    import gzip

    make_class_tree(tmp_path / "src", {"cat": 3, "dog": 3}, size=(16, 16))
    raw = make_archive(tmp_path / "src", tmp_path / "d.tar").read_bytes()
    archive = tmp_path / "multi.tar.gz"
    archive.write_bytes(gzip.compress(raw[:3000]) + gzip.compress(raw[3000:]) + bytes(64))
    ds = import_dataset(archive, val_fraction=0)
    assert per_split_counts(ds) == {"train": {"cat": 3, "dog": 3}}


@pytest.mark.parametrize("fmt", ARCHIVE_FORMATS)
def test_garbage_archive_is_an_error(tmp_path, fmt):
    archive = tmp_path / f"data{fmt}"
    archive.write_bytes(b"this is not an archive at all" * 40)
    with pytest.raises(DataError, match=rf"{archive}: cannot read archive"):
        import_dataset(archive, "d")


def test_archive_members_named_with_dotdot_never_leave_the_archive(tmp_path):
    import tarfile

    make_class_tree(tmp_path / "src", {"cat": 2, "dog": 2})
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        for p in sorted((tmp_path / "src").rglob("*.png")):
            tf.add(p, p.relative_to(tmp_path / "src").as_posix())
        tf.add(tmp_path / "src" / "cat" / "000.png", "../outside.png")
    ds = import_dataset(archive, val_fraction=0)
    assert len(ds.labels) == 4
    assert not any("outside" in f for f in ds.files())


def test_archive_class_tree_pixels_are_exact(tmp_path):
    make_class_tree(tmp_path / "src", {"cat": 1, "dog": 1, "bird": 1})
    archive = make_archive(tmp_path / "src", tmp_path / "a.tar.gz")
    ds = import_dataset(archive, val_fraction=0)
    assert [tuple(ds.images[i, 4, 4]) for i in range(3)] == [BLUE, RED, GREEN]


def test_source_copy_is_not_needed_after_import(tmp_path):
    make_class_tree(tmp_path / "src", {"cat": 2, "dog": 2})
    import_dataset(tmp_path / "src", "pets", val_fraction=0)
    shutil.rmtree(tmp_path / "src")
    ds = load_dataset("pets")
    assert tuple(ds.images[0, 0, 0]) == RED
