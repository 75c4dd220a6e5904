"""The ONNX cache ($IMGCLF_HOME/onnx) is not trusted by file name (issue #31, item 11): a
cached graph replaced by another model's (another class count, another input size, or
the same shapes with other weights) is found out before use, said in one warning line, and
exported again, so ``predict --backend onnx`` still answers as PyTorch does.

The runs are helpers_runs' (one-epoch `simple` nets, built once per session); the
replacement graphs are exported here from other models.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from helpers_runs import session_runs
from imgclf.cli import main
from imgclf.inference.runs import load_run
from imgclf.models import create
from imgclf.runtime.onnx import onnx_bytes

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return session_runs(tmp_path_factory)


def predictions(capsys, trained, out: Path, backend: str) -> tuple[list[dict], str]:
    """``imgclf predict run32 --backend BACKEND`` on the data's images: rows, stderr."""
    argv = ["predict", trained.run32, "--input", trained.src, "--out", out, "--backend", backend]
    assert main([str(a) for a in argv]) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    return rows, capsys.readouterr().err


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [r["label"] for r in got] == [r["label"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert float(a["confidence"]) == pytest.approx(float(b["confidence"]), abs=1e-5)


def _graph(model: torch.nn.Module, size: int) -> bytes:
    return onnx_bytes(model.eval(), torch.zeros(2, 3, size, size), output_name="logits")


def five_classes(trained) -> bytes:
    return _graph(create("simple", 5, input_size=32), 32)


def other_size(trained) -> bytes:
    return _graph(load_run(trained.run16).model, 16)  # the 16-px run's own graph


def other_weights(trained) -> bytes:
    return _graph(load_run(trained.swapped).model, 32)  # same classes and size


@pytest.mark.parametrize(
    ("replacement", "says"),
    [
        (five_classes, "it has 5 outputs, the checkpoint 3 classes"),
        (other_size, "it takes [N, 3, 16, 16], not [N, 3, 32, 32]"),
        (other_weights, "its output on a probe image is not the exported model's"),
    ],
)
def test_a_replaced_cached_graph_is_exported_again(
    trained, tmp_path, capsys, imgclf_home, replacement, says
):
    want, _ = predictions(capsys, trained, tmp_path / "torch.csv", "torch")
    first, err = predictions(capsys, trained, tmp_path / "onnx.csv", "onnx")
    assert_same_rows(first, want)
    assert "warning" not in err
    (cached,) = (imgclf_home / "onnx").glob("*.onnx")
    foreign = replacement(trained)
    cached.write_bytes(foreign)

    again, err = predictions(capsys, trained, tmp_path / "again.csv", "onnx")
    assert_same_rows(again, want)
    (line,) = [line for line in err.splitlines() if "warning" in line]
    assert line == f"warning: ONNX cache {cached}: {says}; exporting the model again"
    assert cached.read_bytes() != foreign  # replaced by the checkpoint's own graph
    _, err = predictions(capsys, trained, tmp_path / "third.csv", "onnx")
    assert "warning" not in err  # and trusted from then on


def test_a_cached_graph_without_its_probe_file_is_exported_again(
    trained, tmp_path, capsys, imgclf_home
):
    predictions(capsys, trained, tmp_path / "onnx.csv", "onnx")
    (sidecar,) = (imgclf_home / "onnx").glob("*.json")
    sidecar.unlink()
    _, err = predictions(capsys, trained, tmp_path / "again.csv", "onnx")
    assert f"its probe file {sidecar.name} is missing or unreadable" in err
    assert sidecar.is_file()
