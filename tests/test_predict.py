"""``imgclf predict``: one row per image file, in natural order, from folders, archives and
lists; failed files keep their row; several runs at different input sizes vote; the CSV
is written atomically."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_archive, save_image
from helpers_runs import COLOURS, noisy_image, session_runs
from imgclf.cli import main
from imgclf.data.scan import scan_source
from imgclf.data.sources import natural_key
from imgclf.errors import CheckpointError, DataError, UserError
from imgclf.inference import engine
from imgclf.inference.engine import run_logits
from imgclf.inference.runs import load_run
from imgclf.predict import PredictFailures, list_inputs, predict

# Relative path → class colour. Nested folders, numbers that sort wrongly as text, mixed
# formats and sizes (a non-square photo, a tiny image, grey and RGBA modes).
IMAGES = {
    "1.png": "cat",
    "2.png": "dog",
    "10.png": "bird",
    "sub/3.jpg": "cat",
    "sub/deeper/20.png": "dog",
    "sub/deeper/9.bmp": "bird",
    "wide.png": "cat",
    "tiny.png": "dog",
}
SIZES = {"wide.png": (48, 80), "tiny.png": (8, 8)}
CORRUPT = "sub/broken.png"
NOT_IMAGES = ["notes.txt", "sub/labels.csv"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return session_runs(tmp_path_factory)


def make_inputs(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for rel, cls in IMAGES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy_image(COLOURS[cls], SIZES.get(rel, (32, 32)), rng)).save(path)
    Image.new("L", (32, 32), 90).save(root / "grey.png")
    Image.new("RGBA", (32, 32), (*COLOURS["bird"], 128)).save(root / "sub" / "alpha.png")
    (root / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    for rel in NOT_IMAGES:
        (root / rel).write_text("not an image\n")
    return root


def image_files(root: Path) -> list[str]:
    return [
        str(p.relative_to(root).as_posix())
        for p in root.rglob("*.*")
        if p.is_file() and p.suffix in (".png", ".jpg", ".bmp")
    ]


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# ---------------------------------------------------------------------------- order


def test_natural_key_sorts_numbers_as_numbers_per_path_part():
    names = [
        "10.png",
        "2.png",
        "1.png",
        "b/1.png",
        "a10/1.png",
        "a2/5.png",
        "img12.png",
        "img2.png",
        "IMG3.png",
        "02.png",
    ]
    assert sorted(names, key=natural_key) == [
        "1.png",
        "02.png",
        "2.png",
        "10.png",
        "a2/5.png",
        "a10/1.png",
        "b/1.png",
        "img2.png",
        "IMG3.png",
        "img12.png",
    ]


# ---------------------------------------------------------------------------- folders


def test_folder_every_image_exactly_one_row_in_natural_order(trained, tmp_path):
    root = make_inputs(tmp_path / "in")
    out = tmp_path / "pred.csv"
    result = predict([trained.run32], root, out)

    header, rows = read_rows(out)
    assert header == ["file", "label", "confidence", "error"]
    files = [r["file"] for r in rows]
    assert sorted(files) == sorted(image_files(root))  # none dropped, none duplicated
    assert len(files) == len(set(files))
    assert files == sorted(files, key=natural_key)
    assert files.index("2.png") < files.index("10.png")
    assert result.rows == len(rows) == len(IMAGES) + 3
    assert result.failures == 1 and result.failed[0][0] == CORRUPT
    assert sum(result.ignored.values()) == len(NOT_IMAGES)
    assert "ignored 2 files" in result.summary() and "1 file could not be read" in result.summary()

    by_file = {r["file"]: r for r in rows}
    assert by_file[CORRUPT]["label"] == "" and by_file[CORRUPT]["confidence"] == ""
    assert by_file[CORRUPT]["error"]
    for rel in files:
        if rel != CORRUPT:
            assert by_file[rel]["error"] == ""
            assert by_file[rel]["label"] in COLOURS
            assert 0.0 < float(by_file[rel]["confidence"]) <= 1.0


def test_predictions_match_eval_on_the_same_images(trained, tmp_path):
    """Each run preprocesses as eval does: same labels, same probabilities, per file,
    for the 32-px run and for the 16-px one (whose batches are resized)."""
    ds = trained.ds
    sources = ds.files()
    for run in (trained.run32, trained.run16):
        out = tmp_path / f"{run.name}.csv"
        predict([run], trained.src, out)
        _, rows = read_rows(out)
        by_file = {str(trained.src / r["file"]): r for r in rows}
        logits, _ = run_logits(load_run(run), ds, "all", device="cpu")
        probs = torch.softmax(logits, 1).numpy()
        classes = load_run(run).classes
        assert len(by_file) == len(sources)
        for i, source in enumerate(sources):
            row = by_file[source]
            assert row["label"] == classes[probs[i].argmax()], source
            assert float(row["confidence"]) == pytest.approx(probs[i].max(), abs=1e-5)


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_archive_gives_the_same_rows_as_the_folder(trained, tmp_path, suffix):
    root = make_inputs(tmp_path / "in")
    archive = make_archive(root, tmp_path / f"images{suffix}")
    predict([trained.run32], root, tmp_path / "folder.csv")
    result = predict([trained.run32], archive, tmp_path / "archive.csv")
    assert read_rows(tmp_path / "archive.csv") == read_rows(tmp_path / "folder.csv")
    assert result.failures == 1


def test_list_file_paths_relative_to_the_list(trained, tmp_path):
    root = make_inputs(tmp_path / "in")
    listing = root / "sub" / "list.txt"
    listing.write_text("deeper/20.png\n../10.png\n\n3.jpg\nmissing.png\ndeeper/20.png\n")
    result = predict([trained.run32], listing, tmp_path / "pred.csv")
    _, rows = read_rows(tmp_path / "pred.csv")
    assert [r["file"] for r in rows] == ["3.jpg", "../10.png", "deeper/20.png", "missing.png"]
    missing = rows[-1]
    assert missing["label"] == "" and "cannot read file" in missing["error"]
    assert result.failures == 1
    assert result.ignored == {"listed twice": 1}


def test_a_single_image_path_is_a_one_row_input(trained, tmp_path):
    root = make_inputs(tmp_path / "in")
    result = predict([trained.run32], root / "2.png", tmp_path / "pred.csv")
    assert result.rows == 1
    assert [r["file"] for r in read_rows(tmp_path / "pred.csv")[1]] == ["2.png"]


def test_no_images_is_an_error_that_says_what_was_found(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"no image files.*1 other files ignored"):
        predict([trained.run32], tmp_path / "empty", tmp_path / "pred.csv")
    assert not (tmp_path / "pred.csv").exists()


def test_small_batches_keep_rows_in_place_around_failures(trained, tmp_path):
    root = make_inputs(tmp_path / "in")
    predict([trained.run32], root, tmp_path / "big.csv")
    predict([trained.run32], root, tmp_path / "small.csv", batch_size=2, workers=3)
    assert read_rows(tmp_path / "small.csv") == read_rows(tmp_path / "big.csv")


# Litter a class tree picks up on macOS, Windows and Linux desktops; every one of the .jpg
# files is a real image, so only the hidden-file rule can keep it out.
LITTER = {
    "__MACOSX/a.jpg": "hidden file or OS metadata",
    "cat/._b.jpg": "hidden file or OS metadata",
    "cat/.hidden.jpg": "hidden file or OS metadata",
    "cat/.DS_Store": "hidden file or OS metadata",
    "cat/.thumbnails/t.jpg": "hidden file or OS metadata",
    "cat/Thumbs.db": "not an image file extension",
}
DATA = ["cat/c.jpg", "dog/d.jpg"]


@pytest.mark.parametrize("suffix", ["", ".zip"])
def test_predict_leaves_out_exactly_the_files_import_leaves_out(tmp_path, suffix):
    root = tmp_path / "in"
    for rel in [*LITTER, *DATA]:
        if rel.endswith(".jpg"):
            save_image(root / rel)
        else:
            (root / rel).write_bytes(b"\0\0")
    src = make_archive(root, tmp_path / f"in{suffix}") if suffix else root
    scanned, inputs = scan_source(src), list_inputs(src)

    def rel(source: str) -> str:
        return source.removeprefix(f"{src}/")

    assert sorted(rel(s.source) for s in scanned.samples) == DATA
    assert sorted(item.file for item in inputs.items) == DATA
    assert {rel(k.path): k.reason for k in scanned.skipped} == LITTER
    assert inputs.ignored == {"hidden file or OS metadata": 5, "not an image file": 1}


def test_a_hidden_broken_link_gets_no_row(tmp_path):
    save_image(tmp_path / "in" / "c.jpg")
    (tmp_path / "in" / ".gone.jpg").symlink_to(tmp_path / "missing.jpg")
    inputs = list_inputs(tmp_path / "in")
    assert [item.file for item in inputs.items] == ["c.jpg"]
    assert inputs.ignored == {"hidden file or OS metadata": 1}


# ---------------------------------------------------------------------------- formats


def test_kaggle_format_writes_id_label_with_file_stems(trained, tmp_path):
    root = make_inputs(tmp_path / "in")
    (root / CORRUPT).unlink()
    (root / "sub" / "alpha.png").unlink()
    shutil.rmtree(root / "sub" / "deeper")
    predict([trained.run32], root, tmp_path / "kaggle.csv", format="kaggle")
    header, rows = read_rows(tmp_path / "kaggle.csv")
    assert header == ["id", "label"]
    assert [r["id"] for r in rows] == ["1", "2", "10", "grey", "3", "tiny", "wide"]
    assert all(r["label"] in COLOURS for r in rows)


def test_kaggle_format_refuses_duplicate_ids(trained, tmp_path):
    root = make_inputs(tmp_path / "in")
    Image.new("RGB", (32, 32)).save(root / "sub" / "2.png")
    with pytest.raises(DataError, match="both give id '2'"):
        predict([trained.run32], root, tmp_path / "kaggle.csv", format="kaggle")


# ---------------------------------------------------------------------------- several runs


def test_runs_at_different_input_sizes_vote_together(trained, tmp_path):
    root = make_inputs(tmp_path / "in")
    runs = [trained.run32, trained.run16]
    for vote in ("hard", "soft", "weighted"):
        predict(runs, root, tmp_path / f"{vote}.csv", vote=vote)
        header, rows = read_rows(tmp_path / f"{vote}.csv")
        assert header == ["file", "label", "confidence", "label_run32", "label_run16", "error"]
        assert len(rows) == len(IMAGES) + 3
    for run in runs:
        predict([run], root, tmp_path / f"{run.name}.csv")
        _, single = read_rows(tmp_path / f"{run.name}.csv")
        assert [r["label"] for r in single] == [r[f"label_{run.name}"] for r in rows]


def test_hard_vote_ties_go_to_the_preferred_run(trained, tmp_path):
    """With two runs every disagreement is a tie: the preferred run's label wins."""
    runs = [trained.run32, trained.swapped]
    predict(runs, trained.src, tmp_path / "default.csv")
    predict(runs, trained.src, tmp_path / "prefer.csv", prefer=["swapped"])
    _, default = read_rows(tmp_path / "default.csv")
    _, preferred = read_rows(tmp_path / "prefer.csv")
    disagree = [r for r in default if r["label_run32"] != r["label_swapped"]]
    assert disagree, "the swapped run should disagree on cats and dogs"
    assert all(r["label"] == r["label_run32"] for r in default)
    assert all(r["label"] == r["label_swapped"] for r in preferred)
    assert {float(r["confidence"]) for r in disagree} == {0.5}


