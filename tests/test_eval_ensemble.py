"""``imgclf eval RUN RUN ...``: each model's and each vote's accuracy, and the best model's
and the ensemble's confusion matrices side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from helpers_runs import session_runs
from imgclf.cli import main
from imgclf.evaluate.compare import Comparison, compare_runs
from imgclf.evaluate.metrics import Metrics, compute_metrics
from imgclf.evaluate.runs import evaluate
from imgclf.inference.runs import unique_names


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return session_runs(tmp_path_factory)


def run_json(capsys, *args: str) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_json_has_the_ensemble_the_models_and_every_vote(trained, tmp_path, capsys):
    runs = [trained.run32, trained.run16, trained.swapped]
    data = str(trained.ds.root)
    got = run_json(
        capsys,
        "eval",
        *map(str, runs),
        "--data",
        data,
        "--split",
        "all",
        "--json",
        "--out-dir",
        str(tmp_path),
    )
    assert {"accuracy", "models", "votes"} <= set(got)
    assert set(got["models"]) == {"run32", "run16", "swapped"}
    assert set(got["votes"]) == {"hard", "soft", "weighted"}
    assert got["vote"] == "hard" and got["accuracy"] == got["votes"]["hard"]
    for run in runs:  # exactly what single-run eval reports
        single = evaluate(run, trained.ds, split="all")
        assert got["models"][run.name] == single.accuracy
    image = tmp_path / "ensemble_confusion.png"
    assert got["confusion_image"] == str(image)
    with Image.open(image) as im:
        assert im.format == "PNG" and im.width > im.height  # two panels in a row


def test_table_lists_each_model_and_each_vote(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out-dir defaults to here
    code = main(
        [
            "eval",
            str(trained.run32),
            str(trained.swapped),
            "--data",
            str(trained.ds.root),
            "--vote",
            "soft",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for name in ("run32", "swapped", "vote hard", "vote soft", "vote weighted"):
        assert name in out
    soft = next(line for line in out.splitlines() if line.startswith("vote soft"))
    assert soft.endswith("ensemble")
    assert (tmp_path / "ensemble_confusion.png").is_file()


def test_single_run_eval_keeps_its_output(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = run_json(capsys, "eval", str(trained.run32), "--data", str(trained.ds.root), "--json")
    assert got["run"] == str(trained.run32) and "per_class" in got
    assert not (tmp_path / "ensemble_confusion.png").exists()


def test_two_model_hard_vote_is_the_preferred_model(trained):
    """Two models tie on every disagreement, so the hard vote follows the preferred one."""
    runs = [trained.run32, trained.swapped]
    by_order = compare_runs(runs, trained.ds, split="all")
    assert by_order.accuracy == by_order.models["run32"].accuracy
    preferred = compare_runs(runs, trained.ds, split="all", prefer=["swapped"])
    assert preferred.accuracy == preferred.models["swapped"].accuracy
    assert preferred.prefer == ["swapped"]
    assert by_order.models["run32"].accuracy != by_order.models["swapped"].accuracy


def test_weights_and_their_defaults(trained):
    runs = [trained.run32, trained.swapped]
    default = compare_runs(runs, trained.ds, split="all", vote="weighted")
    assert set(default.weights) == {"run32", "swapped"}  # validation accuracies
    only_first = compare_runs(
        runs, trained.ds, split="all", vote="weighted", weights={"run32": 1, "swapped": 0}
    )
    assert only_first.accuracy == only_first.models["run32"].accuracy


def test_errors_are_one_line(trained, capsys):
    code = main(
        [
            "eval",
            str(trained.run32),
            str(trained.swapped),
            "--data",
            str(trained.ds.root),
            "--prefer",
            "nobody",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --prefer 'nobody': no such run")


def test_unique_names():
    assert unique_names(["a", "b", "a", "a"]) == ["a", "b", "a-2", "a-3"]
    assert unique_names(["a-2", "a", "a"]) == ["a-2", "a", "a-3"]


def unbalanced_metrics(names: list[str]) -> Metrics:
    """9 "common", 1 "rare", always answered "common": accuracy 0.9, balanced accuracy 0.5,
    macro F1 (18/19 + 0) / 2 = 0.4737; three different numbers, so no column can hide."""
    return compute_metrics(np.tile([0.8, 0.2], (10, 1)), [0] * 9 + [1], names)


def test_eval_text_shows_balanced_accuracy_and_macro_f1_beside_accuracy(capsys):
    from imgclf.cli.results import print_metrics

    print_metrics("run1", unbalanced_metrics(["common", "rare"]))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("run1: accuracy 0.9000  balanced accuracy 0.5000  macro F1 0.4737")

    m = unbalanced_metrics(["common", "rare"])
    right = compute_metrics(np.tile([0.8, 0.2], (10, 1)), [0] * 10, ["common", "rare"])
    comparison = Comparison(
        names=["run1"],
        classes=["common", "rare"],
        dataset="d",
        split="val",
        count=10,
        models={"run1": m},
        votes={"hard": right, "soft": m},
        vote="hard",
        weights=None,
        prefer=[],
    )
    lines = comparison.table().splitlines()
    assert lines[1].split() == ["accuracy", "balanced", "acc", "macro", "F1"]
    assert lines[2].split() == ["run1", "0.9000", "0.5000", "0.4737", "best", "model"]
    assert lines[3].split() == ["vote", "hard", "1.0000", "1.0000", "0.5000", "ensemble"]
    got = json.loads(json.dumps(comparison.to_dict()))
    assert got["scores"]["models"]["run1"] == pytest.approx(
        {"accuracy": 0.9, "balanced_accuracy": 0.5, "macro_f1": 9 / 19}
    )
    assert (got["accuracy"], got["balanced_accuracy"], got["macro_f1"]) == (1.0, 1.0, 0.5)
    assert got["models"] == {"run1": 0.9}  # accuracy alone, as before


def test_eval_json_has_the_same_scores_as_evaluate(trained, tmp_path, capsys):
    data, runs = str(trained.ds.root), [trained.run32, trained.swapped]
    scores = {}
    for run in runs:
        m = evaluate(run, trained.ds, split="all")
        scores[run.name] = {
            "accuracy": m.accuracy,
            "balanced_accuracy": m.balanced_accuracy,
            "macro_f1": m.macro_f1,
        }
    one = run_json(capsys, "eval", str(runs[1]), "--data", data, "--split", "all", "--json")
    assert {k: one[k] for k in scores["swapped"]} == scores["swapped"]
    common = ["--data", data, "--split", "all", "--out-dir", str(tmp_path), "--json"]
    got = run_json(capsys, "eval", *map(str, runs), *common)
    assert got["scores"]["models"] == scores
