"""Metrics against hand-computed values, exact CSV output, plots, atomic writes, infer."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.evaluate import (
    Metrics,
    compute_metrics,
    infer,
    mistakes,
    plots,
    write_confusion_csv,
    write_per_class_csv,
)
from imgclf.io_utils import atomic_path, atomic_write_text

CLASSES = ["cat", "dog", "bird"]
LABELS = np.array([0, 0, 1, 1, 2, 2])
# predictions (argmax):  0, 1, 1, 1, 2, 0  -> 4 of 6 right
PROBS = np.array(
    [
        [0.500, 0.25, 0.250],
        [0.250, 0.50, 0.250],
        [0.250, 0.50, 0.250],
        [0.125, 0.75, 0.125],
        [0.250, 0.25, 0.500],
        [0.500, 0.25, 0.250],
    ]
)
# -log p(true): ln2, ln4, ln2, ln(4/3), ln2, ln4
EXPECTED_LOSS = (3 * math.log(2) + 2 * math.log(4) + math.log(4 / 3)) / 6


@pytest.fixture
def metrics() -> Metrics:
    return compute_metrics(PROBS, LABELS, CLASSES, from_probs=True)


# ---------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_values(metrics):
    assert metrics.count == 6
    assert metrics.accuracy == pytest.approx(4 / 6)
    assert metrics.loss == pytest.approx(EXPECTED_LOSS)
    assert metrics.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics.confusion.dtype == np.int64
    # precision = diagonal / column sum, recall = diagonal / row sum
    np.testing.assert_allclose(metrics.precision, [1 / 2, 2 / 3, 1])
    np.testing.assert_allclose(metrics.recall, [1 / 2, 1, 1 / 2])
    np.testing.assert_allclose(metrics.f1, [1 / 2, 0.8, 2 / 3])
    assert metrics.support.tolist() == [2, 2, 2]
    assert metrics.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert metrics.macro_precision == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert metrics.balanced_accuracy == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)  # mean recall


def test_unbalanced_two_classes_high_accuracy_but_balanced_accuracy_one_half():
    # 9 "common", 1 "rare"; the model says "common" every time
    labels = [0] * 9 + [1]
    result = compute_metrics(np.tile([0.8, 0.2], (10, 1)), labels, ["common", "rare"])
    assert result.accuracy == pytest.approx(0.9)
    assert result.balanced_accuracy == pytest.approx((1.0 + 0.0) / 2)
    # F1 common = 2·0.9·1 / (0.9 + 1) = 18/19; F1 rare = 0 (never predicted)
    assert result.macro_f1 == pytest.approx((18 / 19 + 0) / 2)
    assert result.to_dict()["balanced_accuracy"] == pytest.approx(0.5)


def test_balanced_accuracy_leaves_out_a_class_without_samples_macro_f1_counts_it_as_zero():
    """Labels 0,0,1,1 predicted 0,2,1,1 with a third class that has no samples but is
    predicted once: its recall is 0/0 (left out of the balanced accuracy), its F1 is 0
    (counted in macro F1, as sklearn's macro average over every listed class)."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    labels = np.array([0, 0, 1, 1])
    predicted = np.array([0, 2, 1, 1])
    result = compute_metrics(np.eye(3)[predicted], labels, ["a", "b", "c"], from_probs=True)
    assert result.recall.tolist() == [0.5, 1.0, 0.0] and result.support[2] == 0
    assert result.balanced_accuracy == pytest.approx((0.5 + 1.0) / 2)
    # F1: a = 2·1·0.5/1.5 = 2/3, b = 1, c = 0
    assert result.macro_f1 == pytest.approx((2 / 3 + 1 + 0) / 3)
    # the same numbers sklearn gives
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        assert result.balanced_accuracy == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert result.macro_f1 == pytest.approx(
        f1_score(labels, predicted, labels=[0, 1, 2], average="macro", zero_division=0)
    )


@pytest.mark.parametrize("num_classes", [2, 3, 7, 12])
def test_per_class_scores_are_sklearns_to_the_bit(num_classes):
    """The confusion matrix and per-class precision, recall, F1 and support, computed
    without sklearn (issue #30, small sets), equal sklearn's exactly on random
    predictions, classes without samples or never predicted included; and so do the
    macro F1 and balanced accuracy built on them."""
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    rng = np.random.default_rng(num_classes)
    for n in (1, 5, 50, 333):
        labels = rng.integers(0, max(1, num_classes - 1), n)  # the last class: no samples
        scores = rng.normal(size=(n, num_classes))
        scores[:, 0] -= 1.5  # class 0 rarely predicted, sometimes never
        result = compute_metrics(scores, labels, [f"c{i}" for i in range(num_classes)])
        predicted = scores.argmax(axis=1)
        every = list(range(num_classes))
        want = precision_recall_fscore_support(
            labels, predicted, labels=every, average=None, zero_division=0
        )
        for got, expected in zip(
            (result.precision, result.recall, result.f1, result.support), want, strict=True
        ):
            assert got.tolist() == expected.tolist()
        assert (
            result.confusion.tolist() == confusion_matrix(labels, predicted, labels=every).tolist()
        )
        assert result.macro_f1 == f1_score(
            labels, predicted, labels=every, average="macro", zero_division=0
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
            assert result.balanced_accuracy == pytest.approx(
                balanced_accuracy_score(labels, predicted), abs=1e-15
            )


def test_logits_give_the_same_metrics_as_probs_whatever_the_row_shift(metrics):
    logits = np.log(PROBS) + np.array([[0.0], [50.0], [-7.0], [3.0], [1000.0], [0.0]])
    from_logits = compute_metrics(
        torch.from_numpy(logits).float(), torch.from_numpy(LABELS), CLASSES
    )
    assert from_logits.loss == pytest.approx(EXPECTED_LOSS, rel=1e-5)
    assert from_logits.confusion.tolist() == metrics.confusion.tolist()
    np.testing.assert_allclose(from_logits.f1, metrics.f1)


def test_zero_probability_of_the_true_class_is_clipped_not_infinite():
    result = compute_metrics(np.array([[1.0, 0.0]]), [1], ["a", "b"], from_probs=True)
    assert math.isfinite(result.loss)
    assert result.loss == pytest.approx(-math.log(np.finfo(np.float32).eps))


def test_class_never_seen_nor_predicted_scores_zero_not_nan():
    result = compute_metrics(
        PROBS[:, [0, 1, 2, 2]] * [1, 1, 1, 0], LABELS, [*CLASSES, "fish"], from_probs=True
    )
    assert result.confusion.shape == (4, 4)
    assert result.precision[3] == result.recall[3] == result.f1[3] == 0
    assert result.support[3] == 0
    assert result.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 4)  # sklearn's macro
    assert result.balanced_accuracy == pytest.approx(2 / 3)  # over the 3 classes with samples


def test_to_dict_is_json_able(metrics):
    data = json.loads(json.dumps(metrics.to_dict(), allow_nan=False))
    assert data["count"] == 6
    assert data["balanced_accuracy"] == pytest.approx(2 / 3)
    assert data["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert data["confusion"][2] == [1, 0, 1]
    assert data["per_class"][1] == {
        "class": "dog",
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": 0.8,
        "support": 2,
    }


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        (PROBS[:, :2], LABELS, r"shape \(N, 3\)"),
        (PROBS, LABELS[:5], "labels must have shape"),
        (PROBS, LABELS + 1, r"labels must lie in \[0, 3\)"),
        (PROBS[:0], LABELS[:0], "no samples"),
    ],
)
def test_bad_inputs_are_refused(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(scores, labels, CLASSES)


# ---------------------------------------------------------------------------- CSV writers


def test_confusion_csv_exact(metrics, tmp_path):
    path = tmp_path / "confusion.csv"
    write_confusion_csv(metrics, path)
    assert path.read_text() == ("true\\pred,cat,dog,bird\ncat,1,1,0\ndog,0,2,0\nbird,1,0,1\n")


def test_per_class_csv_exact(metrics, tmp_path):
    path = tmp_path / "per_class.csv"
    write_per_class_csv(metrics, path)
    assert path.read_text() == (
        "class,precision,recall,f1,support\n"
        "cat,0.500000,0.500000,0.500000,2\n"
        "dog,0.666667,1.000000,0.800000,2\n"
        "bird,1.000000,0.500000,0.666667,2\n"
        "macro avg,0.722222,0.666667,0.655556,6\n"
        "accuracy,,,0.666667,6\n"
    )


def test_class_names_with_commas_are_quoted(tmp_path):
    result = compute_metrics(np.eye(2), [0, 1], ["a, b", "c"], from_probs=True)
    write_confusion_csv(result, tmp_path / "c.csv")
    assert (tmp_path / "c.csv").read_text().splitlines()[0] == 'true\\pred,"a, b",c'


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_only_the_target(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_atomic_write_keeps_the_old_file_when_the_writer_raises(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_temp_file_is_a_sibling_with_the_same_suffix(tmp_path):
    with atomic_path(tmp_path / "plot.png") as tmp:
        assert tmp.parent == tmp_path
        assert tmp.suffix == ".png"
        assert not tmp.exists()
        tmp.write_bytes(b"x")
    assert (tmp_path / "plot.png").read_bytes() == b"x"


# ---------------------------------------------------------------------------- plots


def curve_rows(val: bool = True) -> list[dict]:
    rows = []
    for epoch, stage in enumerate([1, 1, 1, 2, 2, 3], start=1):
        row = {"stage": stage, "epoch": epoch, "train_loss": 2.0 / epoch, "train_acc": 0.1 * epoch}
        if val:
            row |= {"val_loss": 2.2 / epoch, "val_acc": 0.09 * epoch}
        rows.append(row)
    return rows


def png_size(path) -> tuple[int, int]:
    assert path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def test_curves_png(tmp_path):
    path = tmp_path / "curves.png"
    plots.plot_curves(curve_rows(), path, title="resnet18")
    width, height = png_size(path)
    assert 800 <= width <= 1600 and 300 <= height <= 800
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_curves_mark_each_stage_boundary():
    fig = plots.curves_figure(curve_rows())
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.texts]
        assert labels == ["stage 2", "stage 3"]
        boundaries = [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"]
        assert boundaries == [3.5, 5.5]  # between epochs 3|4 and 5|6
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "val"]


def test_curves_without_val_or_with_nan_and_strings(tmp_path):
    no_val = plots.curves_figure(curve_rows(val=False))
    assert [t.get_text() for t in no_val.axes[0].get_legend().get_texts()] == ["train"]

    rows = curve_rows()
    rows[2]["val_loss"] = float("nan")
    rows[3]["val_acc"] = None
    as_csv = [
        {key: str(value) if value is not None else "" for key, value in row.items()} for row in rows
    ]
    plots.plot_curves(as_csv, tmp_path / "curves.png")
    png_size(tmp_path / "curves.png")

    plots.plot_curves(rows[:1], tmp_path / "one.png")  # a single epoch still draws
    png_size(tmp_path / "one.png")


def test_confusion_png_10_classes(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 50, size=(10, 10))
    matrix[3] = 0  # a class with no samples must not divide by zero
    names = [f"class_{i}" for i in range(10)]
    plots.plot_confusion(matrix, names, tmp_path / "cm.png", title="val")
    width, height = png_size(tmp_path / "cm.png")
    assert 500 <= width <= 1200 and 400 <= height <= 1200

    fig = plots.confusion_figure([("val", matrix)], names)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 100 and "0%\n0" in texts


def test_confusion_png_100_classes_has_no_cell_text(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 5, size=(100, 100))
    names = [f"c{i}" for i in range(100)]
    fig = plots.confusion_figure([("test", matrix)], names, normalize=False)
    assert len(fig.axes[0].texts) == 0
    plots.plot_confusion(matrix, names, tmp_path / "cm.png")
    width, height = png_size(tmp_path / "cm.png")
    assert 1500 <= width <= 2600 and 1500 <= height <= 2600


def test_side_by_side_png(tmp_path):
    matrix = np.array([[5, 1, 0], [0, 6, 0], [2, 0, 4]])
    path = tmp_path / "ensemble_vs_best.png"
    plots.plot_confusions_side_by_side(
        [("ensemble", matrix), ("best: resnet18", matrix.T)], CLASSES, path
    )
    width, height = png_size(path)
    assert width > 1.8 * height


def test_confusion_shape_must_match_class_names(tmp_path):
    with pytest.raises(ValueError, match="does not match 2 class names"):
        plots.plot_confusion(np.eye(3), ["a", "b"], tmp_path / "cm.png")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- mistakes

# Rows: true label, and the probabilities. Wrong ones: 0 (0.9 "dog"), 2 (0.6 "cat"),
# 3 (0.9 "bird", a tie with row 0: the lower index comes first), 5 (0.5 "cat").
MISTAKE_LABELS = np.array([0, 1, 2, 0, 1, 2])
MISTAKE_PROBS = np.array(
    [
        [0.05, 0.90, 0.05],
        [0.10, 0.80, 0.10],
        [0.60, 0.30, 0.10],
        [0.05, 0.05, 0.90],
        [0.20, 0.70, 0.10],
        [0.50, 0.20, 0.30],
    ]
)


def test_top_mistakes_most_confident_first_ties_by_index():
    found = mistakes.top_mistakes(MISTAKE_PROBS, MISTAKE_LABELS, k=None)
    assert [(m.index, m.true, m.predicted) for m in found] == [
        (0, 0, 1),
        (3, 0, 2),
        (2, 2, 0),
        (5, 2, 0),
    ]
    assert [m.confidence for m in found] == pytest.approx([0.9, 0.9, 0.6, 0.5])
    assert [m.index for m in mistakes.top_mistakes(MISTAKE_PROBS, MISTAKE_LABELS, k=2)] == [0, 3]
    assert mistakes.top_mistakes(np.eye(3), [0, 1, 2]) == []


def test_mistakes_csv_exact(tmp_path):
    found = mistakes.top_mistakes(MISTAKE_PROBS, MISTAKE_LABELS, k=3)
    # the split is samples 10..15 of the dataset; files are listed for every sample
    files = [f"/photos/{i}.jpg" for i in range(20)]
    path = tmp_path / "mistakes.csv"
    mistakes.write_mistakes_csv(
        found, CLASSES, path, dataset_indices=np.arange(10, 16), files=files
    )
    assert path.read_text() == (
        "rank,val_index,dataset_index,file,true,predicted,confidence\n"
        "1,0,10,/photos/10.jpg,cat,dog,0.900000\n"
        "2,3,13,/photos/13.jpg,cat,bird,0.900000\n"
        "3,2,12,/photos/12.jpg,bird,cat,0.600000\n"
    )
    mistakes.write_mistakes_csv(found[:1], CLASSES, path)  # nothing known of the dataset
    assert path.read_text().splitlines()[1] == "1,0,,,cat,dog,0.900000"


def solid_images(colours) -> np.ndarray:
    return np.stack([np.full((8, 8, 3), c, dtype=np.uint8) for c in colours])


def test_mistakes_grid_shows_each_image_with_its_caption(tmp_path):
    found = mistakes.top_mistakes(MISTAKE_PROBS, MISTAKE_LABELS, k=None)
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]
    images = solid_images(colours)
    fig = mistakes.mistakes_figure(images, found, CLASSES, title="tiny")
    captions = [ax.get_xlabel() for ax in fig.axes]
    assert captions == [
        "true: cat\npred: dog\n90.0%",
        "true: cat\npred: bird\n90.0%",
        "true: bird\npred: cat\n60.0%",
        "true: bird\npred: cat\n50.0%",
    ]
    path = tmp_path / "mistakes.png"
    mistakes.plot_mistakes(images, found, CLASSES, path)
    with Image.open(path) as im:
        pixels = {tuple(p[:3]) for _, p in im.convert("RGB").getcolors(1 << 20)}
    assert all(c in pixels for c in colours)  # every thumbnail is drawn, unblurred

    big = mistakes.top_mistakes(np.tile([0.1, 0.9, 0.0], (40, 1)), np.zeros(40), k=16)
    fig = mistakes.mistakes_figure(solid_images([(9, 9, 9)] * 16), big, CLASSES)
    assert len(big) == 16 and len(fig.axes) == 16  # a 4×4 grid
    with pytest.raises(ValueError, match="3 images for 4 mistakes"):
        mistakes.mistakes_figure(images[:3], found, CLASSES)


def test_class_names_that_look_like_mathtext_or_html_are_drawn_as_plain_text(tmp_path):
    """A class named $\\foo$ used to crash the end of a training (mathtext: unknown
    symbol) when the confusion matrix was drawn; every plot must draw it as typed."""
    names = ["$\\foo$", "a$b", "<script>alert(1)</script>"]
    plots.plot_confusion(np.eye(3, dtype=int), names, tmp_path / "cm.png", title="$\\bar$")
    plots.plot_confusions_side_by_side(
        [("$\\x$", np.eye(3)), ("$y$", np.eye(3))], names, tmp_path / "both.png"
    )
    plots.plot_curves(curve_rows(), tmp_path / "curves.png", title="$\\foo$ on $\\data$")
    found = mistakes.top_mistakes(MISTAKE_PROBS, MISTAKE_LABELS)
    mistakes.plot_mistakes(
        solid_images([(1, 2, 3)] * 4), found, names, tmp_path / "m.png", title="$\\foo$"
    )
    for name in ("cm.png", "both.png", "curves.png", "m.png"):
        png_size(tmp_path / name)
    fig = plots.confusion_figure([("$\\bar$", np.eye(3))], names)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    shown = [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.title]
    assert all(not t.get_parse_math() and not t.get_usetex() for t in shown)
    grid = mistakes.mistakes_figure(solid_images([(1, 2, 3)] * 4), found, names)
    assert grid.axes[0].get_xlabel() == "true: $\\foo$\npred: a$b\n90.0%"


# ---------------------------------------------------------------------------- infer


class Probe(torch.nn.Module):
    """Linear model that records whether it ran in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.norm = torch.nn.BatchNorm1d(3)
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return self.norm(self.linear(x))


def test_infer_collects_float32_logits_and_int64_labels_in_eval_mode():
    torch.manual_seed(0)
    model = Probe()
    model.train()
    model.norm.eval()  # a frozen BatchNorm the trainer keeps in eval mode
    batches = [(torch.randn(5, 4), torch.arange(5) % 3), (torch.randn(2, 4), [1, 2])]
    logits, labels = infer(model, batches)
    assert logits.shape == (7, 3) and logits.dtype == torch.float32
    assert not logits.requires_grad
    assert labels.tolist() == [0, 1, 2, 0, 1, 1, 2] and labels.dtype == torch.int64
    assert model.seen_training == [False, False]
    # each module's flag is restored as it was, frozen BatchNorm included
    assert model.training and model.linear.training and not model.norm.training
    with torch.no_grad():
        expected = model.norm.eval()(model.linear(torch.cat([b[0] for b in batches])))
    torch.testing.assert_close(logits, expected)


def test_infer_with_autocast_returns_float32():
    model = torch.nn.Linear(4, 3)
    logits, _ = infer(
        model, [(torch.randn(3, 4), torch.zeros(3))], device="cpu", autocast_dtype=torch.bfloat16
    )
    assert logits.dtype == torch.float32


def test_infer_no_batches_gives_empty_tensors():
    logits, labels = infer(torch.nn.Linear(4, 3), [])
    assert logits.numel() == 0 and labels.numel() == 0 and labels.dtype == torch.int64
