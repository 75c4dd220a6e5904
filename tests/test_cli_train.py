"""``imgclf train | eval | recipes``: what they print, exit codes, one-line errors, and
evaluation by class name on datasets and plain image folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import imgclf
from helpers_train import (
    CLASSES,
    import_tiny,
    load_pt,
    make_image_folder,
    tiny_recipe,
    write_recipe,
)
from imgclf.cli import main
from imgclf.data import load_dataset
from imgclf.data.loader import BatchLoader
from imgclf.evaluate.metrics import compute_metrics, infer
from imgclf.models import build_model_from_checkpoint
from imgclf.runtime.checkpoint import load_checkpoint, save_checkpoint
from imgclf.train.recipe import list_recipes


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny(tmp_path):
    """The tiny dataset imported as ``tiny`` in this test's IMGCLF_HOME, and its recipe."""
    ds = import_tiny(tmp_path)
    return ds, write_recipe(tmp_path / "tiny.yaml", tiny_recipe(epochs=2))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A trained run folder, its dataset folder and the folder of images it came from."""
    root = tmp_path_factory.mktemp("cli")
    folder = make_image_folder(root / "images")
    ds = imgclf.import_dataset(folder, "tiny", dest=root / "tiny", warn=lambda msg: None)
    run = imgclf.train(tiny_recipe(epochs=2), ds, out=root / "run", threads=1, progress=False)
    return run.path, ds.root, folder


# ---------------------------------------------------------------- train


def test_train_prints_epoch_lines_and_where_the_run_is(tiny, tmp_path, capsys):
    _, recipe = tiny
    out = tmp_path / "my-run"
    code, stdout, stderr = run_cli(capsys, "train", recipe, "--data", "tiny", "--out", out)
    assert code == 0
    assert stdout.splitlines()[0].startswith("val accuracy ")
    assert f"run folder:       {out}\n" in stdout
    assert f"curves:           {out / 'curves.png'}" in stdout
    epoch_lines = [line for line in stderr.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and "train loss" in epoch_lines[0] and "img/s" in epoch_lines[0]
    assert "val loss" in epoch_lines[0] and "stage 1" in epoch_lines[0]
    assert (out / "best.pt").is_file()


def test_train_numbers_run_folders_and_takes_epochs_and_set(tiny, tmp_path, capsys, monkeypatch):
    _, recipe = tiny
    monkeypatch.chdir(tmp_path)
    argv = ["train", recipe, "--data", "tiny", "--quiet", "--epochs", "1"]
    for n in (1, 2):
        code, stdout, stderr = run_cli(capsys, *argv, "--set", "optimizer.lr=0.02")
        assert code == 0 and stderr == ""
        assert f"run folder:       {Path('runs') / f'tiny-{n}'}\n" in stdout
    state = load_pt(tmp_path / "runs" / "tiny-2" / "last.pt")
    assert state["recipe"]["optimizer"]["lr"] == 0.02
    assert state["recipe"]["stages"][0]["epochs"] == 1
    config = yaml.safe_load((tmp_path / "runs" / "tiny-2" / "config.yaml").read_text())
    assert config["optimizer"]["lr"] == 0.02


BAD_TRAIN = [
    (["nope-recipe", "--data", "tiny"], "unknown recipe 'nope-recipe'"),
    (["scratch-simpel", "--data", "tiny"], "did you mean 'scratch-simple'?"),
    (["RECIPE", "--data", "tiny", "--set", "optimizer.lrr=1"], "unknown key 'optimizer.lrr'"),
    (["RECIPE", "--data", "tiny", "--set", "scheduler.name=poly"], "'cosine'"),
    (["RECIPE", "--data", "tiny", "--set", "input_size=30"], "multiple of 4"),
    (["RECIPE", "--data", "tiny", "--set", "model_args.depth=3"], "model 'simple'"),
    (["RECIPE", "--data", "tiny", "--set", "model=resnet"], "unknown model 'resnet'"),
    (["RECIPE", "--data", "tiny", "--set", "stages.0.train=[layer4]"], "block1, block2, head"),
    (["RECIPE", "--data", "tiny", "--epochs", "1", "--set", "stages=[]"], "stages"),
    (["RECIPE", "--data", "nosuchdata"], "no imported dataset 'nosuchdata'"),
    (["RECIPE"], "no --data given"),
    (["--resume", "TMP/nothing-here"], "no such checkpoint"),
    ([], "give --data DATASET"),
    (["RECIPE", "--data", "tiny", "--weights", "TMP/none.pth"], "none.pth: no such file"),
    (["RECIPE", "--data", "tiny", "--weights", "RECIPE"], "'simple' is trained from scratch"),
    (["--resume", "TMP/nothing-here", "--weights", "RECIPE"], "drop --weights"),
]


@pytest.mark.parametrize("args, expected", BAD_TRAIN)
def test_bad_train_input_is_one_error_line(tiny, tmp_path, capsys, args, expected):
    _, recipe = tiny
    argv = [str(recipe) if a == "RECIPE" else a.replace("TMP", str(tmp_path)) for a in args]
    code, _, stderr = run_cli(capsys, "train", *argv, "--out", tmp_path / "out", "--quiet")
    assert code == 2
    (line,) = stderr.splitlines()
    assert line.startswith("error: ") and expected in line, line
    assert not (tmp_path / "out").exists()  # nothing written for a run that never started


def test_resume_refuses_set(trained_run, capsys):
    # --epochs on a finished run trains it more (tests/test_train_more.py); --set alone
    # would change the saved recipe.
    run, _, _ = trained_run
    code, _, stderr = run_cli(capsys, "train", "--resume", run, "--set", "optimizer.lr=0.1")
    assert code == 2 and "drop --set/--epochs" in stderr


def test_resume_of_a_finished_run_changes_nothing(trained_run, tmp_path, capsys):
    out = Path(shutil.copytree(trained_run[0], tmp_path / "run"))
    rows = (out / "metrics.csv").read_text()
    before = load_pt(out / "last.pt")["model_state"]
    code, stdout, _ = run_cli(capsys, "train", "--resume", out, "--quiet")
    assert code == 0 and f"run folder:       {out}" in stdout
    assert (out / "metrics.csv").read_text() == rows
    after = load_pt(out / "last.pt")["model_state"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_epochs_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["train", "fast", "--epochs", "0"])
    assert excinfo.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------- recipes, version


def test_recipes_lists_every_bundled_recipe(capsys):
    code, stdout, _ = run_cli(capsys, "recipes")
    assert code == 0
    names = [line.split()[0] for line in stdout.splitlines()]
    assert names == sorted(list_recipes())
    fast = next(line for line in stdout.splitlines() if line.startswith("fast "))
    assert "airbench" in fast  # with its description


def test_recipes_name_prints_the_resolved_yaml(capsys):
    code, stdout, _ = run_cli(capsys, "recipes", "fast")
    assert code == 0
    data = yaml.safe_load(stdout)
    assert data["name"] == "fast" and data["model"] == "fast"
    assert data["stages"][0]["epochs"] == 10
    assert "early_stopping" in data and "precision" in data  # defaults filled in


def test_recipes_unknown_name(capsys):
    code, _, stderr = run_cli(capsys, "recipes", "fats")
    assert code == 2 and "did you mean 'fast'?" in stderr and len(stderr.splitlines()) == 1


def test_python_m_imgclf_version():
    result = subprocess.run(
        [sys.executable, "-m", "imgclf", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"imgclf {imgclf.__version__}"


# ---------------------------------------------------------------- eval


def expected_metrics(run: Path, ds, split: str):
    """compute_metrics on logits computed here, without imgclf.evaluate."""
    state = load_checkpoint(run / "best.pt")
    model = build_model_from_checkpoint(state)
    idx = ds.indices(split)
    loader = BatchLoader(
        ds.images[idx],
        ds.labels[idx],
        batch_size=16,
        size=state["input_size"],
        mean=state["mean"],
        std=state["std"],
    )
    assert ds.classes == state["class_names"]
    return compute_metrics(*infer(model, loader), state["class_names"])


def eval_json(capsys, *argv) -> dict:
    code, stdout, stderr = run_cli(capsys, "eval", *argv, "--json")
    assert code == 0, stderr
    (line,) = stdout.splitlines()  # one JSON object
    return json.loads(line)


def test_eval_json_accuracy_is_a_fraction_from_compute_metrics(trained_run, capsys):
    run, data, _ = trained_run
    ds = load_dataset(data)
    result = eval_json(capsys, run, "--data", data)
    expected = expected_metrics(run, ds, "val")  # no test split: val is the default
    assert result["accuracy"] == pytest.approx(expected.accuracy, abs=1e-12)
    assert result["accuracy"] == pytest.approx(np.trace(expected.confusion) / result["count"])
    assert result["count"] == len(ds.indices("val"))
    assert result["loss"] == pytest.approx(expected.loss, rel=1e-5)
    assert result["confusion"] == expected.confusion.tolist()
    assert result["class_names"] == list(CLASSES) and result["run"] == str(run)
    everything = eval_json(capsys, run, "--data", data, "--split", "all")
    assert everything["count"] == 60
    assert everything["accuracy"] == pytest.approx(expected_metrics(run, ds, "all").accuracy)


def test_eval_text_has_per_class_scores_and_confusion(trained_run, capsys):
    run, data, _ = trained_run
    code, stdout, _ = run_cli(capsys, "eval", run, "--data", data, "--split", "all")
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith(f"{run}: accuracy ") and "(60 images)" in lines[0]
    assert lines[1].split() == ["class", "precision", "recall", "f1", "support"]
    assert [line.split()[0] for line in lines[2:5]] == list(CLASSES)
    assert lines[5].split() == ["true\\pred", *CLASSES]
    confusion = [[int(n) for n in line.split()[1:]] for line in lines[6:9]]
    assert np.sum(confusion) == 60


def test_eval_an_image_folder_without_splits(trained_run, capsys, monkeypatch, tmp_path):
    run, data, folder = trained_run
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    result = eval_json(capsys, run, "--data", folder)
    reference = expected_metrics(run, load_dataset(data), "all")  # the same 60 images
    assert result["count"] == 60
    assert result["accuracy"] == pytest.approx(reference.accuracy, abs=1e-12)
    assert result["confusion"] == reference.confusion.tolist()
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary import is gone


def test_eval_an_image_folder_with_split_folders(trained_run, capsys, tmp_path):
    run, _, folder = trained_run
    split_root = tmp_path / "splits"
    for cls in CLASSES:  # the first 5 images of each class: test; the rest: train
        for i, image in enumerate(sorted((folder / cls).iterdir(), key=lambda p: int(p.stem))):
            split = "test" if i < 5 else "train"
            (split_root / split / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, split_root / split / cls / image.name)
    result = eval_json(capsys, run, "--data", split_root)  # default split: test
    assert result["count"] == 15
    assert result["per_class"][0]["support"] == 5
    only_test = tmp_path / "only-test"
    shutil.copytree(split_root / "test", only_test)
    assert result == eval_json(capsys, run, "--data", only_test) | {"run": str(run)}
    assert eval_json(capsys, run, "--data", split_root, "--split", "train")["count"] == 45


def permuted_checkpoint(run: Path, dest: Path, order: list[int]) -> Path:
    """The same classifier with its classes (names and head rows) listed in another order."""
    state = load_checkpoint(run / "best.pt")
    state.pop("path")
    state.pop("format")
    state["class_names"] = [state["class_names"][i] for i in order]
    for key in ("head.weight", "head.bias"):
        state["model_state"][key] = state["model_state"][key][order].clone()
    save_checkpoint(state, dest)
    return dest


def test_eval_matches_classes_by_name_not_index(trained_run, capsys, tmp_path):
    run, data, _ = trained_run
    original = eval_json(capsys, run, "--data", data, "--split", "all")
    assert original["accuracy"] > 0.9  # so an index mix-up could not go unnoticed
    order = [2, 0, 1]  # every class moves: by index, every answer would be wrong
    moved = permuted_checkpoint(run, tmp_path / "moved.pt", order)
    result = eval_json(capsys, moved, "--data", data, "--split", "all")
    assert result["class_names"] == [CLASSES[i] for i in order]
    assert result["accuracy"] == original["accuracy"]
    confusion = np.array(original["confusion"])[np.ix_(order, order)]
    assert result["confusion"] == confusion.tolist()
    # The library entry point and a plain folder agree.
    assert imgclf.evaluate(moved, data, split="all").accuracy == original["accuracy"]


def test_eval_with_another_class_set_is_one_line_showing_both(trained_run, capsys, tmp_path):
    run, _, _ = trained_run
    other = make_image_folder(tmp_path / "other", per_class=2, classes=("a", "b", "d"))
    code, stdout, stderr = run_cli(capsys, "eval", run, "--data", other, "--json")
    assert code == 2 and stdout == ""
    (line,) = stderr.splitlines()
    assert "checkpoint classes ['a', 'b', 'c']" in line
    assert "data classes ['a', 'b', 'd']" in line


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["RUN", "--data", "nosuchdata"], "no imported dataset 'nosuchdata'"),
        (["TMP/none", "--data", "DATA"], "no such checkpoint"),
        (["TMP", "--data", "DATA"], "no best.pt or last.pt"),
        (["RUN", "--data", "DATA", "--split", "test"], "no 'test' split"),
    ],
)
def test_bad_eval_input_is_one_error_line(trained_run, capsys, tmp_path, argv, expected):
    run, data, _ = trained_run
    names = {"RUN": str(run), "DATA": str(data), "TMP": str(tmp_path)}
    argv = [names.get(a, a.replace("TMP", str(tmp_path))) for a in argv]
    code, _, stderr = run_cli(capsys, "eval", *argv)
    assert code == 2
    (line,) = stderr.splitlines()
    assert line.startswith("error: ") and expected in line, line


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["train", "fast", "--epochs", "99999999999999999999"], "must be at most 100,000"),
        (["train", "fast", "--threads", "99999999999999999999"], "must be at most 2,147,483,647"),
        (["serve", "runs/x", "--port", "70000"], "--port: 70000 must be at most 65,535"),
        (["serve", "runs/x", "--port", "-1"], "--port: -1 must be at least 0"),
    ],
)
def test_out_of_range_numbers_are_one_usage_line(capsys, argv, says):
    """Issue #31: a port past 65535 ended in an OverflowError traceback, and any count
    was accepted however large."""
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert [ln for ln in err.splitlines() if "error:" in ln] == [err.splitlines()[-1]]
