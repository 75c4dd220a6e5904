"""Suspect training labels (issue #33, item 2): the confident-learning rule against a
loop written from the paper, the folds, and ``imgclf data check NAME --labels`` end to end
on a generated set with one planted label flip (Lite0's offline ImageNet weights, eager
PyTorch on ~40 images: seconds)."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from imgclf.cli import main
from imgclf.data.dup_check import relative_files
from imgclf.evaluate.confident import confident_issues, label_quality, thresholds
from imgclf.evaluate.label_issues import CSV_NAME, PNG_NAME
from imgclf.train.out_of_fold import cross_validate, stratified_folds

# ------------------------------------------------------------------ the rule, by hand


def _reference(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eqs. (1)-(2) of Northcutt et al. (JAIR 2021) as loops: (thresholds, issue mask)."""
    classes = probs.shape[1]
    t = np.array(
        [
            np.mean([probs[i, j] for i in range(len(labels)) if labels[i] == j])
            for j in range(classes)
        ]
    )
    issue = np.zeros(len(labels), bool)
    for i, p in enumerate(probs):
        confident = [j for j in range(classes) if p[j] >= t[j]]
        if confident:
            star = max(confident, key=lambda j: p[j])
            issue[i] = star != labels[i] and p.argmax() != labels[i]
    return t, issue


def test_confident_rule_matches_the_paper_on_random_probabilities():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 300)
    logits = rng.normal(0, 1, (300, 4))
    logits[np.arange(300), labels] += 1.5  # mostly right, some not
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    found = confident_issues(probs, labels)
    t, issue = _reference(probs, labels)
    np.testing.assert_allclose(found.thresholds, t)
    assert 0 < issue.sum() < 300
    np.testing.assert_array_equal(found.issue, issue)
    assert sorted(found.ranked) == list(np.flatnonzero(issue))
    scores = probs[found.ranked, labels[found.ranked]]
    assert np.all(np.diff(scores) >= 0)  # most suspect (lowest self-confidence) first
    assert found.joint.sum() == (found.suggested >= 0).sum()


def test_a_contradicted_label_is_flagged_with_the_class_it_looks_like():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8], [0.1, 0.9], [0.95, 0.05]])
    labels = np.array([0, 0, 0, 1, 1, 1])  # the last one: labelled 1, looks like 0
    found = confident_issues(probs, labels)
    assert list(found.ranked) == [5] and found.suggested[5] == 0
    assert found.score[5] == pytest.approx(0.05)
    margin = label_quality(probs, labels, "normalized_margin")
    assert margin[5] == pytest.approx((0.05 - 0.95 + 1) / 2)
    # a class no image is labelled has no threshold any image can reach
    assert thresholds(probs, np.zeros(6, dtype=np.int64))[1] == np.inf


def test_folds_hold_each_class_in_equal_shares_and_are_seeded():
    labels = np.repeat([0, 1, 2], [10, 7, 25])
    fold = stratified_folds(labels, 5, seed=1)
    for c, n in zip([0, 1, 2], [10, 7, 25], strict=True):
        counts = np.bincount(fold[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n
    assert np.array_equal(fold, stratified_folds(labels, 5, seed=1))
    assert not np.array_equal(fold, stratified_folds(labels, 5, seed=2))


def test_out_of_fold_probabilities_come_from_a_head_that_never_saw_the_row():
    """Each row's probabilities are those of a head fitted on the other folds alone, and
    a flipped label among well-separated clusters is contradicted by them."""
    import torch

    from imgclf.train.out_of_fold import fit_predict

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 8))
    labels = np.repeat([0, 1, 2], 10)
    x = torch.as_tensor(centres[labels] + rng.normal(0, 0.5, (30, 8)))
    noisy = labels.copy()
    noisy[4] = 2
    probs, fold = cross_validate(x, noisy, 3, folds=5)
    assert probs.shape == (30, 3) and np.allclose(probs.sum(1), 1)
    y = torch.as_tensor(noisy)
    for k in range(5):
        held = torch.as_tensor(fold == k)
        alone = fit_predict(x[~held], y[~held], x[held], 3).numpy()
        np.testing.assert_allclose(probs[fold == k], alone, atol=1e-12)
    assert probs[4].argmax() == 0 and probs[4, 2] < 0.5
    assert list(confident_issues(probs, noisy).ranked[:1]) == [4]


