"""A checkpoint with imgclf's format marker but a bad field is one line naming the file and
the field, for every command that reads one (issue #31, item 9): missing ``model_name`` or
``class_names``, arguments the model does not take, tensors of the wrong shape, five class
names for three outputs, empty or duplicate class names, a NaN mean.

Each case edits a copy of a finished one-epoch run (built once, seconds) and drives the
real CLI: eval, predict, export, serve, report --data and train --resume.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import imgclf
from helpers_train import finished_tiny_run
from imgclf.cli import main
from imgclf.errors import CheckpointError
from imgclf.models import build_model_from_checkpoint
from imgclf.runtime.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> SimpleNamespace:
    """A finished one-epoch run of the tiny recipe, its data set and image folder."""
    return finished_tiny_run(tmp_path_factory.mktemp("fields"))


def edited_run(finished: SimpleNamespace, tmp_path: Path, edit: Callable[[dict], Any]) -> Path:
    """A copy of the run whose best.pt and last.pt are ``edit``-ed, format marker kept."""
    run = Path(shutil.copytree(finished.run, tmp_path / "run"))
    for name in ("best.pt", "last.pt"):
        state = torch.load(run / name, weights_only=True)
        del state["format"]  # save_checkpoint writes it again
        edit(state)
        save_checkpoint(state, run / name)
    return run


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda state: state.__setitem__(key, value)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda state: state.pop(key)


def _edit_args(state: dict) -> None:
    state["model_args"]["depth"] = 7


def _wide_head(state: dict) -> None:
    weights = state["model_state"]
    weights["head.weight"] = torch.zeros(5, weights["head.weight"].shape[1])


def _no_bias(state: dict) -> None:
    del state["model_state"]["head.bias"]


def _nan_mean(state: dict) -> None:
    state["mean"] = [0.5, math.nan, 0.5]


# (edit, what the line must say after "<checkpoint>: ")
CASES = {
    "no model_name": (_drop("model_name"), "model_name: missing"),
    "unknown model_name": (_set("model_name", "nosuchnet"), "model_name: "),
    "no class_names": (_drop("class_names"), "class_names: missing"),
    "unknown model_args": (_edit_args, "model_args {"),
    "model_args a list": (_set("model_args", [3, 16]), "model_args: "),
    "head of another shape": (_wide_head, "model_state: tensor 'head.weight' has shape [5, "),
    "a tensor missing": (_no_bias, "model_state: no tensor 'head.bias'"),
    "model_state a list": (_set("model_state", [1, 2]), "model_state: "),
    "5 names, 3 outputs": (
        _set("class_names", ["a", "b", "c", "d", "e"]),
        "class_names: 5 names for a model with 3 outputs",
    ),
    "empty class name": (_set("class_names", ["a", "", "c"]), "class_names: class name 1 is empty"),
    "duplicate class": (_set("class_names", ["a", "a", "c"]), "class_names: class 'a' is named"),
    "class names not text": (_set("class_names", [1, 2, 3]), "class_names.0: "),
    "NaN mean": (_nan_mean, "mean.1: Input should be a finite number"),
    "zero std": (_set("std", [0, 0.2, 0.2]), "std.0: "),
    "input_size text": (_set("input_size", "16"), "input_size: "),
}


# A resume names what it needs first (imgclf.runtime.checkpoint.RESUME_KEYS).
RESUME_SAYS = {"no class_names": "cannot resume from this checkpoint (no class_names)"}


def commands(finished: SimpleNamespace, run: Path, tmp_path: Path) -> dict[str, list]:
    best = run / "best.pt"
    return {
        "eval": ["eval", best, "--data", finished.data],
        "predict": ["predict", best, "--input", finished.images, "--out", tmp_path / "p.csv"],
        "export": ["export", best, "--out", tmp_path / "m.onnx"],
        "serve": ["serve", best, "--port", "0"],
        "report": ["report", run, "--data", finished.data, "--out", tmp_path / "r.html"],
        "resume": ["train", "--resume", run, "--quiet"],
    }


def _no_server(*args, **kwargs):
    raise AssertionError("the server started on a bad checkpoint")


@pytest.mark.parametrize("command", ["eval", "predict", "export", "serve", "report", "resume"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_field_is_one_line_naming_the_file_and_field(
    finished, tmp_path, capsys, monkeypatch, case, command
):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", _no_server)
    edit, says = CASES[case]
    run = edited_run(finished, tmp_path, edit)
    argv = commands(finished, run, tmp_path)[command]
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2, err
    (line,) = err.splitlines()
    read = "last.pt" if command == "resume" else "best.pt"
    says = RESUME_SAYS.get(case, says) if command == "resume" else says
    assert line.startswith(f"error: {run / read}: {says}"), line
    assert "nosuchnet" in line or case != "unknown model_name"
    assert not {"m.onnx", "p.csv", "r.html"} & {p.name for p in tmp_path.iterdir()}


def test_the_unedited_run_loads(finished):
    state = load_checkpoint(finished.run / "best.pt")
    model = build_model_from_checkpoint(state)
    assert model.num_classes == len(state["class_names"]) == 3


def test_a_checkpoint_of_another_model_names_the_tensor(finished, tmp_path):
    """Weights of another architecture under a model's name: the first tensor that does
    not fit, not torch's list of every mismatch."""
    state = load_checkpoint(finished.run / "best.pt")
    state.pop("path"), state.pop("format")
    other = imgclf.models.create("medium", 3, input_size=16)
    state["model_state"] = other.state_dict()
    save_checkpoint(state, tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as err:
        build_model_from_checkpoint(load_checkpoint(tmp_path / "other.pt"))
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'other.pt'}: model_state: ") and "\n" not in msg
