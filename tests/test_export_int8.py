"""imgclf export --int8: a quantized ONNX model, verified, that predict, serve and eval take."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import onnx
import pytest
import torch

from helpers_export import make_checkpoint
from helpers_runs import session_runs
from imgclf import export_int8 as int8_module
from imgclf.cli import main
from imgclf.export import read_metadata
from imgclf.inference.runs import load_run
from imgclf.models import create
from imgclf.runtime.onnx import onnx_bytes

pytest.importorskip("onnxruntime.quantization")
CLASSES = ["bird", "cat", "dog"]
CALIBRATION = "6"  # few calibration images: seconds, not minutes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return session_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """run32 as an int8 file (through the CLI, a fixed batch of 1 as export's default)
    and as a float file with a dynamic batch."""
    folder = tmp_path_factory.mktemp("int8")
    int8, float_ = folder / "run32" / "model.int8.onnx", folder / "run32" / "model.onnx"
    args = ["export", str(trained.run32), "--int8", "--calibration-images", CALIBRATION]
    assert main([*args, "--out", str(int8)]) == 0
    assert main(["export", str(trained.run32), "--out", str(float_), "--dynamic-batch"]) == 0
    return int8, float_


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return {row["file"]: row for row in csv.DictReader(f)}


def _predict(model: Path, trained, out: Path, *extra: str) -> dict[str, dict[str, str]]:
    assert (
        main(["predict", str(model), "--input", str(trained.src), "--out", str(out), *extra]) == 0
    )
    return _rows(out)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------------------- the file


def test_int8_file_is_quantized_and_holds_its_verification(exported, trained, capsys):
    int8, float_ = exported
    assert int8.is_file()
    graph = onnx.load(str(int8)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    assert int8.stat().st_size < float_.stat().st_size / 2
    meta = read_metadata(int8)
    assert meta["classes"] == CLASSES and meta["input_size"] == 32
    assert meta["preprocessing"] == read_metadata(float_)["preprocessing"]
    q = meta["quantization"]
    assert q["format"] == "QDQ" and "per output channel" in q["weights"]
    assert q["calibrated_on"] == f"{CALIBRATION} train images of 'tiny'"
    assert q["verified_on"] == "9 val images of 'tiny'"
    assert q["agreement"] >= 0.9
    assert 0 <= q["int8_accuracy"] <= 1 and 0 <= q["float_accuracy"] <= 1
    drop = 100 * (q["float_accuracy"] - q["int8_accuracy"])
    assert q["accuracy_drop_points"] == pytest.approx(drop)
    # the flat key, as export's other keys
    props = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    assert json.loads(props["quantization"]) == q


def test_cli_prints_agreement_and_both_accuracies(trained, tmp_path, capsys):
    out = tmp_path / "dyn.int8.onnx"
    args = ["export", str(trained.run16), "--int8", "--dynamic-batch", "--out", str(out)]
    assert main([*args, "--calibration-images", CALIBRATION]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    q = read_metadata(out)["quantization"]
    assert f"agrees with the float model on {100 * q['agreement']:.1f}%" in lines[0]
    assert (
        f"{100 * q['float_accuracy']:.2f}% float → {100 * q['int8_accuracy']:.2f}% int8"
        in (lines[0])
    )


# ---------------------------------------------------------------------------- using it


def test_predict_with_the_int8_file_labels_every_file_like_the_float_one(
    exported, trained, tmp_path
):
    int8, float_ = exported
    files = {p.relative_to(trained.src).as_posix() for p in trained.src.rglob("*.png")}
    got = _predict(int8, trained, tmp_path / "int8.csv", "--backend", "onnx")
    same_default = _predict(int8, trained, tmp_path / "int8-auto.csv")
    from_float = _predict(float_, trained, tmp_path / "float.csv")
    from_run = _predict(trained.run32, trained, tmp_path / "run.csv", "--backend", "torch")
    assert set(got) == files and all(row["label"] in CLASSES for row in got.values())
    assert all(not row["error"] for row in got.values())
    assert {f: r["label"] for f, r in same_default.items()} == {
        f: r["label"] for f, r in got.items()
    }
    agree = sum(got[f]["label"] == from_float[f]["label"] for f in files) / len(files)
    assert agree >= 0.9
    for f in files:  # int8 moves the probabilities a little, not a lot
        assert abs(float(got[f]["confidence"]) - float(from_float[f]["confidence"])) < 0.05
        # the float file is the run: same preprocessing, same probabilities
        assert from_float[f]["label"] == from_run[f]["label"]
        assert float(from_float[f]["confidence"]) == pytest.approx(
            float(from_run[f]["confidence"]), abs=1e-4
        )


def test_weighted_vote_weighs_an_int8_file_by_its_measured_accuracy(
    exported, trained, tmp_path, capsys
):
    int8, float_ = exported
    out = tmp_path / "w.csv"
    args = ["--input", str(trained.src), "--out", str(out), "--vote", "weighted"]
    assert main(["predict", str(int8), str(trained.run16), *args]) == 0
    assert len(_rows(out)) == 36
    # a float file has no accuracy of its own (a summary.json beside it may be another's)
    out.unlink()
    assert main(["predict", str(float_), str(trained.run16), *args]) == 2
    assert "no validation accuracy for run32" in _one_line_error(capsys)
    assert not out.exists()


def test_serve_with_the_int8_file(exported, trained, tmp_path):
    from fastapi.testclient import TestClient

    from imgclf.serve import Predictor, create_app

    int8, _ = exported
    expected = _predict(int8, trained, tmp_path / "p.csv")
    files = sorted(trained.src.rglob("*.png"))[::6]
    app = create_app(Predictor([int8], backend="onnx"))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/info").json()["classes"] == CLASSES
        r = client.post("/predict", files=[("file", (f.name, f.read_bytes())) for f in files])
    assert r.status_code == 200
    for f, p in zip(files, r.json()["predictions"], strict=True):
        row = expected[f.relative_to(trained.src).as_posix()]
        assert p["label"] == row["label"]
        assert p["confidence"] == pytest.approx(float(row["confidence"]), abs=1e-5)


def test_eval_on_the_int8_file_gives_the_accuracy_in_its_metadata(exported, trained, capsys):
    int8, _ = exported
    assert main(["eval", str(int8), "--data", str(trained.ds.root), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["count"] == 9  # the validation split export verified on
    assert scored["accuracy"] == pytest.approx(read_metadata(int8)["quantization"]["int8_accuracy"])


# ---------------------------------------------------------------------------- refusals


def _swapped_quantizer(trained, monkeypatch):
    """The quantizer returns the int8 model of another run (cat and dog swapped): what an
    int8 model that lost the run's labels looks like to the verification."""
    real = int8_module.quantize
    other = load_run(trained.swapped).model.eval()
    other_float = onnx_bytes(other, torch.zeros(1, 3, 32, 32), dynamic_batch=False)

    def quantize(float_model, calibration, reduce_range):
        return real(other_float, calibration, reduce_range)

    monkeypatch.setattr(int8_module, "quantize", quantize)


def test_disagreeing_int8_model_is_refused_and_nothing_is_written(
    trained, tmp_path, capsys, monkeypatch
):
    _swapped_quantizer(trained, monkeypatch)
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "m.int8.onnx"
    args = ["export", str(trained.run32), "--int8", "--calibration-images", CALIBRATION]
    assert main([*args, "--out", str(out)]) == 2
    line = _one_line_error(capsys)
    assert "the int8 model agrees with the float one on only" in line
    assert "--min-agreement 90; nothing written" in line
    assert list(folder.iterdir()) == []  # no file, no temporary sibling
    # --min-agreement 0: the user's call, the numbers in the file
    assert main([*args, "--out", str(out), "--min-agreement", "0"]) == 0
    assert read_metadata(out)["quantization"]["agreement"] < 0.9


def test_bad_runs_and_options_are_one_line_errors(exported, trained, tmp_path, capsys):
    int8, _ = exported
    out = tmp_path / "x.onnx"
    cases = {
        "no such checkpoint": [str(tmp_path / "missing")],
        "already an exported ONNX model": [str(int8)],
        "--int8 writes an ONNX model": [str(trained.run32), "--format", "torchscript"],
        "--int8 quantizes one run": [str(trained.run32), str(trained.run16)],
        "--int8 needs an ONNX opset between 13": [str(trained.run32), "--opset", "11"],
        "names no data set to calibrate on": [
            str(make_checkpoint(tmp_path / "c", "simple", CLASSES))
        ],
    }
    for expected, args in cases.items():
        assert main(["export", *args, "--int8", "--out", str(out)]) == 2
        assert expected in _one_line_error(capsys)
        assert not out.exists()


def test_onnx_files_predict_refuses_are_one_line_errors(exported, trained, tmp_path, capsys):
    int8, _ = exported
    plain = tmp_path / "plain.onnx"  # an ONNX file without imgclf's description
    net = create("simple", num_classes=3, input_size=32).eval()
    plain.write_bytes(onnx_bytes(net, torch.zeros(1, 3, 32, 32), dynamic_batch=False))
    out = tmp_path / "p.csv"
    cases = {
        "without imgclf's description": [str(plain)],
        "runs on ONNX Runtime; drop --backend torch": [str(int8), "--backend", "torch"],
        "not a readable ONNX file": [str(tmp_path / "p.csv.onnx")],
    }
    (tmp_path / "p.csv.onnx").write_bytes(b"not onnx")
    for expected, args in cases.items():
        assert main(["predict", *args, "--input", str(trained.src), "--out", str(out)]) == 2
        assert expected in _one_line_error(capsys)
        assert not out.exists()
