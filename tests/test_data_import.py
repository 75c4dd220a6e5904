"""Decoding policy, bad input, errors, splits and the cache, through ``import_dataset``."""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import (
    BLUE,
    GREEN,
    RED,
    all_files,
    cache_entries,
    is_root,
    make_archive,
    make_class_tree,
    save_array,
    save_image,
)
from imgclf.data import import_dataset, list_datasets, load_dataset
from imgclf.data.cache import resolve_dataset_dir
from imgclf.data.decode import cover_crop
from imgclf.data.splits import stratified_split
from imgclf.errors import DataError

EXTENSIONS = [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"]
LOSSY = {".jpg", ".jpeg"}


def pixel_of(ds, path) -> tuple[int, ...]:
    i = ds.files().index(str(path))
    return tuple(int(v) for v in ds.images[i, 2, 2])


def assert_close(got, want, tol: int) -> None:
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= tol, (got, want)


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- formats and modes


def test_every_image_extension(tmp_path):
    src = tmp_path / "src"
    for ext in EXTENSIONS:
        kwargs = {"lossless": True} if ext == ".webp" else {}
        save_image(src / "cat" / f"a{ext}", RED, **kwargs)
        save_image(src / "dog" / f"a{ext}", BLUE, **kwargs)
    # Upper-case extensions are images too.
    save_image(src / "dog" / "UPPER.PNG", BLUE, fmt="PNG")
    ds = import_dataset(src, "ext", val_fraction=0)
    assert len(ds.labels) == 2 * len(EXTENSIONS) + 1
    assert ds.skipped() == []
    for cls, colour in (("cat", RED), ("dog", BLUE)):
        for ext in EXTENSIONS:
            assert_close(pixel_of(ds, src / cls / f"a{ext}"), colour, 3 if ext in LOSSY else 0)


def test_modes_become_rgb(tmp_path):
    src = tmp_path / "src"
    cat = src / "cat"
    save_image(cat / "L.png", 100, mode="L")
    save_image(cat / "LA.png", (100, 50), mode="LA")
    save_image(cat / "1.png", 1, mode="1")
    save_image(cat / "RGBA.png", (10, 20, 30, 0), mode="RGBA")
    save_image(cat / "CMYK.jpg", (0, 255, 255, 0), mode="CMYK")
    # Palette images whose pixels use a transparent entry: the entry's colour is kept,
    # as torchvision's pil_loader (convert("RGB")) keeps it.
    for ext in (".png", ".gif"):
        p = Image.new("P", (8, 8), 1)
        p.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
        p.save(cat / f"P{ext}", transparency=1)
    # 16-bit grey: the top 8 bits are kept (0x12 of 0x1234).
    Image.fromarray(np.full((8, 8), 0x1234, np.uint16)).save(cat / "I16.png")
    assert Image.open(cat / "I16.png").mode == "I;16"
    save_image(src / "dog" / "rgb.png", GREEN)
    ds = import_dataset(src, "modes", val_fraction=0)
    assert ds.skipped() == []
    assert pixel_of(ds, cat / "L.png") == (100, 100, 100)
    assert pixel_of(ds, cat / "LA.png") == (100, 100, 100)
    assert pixel_of(ds, cat / "1.png") == (255, 255, 255)
    assert pixel_of(ds, cat / "RGBA.png") == (10, 20, 30)
    assert_close(pixel_of(ds, cat / "CMYK.jpg"), RED, 3)
    assert pixel_of(ds, cat / "P.png") == BLUE
    assert pixel_of(ds, cat / "P.gif") == BLUE
    assert pixel_of(ds, cat / "I16.png") == (0x12, 0x12, 0x12)


def exif_rotated(path, arr: np.ndarray, orientation: int, **kwargs) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    save_array(path, arr, exif=exif.tobytes(), **kwargs)


def stored_top_red() -> np.ndarray:
    """Stored 8×8: top row red, the rest green."""
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:] = GREEN
    arr[0] = RED
    return arr


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_exif_orientation_is_applied(tmp_path, ext):
    src = tmp_path / "src"
    kwargs = {"quality": 100, "subsampling": 0} if ext == ".jpg" else {}
    exif_rotated(src / "cat" / f"rot{ext}", stored_top_red(), 6, **kwargs)
    make_class_tree(src, {"dog": 2}, size=(8, 8))
    ds = import_dataset(src, "exif", val_fraction=0)
    assert ds.image_size == (8, 8)
    assert ds.meta["resized"] == 0
    out = ds.images[ds.files().index(str(src / "cat" / f"rot{ext}"))].astype(int)
    # Orientation 6 = rotate 90° clockwise: the stored top row becomes the right column.
    want = np.zeros((8, 8, 3), int)
    want[:] = GREEN
    want[:, -1] = RED
    tol = 0 if ext == ".png" else 80
    assert np.abs(out - want).max() <= tol