def test_a_named_model_replaces_the_recipes_at_its_own_input_size():
    from imgclf.evaluate.label_issues import check_recipe

    recipe = check_recipe("lite0-photo", "efficientnet_lite1")
    assert (recipe.model, recipe.input_size, recipe.pretrained) == (
        "efficientnet_lite1",
        None,
        True,
    )
    assert check_recipe("lite0-photo", None).input_size == 224


def test_files_are_named_relative_to_the_imported_folder():
    """label_issues.csv names files as duplicates.csv does (one helper for both)."""
    ds = SimpleNamespace(
        meta={"source": "/data/photos"},
        files=lambda: ["/data/photos/train/cat/1.jpg", "/elsewhere/2.jpg", "arrays[3]"],
    )
    assert relative_files(ds) == ["train/cat/1.jpg", "/elsewhere/2.jpg", "arrays[3]"]


# ------------------------------------------------------------------ the command


CLASSES = {"red": (200, 40, 40), "green": (40, 170, 40), "blue": (40, 40, 200)}


def _image(cls: str, rng: np.random.Generator) -> np.ndarray:
    """A class's look: its colour, with stripes (red), a checkerboard (green) or plain
    noise (blue), and per-image noise."""
    pixels = np.array(CLASSES[cls], dtype=np.float64) + rng.normal(0, 25, (32, 32, 3))
    rows, cols = np.mgrid[:32, :32]
    if cls == "red":
        pixels[rows % 8 < 4] *= 0.5
    elif cls == "green":
        pixels[(rows // 8 + cols // 8) % 2 == 0] *= 0.5
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _folder(root: Path, per_class: int = 10) -> Path:
    """``root/{train,val}/<class>/*.png``, and one red image filed under train/green."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_image(cls, rng)).save(root / split / cls / f"{i:02d}.png")
    Image.fromarray(_image("red", rng)).save(root / "train" / "green" / "planted.png")
    return root


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """A generated set with one planted flip, imported and checked by the CLI once:
    (exit code, --out folder, the data set's folder)."""
    base = tmp_path_factory.mktemp("labels")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLF_HOME", str(base / "home"))
        assert main(["data", "import", str(_folder(base / "src")), "--name", "planted"]) == 0
        out = base / "out"
        code = main(["data", "check", "planted", "--labels", "--out", str(out)])
    return code, out, base / "home" / "datasets" / "planted"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_cli_ranks_the_planted_flip_first(checked, capsys):
    code, out, _ = checked
    assert code == 0
    with open(out / CSV_NAME, newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == ["file", "given", "suggested", "score"]
    rows = _rows(out / CSV_NAME)
    assert rows[0]["file"] == "train/green/planted.png"
    assert (rows[0]["given"], rows[0]["suggested"]) == ("green", "red")
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores) and 0 <= scores[0] < 0.5
    assert len(rows) <= 3  # a clean set of generated looks is not flagged wholesale


def test_gallery_and_copies_in_the_dataset_folder(checked):
    _, out, dataset = checked
    assert dataset.is_symlink()  # the name points at the version folder the files are in
    for folder in (out, dataset):
        with Image.open(folder / PNG_NAME) as png:
            assert png.format == "PNG" and png.width > 100
    assert (dataset / CSV_NAME).read_bytes() == (out / CSV_NAME).read_bytes()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files


def test_report_shows_the_suspects_of_the_runs_data_set(checked, tmp_path):
    from helpers_train import tiny_recipe
    from imgclf.report import build_report
    from imgclf.train import train

    _, _, dataset = checked
    run = train(tiny_recipe(epochs=1), dataset, out=tmp_path / "run", threads=1, progress=False)
    build_report([run.path], tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    section = page.split("<h3>Suspect training labels (planted)</h3>", 1)[1].split("<h3>")[0]
    assert re.search(r'<img src="data:image/png;base64,[^"]+" alt="run suspect training', section)
    assert "<td>train/green/planted.png</td><td>green</td><td>red</td>" in section
    report = build_report([run.path], tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "### Suspect training labels (planted)" in text
    assert "| 1 | train/green/planted.png | green | red |" in text
    assert tmp_path / "report_files" / "run-label_issues.png" in report.files


@pytest.mark.parametrize(
    ("counts", "args", "expected"),
    [
        (
            {"red": 10, "green": 3},
            [],
            "error: dataset 'small': class 'green' has 3 training image(s), fewer than the 5 "
            "folds; use --folds 3 or add images to it\n",
        ),
        (
            {"train/red": 6, "val/red": 1, "val/green": 2},  # green: in val alone
            [],
            "error: dataset 'small': 1 class ('red') in its training split; suspect labels "
            "need two classes or more: import the other classes too\n",
        ),
        (
            {"red": 6, "green": 6},
            ["--recipe", "fast"],
            "error: model 'fast' would start untrained here: suspect labels need a pretrained "
            "backbone's features; use the default recipe (lite0-photo) or another with "
            "pretrained: true\n",
        ),
    ],
)
def test_sets_too_small_for_the_folds_are_one_line_errors(tmp_path, capsys, counts, args, expected):
    rng = np.random.default_rng(0)
    for folder, n in counts.items():
        (tmp_path / "src" / folder).mkdir(parents=True)
        for i in range(n):
            image = _image(folder.rsplit("/", 1)[-1], rng)
            Image.fromarray(image).save(tmp_path / "src" / folder / f"{i}.png")
    main(["data", "import", str(tmp_path / "src"), "--name", "small", "--val-fraction", "0"])
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["data", "check", "small", "--labels", "--out", str(out), *args]) == 2
    assert capsys.readouterr().err == expected
    assert not out.exists()  # nothing written, not even the folder


def test_no_suspects_leave_the_header_alone_and_no_stale_gallery(tmp_path):
    from imgclf.data import load_dataset
    from imgclf.evaluate.label_issues import write_outputs

    rng = np.random.default_rng(0)
    for cls in ("red", "green"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(_image(cls, rng)).save(tmp_path / "src" / cls / f"{i}.png")
    main(["data", "import", str(tmp_path / "src"), "--name", "clean", "--val-fraction", "0"])
    ds = load_dataset("clean")
    idx = ds.indices("train")
    labels = np.asarray(ds.labels[idx])
    issues = confident_issues(np.eye(2)[labels] * 0.8 + 0.1, labels)  # all agree
    assert len(issues.ranked) == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / PNG_NAME).write_bytes(b"an older check's gallery")
    written, notes = write_outputs(ds, out, idx, labels, issues, [])
    assert (out / CSV_NAME).read_text() == "file,given,suggested,score\n"
    assert not (out / PNG_NAME).exists() and not (ds.root / PNG_NAME).exists()
    assert written == [out / CSV_NAME, ds.root / CSV_NAME] and notes == []


def test_check_without_labels_looks_for_duplicates_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IMGCLF_HOME", str(tmp_path / "home"))
    assert main(["data", "import", str(_folder(tmp_path / "src", 6)), "--name", "p"]) == 0
    out = tmp_path / "out"
    assert main(["data", "check", "p", "--out", str(out)]) == 0
    assert "near duplicates" in capsys.readouterr().out
    assert (out / "duplicates.csv").is_file()
    assert not (out / "label_issues.csv").exists()  # suspect labels only with --labels


def test_the_parser_offers_the_rankings_the_rule_has():
    from imgclf.cli.data import RANK_BY as offered
    from imgclf.evaluate.confident import RANK_BY

    assert offered == RANK_BY


def test_folds_below_two_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "check", "x", "--labels", "--folds", "1"])
    assert exc.value.code == 2
    assert "--folds: 1 must be at least 2" in capsys.readouterr().err
