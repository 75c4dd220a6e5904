"""Duplicates and near duplicates (issue #33, item 1): fingerprints made at import from
every kind of source, the multi-index search, ``data check``'s files, ``data info``'s
counts, ``import --dedupe`` and ``eval``'s duplicate-free accuracy."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
from PIL import Image, ImageEnhance

from conftest import save_array, write_cifar10
from imgclf.cli import main
from imgclf.data import load_dataset
from imgclf.data.duplicates import NEAR_BITS, near_pairs
from imgclf.data.fingerprints import FINGERPRINT_VERSION, FP_DTYPE, fingerprint_chunk
from imgclf.data.importer import import_arrays, import_dataset

SIDE = 64
# The hash's checks. These smooth colour layouts are not photos: Lite0's ImageNet
# embedding, which `data check` adds on sets of 64 px or more, finds them all alike
# (tests/test_near_copies.py tests it on pictures with content).
NO_EMBED = "--no-embed"


def photo(seed: int) -> np.ndarray:
    """A smooth 64×64 picture unlike any other seed's: a random 6×6 colour layout
    upscaled (bicubic), plus a gradient, so it has the coarse structure photos have."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    im = np.asarray(Image.fromarray(small).resize((SIDE, SIDE), Image.Resampling.BICUBIC))
    ramp = np.linspace(-30, 30, SIDE)[None, :, None] * rng.choice([-1, 1])
    return np.clip(im + ramp, 0, 255).astype(np.uint8)


def jpeg(arr: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def brighter(arr: np.ndarray, factor: float) -> np.ndarray:
    return np.asarray(ImageEnhance.Brightness(Image.fromarray(arr)).enhance(factor))


# Copies planted in val, each of one training image: (train file, what was done to it).
# No crop: the 63-bit DCT hash moves 8 bits or more for a 2% crop of these pictures and
# ~20 for the benchmark's 80-95% crops (docs/results.md, "Duplicates"), past NEAR_BITS.
PLANTED = {
    "exact": lambda a: a,
    "reencoded": lambda a: jpeg(a, 70),
    "mirrored": lambda a: a[:, ::-1],
    "brighter": lambda a: brighter(a, 1.1),
}


def planted_source(root, n_train: int = 8) -> dict[str, str]:
    """``root/{train,val}/{a,b}/*.png``: unrelated pictures, and in val one copy of a
    training picture per entry of PLANTED; returns copy file → original file."""
    pairs = {}
    for i in range(n_train):
        cls = "ab"[i % 2]
        save_array(root / "train" / cls / f"t{i}.png", photo(i))
    for k, (name, make) in enumerate(PLANTED.items()):
        cls = "ab"[k % 2]
        save_array(root / "val" / cls / f"{name}.png", make(photo(k)))
        pairs[f"val/{cls}/{name}.png"] = f"train/{cls}/t{k}.png"
    for i in range(3):  # unrelated val pictures
        save_array(root / "val" / "ab"[i % 2] / f"other{i}.png", photo(100 + i))
    return pairs


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- fingerprints at import


def _check_fingerprints(ds) -> None:
    fps = np.load(ds.version_root / "fingerprints.npy")
    assert fps.dtype == FP_DTYPE and len(fps) == len(ds.labels)
    assert (fps == fingerprint_chunk(np.asarray(ds.images))).all()
    assert ds.meta["fingerprints"]["version"] == FINGERPRINT_VERSION


def test_every_source_kind_gets_fingerprints_at_import(tmp_path):
    planted_source(tmp_path / "tree")
    _check_fingerprints(import_dataset(tmp_path / "tree", "tree"))
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="tree")
    _check_fingerprints(import_dataset(tmp_path / "tree.tar.gz", "archive"))
    write_cifar10(tmp_path / "cifar", per_batch=6)
    _check_fingerprints(import_dataset(tmp_path / "cifar", "cifar"))
    for i in range(6):
        save_array(tmp_path / "flat" / "train" / f"{i}.png", photo(i))
    (tmp_path / "flat" / "labels.csv").write_text(
        "id,label\n" + "".join(f"{i},{'xy'[i % 2]}\n" for i in range(6))
    )
    _check_fingerprints(
        import_dataset(
            tmp_path / "flat" / "train", "csv", labels_csv=tmp_path / "flat" / "labels.csv"
        )
    )
    images = np.stack([photo(i) for i in range(6)])
    _check_fingerprints(import_arrays(images, [0, 1] * 3, ["x", "y"], "arrays"))