def test_mixed_sizes_default_to_the_most_common_size(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, {"cat": 2}, size=(8, 8))
    make_class_tree(src, {"dog": 2}, size=(16, 16))
    save_image(src / "dog" / "small.png", GREEN, (8, 8))
    ds = import_dataset(src, "mixed", val_fraction=0)
    assert ds.image_size == (8, 8)
    assert ds.images.shape == (5, 8, 8, 3)
    assert ds.meta["resized"] == 2
    # Solid images stay solid through the resize.
    assert {tuple(ds.images[i].reshape(-1, 3)[k]) for i in range(2, 5) for k in (0, 63)} == {GREEN}


def test_most_common_size_wins_even_when_the_first_images_differ(tmp_path):
    """The size guessed from the first chunk is checked against every image."""
    src = tmp_path / "src"
    make_class_tree(src, {"aaa": 3}, size=(16, 16))  # sorted first
    make_class_tree(src, {"bbb": 4}, size=(8, 8))
    ds = import_dataset(src, "mixed", val_fraction=0)
    assert ds.image_size == (8, 8)
    assert ds.meta["resized"] == 3


def test_guessed_size_is_a_square_capped_for_photos(tmp_path):
    """Portrait photos become centre-cropped squares (their shorter side, at most 224):
    a non-square cache would be squashed to the model's square input."""
    src = tmp_path / "src"
    make_class_tree(src, {"cat": 2, "dog": 1}, size=(20, 12))  # 20 high × 12 wide
    ds = import_dataset(src, "portrait", val_fraction=0)
    assert ds.image_size == (12, 12)
    big = tmp_path / "big"
    make_class_tree(big, {"cat": 1, "dog": 1}, size=(300, 260))
    assert import_dataset(big, "big", val_fraction=0).image_size == (224, 224)
    # No common size: the median shorter side, not the largest image's.
    mixed = tmp_path / "mixed"
    for i, (h, w) in enumerate([(40, 900), (60, 50), (70, 90), (100, 80), (30, 30)]):
        make_class_tree(mixed / f"s{i}", {"cat" if i % 2 else "dog": 1}, size=(h, w))
    ds = import_dataset(mixed, "mixed", val_fraction=0)
    assert ds.image_size == (50, 50)


def test_image_size_forces_n_by_n(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, {"cat": 2}, size=(8, 8))
    make_class_tree(src, {"dog": 2}, size=(16, 12))
    ds = import_dataset(src, "sized", image_size=12, val_fraction=0)
    assert ds.image_size == (12, 12)
    assert ds.images.shape == (4, 12, 12, 3)
    assert ds.meta["resized"] == 4
    assert tuple(ds.images[0, 6, 6]) == RED
    assert tuple(ds.images[3, 6, 6]) == GREEN


