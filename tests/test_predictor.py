"""The Python predictor (issue #32, item 1): ``imgclf.load(...)`` → ``clf.predict(...)``.

Every input kind, folder order, top-k, errors kept in place, and the must-hold: the same
file gets the same probabilities through the predictor, ``imgclf predict``, ``serve`` and
``eval`` on a folder. The runs are the session's tiny trained ones (helpers_runs).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imgclf
from helpers_predictions import PROB_ATOL
from helpers_runs import COLOURS, noisy_image, session_runs
from imgclf.cli import main
from imgclf.errors import CheckpointError, DataError, UserError
from imgclf.evaluate.metrics import compute_metrics
from imgclf.inference.engine import run_logits
from imgclf.inference.rows import top_k_pairs
from imgclf.inference.runs import load_run
from imgclf.predict import predict

# What predict's CSV prints (6 decimals) can differ from the float it printed by half a unit.
CSV_ATOL = 5e-7 + 1e-9
# Relative path → class. Numbers that sort wrongly as text, a subfolder, a JPEG, a wide
# image (cover-cropped), a grey one, one under the source size; and a corrupt file.
IMAGES = {
    "1.png": "cat",
    "2.png": "dog",
    "10.png": "bird",
    "sub/3.jpg": "cat",
    "sub/9.png": "dog",
    "wide.png": "bird",
    "grey.png": "cat",
    "tiny.png": "dog",
}
SIZES = {"wide.png": (40, 90), "tiny.png": (12, 12)}
CORRUPT = "sub/broken.png"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return session_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def clf(trained):
    return imgclf.load(trained.run32)


def make_inputs(root: Path) -> Path:
    rng = np.random.default_rng(5)
    for rel, cls in IMAGES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(noisy_image(COLOURS[cls], SIZES.get(rel, (32, 32)), rng))
        (img.convert("L") if rel == "grey.png" else img).save(path)
    (root / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (root / "notes.txt").write_text("not an image")
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def probs_of(result) -> np.ndarray:
    return np.array(list(result.probs.values()))


# ---------------------------------------------------------------- inputs


def test_every_input_kind_gives_the_files_answer(clf, trained, tmp_path):
    root = make_inputs(tmp_path / "in")
    png, wide, jpg = root / "1.png", root / "wide.png", root / "sub" / "3.jpg"
    kinds = [
        str(png),  # a path as text
        png,  # a Path
        Image.open(png),  # a PIL image, lazily opened
        np.asarray(Image.open(png).convert("RGB")),  # H×W×3 uint8
        png.read_bytes(),  # a file's bytes
        Image.open(wide),  # cover-cropped from 40×90, as the file is
        np.asarray(Image.open(wide)),
        jpg.read_bytes(),
        Image.open(root / "grey.png"),  # mode L → RGB, as the file
        trained.run32 / "best.pt",  # not an image: its own error, nothing else lost
    ]
    got = clf.predict(kinds, probs=True)
    assert [r.source for r in got] == [str(png), str(png), 2, 3, 4, 5, 6, 7, 8, str(kinds[-1])]
    files = clf.predict([png, wide, jpg, root / "grey.png"], probs=True)
    same_as = [0, 0, 0, 0, 0, 1, 1, 2, 3]
    for result, k in zip(got, same_as, strict=False):
        assert result.error is None
        assert result.label == files[k].label in COLOURS
        np.testing.assert_allclose(probs_of(result), probs_of(files[k]), rtol=0, atol=1e-6)
    assert got[-1].label is None and got[-1].error == "not an image Pillow can read"

    one = clf.predict(Image.open(png))  # a lone image: a list of one result
    assert len(one) == 1 and one[0].source == 0 and one[0].label == files[0].label
    batch = np.stack([np.asarray(Image.open(png).convert("RGB"))] * 2)  # N×H×W×3: N images
    assert [r.label for r in clf(batch)] == [files[0].label] * 2  # clf(x) is clf.predict(x)


def test_folder_order_and_answers_match_predicts_csv(clf, trained, tmp_path):
    root = make_inputs(tmp_path / "in")
    predict([trained.run32], root, tmp_path / "pred.csv")
    rows = read_csv(tmp_path / "pred.csv")
    got = clf.predict(root)
    assert [r.source for r in got] == [str(root / row["file"]) for row in rows]
    assert [r.source for r in got][:3] == [str(root / n) for n in ("1.png", "2.png", "10.png")]
    for result, row in zip(got, rows, strict=True):
        assert (result.label or "") == row["label"]
        assert (result.error or "") == row["error"]
        if row["confidence"]:
            assert math.isclose(result.confidence, float(row["confidence"]), abs_tol=CSV_ATOL)
    assert sum(r.error is not None for r in got) == 1


def test_top_k_pairs_are_sorted_and_sum_to_at_most_one(clf, tmp_path):
    root = make_inputs(tmp_path / "in")
    files = [root / n for n in IMAGES]
    for result in clf.predict(files, top_k=2, probs=True):
        assert len(result.top_k) == 2
        assert result.top_k[0] == (result.label, result.confidence)
        scores = [p for _, p in result.top_k]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) <= 1.0 + 1e-6
        assert set(result.probs) == set(clf.classes)
        assert math.isclose(sum(result.probs.values()), 1.0, abs_tol=1e-5)
    every = clf.predict(files[:1], top_k=10)[0].top_k  # more than there are classes: all
    assert sorted(label for label, _ in every) == sorted(clf.classes)
    assert clf.predict(files[:1])[0].probs is None  # only when asked
    # Equal scores keep class order, as the vote's tie-break does.
    tied = top_k_pairs(np.array([0.25, 0.5, 0.25]), ["a", "b", "c"], 3)
    assert tied == [("b", 0.5), ("a", 0.25), ("c", 0.25)]


def test_an_unreadable_input_gets_its_error_and_the_others_their_answers(clf, tmp_path):
    root = make_inputs(tmp_path / "in")
    good = [root / "1.png", root / "2.png", root / "10.png"]
    wrong_array = np.zeros((8, 8), dtype=np.float32)
    mixed = [good[0], root / CORRUPT, good[1], b"", wrong_array, b"GIF89a...", good[2]]
    got = clf.predict(mixed, probs=True)
    alone = clf.predict(good, probs=True)
    assert [r.error is None for r in got] == [True, False, True, False, False, False, True]
    for result, want in zip([got[0], got[2], got[6]], alone, strict=True):
        assert result.label == want.label
        np.testing.assert_allclose(probs_of(result), probs_of(want), rtol=0, atol=1e-6)
    assert got[1].source == str(root / CORRUPT) and got[1].error
    assert got[3].error == "empty file (0 bytes)"
    assert got[4].error.startswith("not an H×W×3 uint8 array")
    for bad in (got[1], got[3], got[4], got[5]):
        assert "\n" not in bad.error and bad.label is None and bad.top_k == []

    proba = clf.predict_proba(mixed)
    assert proba.shape == (len(mixed), len(clf.classes)) and proba.dtype == np.float64
    assert np.isnan(proba[[1, 3, 4, 5]]).all() and not np.isnan(proba[[0, 2, 6]]).any()
    np.testing.assert_allclose(proba[[0, 2, 6]], [probs_of(r) for r in alone], atol=1e-6)


def test_several_chunks_keep_every_result_in_place(trained, tmp_path):
    root = make_inputs(tmp_path / "in")
    whole = imgclf.load(trained.run32).predict(root)
    small = imgclf.load(trained.run32, batch_size=2, workers=1).predict(root)
    assert [(r.source, r.label, r.error) for r in small] == [
        (r.source, r.label, r.error) for r in whole
    ]


# ---------------------------------------------------------------- one answer on every path


def test_predictor_predict_serve_and_eval_give_the_same_probabilities(trained, tmp_path):
    """The must-hold: per file, the predictor's probabilities are serve's (every class),
    predict's (the voted label and its score, as printed) and eval's (every class, through
    the folder's import at the run's size; and ``imgclf.evaluate`` on the folder scores them
    alike), for the 32-px run and the 16-px one whose batches are resized."""
    from fastapi.testclient import TestClient

    from imgclf.serve import Predictor, create_app

    files = [Path(f) for f in trained.ds.files()]  # the folder, as eval imports it
    truth = np.array([trained.ds.classes.index(f.parent.name) for f in files])
    for run in (trained.run32, trained.run16):
        clf = imgclf.load(run)
        mine = clf.predict_proba(files)
        assert not np.isnan(mine).any()

        logits, labels = run_logits(load_run(run), trained.ds, "all", device="cpu")
        np.testing.assert_allclose(mine, torch.softmax(logits, 1), rtol=0, atol=PROB_ATOL)
        assert (labels.numpy() == [clf.classes.index(trained.ds.classes[t]) for t in truth]).all()
        on_folder = imgclf.evaluate(run, trained.src)  # `imgclf eval RUN --data FOLDER`
        scored = compute_metrics(mine, labels, clf.classes, from_probs=True)
        assert (scored.confusion == on_folder.confusion).all()
        assert math.isclose(scored.loss, on_folder.loss, rel_tol=0, abs_tol=PROB_ATOL)

        upload = [("file", (f.name, f.read_bytes())) for f in files]
        app = create_app(Predictor([run], top_k=len(clf.classes)))
        with TestClient(app, base_url="http://127.0.0.1") as client:
            answers = client.post("/predict", files=upload).json()["predictions"]
        tops = [{t["label"]: t["probability"] for t in a["top"]} for a in answers]
        served = np.array([[top[c] for c in clf.classes] for top in tops])
        np.testing.assert_allclose(mine, served, rtol=0, atol=PROB_ATOL)

        predict([run], trained.src, tmp_path / "p.csv")
        rows = {str(trained.src / r["file"]): r for r in read_csv(tmp_path / "p.csv")}
        for f, row in zip(files, mine, strict=True):
            csv_row = rows[str(f)]
            assert csv_row["label"] == clf.classes[int(row.argmax())]
            assert math.isclose(row.max(), float(csv_row["confidence"]), abs_tol=CSV_ATOL)


def test_a_soft_vote_of_two_runs_is_predicts(trained, tmp_path, capsys):
    root = make_inputs(tmp_path / "in")
    runs = [str(trained.run32), str(trained.swapped)]
    out = tmp_path / "soft.csv"
    assert main(["predict", *runs, "--input", str(root), "--out", str(out), "--vote", "soft"]) == 0
    rows = read_csv(out)
    clf = imgclf.load(runs, vote="soft")
    assert clf.runs == ["run32", "swapped"]
    got = clf.predict(root, probs=True)
    assert len(got) == len(rows)
    for result, row in zip(got, rows, strict=True):
        assert (result.label or "") == row["label"] and (result.error or "") == row["error"]
        if result.error is None:
            assert math.isclose(result.confidence, float(row["confidence"]), abs_tol=CSV_ATOL)
            assert math.isclose(sum(result.probs.values()), 1.0, abs_tol=1e-5)
    hard = imgclf.load(runs, vote="hard", prefer=["swapped"]).predict(root)
    main(["predict", *runs, "--input", str(root), "--out", str(out), "--prefer", "swapped"])
    assert [r.label or "" for r in hard] == [row["label"] for row in read_csv(out)]


def test_a_checkpoint_and_an_exported_onnx_file_agree_with_the_run(trained, tmp_path, capsys):
    root = make_inputs(tmp_path / "in")
    want = imgclf.load(trained.run32, backend="torch").predict_proba(root)
    from_pt = imgclf.load(trained.run32 / "best.pt").predict_proba(root)
    np.testing.assert_allclose(from_pt, want, rtol=0, atol=1e-4, equal_nan=True)

    single = tmp_path / "run32.onnx"  # the export's default: a batch of 1, logits out
    assert main(["export", str(trained.run32), "--out", str(single)]) == 0
    clf = imgclf.load(single)
    assert clf.backend == "onnx" and clf.classes == imgclf.load(trained.run32).classes
    assert clf.input_size == 32
    np.testing.assert_allclose(clf.predict_proba(root), want, rtol=0, atol=1e-4, equal_nan=True)

    runs = [str(trained.run32), str(trained.run16)]  # a vote in one graph: probabilities out
    vote = tmp_path / "vote.onnx"
    assert main(["export", *runs, "--vote", "soft", "--out", str(vote)]) == 0
    soft = imgclf.load(runs, vote="soft", backend="torch").predict_proba(root)
    exported = imgclf.load(vote).predict_proba(root)
    np.testing.assert_allclose(exported, soft, rtol=0, atol=1e-4, equal_nan=True)


# ---------------------------------------------------------------- mistakes


def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_bad_paths_and_options_are_one_line_user_errors(clf, trained, tmp_path):
    with pytest.raises(CheckpointError) as info:
        imgclf.load(tmp_path / "no-such-run")
    assert "no-such-run" in _one_line(info)
    with pytest.raises(CheckpointError) as info:
        imgclf.load(tmp_path / "missing.onnx")
    assert "missing.onnx: no such ONNX file" in _one_line(info)
    (tmp_path / "fake.onnx").write_bytes(b"not a graph at all")
    with pytest.raises(CheckpointError) as info:
        imgclf.load(tmp_path / "fake.onnx")
    assert "fake.onnx" in _one_line(info)
    with pytest.raises(CheckpointError) as info:  # in a vote too (exported files may vote)
        imgclf.load([trained.run32, tmp_path / "fake.onnx"])
    assert "fake.onnx" in _one_line(info)
    with pytest.raises(UserError) as info:
        imgclf.load(trained.run32, vote="majority")
    assert "majority" in _one_line(info)

    with pytest.raises(DataError) as info:
        clf.predict([trained.run32 / "best.pt", tmp_path / "nope.jpg"])
    assert _one_line(info) == f"{tmp_path / 'nope.jpg'}: no such file or folder"
    with pytest.raises(UserError) as info:
        clf.predict([io.BytesIO(b"")])
    assert "input 0 is a BytesIO" in _one_line(info)
    with pytest.raises(UserError) as info:
        clf.predict(tmp_path, top_k=0)
    assert "top_k=0" in _one_line(info)


def test_the_public_api_is_documented():
    from imgclf.evaluate.runs import evaluate
    from imgclf.train.api import train

    for fn in (imgclf.load, train, evaluate, imgclf.import_dataset):
        doc = fn.__doc__ or ""
        assert all(part in doc for part in ("Args:", "Returns:", "Example::")), fn.__name__
    for method in (imgclf.Classifier.predict, imgclf.Classifier.predict_proba):
        assert "Example::" in (method.__doc__ or "")
    # imgclf.train and imgclf.evaluate are callable packages: help() shows their docstring
    assert "imgclf.train(" in imgclf.train.__doc__
    assert "imgclf.evaluate(" in imgclf.evaluate.__doc__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_answers_are_the_cpus(trained, tmp_path):
    root = make_inputs(tmp_path / "in")
    cpu = imgclf.load(trained.run32, device="cpu").predict_proba(root)
    gpu = imgclf.load(trained.run32, device="cuda")
    assert gpu.device.type == "cuda"
    # bf16 or fp16 autocast on the GPU, as predict runs there: labels agree, scores close
    np.testing.assert_allclose(gpu.predict_proba(root), cpu, rtol=0, atol=2e-2, equal_nan=True)