def test_copies_are_close_and_unrelated_pictures_far():
    originals = np.stack([photo(i) for i in range(40)])
    copies = np.stack([make(photo(0)) for make in PLANTED.values()])
    fps = fingerprint_chunk(np.concatenate([originals, copies]))
    pairs = near_pairs(fps)
    planted = {(0, 40 + k) for k in range(len(PLANTED))}
    found = {(int(i), int(j)) for i, j, _ in pairs}
    assert planted <= found
    # The only other pairs are copies of one picture paired with each other.
    assert {p for p in found if p[0] != 0} <= {(a, b) for a in range(40, 45) for b in range(40, 45)}


def test_multi_index_search_finds_what_brute_force_finds():
    rng = np.random.default_rng(3)
    n = 2000
    fps = np.zeros(n, dtype=FP_DTYPE)
    fps["phash"] = rng.integers(0, 1 << 63, n, dtype=np.uint64)
    fps["flip"] = rng.integers(0, 1 << 63, n, dtype=np.uint64)
    one = np.uint64(1)
    bits = lambda k: one << rng.integers(0, 63, k).astype(np.uint64)  # noqa: E731
    fps["phash"][500:800] = fps["phash"][:300] ^ bits(300) ^ bits(300) ^ bits(300)
    fps["flip"][800:1000] = fps["phash"][:200] ^ bits(200) ^ bits(200)
    ph, fl = fps["phash"], fps["flip"]
    d = np.minimum(
        np.bitwise_count(ph[:, None] ^ ph[None]), np.bitwise_count(ph[:, None] ^ fl[None])
    )
    d = np.minimum(d, d.T)
    i, j = np.triu_indices(n, 1)
    close = d[i, j] <= NEAR_BITS
    expected = set(zip(i[close].tolist(), j[close].tolist(), strict=True))
    got = {(int(a), int(b)) for a, b, _ in near_pairs(fps)}
    assert len(expected) >= 500 and got == expected


# ---------------------------------------------------------------- data check, data info


def test_data_check_writes_groups_of_planted_copies_only(tmp_path, capsys):
    pairs = planted_source(tmp_path / "src")
    assert run(capsys, "data", "import", str(tmp_path / "src"), "--name", "shop")[0] == 0
    code, out, err = run(capsys, "data", "check", "shop", "--out", str(tmp_path / "chk"), NO_EMBED)
    assert code == 0, err
    rows = read_csv(tmp_path / "chk" / "duplicates.csv")
    assert list(rows[0]) == ["group", "split", "file", "distance"]
    group_of = {r["file"]: r["group"] for r in rows}
    assert set(group_of) == set(pairs) | set(pairs.values())  # nothing unrelated paired
    for copy, original in pairs.items():
        assert group_of[copy] == group_of[original]
    assert len(set(group_of.values())) == len(pairs)
    by_file = {r["file"]: r for r in rows}
    assert by_file["val/a/exact.png"]["distance"] == "0"
    assert {r["split"] for r in rows} == {"train", "val"}
    for png in (
        tmp_path / "chk" / "duplicates.png",
        load_dataset("shop").version_root / "duplicates.png",
    ):
        with Image.open(png) as im:
            assert im.height >= 4 * 128  # one row per cross-split pair
    assert "exact copies: 1 groups; within train 0, val 0; across train↔val 1" in out