def test_cover_then_centre_crop(tmp_path):
    """Aspect ratio is kept: a 16 high × 32 wide image to 16×16 keeps the middle half."""
    src = tmp_path / "src"
    wide = np.zeros((16, 32, 3), np.uint8)
    wide[:, :8], wide[:, 8:24], wide[:, 24:] = RED, GREEN, BLUE
    tall = wide.transpose(1, 0, 2).copy()  # 32 high × 16 wide: red top, blue bottom
    save_array(src / "cat" / "wide.png", wide)
    save_array(src / "dog" / "tall.png", tall)
    ds = import_dataset(src, "crop", image_size=16, val_fraction=0)
    assert ds.images.shape == (2, 16, 16, 3)
    assert (ds.images[0] == GREEN).all()
    assert (ds.images[1] == GREEN).all()
    assert ds.meta["resize_policy"] == "scale to cover, bicubic antialiased, centre crop"


def test_large_jpeg_scaled_while_decoding_matches_a_full_decode(tmp_path):
    """libjpeg's DCT scaling (fast path and Pillow's draft) stays close to a full decode."""
    src = tmp_path / "src"
    smooth = np.linspace(0, 255, 64).astype(np.uint8)
    arr = np.stack(np.broadcast_arrays(smooth[:, None], smooth[None, :], 128), -1)
    arr = arr.astype(np.uint8)
    save_array(src / "cat" / "plain.jpg", arr, quality=95)
    # Stored turned left; orientation 6 turns it back clockwise.
    exif_rotated(src / "cat" / "exif.jpg", np.rot90(arr, 1).copy(), 6, quality=95)
    save_image(src / "dog" / "d.png", GREEN, (16, 16))
    ds = import_dataset(src, "dct", image_size=16, val_fraction=0)
    ref = np.asarray(Image.fromarray(arr).resize((16, 16), Image.Resampling.BICUBIC), int)
    for name in ("plain.jpg", "exif.jpg"):
        got = ds.images[ds.files().index(str(src / "cat" / name))].astype(int)
        assert np.abs(got - ref).mean() < 4, name


def test_exif_rotated_jpeg_is_not_shrunk_below_the_target_while_decoding(tmp_path):
    """Pillow's draft() must be asked for the size before rotation, not after."""
    src = tmp_path / "src"
    path = src / "cat" / "rot.jpg"
    exif_rotated(path, noise(64, 16), 6, quality=95)  # shown 64 wide × 16 high
    make_class_tree(src, {"dog": 3}, size=(16, 16))
    ds = import_dataset(src, "draft", val_fraction=0)
    assert ds.image_size == (16, 16)
    full = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert full.shape == (16, 64, 3)
    ref = cover_crop(full, (16, 16)).astype(int)
    got = ds.images[ds.files().index(str(path))].astype(int)
    assert np.abs(got - ref).mean() < 2


# ---------------------------------------------------------------- bad input


def truncated(data: bytes, keep: float = 0.7) -> bytes:
    return data[: int(len(data) * keep)]


def encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def make_bad_source(src):
    """Two good images per class and one file of every bad kind; returns expected rows."""
    make_class_tree(src, {"cat": 2, "dog": 2})
    cat = src / "cat"
    (cat / "zero.jpg").write_bytes(b"")
    (cat / "trunc.jpg").write_bytes(truncated(encoded(noise(32, 32), "JPEG")))
    (cat / "trunc_header.jpg").write_bytes(truncated(encoded(noise(32, 32), "JPEG"), 0.3))
    (cat / "trunc.png").write_bytes(truncated(encoded(noise(32, 32), "PNG")))
    (cat / "text.jpg").write_text("this is not a JPEG\n")
    (cat / "README.txt").write_text("notes")
    (cat / ".hidden.png").write_bytes(encoded(noise(8, 8), "PNG"))
    (src / "dog" / ".DS_Store").write_bytes(b"\0\0")
    decode_failures = {
        cat / "zero.jpg": "empty file (0 bytes)",
        cat / "trunc.jpg": "truncated image",
        cat / "trunc_header.jpg": "truncated image",
        cat / "trunc.png": "truncated image",
        cat / "text.jpg": "not an image Pillow can read",
    }
    listed = {
        cat / "README.txt": "not an image file extension",
        cat / ".hidden.png": "hidden file or OS metadata",
        src / "dog" / ".DS_Store": "hidden file or OS metadata",
    }
    return decode_failures, listed


