"""imgclf export: ONNX / TorchScript files that equal PyTorch and describe themselves."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from helpers_export import make_checkpoint
from helpers_runs import session_runs
from imgclf.cli import main
from imgclf.data.preprocess import Preprocess
from imgclf.errors import UserError
from imgclf.export import ATOL, ExportError, export, read_metadata
from imgclf.inference.runs import load_run
from imgclf.predict import predict
from imgclf.runtime.onnx import onnx_bytes, ort_session

pytest.importorskip("onnxruntime")
CLASSES = ["bird", "cat", "dog"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return session_runs(tmp_path_factory)


def _onnx_matches_torch(path, run, batch: int = 5) -> None:
    """The file, run by ONNX Runtime on fresh inputs, gives the checkpoint's logits."""
    lr = load_run(run)
    pre = Preprocess.from_state(lr.state)
    pixels = torch.randint(0, 256, (batch, *pre.source_size, 3), dtype=torch.uint8)
    x = pre.batch_to_input(pixels, channels_last=False)
    with torch.inference_mode():
        expected = lr.model(x).numpy()
    got = ort_session(path).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - expected).max() <= ATOL


def test_scratch_run_round_trip_with_metadata(trained, tmp_path):
    out = tmp_path / "run32.onnx"
    result = export([trained.run32], out, dynamic_batch=True)
    assert out.is_file()
    assert result.max_abs_diff <= ATOL and result.labels_agree
    # verified on the run's own validation images: its cache is still there
    assert "val images of 'tiny'" in result.summary()
    _onnx_matches_torch(out, trained.run32)
    meta = read_metadata(out)
    pre = Preprocess.from_state(load_run(trained.run32).state)
    assert meta["classes"] == CLASSES
    assert meta["source_size"] == [32, 32] and meta["input_size"] == 32
    assert meta["mean"] == pytest.approx(pre.mean) and meta["std"] == pytest.approx(pre.std)
    assert meta["preprocessing"] == pre.to_dict()
    assert meta["output"] == "logits"


def test_fixed_batch_by_default(trained, tmp_path):
    out = tmp_path / "fixed.onnx"
    export([trained.run16], out)
    shape = ort_session(out).get_inputs()[0].shape
    assert shape == [1, 3, 16, 16]


def test_fast_with_whitening_stem(tmp_path):
    run = make_checkpoint(tmp_path / "fast", "fast", CLASSES)
    result = export([run], dynamic_batch=True)
    assert result.path == run / "model.onnx"
    assert "random images" in result.verified_on  # no data set behind this checkpoint
    _onnx_matches_torch(result.path, run)


@pytest.mark.slow  # ~30 s on 2 busy cores: exporting and checking Lite0 twice
def test_pretrained_backbone_lite0(tmp_path):
    run = make_checkpoint(tmp_path / "lite0", "efficientnet_lite0", CLASSES, pretrained=True)
    result = export([run], tmp_path / "lite0.onnx", dynamic_batch=True)
    _onnx_matches_torch(result.path, run)
    assert read_metadata(result.path)["mean"] == pytest.approx([127 / 255] * 3)


def test_soft_vote_of_two_input_sizes(trained, tmp_path):
    """run32 and run16 take one 32-px input; run16's is shrunk inside the graph."""
    out = tmp_path / "pair.onnx"
    result = export([trained.run32, trained.run16], out, vote="soft")
    assert result.max_abs_diff <= ATOL
    meta = read_metadata(out)
    assert meta["input_size"] == 32 and meta["weights"] == [0.5, 0.5]


@pytest.mark.slow  # ~30 s on 2 busy cores: a Lite0 member
def test_soft_vote_ensemble_resizes_and_renormalizes_inside(trained, tmp_path):
    """run32 (32 px), run16 (16 px) and a Lite0 with its own mean/std and another class
    order: one graph whose probabilities equal predict's soft vote."""
    lite = make_checkpoint(
        tmp_path / "lite0", "efficientnet_lite0", ["dog", "bird", "cat"], pretrained=True
    )
    out = tmp_path / "ensemble.onnx"
    runs = [trained.run32, trained.run16, lite]
    result = export(runs, out, vote="soft", dynamic_batch=True)
    assert result.max_abs_diff <= ATOL
    meta = read_metadata(out)
    assert meta["output"] == "probabilities" and meta["vote"] == "soft"
    assert meta["input_size"] == 32 and meta["classes"] == CLASSES
    assert [m["input_size"] for m in meta["members"]] == [32, 16, 32]

    # predict's soft vote on the raw files, against the graph fed by the metadata alone
    predict(runs, trained.src, tmp_path / "pred.csv", vote="soft")
    rows = list(csv.DictReader((tmp_path / "pred.csv").read_text().splitlines()))
    pre = Preprocess.from_state(load_run(trained.run32).state)
    session = ort_session(out)
    for row in rows[:6]:
        x = pre(path=str(trained.src / row["file"])).numpy()
        probs = session.run(None, {"input": np.ascontiguousarray(x)})[0][0]
        assert CLASSES[int(probs.argmax())] == row["label"]
        assert float(probs.max()) == pytest.approx(float(row["confidence"]), abs=1e-5)


