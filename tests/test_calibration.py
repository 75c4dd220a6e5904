"""Top-5 accuracy and calibration (issue #32, item 2): the expected calibration error of
Guo et al. 2017 (15 equal-width confidence bins) on hand-made probabilities, top-5 on a
crafted example, and both through a real run: training's summary.json and reliability.png,
``imgclf eval``'s printout, JSON and eval_reliability.png, and the report."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_train import make_image_folder, tiny_recipe
from imgclf.cli import main
from imgclf.evaluate import compute_metrics
from imgclf.evaluate.calibration import reliability, top_k_accuracy
from imgclf.report import build_report

# ---------------------------------------------------------------------------- ECE by hand

# Two classes; the confidence is the larger probability. With 15 bins of width 1/15:
#   0.90 -> 13.5 -> bin 13, twice: one right, one wrong  -> |1/2 - 0.90| * 2/5 = 0.160
#   0.85 -> 12.75 -> bin 12, right                       -> |1 - 0.85|   * 1/5 = 0.030
#   0.62 -> 9.3  -> bin 9, right                         -> |1 - 0.62|   * 1/5 = 0.076
#   0.55 -> 8.25 -> bin 8, wrong                         -> |0 - 0.55|   * 1/5 = 0.110
HAND_PROBS = np.array([[0.9, 0.1], [0.9, 0.1], [0.15, 0.85], [0.62, 0.38], [0.55, 0.45]])
HAND_LABELS = np.array([0, 1, 1, 0, 1])
HAND_ECE = 0.160 + 0.030 + 0.076 + 0.110


def test_ece_of_hand_made_probabilities():
    rel = reliability(HAND_PROBS, HAND_LABELS)
    assert rel.bins == 15 and rel.ece == pytest.approx(HAND_ECE)
    assert np.flatnonzero(rel.counts).tolist() == [8, 9, 12, 13]
    assert rel.counts[[8, 9, 12, 13]].tolist() == [1, 1, 1, 2]
    assert rel.accuracy[[8, 9, 12, 13]].tolist() == [0.0, 1.0, 1.0, 0.5]
    assert rel.confidence[13] == pytest.approx(0.9)
    assert np.isnan(rel.accuracy[0])  # an empty bin: no accuracy, not 0
    # the same through the metrics, from probabilities and from logits
    metrics = compute_metrics(HAND_PROBS, HAND_LABELS, ["a", "b"], from_probs=True)
    assert metrics.ece == pytest.approx(HAND_ECE)
    logits = torch.from_numpy(np.log(HAND_PROBS) + 3.0)
    assert compute_metrics(logits, HAND_LABELS, ["a", "b"]).ece == pytest.approx(HAND_ECE)
    data = json.loads(json.dumps(metrics.to_dict(), allow_nan=False))
    assert data["ece"] == pytest.approx(HAND_ECE) and data["ece_bins"] == 15
    assert data["top5_accuracy"] is None  # 2 classes: top-5 says nothing


def test_a_calibrated_model_scores_zero_and_a_sure_wrong_one_scores_one():
    # right 3 times in 4 at confidence 0.75: exactly calibrated
    probs = np.array([[0.75, 0.25]] * 4)
    assert reliability(probs, np.array([0, 0, 0, 1])).ece == pytest.approx(0.0)
    # certain (confidence 1, the last bin: (14/15, 1]) and always wrong
    sure = np.array([[1.0, 0.0], [0.0, 1.0]])
    rel = reliability(sure, np.array([1, 0]))
    assert rel.ece == pytest.approx(1.0) and rel.counts[14] == 2


# ---------------------------------------------------------------------------- top-5


def test_top5_accuracy_on_a_crafted_example():
    classes = list("abcdefg")  # 7 classes: top-5 is reported
    scores = np.array(
        [
            [9, 1, 1, 1, 1, 1, 1],  # true a: ranked 1st            -> in
            [7, 6, 5, 4, 3, 2, 1],  # true e (score 3): ranked 5th  -> in
            [7, 6, 5, 4, 3, 2, 1],  # true f (score 2): ranked 6th  -> out
            [5, 5, 5, 5, 5, 5, 5],  # true e, all tied: class order 5th -> in
            [5, 5, 5, 5, 5, 5, 5],  # true f, all tied: class order 6th -> out
            [1, 2, 3, 4, 5, 6, 7],  # true g: ranked 1st            -> in
        ],
        dtype=np.float64,
    )
    labels = np.array([0, 4, 5, 4, 5, 6])
    assert top_k_accuracy(scores, labels, 5) == pytest.approx(4 / 6)
    assert top_k_accuracy(scores, labels, 1) == pytest.approx(2 / 6)  # rows 1 and 6
    metrics = compute_metrics(scores, labels, classes)
    assert metrics.top5_accuracy == pytest.approx(4 / 6)
    assert metrics.accuracy == pytest.approx(2 / 6)  # top-1 is accuracy
    five = compute_metrics(scores[:, :5], np.array([0, 4, 0, 4, 0, 4]), classes[:5])
    assert five.top5_accuracy is None  # 5 classes: every label is in the top 5


# ---------------------------------------------------------------------------- a real run

SIX = ("a", "b", "c", "d", "e", "f")  # more than 5 classes: top-5 accuracy is reported


@pytest.fixture(scope="module")
def six(tmp_path_factory) -> SimpleNamespace:
    """A finished one-epoch run on six classes (d, e and f share a colour, so it is not
    sure of everything), and its data set."""
    import imgclf

    root = tmp_path_factory.mktemp("calibration")
    src = make_image_folder(root / "src", per_class=8, classes=SIX)
    ds = imgclf.import_dataset(src, "six", dest=root / "six", warn=lambda msg: None)
    run = imgclf.train(tiny_recipe(epochs=1), ds, out=root / "run", threads=1, progress=False)
    return SimpleNamespace(run=run.path, data=ds.root, ds=ds)


def naive_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """The paper's sum written out bin by bin, B_m = ((m-1)/M, m/M]."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    total = 0.0
    for m in range(1, bins + 1):
        inside = (confidence > (m - 1) / bins) & (confidence <= m / bins)
        if inside.any():
            acc = (predicted[inside] == labels[inside]).mean()
            total += inside.sum() / len(labels) * abs(acc - confidence[inside].mean())
    return total