def test_bad_files_are_skipped_warned_counted_and_reported(tmp_path):
    src = tmp_path / "src"
    decode_failures, listed = make_bad_source(src)
    warnings: list[str] = []
    ds = import_dataset(src, "bad", val_fraction=0, warn=warnings.append, workers=2)
    assert len(ds.labels) == 4
    assert sorted(warnings) == sorted(f"{p}: skipped: {r}" for p, r in decode_failures.items())
    expected = {str(p): r for p, r in {**decode_failures, **listed}.items()}
    assert {r["path"]: r["reason"] for r in ds.skipped()} == expected
    assert ds.meta["skipped"] == len(expected) == 8
    # Every file under SRC is a sample or a report row, never both, never neither.
    samples, rows = set(ds.files()), {r["path"] for r in ds.skipped()}
    assert samples.isdisjoint(rows)
    assert samples | rows == all_files(src)
    assert len(ds.files()) + len(ds.skipped()) == len(all_files(src))


def test_bad_files_inside_an_archive(tmp_path):
    decode_failures, listed = make_bad_source(tmp_path / "src")
    archive = make_archive(tmp_path / "src", tmp_path / "bad.tar.gz")
    warnings: list[str] = []
    ds = import_dataset(archive, val_fraction=0, warn=warnings.append)
    assert len(ds.labels) == 4
    assert len(warnings) == len(decode_failures)
    got = {r["path"]: r["reason"] for r in ds.skipped()}
    rel = {
        p.relative_to(tmp_path / "src").as_posix(): r
        for p, r in {**decode_failures, **listed}.items()
    }
    assert got == {f"{archive}/{k}": r for k, r in rel.items()}


@pytest.mark.skipif(is_root(), reason="running as root: chmod 000 does not stop root reading")
def test_unreadable_file_is_skipped(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, {"cat": 2, "dog": 2})
    locked = save_image(src / "cat" / "locked.png")
    locked.chmod(0)
    try:
        ds = import_dataset(src, "locked", val_fraction=0, warn=lambda m: None)
    finally:
        locked.chmod(0o644)
    assert ds.skipped() == [{"path": str(locked), "reason": "unreadable: permission denied"}]


