"""Final fits (issue #34, item 1): ``imgclf train RECIPE --data D --final [--from RUN]``.

The reference for what a final fit trains is independent of it: the same recipe trained
normally on a copy of the data set whose validation images are relabelled as training
ones (so it has no val split); the final fit must end with the same weights, bit for bit
on CPU, and the same training rows. The data set has a test split, which neither sees.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

import imgclf
from helpers_train import (
    assert_same_run,
    assert_same_weights,
    cli_process,
    load_pt,
    make_image_folder,
    metric_rows,
    tiny_recipe,
    write_recipe,
)
from imgclf.cli import main
from imgclf.runtime.checkpoint import load_checkpoint
from imgclf.train.recipe import load_recipe
from imgclf.train.rundir import METRIC_COLUMNS

TRAIN_COLUMNS = ("stage", "epoch", "stage_epoch", "lr", "train_loss", "train_acc")


def quiet_main(*argv: object) -> tuple[int, str, str]:
    """``imgclf ARGV`` in this process, its stdout and stderr captured (usable in a
    module-scoped fixture, where capsys is not)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A data set with train (val carved out of it) and test splits, the tiny recipe, its
    validation run, and a final fit of it from the command line with --from."""
    root = tmp_path_factory.mktemp("final")
    make_image_folder(root / "src" / "train", per_class=14)
    make_image_folder(root / "src" / "test", per_class=4, seed=1)
    ds = imgclf.import_dataset(root / "src", "tiny", dest=root / "tiny", warn=lambda m: None)
    recipe = write_recipe(root / "tiny.yaml", tiny_recipe(epochs=2))
    val = imgclf.train(recipe, ds, out=root / "val", threads=1, progress=False)
    final = root / "final"
    code, out, err = quiet_main(
        "train", recipe, "--data", ds.root, "--out", final, "--final", "--from", val.path,
        "--threads", "1", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    return SimpleNamespace(
        root=root, ds=ds, recipe=recipe, val=val.path, final=final, out=out, err=err
    )


def merged(ds):
    """``ds`` with its validation images relabelled as training ones and no val split."""
    names = ds.split_names
    splits = ds.splits.copy()
    splits[splits == names.index("val")] = names.index("train")
    renamed = ["merged" if n == "val" else n for n in names]
    return dataclasses.replace(ds, splits=splits, meta={**ds.meta, "split_names": renamed})


def test_a_final_fit_trains_on_train_and_val_as_a_run_on_both_would(runs, tmp_path):
    ds = runs.ds
    assert {"train", "val", "test"} <= set(ds.split_names) and len(ds.indices("val")) > 0
    reference = imgclf.train(
        tiny_recipe(epochs=2), merged(ds), out=tmp_path / "ref", threads=1, progress=False
    )
    assert_same_weights(runs.final / "last.pt", reference.path / "last.pt")
    assert_same_weights(runs.final / "best.pt", runs.final / "last.pt")  # the last epoch
    assert metric_rows(runs.final) == metric_rows(reference.path)
    summary = json.loads((runs.final / "summary.json").read_text())
    n = len(ds.indices("train")) + len(ds.indices("val"))
    assert summary["final"] is True and summary["final_images"] == n
    assert summary["final_splits"] == ["train", "val"]
    assert summary["final_held_out"] == ["test"]  # what its held-out score is taken on
    assert (
        summary["images_seen"]
        == json.loads((reference.path / "summary.json").read_text())["images_seen"]
    )
    assert summary["best_epoch"] == summary["epochs"] == 2


def test_a_final_fit_reports_no_validation_and_names_its_validation_run(runs):
    summary = json.loads((runs.final / "summary.json").read_text())
    val_summary = json.loads((runs.val / "summary.json").read_text())
    assert not [k for k in summary if k.startswith("val_")]  # no validation number at all
    assert summary["final_from"] == {
        "run": str(runs.val.resolve()),
        "val_accuracy": val_summary["val_accuracy"],
    }
    assert load_checkpoint(runs.final / "best.pt")["final"] == {
        "from": str(runs.val.resolve()),
        "from_val_accuracy": val_summary["val_accuracy"],
    }
    assert yaml.safe_load((runs.final / "config.yaml").read_text())["final"] is True
    header = (runs.final / "metrics.csv").read_text().splitlines()[0]
    assert header.split(",") == METRIC_COLUMNS  # readers keep their columns; val is empty
    for row in metric_rows(runs.final):
        assert row["val_loss"] == row["val_acc"] == ""
    assert not (runs.final / "confusion.csv").exists()
    assert "val accuracy 0" not in runs.out and "confusion matrix" not in runs.out
    assert "no validation accuracy can be reported" in runs.out
    assert f"chosen by:        {runs.val.resolve()} (val accuracy " in runs.out
    assert f"held-out score:   imgclf eval {runs.final} --data " in runs.out
    assert runs.out.split("held-out score:")[1].split("\n")[0].endswith("--split test")
    assert "final fit: training on train + val of 'tiny'" in runs.err  # even with --quiet
    # Read back as a recipe (to repeat the run), config.yaml is the recipe alone.
    assert load_recipe(runs.final / "config.yaml").model == "simple"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("other-recipe", "with recipe 'tiny'; this final fit trains 'simple' with 'other'"),
        ("other-settings", "other settings (optimizer.lr: 0.05 there, 0.2 here)"),
        ("final-itself", "is a final fit itself"),
        ("not-a-run", "not a finished run folder (no summary.json)"),
        ("no-final", "--from names the validation run of a final fit: add --final"),
    ],
)
def test_from_must_be_a_validation_run_of_this_recipe(runs, tmp_path, case, expected):
    recipe, source, extra = runs.recipe, runs.val, ["--final"]
    if case == "other-recipe":
        recipe = write_recipe(tmp_path / "other.yaml", tiny_recipe(epochs=2, name="other"))
    elif case == "other-settings":
        extra.extend(["--set", "optimizer.lr=0.2"])
    elif case == "final-itself":
        source = runs.final
    elif case == "not-a-run":
        source = tmp_path
    else:
        extra = []
    out = tmp_path / "run"
    code, _, err = quiet_main(
        "train", recipe, "--data", runs.ds.root, "--out", out, "--from", source, *extra
    )
    assert code == 2 and expected in error_line(err)
    assert not out.exists()  # refused before any folder is made


def test_early_stopping_is_refused_in_a_final_fit(runs, tmp_path):
    out = tmp_path / "run"
    argv = ["train", runs.recipe, "--data", runs.ds.root, "--out", out, "--final"]
    code, _, err = quiet_main(*argv, "--set", "early_stopping.patience=2")
    assert code == 2
    assert error_line(err).startswith(
        "error: --final trains on the validation images too: early stopping "
        "(early_stopping.patience 2) cannot be used; "
    )
    assert not out.exists()


def test_training_indices_are_train_and_val_in_the_data_set_s_order(runs):
    from imgclf.train.final import training_indices

    ds = runs.ds
    both = training_indices(ds, final=True)
    expected = np.flatnonzero(
        np.isin(ds.splits, [ds.split_names.index(s) for s in ("train", "val")])
    )
    assert np.array_equal(both, expected)
    assert np.array_equal(training_indices(ds, final=False), ds.indices("train"))
    assert not np.isin(ds.indices("test"), both).any()
    assert load_pt(runs.val / "best.pt")["final"] is None  # a normal run records none


# ---------------------------------------------------------------- eval, report, predict…


def test_eval_of_a_final_fit_on_its_own_val_split_says_it_trained_on_those_images(runs):
    data = runs.ds.root
    code, out, err = quiet_main("eval", runs.final, "--data", data, "--split", "val", "--json")
    assert code == 0
    scored = json.loads(out)
    assert scored["held_out"] is False and scored["trained_on"] == ["val"]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: final (a final fit) trained on ")
    assert "the val images of 'tiny': its val scores are not held-out ones" in lines[0]
    # The test split, and the validation run on its own val split, are held out: no line.
    for run, split in ((runs.final, "test"), (runs.val, "val")):
        code, out, err = quiet_main("eval", run, "--data", data, "--split", split, "--json")
        assert code == 0 and err == ""
        assert json.loads(out)["held_out"] is True and json.loads(out)["trained_on"] == []
    # Several runs: the comparison notes it (the vote's scores are not held out either).
    code, out, _ = quiet_main("eval", runs.final, runs.val, "--data", data, "--split", "val")
    assert code == 0 and "note: final (a final fit) trained on the val images" in out


def test_report_marks_a_final_fit(runs, tmp_path):
    code, _, err = quiet_main("report", runs.final, runs.val, "--out", tmp_path / "r.md")
    assert code == 0, err
    text = (tmp_path / "r.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| final |"))
    assert "final fit (trained on val)" in row  # the comparison's val accuracy column
    val = json.loads((runs.val / "summary.json").read_text())["val_accuracy"]
    n = len(runs.ds.indices("train")) + len(runs.ds.indices("val"))
    assert (
        f"| fit | final fit (trained on val): train + val, {n} images, no validation score; "
        f"settings chosen by {runs.val.resolve()} at val accuracy {val:.4f} |"
    ) in text
    assert "| fit |" not in text.split("## val")[-1]  # the validation run is not marked


def test_predict_export_and_serve_take_a_final_fit(runs, tmp_path):
    from imgclf.serve import Predictor, create_app

    images = runs.root / "src" / "test"
    csv_path = tmp_path / "p.csv"
    code, _, err = quiet_main("predict", runs.final, "--input", images, "--out", csv_path)
    assert code == 0, err
    rows = csv_path.read_text().splitlines()
    labels = {r.split(",")[0]: r.split(",")[1] for r in rows[1:]}
    assert len(labels) == 12 and sum(f.split("/")[0] == lab for f, lab in labels.items()) >= 9
    onnx = tmp_path / "final.onnx"
    code, out, err = quiet_main("export", runs.final, "--out", onnx, "--opset", "18")
    assert code == 0 and "ONNX Runtime matches PyTorch" in out, err
    code, _, err = quiet_main("predict", onnx, "--input", images, "--out", tmp_path / "o.csv")
    assert code == 0, err
    exported = [r.split(",")[:2] for r in (tmp_path / "o.csv").read_text().splitlines()[1:]]
    assert {f: lab for f, lab in exported} == labels
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    app = create_app(Predictor([runs.final]))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        one = images / "a" / "0.png"
        got = client.post("/predict", files=[("file", (one.name, one.read_bytes()))])
        assert got.status_code == 200
        assert got.json()["predictions"][0]["label"] == labels["a/0.png"]


def test_int8_export_of_a_final_fit_verifies_on_the_test_split(runs, tmp_path):
    pytest.importorskip("onnxruntime")
    from imgclf.export_int8 import export_int8

    result = export_int8(runs.final, tmp_path / "m.int8.onnx", min_agreement=0)
    # Not the val split it trained on (a normal run verifies on val: test_export_int8).
    assert result.verified_on == "12 test images of 'tiny'"


# ---------------------------------------------------------------- resume, --time, DDP


@pytest.fixture(scope="module")
def long_final(tmp_path_factory):
    """A data set whose epochs take long enough for a signal to land inside one (54 steps
    of batch 4, as test_faults'), and an uninterrupted final fit of the tiny recipe on it."""
    root = tmp_path_factory.mktemp("final-long")
    folder = make_image_folder(root / "src", per_class=80)
    ds = imgclf.import_dataset(folder, "long", dest=root / "long", warn=lambda m: None)
    recipe = write_recipe(root / "long.yaml", tiny_recipe(epochs=3, batch_size=4))
    reference = imgclf.train(
        recipe, ds.root, out=root / "reference", final=True, threads=1, progress=False
    )
    with open(reference.path / "metrics.csv", newline="") as f:
        seconds = max(float(row["seconds"]) for row in csv.DictReader(f))
    return recipe, ds.root, reference.path, seconds


@pytest.mark.slow  # a real child process killed with SIGKILL: ~15-30 s here
def test_kill_9_then_resume_of_a_final_fit_equals_an_uninterrupted_one(long_final, tmp_path):
    recipe, data, reference, seconds = long_final
    out = tmp_path / "killed"
    proc = cli_process(
        "train", str(recipe), "--data", str(data), "--out", str(out), "--final",
        "--threads", "1", "--quiet",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (out / "last.pt").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.005)
        time.sleep(0.4 * seconds)  # inside epoch 2
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists(), "killed after training had finished"
    assert 1 <= load_checkpoint(out / "last.pt")["position"]["epoch"] < 3
    code, stdout, err = quiet_main("train", "--resume", out, "--threads", "1", "--quiet")
    assert code == 0, err
    assert "final fit: training on train + val of 'long'" in err  # from the checkpoint
    assert "no validation accuracy can be reported" in stdout
    assert_same_run(out, reference)
    assert json.loads((out / "summary.json").read_text())["final"] is True


def test_a_final_fit_resumes_only_as_a_final_fit(runs, tmp_path):
    code, _, err = quiet_main("train", "--resume", runs.val, "--final")
    assert code == 2 and "is not a final fit, and --resume continues a run as it was" in err
    code, _, err = quiet_main("train", "--resume", runs.final, "--final", "--from", tmp_path)
    assert code == 2 and "with the validation run it was started with: drop --from" in err


def test_a_time_budget_prices_train_and_val_with_no_validation_pass(runs, tmp_path, monkeypatch):
    from imgclf.train import budget

    probed = []
    probe = budget._probe_stage

    def spy(job, stage, forward):
        probed.append((job.train_loader.num_samples, job.val_loader))
        return probe(job, stage, forward)

    monkeypatch.setattr(budget, "_probe_stage", spy)
    run = imgclf.train(
        runs.recipe, runs.ds, out=tmp_path / "run", final=True, time_budget=6, progress=False
    )
    n = len(runs.ds.indices("train")) + len(runs.ds.indices("val"))
    assert probed == [(n, None)]  # the larger set priced, no validation pass
    summary = run.summary
    assert summary["final"] is True and summary["budget_seconds"] == 6
    assert summary["trained_epochs"] > 0 and not [k for k in summary if k.startswith("val_")]
    assert load_checkpoint(run.path / "last.pt")["plan"]["budget_seconds"] == 6


def test_two_processes_train_a_final_fit_like_one(runs, tmp_path):
    """`--final --nproc-per-node 2` (torchrun, CPU Gloo): the single-process final fit's
    weights and rows, every rank on its share of train + val."""
    from test_distributed import NO_AUGMENT, assert_close_runs, run_job

    recipe = write_recipe(tmp_path / "noaug.yaml", tiny_recipe(epochs=2, **NO_AUGMENT))
    data = runs.ds.root
    one = imgclf.train(recipe, data, out=tmp_path / "one", final=True, threads=1, progress=False)
    two = tmp_path / "two"
    run_job(
        [sys.executable, "-m", "imgclf", "train", str(recipe), "--data", str(data), "--final",
         "--out", str(two), "--nproc-per-node", "2", "--quiet"],
    )  # fmt: skip
    assert_close_runs(two, one.path)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["final"] is True and summary["world_size"] == 2
    assert summary["images_seen"] == one.summary["images_seen"]
