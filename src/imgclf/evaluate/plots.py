"""Training curves, confusion-matrix heatmaps and reliability diagrams as PNG files.

Figures are built from :class:`matplotlib.figure.Figure` with an explicit Agg canvas,
never through ``pyplot``: no global figure registry to leak memory across epochs, no GUI
backend needed on a headless machine, and no change to the process-wide backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from imgclf.evaluate.calibration import Reliability
from imgclf.io_utils import atomic_path

_DPI = 100
_ANNOTATE_MAX_CLASSES = 20  # beyond this, cell text is too small to read
_COUNTS_TOO_MAX_CLASSES = 10  # cells are big enough for a count under the percent

PathLike = str | os.PathLike[str]

# Keyword arguments for every text that shows a name (class, recipe, run): such names are
# the user's, and matplotlib would otherwise read "$\foo$" as mathtext (and fail to draw
# it, after all the epochs) or hand it to LaTeX when the user's rc sets text.usetex.
PLAIN_TEXT: dict[str, Any] = {"parse_math": False, "usetex": False}


def save_figure(fig: Figure, path: PathLike) -> None:
    """Render ``fig`` with Agg into a PNG at ``path``, atomically."""
    FigureCanvasAgg(fig)  # attaches itself to fig; savefig then renders with Agg
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)


# ---------------------------------------------------------------------------- curves


def _number(row: Mapping[str, Any], key: str) -> float:
    # Rows may come straight from the trainer or back from metrics.csv as strings;
    # a missing, empty or None value (no validation split) is NaN.
    value = row.get(key)
    if value is None or value == "":
        return math.nan
    return float(value)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([_number(row, key) for row in rows], dtype=np.float64)


def _stage_starts(epochs: np.ndarray, stages: np.ndarray) -> list[tuple[float, int]]:
    """(x position, new stage) for each row where the stage differs from the row before."""
    known = np.isfinite(stages[1:]) & np.isfinite(stages[:-1])  # NaN != NaN is no boundary
    changes = np.flatnonzero(known & (stages[1:] != stages[:-1])) + 1
    return [(epochs[i] - 0.5, int(stages[i])) for i in changes]


def _draw_series(ax: Axes, epochs: np.ndarray, train: np.ndarray, val: np.ndarray) -> None:
    marker = "o" if len(epochs) <= 30 else None  # a lone epoch would draw nothing without one
    for values, label in ((train, "train"), (val, "val")):
        if np.isfinite(values).any():  # no "val" legend entry when there was no val split
            ax.plot(epochs, values, label=label, marker=marker, markersize=3)


def _draw_stage_lines(ax: Axes, starts: list[tuple[float, int]]) -> None:
    for x, stage in starts:
        ax.axvline(x, linestyle="--", color="grey", linewidth=1)
        # x in data units, y in axes units: the label sits at the top whatever the scale
        ax.text(
            x,
            0.98,
            f"stage {stage}",
            transform=ax.get_xaxis_transform(),
            rotation=90,
            ha="right",
            va="top",
            fontsize=8,
            color="grey",
            **PLAIN_TEXT,
        )


def plot_curves(rows: Sequence[Mapping[str, Any]], path: PathLike, *, title: str = "") -> None:
    """Loss and accuracy per global epoch, train against val, stage changes dashed.

    ``rows`` are metrics rows with ``stage``, ``epoch`` (global, 1-based), ``train_loss``,
    ``val_loss``, ``train_acc``, ``val_acc``; val values may be missing or NaN. Values may
    be strings, as read back from a CSV file. Saved as PNG, atomically.
    """
    save_figure(curves_figure(rows, title=title), path)


def curves_figure(rows: Sequence[Mapping[str, Any]], *, title: str = "") -> Figure:
    """The figure :func:`plot_curves` saves, for callers that embed it elsewhere."""
    if not rows:
        raise ValueError("no metrics rows to plot")
    rows = sorted(rows, key=lambda row: _number(row, "epoch"))
    epochs = _series(rows, "epoch")
    starts = _stage_starts(epochs, _series(rows, "stage"))

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, kind, label in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy")):
        _draw_series(ax, epochs, _series(rows, f"train_{kind}"), _series(rows, f"val_{kind}"))
        _draw_stage_lines(ax, starts)
        ax.set_xlabel("epoch", **PLAIN_TEXT)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylabel(label, **PLAIN_TEXT)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title, **PLAIN_TEXT)
    return fig


# ---------------------------------------------------------------------------- confusion


def _row_normalized(matrix: np.ndarray) -> np.ndarray:
    totals = matrix.sum(axis=1, keepdims=True)
    # a class with no true samples gets an all-zero row rather than 0/0
    return np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)


def _panel_inches(num_classes: int) -> float:
    # grows with the class count, capped so 100 classes stays a ~2000 px image
    return float(np.clip(3.0 + 0.3 * num_classes, 5.0, 20.0))


def _tick_fontsize(num_classes: int) -> float:
    # cells are ~13 pt tall at 100 classes on the capped 20-inch panel: 6 pt labels fit
    return float(np.clip(600.0 / num_classes, 6.0, 10.0))


def _cell_text(count: int, share: float, num_classes: int, normalize: bool) -> str:
    if not normalize:
        return str(count)
    percent = f"{100 * share:.0f}%"
    return f"{percent}\n{count}" if num_classes <= _COUNTS_TOO_MAX_CLASSES else percent


def _annotate(ax: Axes, matrix: np.ndarray, shown: np.ndarray, normalize: bool) -> None:
    num_classes = len(matrix)
    shares = _row_normalized(matrix)
    # half of the colour scale (vmax is 1 when normalized), not of the data: white text only
    # on cells that are really dark
    vmax = 1.0 if normalize else max(float(shown.max()), 1.0)
    threshold = vmax / 2
    fontsize = 9 if num_classes <= _COUNTS_TOO_MAX_CLASSES else 6
    for i in range(num_classes):
        for j in range(num_classes):
            text = _cell_text(int(matrix[i, j]), shares[i, j], num_classes, normalize)
            color = "white" if shown[i, j] > threshold else "black"  # legible on dark cells
            ax.text(
                j, i, text, ha="center", va="center", color=color, fontsize=fontsize, **PLAIN_TEXT
            )


def _draw_confusion(
    fig: Figure, ax: Axes, matrix: Any, class_names: Sequence[str], title: str, normalize: bool
) -> None:
    matrix = np.asarray(matrix)
    num_classes = len(class_names)
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(
            f"confusion matrix shape {matrix.shape} does not match {num_classes} class names"
        )
    shown = _row_normalized(matrix) if normalize else matrix
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.set_label("fraction of true class" if normalize else "count", **PLAIN_TEXT)

    fontsize = _tick_fontsize(num_classes)
    ticks = np.arange(num_classes)
    ax.set_xticks(
        ticks,
        labels=class_names,
        fontsize=fontsize,
        rotation=90 if num_classes > _ANNOTATE_MAX_CLASSES else 45,
        ha="right" if num_classes <= _ANNOTATE_MAX_CLASSES else "center",
        rotation_mode="anchor" if num_classes <= _ANNOTATE_MAX_CLASSES else "default",
        **PLAIN_TEXT,
    )
    ax.set_yticks(ticks, labels=class_names, fontsize=fontsize, **PLAIN_TEXT)
    ax.set_xlabel("predicted", **PLAIN_TEXT)
    ax.set_ylabel("true", **PLAIN_TEXT)
    if title:
        ax.set_title(title, **PLAIN_TEXT)
    if num_classes <= _ANNOTATE_MAX_CLASSES:
        _annotate(ax, matrix, shown, normalize)


def plot_confusion(
    matrix: Any,
    class_names: Sequence[str],
    path: PathLike,
    *,
    title: str = "",
    normalize: bool = True,
) -> None:
    """Heatmap of a (C, C) confusion matrix (rows true, cols predicted).

    ``normalize`` colours each row by its share of the true class (so rows read as
    recall); cells carry percent (and counts for ≤ 10 classes) up to 20 classes.
    """
    panels = [(title, matrix)]
    save_figure(confusion_figure(panels, class_names, normalize=normalize), path)


def plot_confusions_side_by_side(
    panels: Sequence[tuple[str, Any]],
    class_names: Sequence[str],
    path: PathLike,
    *,
    normalize: bool = True,
) -> None:
    """Several ``(title, matrix)`` confusion heatmaps in one row, e.g. ensemble vs best."""
    save_figure(confusion_figure(panels, class_names, normalize=normalize), path)


def confusion_figure(
    panels: Sequence[tuple[str, Any]], class_names: Sequence[str], *, normalize: bool = True
) -> Figure:
    """One heatmap per ``(title, matrix)`` in a row: the figure the two functions above save."""
    if not panels:
        raise ValueError("no confusion matrices to plot")
    side = _panel_inches(len(class_names))
    fig = Figure(figsize=((side + 1.2) * len(panels), side), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, matrix) in zip(axes, panels, strict=True):
        _draw_confusion(fig, ax, matrix, class_names, title, normalize)
    return fig


# ---------------------------------------------------------------------------- calibration


def reliability_figure(rel: Reliability, *, title: str = "") -> Figure:
    """Guo et al.'s reliability diagram: each confidence bin's accuracy as a bar (its
    count of predictions above it), the gap to the bin's mean confidence hatched, and
    the diagonal a calibrated model follows. Bars below the diagonal: overconfident."""
    edges, width = rel.edges, 1.0 / rel.bins
    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.subplots()
    filled = rel.counts > 0
    left, acc, conf = edges[:-1][filled], rel.accuracy[filled], rel.confidence[filled]
    bars = {"width": width, "align": "edge", "edgecolor": "black", "linewidth": 0.6}
    ax.bar(left, acc, color="tab:blue", label="accuracy", **bars)
    gap = {"color": "tab:red", "alpha": 0.3, "hatch": "//", "label": "gap to mean confidence"}
    ax.bar(left, conf - acc, bottom=acc, **bars, **gap)
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    for x, top, n in zip(left + width / 2, np.maximum(acc, conf), rel.counts[filled], strict=True):
        ax.text(x, top + 0.01, str(int(n)), ha="center", va="bottom", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)  # room for the counts over a full bar
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    shown = f"ECE {rel.ece:.4f} ({rel.bins} bins, {int(rel.counts.sum())} images)"
    ax.set_title(f"{title}\n{shown}" if title else shown, **PLAIN_TEXT)
    return fig


def plot_reliability(rel: Reliability, path: PathLike, *, title: str = "") -> None:
    """The reliability diagram (:func:`reliability_figure`) as a PNG at ``path``."""
    save_figure(reliability_figure(rel, title=title), path)