@pytest.mark.parametrize("limit", [100, 150])  # 16×16 = 256 px: error band, warning band
def test_images_over_the_decompression_bomb_limit_are_skipped(tmp_path, monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    src = tmp_path / "src"
    make_class_tree(src, {"cat": 2, "dog": 2})  # 8×8 = 64 px: under the limit
    save_image(src / "cat" / "bomb.png", RED, (16, 16))
    save_image(src / "cat" / "bomb.jpg", RED, (16, 16))  # plain JPEG: the fast decoder
    exif_rotated(src / "dog" / "bomb_exif.jpg", noise(16, 16), 6)
    warnings: list[str] = []
    ds = import_dataset(src, "bombs", val_fraction=0, warn=warnings.append, workers=2)
    assert len(ds.labels) == 4
    rows = {r["path"]: r["reason"] for r in ds.skipped()}
    assert sorted(rows) == sorted(
        str(p) for p in (src / "cat/bomb.png", src / "cat/bomb.jpg", src / "dog/bomb_exif.jpg")
    )
    assert all(r.startswith("over Pillow's decompression-bomb limit") for r in rows.values())
    assert len(warnings) == 3


# ---------------------------------------------------------------- errors


def no_readable_in_class(src):
    make_class_tree(src, {"dog": 2})
    (src / "cat").mkdir()
    (src / "cat" / "text.jpg").write_text("nope")
    return f"{src / 'cat'}: no readable images (1 files skipped"


def only_non_images_in_class(src):
    make_class_tree(src, {"dog": 2})
    (src / "cat").mkdir()
    (src / "cat" / "README.txt").write_text("nope")
    return f"{src / 'cat'}: no readable images"


def empty_class_folder(src):
    make_class_tree(src, {"dog": 2, "bird": 1})
    (src / "cat").mkdir()
    return f"{src / 'cat'}: no readable images"


def no_readable_in_class_of_split_tree(src):
    make_class_tree(src / "train", {"dog": 2})
    (src / "train" / "cat").mkdir()
    (src / "train" / "cat" / "bad.png").write_bytes(b"")
    return f"{src / 'train' / 'cat'}: no readable images"


def one_class(src):
    make_class_tree(src, {"cat": 3})
    return "found 1 class(es) ['cat']; a classifier needs at least 2"


def every_image_broken(src):
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        (src / cls / "x.png").write_bytes(b"")
    return "no readable images"


def csv_missing_files(src):
    save_image(src / "1.png")
    save_image(src / "2.png", GREEN)
    (src / "labels.csv").write_text("id,label\n1,cat\n2,dog\n3,dog\n")
    return f"{src / 'labels.csv'}: 1 listed files not found"


def csv_without_columns(src):
    save_image(src / "1.png")
    save_image(src / "2.png", GREEN)
    (src / "labels.csv").write_text("a,b\n1,cat\n2,dog\n")
    return f"{src / 'labels.csv'}: CSV columns ['a', 'b'] lack an id column"


def only_text_files(src):
    src.mkdir()
    (src / "a.txt").write_text("a")
    (src / "b.txt").write_text("b")
    return f"{src}: unknown source shape"


def nonexistent(src):
    return f"{src}: no such file or folder"


def corrupt_archive(src):
    src.mkdir()
    make_class_tree(src / "tree", {"cat": 2, "dog": 2})
    archive = make_archive(src / "tree", src / "data.tar.gz")
    archive.write_bytes(archive.read_bytes()[:100])
    return f"{archive}: cannot read archive"


def a_plain_file(src):
    save_image(src.with_suffix(".png"))
    return "not a folder or a .tar/.tar.gz/.tgz/.zip archive"


ERROR_CASES = [
    no_readable_in_class,
    only_non_images_in_class,
    empty_class_folder,
    no_readable_in_class_of_split_tree,
    one_class,
    every_image_broken,
    csv_missing_files,
    csv_without_columns,
    only_text_files,
    nonexistent,
    corrupt_archive,
    a_plain_file,
]


def source_for(case, tmp_path):
    src = tmp_path / "src"
    want = case(src)
    if case is corrupt_archive:
        src = src / "data.tar.gz"
    elif case is a_plain_file:
        src = src.with_suffix(".png")
    return src, want


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.__name__)
def test_errors_are_one_line_and_leave_no_cache(tmp_path, imgclf_home, case):
    src, want = source_for(case, tmp_path)
    with pytest.raises(DataError) as err:
        import_dataset(src, "broken", warn=lambda m: None)
    msg = str(err.value)
    assert want in msg
    assert "\n" not in msg
    assert cache_entries(imgclf_home) == []


@pytest.mark.parametrize("case", ERROR_CASES[:3], ids=lambda c: c.__name__)
def test_a_failed_import_keeps_the_existing_dataset(tmp_path, case):
    make_class_tree(tmp_path / "good", {"cat": 2, "dog": 3})
    import_dataset(tmp_path / "good", "pets", val_fraction=0)
    src, _ = source_for(case, tmp_path)
    with pytest.raises(DataError):
        import_dataset(src, "pets", warn=lambda m: None)
    ds = load_dataset("pets")
    assert len(ds.labels) == 5
    assert list_datasets() == ["pets"]


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file", "read-only"])
def test_unwritable_cache(tmp_path, monkeypatch, where):
    make_class_tree(tmp_path / "src", {"cat": 2, "dog": 2})
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    if where == "under-a-file":
        home = blocker / "home"
    elif where == "is-a-file":
        home = blocker
    else:
        if is_root():
            pytest.skip("running as root: a read-only folder does not stop root writing")
        home = tmp_path / "ro"
        home.mkdir(mode=0o555)
    monkeypatch.setenv("IMGCLF_HOME", str(home))
    with pytest.raises(DataError) as err:
        import_dataset(tmp_path / "src", "pets")
    msg = str(err.value)
    if where == "read-only":
        assert "cannot write the dataset cache" in msg
        assert f"set IMGCLF_HOME to a writable folder (now {home})" in msg
    else:  # a file in the way: named, with the setting to change
        assert msg.startswith(f"IMGCLF_HOME {home / 'datasets'}: {blocker} is a file, not a folder")
        assert msg.endswith("IMGCLF_HOME")