def test_data_info_counts_groups_within_and_across_splits(tmp_path, capsys):
    planted_source(tmp_path / "src")
    # A second copy of t5 inside train, and a test split sharing a picture with val.
    save_array(tmp_path / "src" / "train" / "b" / "t5-again.png", photo(5))
    save_array(tmp_path / "src" / "test" / "a" / "x.png", photo(101))
    save_array(tmp_path / "src" / "test" / "b" / "y.png", photo(300))
    assert run(capsys, "data", "import", str(tmp_path / "src"), "--name", "shop")[0] == 0
    info = json.loads(run(capsys, "data", "info", "shop", "--json")[1])["duplicates"]
    assert info["exact"]["within"] == {"train": 1, "val": 0, "test": 0}
    assert info["exact"]["across"] == {"train-val": 1, "train-test": 0, "val-test": 1}
    assert info["near"]["across"] == {"train-val": 3, "train-test": 0, "val-test": 0}
    assert info["near"]["within"] == {"train": 0, "val": 0, "test": 0}
    out = run(capsys, "data", "info", "shop")[1]
    assert "near duplicates (≤4 bits): 3 groups; within train 0, val 0, test 0; across " in out


def test_old_dataset_gets_fingerprints_on_first_check(tmp_path, capsys):
    planted_source(tmp_path / "src")
    ds = import_dataset(tmp_path / "src", "old")
    made = np.load(ds.version_root / "fingerprints.npy")
    # As an import before fingerprints existed left it.
    (ds.version_root / "fingerprints.npy").unlink()
    meta = json.loads((ds.version_root / "meta.json").read_text())
    del meta["fingerprints"]
    (ds.version_root / "meta.json").write_text(json.dumps(meta))
    out = run(capsys, "data", "info", "old")[1]
    assert "duplicates: not looked for yet; run `imgclf data check old`" in out
    code, out, err = run(capsys, "data", "check", "old", "--out", str(tmp_path / "chk"), NO_EMBED)
    assert code == 0, err
    assert (np.load(ds.version_root / "fingerprints.npy") == made).all()
    assert load_dataset("old").meta["fingerprints"]["version"] == FINGERPRINT_VERSION
    assert "near duplicates (≤4 bits): 3 groups" in run(capsys, "data", "info", "old")[1]


def test_data_check_default_folder_and_bad_out(tmp_path, capsys, monkeypatch):
    planted_source(tmp_path / "src")
    assert run(capsys, "data", "import", str(tmp_path / "src"), "--name", "shop")[0] == 0
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "data", "check", "shop", NO_EMBED)[0] == 0
    assert (tmp_path / "shop-check" / "duplicates.csv").is_file()
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, "data", "check", "shop", "--out", str(tmp_path / "afile" / "d"))
    assert code == 2 and err.startswith("error: --out ") and err.count("\n") == 1


# ---------------------------------------------------------------- import --dedupe


def test_import_dedupe_keeps_the_held_out_copy_and_reports_removals(tmp_path, capsys):
    pairs = planted_source(tmp_path / "src")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "src").rglob("*"))
    argv = ["data", "import", str(tmp_path / "src"), "--name", "shop", "--dedupe"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert f"{len(pairs)} skipped (of them {len(pairs)} duplicates, --dedupe)" in out
    ds = load_dataset("shop")
    src = str(tmp_path / "src")
    kept = {f[len(src) + 1 :] for f in ds.files()}
    assert set(pairs) <= kept  # every val copy stays
    assert not set(pairs.values()) & kept  # its train original is left out
    assert len(kept) == 8 + len(pairs) + 3 - len(pairs)
    report = {
        r["path"][len(src) + 1 :]: r["reason"] for r in read_csv(ds.root / "import-report.csv")
    }
    assert set(report) == set(pairs.values())
    for copy, original in pairs.items():
        assert report[original].startswith(f"duplicate of {src}/{copy} (")
        assert report[original].endswith("; left out by --dedupe")
    assert (
        report["train/a/t0.png"]
        == f"duplicate of {src}/val/a/exact.png (an exact copy); left out by --dedupe"
    )
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "src").rglob("*")) == before
    info = json.loads(run(capsys, "data", "info", "shop", "--json")[1])
    assert info["duplicates"]["images_in_groups"] == 0
    fps = np.load(ds.version_root / "fingerprints.npy")
    assert len(fps) == len(ds.labels) and (fps == fingerprint_chunk(np.asarray(ds.images))).all()