def val_probs(six: SimpleNamespace) -> tuple[np.ndarray, np.ndarray]:
    from imgclf.inference.engine import run_logits
    from imgclf.inference.runs import load_run

    logits, labels = run_logits(load_run(six.run), six.ds, "val", tta=False, batch_size=64)
    return torch.softmax(logits.double(), dim=1).numpy(), labels.numpy()


def is_png(path: Path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] > 100


def test_training_writes_the_reliability_diagram_and_the_scores(six):
    summary = json.loads((six.run / "summary.json").read_text())
    probs, labels = val_probs(six)
    assert summary["val_ece"] == pytest.approx(naive_ece(probs, labels), abs=1e-5)
    top5 = (np.argsort(-probs, axis=1, kind="stable")[:, :5] == labels[:, None]).any(axis=1)
    assert summary["val_top5_accuracy"] == pytest.approx(top5.mean(), abs=1e-6)
    assert is_png(six.run / "reliability.png")


def test_eval_prints_and_stores_top5_and_ece_and_draws_into_the_run(six, tmp_path, capsys):
    args = ["eval", str(six.run), "--data", str(six.data), "--split", "val"]
    image = six.run / "eval_reliability.png"
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    probs, labels = val_probs(six)
    assert result["ece"] == pytest.approx(naive_ece(probs, labels), abs=1e-5)
    assert result["ece_bins"] == 15 and 0.0 <= result["top5_accuracy"] <= 1.0
    assert result["top5_accuracy"] >= result["accuracy"]
    assert result["reliability_image"] == str(image) and is_png(image)
    image.unlink()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"top-5 accuracy {result['top5_accuracy']:.4f}" in out
    assert f"expected calibration error {result['ece']:.4f} (15 bins)" in out
    assert f"reliability diagram: {image}" in out and is_png(image)
    # --out-dir puts it elsewhere; the run folder is left as it is
    image.unlink()
    assert main([*args, "--out-dir", str(tmp_path / "plots")]) == 0
    assert is_png(tmp_path / "plots" / "eval_reliability.png") and not image.exists()


def test_report_shows_the_ece_and_the_reliability_diagram(six, tmp_path):
    summary = json.loads((six.run / "summary.json").read_text())
    page_path = tmp_path / "report.html"
    build_report([six.run], page_path)
    page = page_path.read_text(encoding="utf-8")
    ece = f"{summary['val_ece']:.4f}"
    assert f'<td>expected calibration error (15 bins)</td><td class="num">{ece}</td>' in page
    assert f'<td>top-5 accuracy</td><td class="num">{summary["val_top5_accuracy"]:.4f}' in page
    calibration = re.search(r"<h3>Calibration \(validation\)</h3><img src=\"([^\"]+)\"", page)
    assert calibration and calibration.group(1).startswith("data:image/png;base64,")
    md = build_report([six.run], tmp_path / "report.md")
    text = md.path.read_text(encoding="utf-8")
    assert "### Calibration (validation)" in text and f"| {ece} |" in text
    link = re.search(r"!\[[^\]]*reliability diagram\]\(<([^>]+)>\)", text).group(1)
    assert is_png(tmp_path / link)


def test_eval_of_a_run_it_cannot_write_to_still_scores_and_says_so(six, monkeypatch, capsys):
    """A run on a read-only disk (os.access says so even to root there) is evaluated; the
    diagram is left out with one line, not an error."""
    import os

    image = six.run / "eval_reliability.png"
    image.unlink(missing_ok=True)
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == six.run else real(p, mode)
    )
    args = ["eval", str(six.run), "--data", str(six.data), "--split", "val"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reliability diagram: not drawn (the run folder is read-only" in out
    assert "expected calibration error" in out and not image.exists()
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reliability_image"] is None