@pytest.mark.parametrize(
    "kwargs, want",
    [
        ({"image_size": 0}, "--image-size 0: must be between 1 and 4096"),
        ({"val_fraction": 1.0}, "--val-fraction 1.0: must be at least 0 and below 1"),
        ({"val_fraction": -0.1}, "--val-fraction -0.1"),
        ({"name": "../escape"}, "'../escape': not a usable dataset name"),
        ({"name": ".hidden"}, "'.hidden': not a usable dataset name"),
    ],
)
def test_bad_options(tmp_path, imgclf_home, kwargs, want):
    make_class_tree(tmp_path / "src", {"cat": 2, "dog": 2})
    kwargs.setdefault("name", "pets")
    with pytest.raises(DataError, match=re.escape(want)):
        import_dataset(tmp_path / "src", **kwargs)
    assert cache_entries(imgclf_home) == []
    assert not (tmp_path / "escape").exists()


# ---------------------------------------------------------------- splits


def test_stratified_split_counts_per_class():
    labels = np.repeat(np.arange(6), [50, 30, 7, 15, 2, 1])
    val = stratified_split(labels, 0.1, seed=0)
    counts = np.bincount(labels[val], minlength=6)
    # round(n·f) per class; a class of 2 still gives 1 to val, a class of 1 keeps it.
    assert counts.tolist() == [5, 3, 1, 2, 1, 0]
    assert len(np.unique(val)) == len(val)
    assert (np.bincount(labels, minlength=6) - counts >= 1).all()  # ≥1 left in train


def test_stratified_split_keeps_one_in_train_at_large_fractions():
    labels = np.repeat(np.arange(3), [2, 3, 10])
    val = stratified_split(labels, 0.9, seed=0)
    assert np.bincount(labels[val], minlength=3).tolist() == [1, 2, 9]


def test_stratified_split_is_seeded():
    labels = np.repeat(np.arange(4), 40)
    a = stratified_split(labels, 0.25, seed=1)
    assert np.array_equal(a, stratified_split(labels, 0.25, seed=1))
    assert not np.array_equal(a, stratified_split(labels, 0.25, seed=2))
    assert np.bincount(labels[a]).tolist() == [10, 10, 10, 10]