def test_dedupe_says_when_the_copies_were_filed_under_two_classes(tmp_path, capsys):
    """One photo under a and under b (the clothing photos hold such a pair): one copy is
    kept, and the report row and a warning say the labels disagree."""
    for i in range(4):
        save_array(tmp_path / "src" / "train" / "ab"[i % 2] / f"t{i}.png", photo(i))
    save_array(tmp_path / "src" / "train" / "b" / "same.png", photo(0))  # t0 is under a
    argv = ["data", "import", str(tmp_path / "src"), "--name", "mixed", "--dedupe"]
    code, _, err = run(capsys, *argv, "--val-fraction", "0")
    assert code == 0, err
    src = str(tmp_path / "src")
    (row,) = read_csv(load_dataset("mixed").root / "import-report.csv")
    copies = {
        f"{src}/train/a/t0.png": "'a' here and 'b'",
        f"{src}/train/b/same.png": "'b' here and 'a'",
    }
    assert row["path"] in copies  # one of the two left out, the other kept
    assert f"filed under {copies[row['path']]} there: one label is wrong" in row["reason"]
    assert row["reason"].endswith("; left out by --dedupe")
    assert f"{row['path']}: duplicate of " in err and "--dedupe keeps the " in err


# ---------------------------------------------------------------- eval


def test_eval_reports_accuracy_without_train_duplicates(tmp_path, capsys):
    import imgclf
    from helpers_train import tiny_recipe
    from imgclf.evaluate.runs import evaluate
    from imgclf.inference.engine import run_logits
    from imgclf.inference.runs import load_run

    planted_source(tmp_path / "src", n_train=12)
    ds = import_dataset(tmp_path / "src", "shop")
    trained = imgclf.train(
        tiny_recipe(epochs=1), ds, out=tmp_path / "run", threads=1, progress=False
    )
    leaked = len(PLANTED)
    summary = json.loads((trained.path / "summary.json").read_text())
    assert summary["val_duplicate_free"]["with_train_duplicate"] == leaked
    assert summary["val_duplicate_free"]["count"] == summary["val_count"] - leaked == 3
    code, out, err = run(capsys, "eval", str(trained.path), "--data", "shop", "--json")
    assert code == 0, err
    free = json.loads(out)["duplicate_free"]
    logits, labels = run_logits(load_run(trained.path), load_dataset("shop"), "val")
    correct = (logits.argmax(1) == labels).numpy()
    files = load_dataset("shop").files()
    clean = np.array(["other" in files[i] for i in load_dataset("shop").indices("val")])
    assert free == {"accuracy": correct[clean].mean(), "count": 3, "with_train_duplicate": leaked}
    assert summary["val_duplicate_free"]["accuracy"] == free["accuracy"]
    text = run(capsys, "eval", str(trained.path), "--data", "shop")[1]
    assert f"{leaked} images have a near duplicate in train: accuracy " in text
    assert f"{free['accuracy']:.4f} on the 3 without" in text
    # A split without train copies (train itself) reports nothing extra.
    assert evaluate(trained.path, "shop", split="train").duplicate_free is None


def test_report_shows_the_data_sets_check_once_it_has_run(tmp_path, capsys):
    import imgclf
    from helpers_train import tiny_recipe

    planted_source(tmp_path / "src")
    ds = import_dataset(tmp_path / "src", "shop")
    trained = imgclf.train(
        tiny_recipe(epochs=1), ds, out=tmp_path / "run", threads=1, progress=False
    )
    html = tmp_path / "r.html"
    assert run(capsys, "report", str(trained.path), "--out", str(html))[0] == 0
    assert "Duplicates in the data set" not in html.read_text()
    assert run(capsys, "data", "check", "shop", "--out", str(tmp_path / "chk"), NO_EMBED)[0] == 0
    assert run(capsys, "report", str(trained.path), "--out", str(html))[0] == 0
    text = html.read_text()
    section = text[text.index("Duplicates in the data set (imgclf data check)") :]
    section = section[: section.index("</section>")]
    assert (
        '<td>exact</td><td class="num">1</td><td>train 0, val 0</td><td>train↔val 1</td>' in section
    )
    assert '<img src="data:image/png;base64,' in section and "closest cross-split pairs" in section