def test_weights_by_name_and_the_errors_for_bad_vote_options(trained, tmp_path):
    root = make_inputs(tmp_path / "in")
    runs = [trained.run32, trained.swapped]
    out = tmp_path / "w.csv"
    predict(runs, root, out, vote="weighted", weights=["run32:1", "swapped:0"])
    _, rows = read_rows(out)
    assert all(r["label"] == r["label_run32"] for r in rows if not r["error"])
    with pytest.raises(UserError, match="missing swapped"):
        predict(runs, root, out, vote="weighted", weights={"run32": 1.0})
    with pytest.raises(UserError, match="no such run; runs are: run32, swapped"):
        predict(runs, root, out, prefer=["nope"])
    with pytest.raises(UserError, match="does not apply to --vote soft"):
        predict(runs, root, out, vote="soft", prefer=["swapped"])
    with pytest.raises(UserError, match="expected RUN:WEIGHT"):
        predict(runs, root, out, vote="weighted", weights=["run32=1", "swapped:1"])


def test_duplicate_run_names_are_told_apart(trained, tmp_path):
    copy = tmp_path / "elsewhere" / "run32"
    shutil.copytree(trained.run32, copy)
    predict([trained.run32, copy], trained.src, tmp_path / "p.csv")
    header, _ = read_rows(tmp_path / "p.csv")
    assert header[3:5] == ["label_run32", "label_run32-2"]