def test_import_split_is_seeded_stratified_and_stored(tmp_path):
    make_class_tree(tmp_path / "src", {"cat": 10, "dog": 20, "bird": 5})
    a = import_dataset(tmp_path / "src", "a", val_fraction=0.2, seed=7)
    b = import_dataset(tmp_path / "src", "b", val_fraction=0.2, seed=7)
    c = import_dataset(tmp_path / "src", "c", val_fraction=0.2, seed=8)
    assert a.split_names == ["train", "val"]
    assert a.counts() == {
        "train": {"bird": 4, "cat": 8, "dog": 16},
        "val": {"bird": 1, "cat": 2, "dog": 4},
    }
    assert np.array_equal(a.splits, b.splits)
    assert not np.array_equal(a.splits, c.splits)
    # Stored with the dataset: a fresh load sees the same split, and files.csv says it too.
    again = load_dataset("a")
    assert np.array_equal(again.splits, a.splits)
    import csv

    with open(again.root / "files.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["split"] for r in rows] == [a.split_names[s] for s in a.splits]
    assert [int(r["label"]) for r in rows] == a.labels.tolist()


def test_val_fraction_zero_makes_no_val(tmp_path):
    make_class_tree(tmp_path / "src", {"cat": 3, "dog": 3})
    ds = import_dataset(tmp_path / "src", "x", val_fraction=0)
    assert ds.split_names == ["train"]
    assert ds.meta["val_split"] == {"from": "source"}
    with pytest.raises(DataError, match="has no 'val' split; choose one of: train, all"):
        ds.indices("val")


def test_default_val_fraction_is_ten_percent(tmp_path):
    make_class_tree(tmp_path / "src", {"cat": 20, "dog": 10})
    ds = import_dataset(tmp_path / "src", "x")
    assert ds.counts()["val"] == {"cat": 2, "dog": 1}


# ---------------------------------------------------------------- cache


def test_cache_layout_and_memory_mapped_load(tmp_path, imgclf_home):
    make_class_tree(tmp_path / "src", {"cat": 2, "dog": 3})
    import_dataset(tmp_path / "src", "pets", val_fraction=0)
    root = imgclf_home / "datasets" / "pets"
    assert sorted(p.name for p in root.iterdir()) == [
        "files.csv",
        "fingerprints.npy",
        "images.npy",
        "import-report.csv",
        "labels.npy",
        "meta.json",
        "splits.npy",
    ]
    ds = load_dataset("pets")
    assert isinstance(ds.images, np.memmap)
    assert not ds.images.flags.writeable
    assert ds.root == root
    meta = json.loads((root / "meta.json").read_text())
    assert meta["source"] == str((tmp_path / "src").resolve())
    assert meta["num_samples"] == 5 and meta["image_size"] == [8, 8]
    # Loading by folder path works too.
    assert load_dataset(root).name == "pets"


def test_files_csv_holds_every_source_path(tmp_path):
    files = make_class_tree(tmp_path / "src", {"cat": 2, "dog": 3})
    ds = import_dataset(tmp_path / "src", "pets", val_fraction=0)
    assert ds.files() == [str(p) for p in files["cat"] + files["dog"]]
    for path, label in zip(ds.files(), ds.labels, strict=True):
        assert os.path.basename(os.path.dirname(path)) == ds.classes[label]


def test_reimport_replaces_the_dataset_atomically(tmp_path, imgclf_home):
    make_class_tree(tmp_path / "one", {"cat": 2, "dog": 2})
    make_class_tree(tmp_path / "two", {"cat": 3, "bird": 1})
    first = import_dataset(tmp_path / "one", "pets", val_fraction=0)
    old_images = first.images  # a reader holding the old arrays keeps working
    second = import_dataset(tmp_path / "two", "pets", val_fraction=0)
    assert second.classes == ["bird", "cat"]
    assert len(load_dataset("pets").labels) == 4
    # No .old or .tmp folder left behind: the name and the one version it points at.
    version, name = cache_entries(imgclf_home)
    assert name == "pets" and version.startswith(".pets.v-")
    assert os.readlink(imgclf_home / "datasets" / "pets") == version
    assert tuple(old_images[0, 0, 0]) == RED


def test_list_datasets_ignores_temporary_folders(tmp_path, imgclf_home):
    make_class_tree(tmp_path / "src", {"cat": 2, "dog": 2})
    import_dataset(tmp_path / "src", "b", val_fraction=0)
    import_dataset(tmp_path / "src", "a", val_fraction=0)
    # What a killed import leaves: a hidden temporary folder, possibly complete.
    leftover = imgclf_home / "datasets" / ".c.tmp-abc"
    leftover.mkdir()
    (leftover / "meta.json").write_text("{}")
    assert list_datasets() == ["a", "b"]


def test_unknown_dataset_names_the_cached_ones(tmp_path):
    make_class_tree(tmp_path / "src", {"cat": 2, "dog": 2})
    import_dataset(tmp_path / "src", "pets", val_fraction=0)
    with pytest.raises(DataError, match=r"no imported dataset 'cats' \(cached: pets\); run"):
        resolve_dataset_dir("cats")


def test_damaged_cache_is_a_data_error(tmp_path, imgclf_home):
    make_class_tree(tmp_path / "src", {"cat": 2, "dog": 2})
    import_dataset(tmp_path / "src", "pets", val_fraction=0)
    (imgclf_home / "datasets" / "pets" / "images.npy").write_bytes(b"junk")
    with pytest.raises(DataError, match="damaged dataset cache"):
        load_dataset("pets")
