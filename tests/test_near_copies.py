"""Near copies by the backbone embedding (issue #33, item 1: crops): ``imgclf data check``
on a generated photo set with a planted crop the hash misses; the blockwise search
against the full similarity matrix; the features kept and read back by a second check and
by ``--labels``; ``--no-embed`` and 32-px sets keep the hash alone. Lite0's offline
ImageNet weights, eager PyTorch on ~10 images at 224 px: seconds."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import save_array
from imgclf.cli import main
from imgclf.data import load_dataset
from imgclf.data.duplicates import NEAR_BITS, hash_distance
from imgclf.data.embed_pairs import EMBED_PAIRS_FILE, EMBED_PAIRS_RECORD
from imgclf.data.fingerprints import FINGERPRINTS_FILE
from imgclf.evaluate import near_copies
from imgclf.evaluate.near_copies import EMBED_COSINE, cosine_pairs, embed

SIDE = 96  # stored size: a photo set (≥ 64 px)


def scene(seed: int) -> Image.Image:
    """A 192-px picture with content: a dozen filled circles, bars and thick lines of
    random colours on a plain background, unlike any other seed's."""
    rng = np.random.default_rng(seed)
    colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    im = Image.new("RGB", (2 * SIDE, 2 * SIDE), colour())
    pen = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = (int(v) for v in rng.integers(0, 2 * SIDE, 2))
        s, kind = int(rng.integers(10, 60)), int(rng.integers(0, 3))
        if kind == 0:
            pen.ellipse((x, y, x + s, y + s), fill=colour())
        elif kind == 1:
            pen.rectangle((x, y, x + s, y + s // 2), fill=colour())
        else:
            dy, width = int(rng.integers(-40, 40)), int(rng.integers(2, 8))
            pen.line((x, y, x + s, y + dy), fill=colour(), width=width)
    return im


def stored(im: Image.Image) -> np.ndarray:
    return np.asarray(im.resize((SIDE, SIDE), Image.Resampling.BICUBIC))


# The scene whose 90% crop is planted in val: 24 bits from it by the hash, cosine 0.97 by
# the embedding; the other scenes' cosines stay under 0.90 (measured when the test was
# written, at the bottom-left corner as cropped here).
CROPPED = 0


def photo_source(root: Path) -> None:
    """``root/train/{a,b}/sK.png`` (8 scenes) and in val a 90% crop of scene CROPPED
    (the bottom-left 173 px of its 192) and an unrelated scene."""
    for k in range(8):
        save_array(root / "train" / "ab"[k % 2] / f"s{k}.png", stored(scene(k)))
    crop = scene(CROPPED).crop((0, 19, 173, 192))
    save_array(root / "val" / "a" / "crop.png", stored(crop))
    save_array(root / "val" / "b" / "other.png", stored(scene(8)))


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """The set imported and checked once by the CLI: (home, --out folder, what the check
    printed)."""
    base = tmp_path_factory.mktemp("near")
    photo_source(base / "src")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("IMGCLF_HOME", str(base / "home"))
        assert main(["data", "import", str(base / "src"), "--name", "shop"]) == 0
        assert main(["data", "check", "shop", "--out", str(base / "chk")]) == 0
    return base / "home", base / "chk", printed.getvalue()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_a_crop_the_hash_misses_is_grouped_with_its_original(checked, monkeypatch):
    home, out, printed = checked
    monkeypatch.setenv("IMGCLF_HOME", str(home))
    ds = load_dataset("shop")
    files = [f.split("/src/", 1)[1] for f in ds.files()]
    crop, original = files.index("val/a/crop.png"), files.index(f"train/a/s{CROPPED}.png")
    bits = int(hash_distance(np.load(ds.version_root / FINGERPRINTS_FILE), [crop], [original])[0])
    assert bits > NEAR_BITS  # the hash alone would not pair them
    with open(out / "duplicates.csv", newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == ["group", "split", "file", "distance"]
    rows = read_csv(out / "duplicates.csv")
    # The crop and its original, nothing else: the other scenes are unrelated.
    assert {r["file"]: r["group"] for r in rows} == {
        f"train/a/s{CROPPED}.png": "1",
        "val/a/crop.png": "1",
    }
    assert {r["file"]: r["distance"] for r in rows}["val/a/crop.png"] == str(bits)  # hash bits
    assert f"1 pairs at cosine ≥ {EMBED_COSINE}" in printed and "computed in " in printed
    assert (
        f"near duplicates (≤{NEAR_BITS} bits, or embedding cosine ≥ {EMBED_COSINE}): 1 groups; "
        "within train 0, val 0; across train↔val 1"
    ) in printed
    summary = json.loads((ds.version_root / "duplicates.json").read_text())
    assert summary["cross_pairs"][0]["found_by"] == "embedding"


def test_data_info_and_eval_see_the_stored_embedding_pairs(checked, monkeypatch, capsys):
    from imgclf.data.dup_check import train_duplicates

    home, _, _ = checked
    monkeypatch.setenv("IMGCLF_HOME", str(home))
    info = json.loads(cli(capsys, "data", "info", "shop", "--json")[1])["duplicates"]
    assert info["near"]["across"] == {"train-val": 1}
    assert info["embedding"]["cosine"] == EMBED_COSINE
    ds = load_dataset("shop")
    val_files = [ds.files()[i] for i in ds.indices("val")]
    leaked = train_duplicates(ds, "val")
    assert [f.endswith("crop.png") for f in val_files] == list(leaked)


def test_a_second_check_and_labels_reuse_the_stored_features(checked, monkeypatch, capsys):
    import imgclf.train.backbone_features as bf

    home, _, _ = checked
    monkeypatch.setenv("IMGCLF_HOME", str(home))
    ds = load_dataset("shop")
    kept = sorted(ds.version_root.glob("features-*.npy"))
    assert [p.name for p in kept] == ["features-efficientnet_lite0-224.npy"]
    assert np.load(kept[0]).shape == (len(ds.labels), 1280)

    def no_pass(*args, **kwargs):
        raise AssertionError("the backbone ran again")

    monkeypatch.setattr(bf, "backbone_features", no_pass)
    code, out, err = cli(capsys, "data", "check", "shop", "--out", str(home / "again"))
    assert code == 0, err
    assert f"features of {len(ds.labels)} images reused from {kept[0]}" in out
    assert read_csv(home / "again" / "duplicates.csv") == read_csv(
        home.parent / "chk" / "duplicates.csv"
    )
    argv = ["data", "check", "shop", "--labels", "--folds", "2", "--out", str(home / "lab")]
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert "features reused from the data set's folder" in out


def test_no_embed_and_small_images_keep_the_hash_alone(checked, monkeypatch, capsys, tmp_path):
    home, _, _ = checked
    monkeypatch.setenv("IMGCLF_HOME", str(home))
    root = load_dataset("shop").version_root
    code, out, err = cli(
        capsys, "data", "check", "shop", "--no-embed", "--out", str(tmp_path / "h")
    )
    assert code == 0, err
    assert "near copies by embedding: skipped (--no-embed); the hash alone" in out
    assert read_csv(tmp_path / "h" / "duplicates.csv") == []  # the crop is the hash's miss
    assert not (root / EMBED_PAIRS_FILE).exists() and not (root / EMBED_PAIRS_RECORD).exists()
    info = json.loads(cli(capsys, "data", "info", "shop", "--json")[1])["duplicates"]
    assert info["embedding"] is None and info["near"]["across"] == {"train-val": 0}
    # A CIFAR-sized set: the hash alone, said so, and no network built.
    monkeypatch.setattr(near_copies, "embedding_pairs", None)
    for k in range(4):
        save_array(tmp_path / "tiny" / "ab"[k % 2] / f"{k}.png", stored(scene(k))[::3, ::3])
    assert cli(capsys, "data", "import", str(tmp_path / "tiny"), "--name", "tiny")[0] == 0
    code, out, err = cli(capsys, "data", "check", "tiny", "--out", str(tmp_path / "t"))
    assert code == 0, err
    assert "not used: images of 32×32 px are under the 64 px of a photo set" in out


def test_a_large_photo_set_skips_the_embedding_unless_asked(checked, monkeypatch, capsys, tmp_path):
    """Past EMBED_AUTO_MAX images the feature pass would take an hour: the hash alone,
    said so with the switch that asks for it; --embed runs it (features reused here)."""
    home, _, _ = checked
    monkeypatch.setenv("IMGCLF_HOME", str(home))
    ds = load_dataset("shop")
    monkeypatch.setattr(near_copies, "EMBED_AUTO_MAX", len(ds.labels) - 1)
    code, out, err = cli(capsys, "data", "check", "shop", "--out", str(tmp_path / "a"))
    assert code == 0, err
    assert f"over the {len(ds.labels) - 1:,} whose feature pass takes minutes" in out
    assert "--embed to run it anyway" in out and read_csv(tmp_path / "a" / "duplicates.csv") == []
    code, out, err = cli(capsys, "data", "check", "shop", "--embed", "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert read_csv(tmp_path / "b" / "duplicates.csv") != []  # the crop, found again


def test_blockwise_search_finds_what_the_full_matrix_finds(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.random((60, 16)).astype(np.float32)
    near = base[:20] + rng.normal(0, 0.02, (20, 16)).astype(np.float32)
    features = np.concatenate([base, near, -base[:5]]).astype(np.float16)
    monkeypatch.setattr(near_copies, "_ROWS", 7)  # blocks that cut through pairs
    monkeypatch.setattr(near_copies, "_COLS", 11)
    got = cosine_pairs(features, 0.9)
    e = embed(features)
    sim = e @ e.T
    i, j = np.nonzero(np.triu(sim >= 0.9, 1))
    assert len(i) >= 20
    assert set(zip(got["i"].tolist(), got["j"].tolist(), strict=True)) == set(
        zip(i.tolist(), j.tolist(), strict=True)
    )
    np.testing.assert_allclose(got["cosine"], sim[got["i"], got["j"]], rtol=1e-6)


def test_the_picture_keeps_half_its_rows_for_the_embeddings_pairs():
    from imgclf.data.dup_check import closest_cross_pairs
    from imgclf.data.duplicates import Duplicates

    # Images 0-9 in train, 10-19 in val: five hash pairs (2-6 bits), three by embedding.
    pairs = np.array([[k, 10 + k, 2 + k] for k in range(5)] + [[k, 10 + k, 20] for k in (5, 6, 7)])
    embedded = np.r_[np.zeros(5, bool), np.ones(3, bool)]
    none = np.zeros(20, dtype=np.int64)
    dups = Duplicates(none, none, none, pairs, embedded)
    splits = np.repeat([0, 1], 10)
    shown = closest_cross_pairs(dups, splits, k=4)
    assert shown[:, 0].tolist() == [0, 1, 5, 6] and shown[:, 3].tolist() == [0, 0, 1, 1]
    # Fewer hash pairs than half: the embedding's fill the rest, and the other way round.
    assert closest_cross_pairs(dups, splits, k=8)[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    hash_only = Duplicates(none, none, none, pairs[:5], embedded[:5])
    assert len(closest_cross_pairs(hash_only, splits, k=4)) == 4
