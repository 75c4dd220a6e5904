"""The validation images a model got most confidently wrong: which ones, as a CSV, and as a
thumbnail grid.

Selection is a pure function of probabilities and labels; the plot only takes the uint8
images of the rows it is given, so it never touches a dataset or a model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgclf.csv_safe import write_csv

GRID_MAX = 16  # thumbnails in mistakes.png: a 4×4 grid still reads at report width
_GRID_COLUMNS = 4
CSV_COLUMNS = ("rank", "val_index", "dataset_index", "file", "true", "predicted", "confidence")


@dataclass(frozen=True)
class Mistake:
    """One wrongly predicted sample; ``index`` is its position in the scored split."""

    index: int
    true: int
    predicted: int
    confidence: float  # the model's probability of its (wrong) prediction


def top_mistakes(probs: Any, labels: Any, k: int | None = GRID_MAX) -> list[Mistake]:
    """The wrong predictions, most confident first (ties: lower index first); at most ``k``,
    all of them when ``k`` is None. ``probs`` is ``(N, C)`` probabilities, ``labels`` ``(N,)``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (N, C) with N = {len(labels)} labels, got {probs.shape}")
    predicted = probs.argmax(axis=1)
    confidence = probs[np.arange(len(labels)), predicted]
    wrong = np.flatnonzero(predicted != labels)
    # stable sort on the negated confidence: equal confidences keep index order
    ranked = wrong[np.argsort(-confidence[wrong], kind="stable")]
    if k is not None:
        ranked = ranked[: max(k, 0)]
    return [
        Mistake(int(i), int(labels[i]), int(predicted[i]), float(confidence[i])) for i in ranked
    ]


def write_mistakes_csv(
    mistakes: Sequence[Mistake],
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    dataset_indices: Sequence[int] | np.ndarray | None = None,
    files: Sequence[str] | None = None,
) -> None:
    """Columns :data:`CSV_COLUMNS`. ``val_index`` is the position in the scored split,
    ``dataset_index`` the sample's index in the dataset (``dataset_indices[val_index]``) and
    ``file`` its source path (``files[dataset_index]``); both are left empty when unknown."""
    rows: list[Sequence[Any]] = [CSV_COLUMNS]
    for rank, m in enumerate(mistakes, start=1):
        ds_index = int(dataset_indices[m.index]) if dataset_indices is not None else None
        file = files[ds_index] if files is not None and ds_index is not None else ""
        rows.append(
            [
                rank,
                m.index,
                "" if ds_index is None else ds_index,
                file,
                class_names[m.true],
                class_names[m.predicted],
                f"{m.confidence:.6f}",
            ]
        )
    write_csv(path, rows)  # file and class names neutralised (imgclf.csv_safe)


def caption(m: Mistake, class_names: Sequence[str]) -> str:
    """The text under a thumbnail: true class, predicted class, confidence."""
    return f"true: {class_names[m.true]}\npred: {class_names[m.predicted]}\n{m.confidence:.1%}"


def mistakes_figure(
    images: Any, mistakes: Sequence[Mistake], class_names: Sequence[str], *, title: str = ""
):
    """A grid of ``images[i]`` (H×W×3 uint8, one per mistake, same order), captioned."""
    if len(images) != len(mistakes):
        raise ValueError(f"{len(images)} images for {len(mistakes)} mistakes")
    if not mistakes:
        raise ValueError("no mistakes to plot")
    return thumbnail_grid(images, [caption(m, class_names) for m in mistakes], title=title)


def thumbnail_grid(images: Any, captions: Sequence[str], *, title: str = ""):
    """Thumbnails of ``images`` (H×W×3 uint8), each above its caption of up to three lines,
    four to a row: the mistakes gallery's and the suspect labels' (imgclf.evaluate.label_issues)."""
    from matplotlib.figure import Figure

    from imgclf.evaluate.plots import PLAIN_TEXT

    columns = min(_GRID_COLUMNS, len(captions))
    rows = math.ceil(len(captions) / columns)
    # a cell 2.9 in tall for 2.4 wide: room for three caption lines under a square thumbnail
    fig = Figure(figsize=(2.4 * columns, 2.9 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, image, text in zip(axes, images, captions, strict=False):
        # nearest: 32 px thumbnails stay sharp pixels rather than a blur
        ax.imshow(np.asarray(image, dtype=np.uint8), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(text, fontsize=8, **PLAIN_TEXT)
    for ax in axes[len(captions) :]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10, **PLAIN_TEXT)
    return fig


def plot_mistakes(
    images: Any,
    mistakes: Sequence[Mistake],
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "",
) -> None:
    """Save :func:`mistakes_figure` as PNG, atomically."""
    from imgclf.evaluate.plots import save_figure

    save_figure(mistakes_figure(images, mistakes, class_names, title=title), path)