def test_hard_vote_and_bad_options_are_one_line_errors(trained, tmp_path, capsys):
    code = main(["export", str(trained.run32), str(trained.run16), "--vote", "hard"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --vote hard")
    code = main(["export", str(tmp_path / "nothing")])
    assert code == 2 and capsys.readouterr().err.startswith("error: ")


def test_unexportable_operator_is_named():
    class Eigen(torch.nn.Module):
        def forward(self, x):
            flat = x.flatten(1)
            return torch.linalg.eigh(flat.T @ flat)[0]

    with pytest.raises(ExportError) as info:
        onnx_bytes(Eigen(), torch.randn(2, 3, 4, 4), dynamic_batch=False)
    message = str(info.value)
    assert "\n" not in message and "linalg_eigh" in message


def test_cli_export_prints_one_line(trained, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(trained.run32), "--out", str(out), "--opset", "18"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "ONNX Runtime matches PyTorch" in lines[0] and str(out) in lines[0]


def test_torchscript_round_trip(trained, tmp_path):
    out = tmp_path / "run16.torchscript.pt"
    result = export([trained.run16], out, format="torchscript")
    assert result.max_abs_diff <= ATOL
    assert read_metadata(out)["classes"] == CLASSES
    lr = load_run(trained.run16)
    x = torch.randn(3, 3, 16, 16)
    loaded = torch.jit.load(str(out))
    with torch.inference_mode():
        assert torch.allclose(loaded(x), lr.model(x), atol=ATOL)


# A consumer that has the .onnx file and nothing of imgclf: ONNX Runtime, Pillow, numpy.
CONSUMER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import onnxruntime as ort
    from PIL import Image, ImageOps

    model, files = sys.argv[1], sys.argv[2:]
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["imgclf"])
    h, w = meta["source_size"]
    size = meta["input_size"]
    mean, std = np.array(meta["mean"], np.float32), np.array(meta["std"], np.float32)

    def tensor(path):
        im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        if im.size != (w, h):  # scale to cover the source size, bicubic, centre crop
            scale = max(w / im.width, h / im.height)
            im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))),
                           Image.BICUBIC)
            left, top = (im.width - w) // 2, (im.height - h) // 2
            im = im.crop((left, top, left + w, top + h))
        if (h, w) != (size, size):  # bilinear, antialiased when shrinking (Pillow's is)
            im = im.resize((size, size), Image.BILINEAR)
        x = (np.asarray(im, np.float32) / 255 - mean) / std
        return x.transpose(2, 0, 1)[None]

    out = {}
    for f in files:
        scores = session.run(None, {meta["input_name"]: tensor(f)})[0][0]
        out[f] = meta["classes"][int(scores.argmax())]
    assert "torch" not in sys.modules and not any(m.startswith("imgclf") for m in sys.modules)
    print(json.dumps(out))
    """
)


def test_metadata_alone_predicts_like_imgclf(trained, tmp_path):
    out = tmp_path / "run32.onnx"
    export([trained.run32], out)
    predict([trained.run32], trained.src, tmp_path / "pred.csv")
    rows = list(csv.DictReader((tmp_path / "pred.csv").read_text().splitlines()))
    files = [str(trained.src / r["file"]) for r in rows]
    done = subprocess.run(
        [sys.executable, "-c", CONSUMER, str(out), *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    labels = json.loads(done.stdout)
    assert [labels[f] for f in files] == [r["label"] for r in rows]


def test_predict_onnx_backend_equals_torch_and_caches_the_export(trained, tmp_path, imgclf_home):
    runs = [trained.run32, trained.run16]
    predict(runs, trained.src, tmp_path / "torch.csv", vote="soft", backend="torch")
    predict(runs, trained.src, tmp_path / "onnx.csv", vote="soft", backend="onnx")
    torch_rows = list(csv.DictReader((tmp_path / "torch.csv").read_text().splitlines()))
    onnx_rows = list(csv.DictReader((tmp_path / "onnx.csv").read_text().splitlines()))
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in torch_rows]
    for a, b in zip(onnx_rows, torch_rows, strict=True):
        assert float(a["confidence"]) == pytest.approx(float(b["confidence"]), abs=1e-5)
    assert len(list((imgclf_home / "onnx").glob("*.onnx"))) == 2  # one per checkpoint


def test_backend_choice_rules():
    """What the choice promises, not which models the benchmark favoured: the measured
    list names real models, ``auto`` uses it only on the CPU, an explicit choice always
    wins, and a choice that cannot run is one line."""
    from imgclf.models import list_models
    from imgclf.runtime.onnx import ONNX_FASTER, backend_for, resolve_backend

    names = {spec.name for spec in list_models()}
    assert ONNX_FASTER and ONNX_FASTER.issubset(names)  # a renamed model loses its backend
    auto = resolve_backend(None)
    for name in names:
        assert backend_for(auto, name, "cuda") == "torch"  # ONNX Runtime here is CPU-only
        assert backend_for(auto, name) == ("onnx" if name in ONNX_FASTER else "torch")
        for chosen in ("torch", "onnx"):
            assert backend_for(resolve_backend(chosen), name) == chosen
    with pytest.raises(UserError, match="unknown backend"):
        resolve_backend("tensorflow")
    with pytest.raises(UserError, match="runs on the CPU"):
        resolve_backend("onnx", "cuda")
