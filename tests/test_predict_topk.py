"""``imgclf predict --top-k K``, ``--probs`` and ``--format jsonl`` (issue #32, item 2): the
ranked labels and every class's score, as CSV columns or one JSON object per file. Rows
stay one per input file, in natural order, with a corrupt file keeping its row in the
middle of a chunk; the scores are the vote's.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_runs import COLOURS, noisy_image, session_runs
from imgclf.cli import main
from imgclf.csv_safe import csv_text
from imgclf.inference.decode import Item
from imgclf.inference.rows import Plan, top_k_pairs

CLASSES = sorted(COLOURS)  # bird, cat, dog: the runs' class order
# Natural order: 1, 2, 3 (corrupt), 10, 11, 20; chunks of 2 put the corrupt one first in
# the second chunk, and 10 after it, where a text sort would put it before 2.
GOOD = {"1.png": "cat", "2.png": "dog", "10.png": "bird", "11.png": "cat", "20.png": "dog"}
CORRUPT = "3.png"
ORDER = ["1.png", "2.png", "3.png", "10.png", "11.png", "20.png"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return session_runs(tmp_path_factory)


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    root.mkdir()
    rng = np.random.default_rng(5)
    for name, cls in GOOD.items():
        Image.fromarray(noisy_image(COLOURS[cls], rng=rng)).save(root / name)
    (root / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return root


def run_predict(runs, root: Path, out: Path, *options: str) -> int:
    args = ["predict", *map(str, runs), "--input", str(root), "--out", str(out)]
    return main([*args, "--batch-size", "2", *options])


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------- ranking


def test_top_k_pairs_highest_first_and_ties_in_class_order():
    probs = np.array([0.2, 0.5, 0.2, 0.1])
    assert top_k_pairs(probs, ["a", "b", "c", "d"], 3) == [("b", 0.5), ("a", 0.2), ("c", 0.2)]
    assert top_k_pairs(probs, ["a", "b", "c", "d"], 1) == [("b", 0.5)]
    tied = np.array([0.25, 0.25, 0.25, 0.25], dtype=np.float32)
    assert [c for c, _ in top_k_pairs(tied, ["d", "c", "b", "a"], 4)] == ["d", "c", "b", "a"]


# ---------------------------------------------------------------------------- CSV


def test_top_k_and_probs_columns_keep_one_row_per_file_in_order(trained, inputs, tmp_path):
    out = tmp_path / "p.csv"
    assert run_predict([trained.run32], inputs, out, "--top-k", "3", "--probs") == 0
    header, rows = read_csv(out)
    probs = [f"prob_{c}" for c in CLASSES]
    ranked = ["label_2", "confidence_2", "label_3", "confidence_3"]
    assert header == ["file", "label", "confidence", *ranked, *probs, "error"]
    assert [r["file"] for r in rows] == ORDER
    broken = rows[ORDER.index(CORRUPT)]
    assert broken["error"] and all(broken[c] == "" for c in header if c not in ("file", "error"))
    for row in (r for r in rows if r["file"] != CORRUPT):
        assert row["error"] == ""
        scores = {c: float(row[f"prob_{c}"]) for c in CLASSES}
        assert math.isclose(sum(scores.values()), 1.0, abs_tol=1e-5)
        labels = [row["label"], row["label_2"], row["label_3"]]
        confidences = [float(row[c]) for c in ("confidence", "confidence_2", "confidence_3")]
        assert sorted(labels) == CLASSES  # every class once, at K = the number of classes
        assert confidences == sorted(confidences, reverse=True)
        assert [scores[c] for c in labels] == confidences  # each label's own probability
        assert row["label"] == GOOD[row["file"]]
    # the label and confidence columns are what they were without the new options
    plain = tmp_path / "plain.csv"
    assert run_predict([trained.run32], inputs, plain) == 0
    _, before = read_csv(plain)
    assert [(r["label"], r["confidence"]) for r in before] == [
        (r["label"], r["confidence"]) for r in rows
    ]


def test_hard_vote_ranks_vote_shares_with_the_tie_break_first(trained, inputs, tmp_path):
    """Two runs that disagree tie at 0.5 each: the preferred run's label leads, even when
    class order would put the other one first, and the other follows at 0.5."""
    out = tmp_path / "hard.csv"
    runs = [trained.run32, trained.swapped]
    assert run_predict(runs, inputs, out, "--top-k", "2", "--prefer", "swapped") == 0
    header, rows = read_csv(out)
    assert header[:5] == ["file", "label", "confidence", "label_2", "confidence_2"]
    assert header[5:] == ["label_run32", "label_swapped", "error"]
    assert [r["file"] for r in rows] == ORDER
    read = [r for r in rows if not r["error"]]
    disagree = [r for r in read if r["label_run32"] != r["label_swapped"]]
    assert disagree, "the swapped run should disagree on cats and dogs"
    for r in disagree:
        assert (r["label"], r["label_2"]) == (r["label_swapped"], r["label_run32"])
        assert r["confidence"] == r["confidence_2"] == "0.500000"
    assert any(r["label"] > r["label_2"] for r in disagree)  # against class order
    for r in read:
        if r not in disagree:
            assert r["label"] == r["label_run32"] and r["confidence"] == "1.000000"
            assert r["confidence_2"] == "0.000000"


# ---------------------------------------------------------------------------- JSON Lines


def test_jsonl_from_the_suffix_holds_the_soft_votes_probabilities(trained, inputs, tmp_path):
    runs = [trained.run32, trained.run16]
    singles = []
    for run in runs:
        out = tmp_path / f"{run.name}.jsonl"
        assert run_predict([run], inputs, out, "--probs") == 0
        singles.append(read_jsonl(out))
    out = tmp_path / "soft.jsonl"
    assert run_predict(runs, inputs, out, "--vote", "soft", "--top-k", "2", "--probs") == 0
    records = read_jsonl(out)
    assert [r["file"] for r in records] == ORDER
    keys = ["file", "label", "confidence", "top_k", "models", "probs", "error"]
    assert all(list(r) == keys for r in records)  # one schema, failed files included
    broken = records[ORDER.index(CORRUPT)]
    assert broken["error"] and broken["label"] is None and broken["confidence"] is None
    assert broken["top_k"] == [] and broken["probs"] is None
    assert broken["models"] == {"run32": None, "run16": None}
    for i, r in enumerate(records):
        if r["file"] == CORRUPT:
            continue
        assert r["error"] is None
        mean = {c: (singles[0][i]["probs"][c] + singles[1][i]["probs"][c]) / 2 for c in CLASSES}
        assert r["probs"] == pytest.approx(mean, abs=1e-6)  # the vote's, not one run's
        assert r["top_k"][0] == [r["label"], r["confidence"]]
        assert [label for label, _ in r["top_k"]] == sorted(mean, key=mean.get, reverse=True)[:2]
        assert r["models"] == {"run32": singles[0][i]["label"], "run16": singles[1][i]["label"]}


def test_format_jsonl_without_out_and_with_one_run(trained, inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(trained.run32), "--input", str(inputs), "--format", "jsonl"]) == 0
    records = read_jsonl(tmp_path / "predictions.jsonl")
    assert [r["file"] for r in records] == ORDER
    assert all(list(r) == ["file", "label", "confidence", "top_k", "error"] for r in records)
    assert all(len(r["top_k"]) == 1 for r in records if r["error"] is None)
    assert not (tmp_path / "predictions.csv").exists()


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--top-k", "0"], "error: --top-k 0: give 1 to 3, the number of classes the runs know"),
        (["--top-k", "4"], "error: --top-k 4: give 1 to 3, the number of classes the runs know"),
        (["--format", "kaggle", "--top-k", "2"], "error: --top-k and --probs add columns"),
        (["--vote", "hard", "--probs", "RUN2"], "error: --probs: a hard vote counts the runs'"),
    ],
)
def test_bad_top_k_and_probs_are_one_line_errors(
    trained, inputs, tmp_path, capsys, options, message
):
    out = tmp_path / "p.csv"
    runs = [trained.run32]
    if "RUN2" in options:
        options = [o for o in options if o != "RUN2"]
        runs.append(trained.swapped)
    assert run_predict(runs, inputs, out, *options) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists()


def test_class_names_in_the_new_columns_are_quoted_for_spreadsheets():
    """Class names come from the user's folders: a ranked label cell gets the ' that
    every other name cell gets (imgclf.csv_safe); the prob_ header starts with a letter."""
    plan = Plan(["=HYPERLINK(1)", "b"], ["r"], "hard", None, None, "default", 2, True)
    probs = np.array([[[0.3, 0.7]]], dtype=np.float32)
    rows = plan.rows([Item("x.png", path="x.png")], [None], probs)
    text = csv_text([plan.header(), *rows])
    header, row = text.splitlines()
    assert header == "file,label,confidence,label_2,confidence_2,prob_=HYPERLINK(1),prob_b,error"
    assert row == "x.png,b,0.700000,'=HYPERLINK(1),0.300000,0.300000,0.700000,"