def test_runs_with_other_classes_are_refused_with_both_lists(trained, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    state = torch.load(trained.run32 / "best.pt", map_location="cpu", weights_only=True)
    state["class_names"] = ["ant", "bee", "cow"]
    torch.save(state, other / "best.pt")
    with pytest.raises(CheckpointError, match=r"run32 \['bird', 'cat', 'dog'\] vs other"):
        predict([trained.run32, other], trained.src, tmp_path / "p.csv")


def test_tta_predicts_every_row(trained, tmp_path):
    root = make_inputs(tmp_path / "in")
    result = predict([trained.run32, trained.run16], root, tmp_path / "tta.csv", tta=True)
    _, rows = read_rows(tmp_path / "tta.csv")
    assert result.rows == len(rows) == len(IMAGES) + 3


# ---------------------------------------------------------------------------- failures


def test_strict_exits_non_zero_only_for_failed_files(trained, tmp_path, capsys):
    root = make_inputs(tmp_path / "in")
    out = tmp_path / "pred.csv"
    args = ["predict", str(trained.run32), "--input", str(root), "--out", str(out)]
    assert main(args) == 0
    assert "1 file could not be read" in capsys.readouterr().out
    assert main([*args, "--strict"]) == 1
    captured = capsys.readouterr()
    assert out.is_file() and "--strict" in captured.err
    (root / CORRUPT).unlink()
    assert main([*args, "--strict"]) == 0


def test_library_strict_raises_after_writing(trained, tmp_path):
    root = make_inputs(tmp_path / "in")
    with pytest.raises(PredictFailures) as info:
        predict([trained.run32], root, tmp_path / "pred.csv", strict=True)
    assert info.value.exit_code == 1 and info.value.result.failures == 1
    assert (tmp_path / "pred.csv").is_file()


def test_cli_kaggle_and_several_runs(trained, tmp_path, capsys):
    root = make_inputs(tmp_path / "in")
    out = tmp_path / "p.csv"
    code = main(
        [
            "predict",
            str(trained.run32),
            str(trained.run16),
            "--input",
            str(root),
            "--out",
            str(out),
            "--vote",
            "soft",
            "--batch-size",
            "3",
        ]
    )
    assert code == 0
    assert "2 runs, soft vote" in capsys.readouterr().out
    assert read_rows(out)[0][3:5] == ["label_run32", "label_run16"]


def test_output_is_atomic_when_prediction_fails_midway(trained, tmp_path, monkeypatch):
    root = make_inputs(tmp_path / "in")
    out = tmp_path / "pred.csv"
    out.write_text("old predictions\n")
    real = engine.chunk_probs
    calls = []

    def fail_on_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "chunk_probs", fail_on_third_chunk)
    with pytest.raises(RuntimeError, match="device lost"):
        predict([trained.run32], root, out, batch_size=2)
    assert out.read_text() == "old predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "pred.csv"]  # no temp file

    fresh = tmp_path / "fresh.csv"
    calls.clear()
    with pytest.raises(RuntimeError):
        predict([trained.run32], root, fresh, batch_size=2)
    assert not fresh.exists()


def test_symlinks_never_drop_an_input(trained, tmp_path):
    """A symlinked class folder is read through; a broken link keeps its row, with why."""
    real = tmp_path / "real"
    real.mkdir()
    Image.fromarray(noisy_image(COLOURS["cat"])).save(real / "a.png")
    src = tmp_path / "in"
    (src / "dogs").mkdir(parents=True)
    Image.fromarray(noisy_image(COLOURS["dog"])).save(src / "dogs" / "b.png")
    (src / "linked").symlink_to(real, target_is_directory=True)
    (src / "dogs" / "gone.png").symlink_to(tmp_path / "nothing.png")
    out = tmp_path / "p.csv"
    result = predict([trained.run32], src, out)
    with open(out, newline="") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"dogs/b.png", "dogs/gone.png", "linked/a.png"}
    assert rows["linked/a.png"]["label"] and not rows["linked/a.png"]["error"]
    assert rows["dogs/gone.png"]["label"] == "" and "broken" in rows["dogs/gone.png"]["error"]
    assert result.failures == 1
