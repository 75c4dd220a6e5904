"""``imgclf data check NAME --labels``: training images whose given label looks wrong.

Out-of-fold probabilities of a pretrained backbone's features (imgclf.train.out_of_fold)
go through the confident-learning rule (imgclf.evaluate.confident); what it flags is
written, most suspect first, as

``DIR/label_issues.csv``  ``file,given,suggested,score``: ``file`` as the import read it,
                          relative to the imported folder; ``score`` the out-of-fold
                          label quality in 0..1 (lower = more suspect)
``DIR/label_issues.png``  the top :data:`GALLERY_MAX` suspects, each with its given and
                          suggested class and score

with the CSV and the picture also in the data set's folder, where ``imgclf report``
shows them beside every run trained on it. The mistakes gallery of ``eval`` looks at the
validation images a trained model gets wrong; this looks at the training images, before
any training. Every file is written atomically (a new one, or the old one, never half).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.csv_safe import write_csv
from imgclf.data.cache import Dataset, load_dataset
from imgclf.data.dup_check import default_check_dir, relative_files
from imgclf.errors import UserError
from imgclf.evaluate.confident import LabelIssues, RankBy, confident_issues
from imgclf.io_utils import check_output_dir, make_folder
from imgclf.train.out_of_fold import DEFAULT_FOLDS, out_of_fold
from imgclf.train.recipe import Recipe, load_recipe

CSV_NAME = "label_issues.csv"
PNG_NAME = "label_issues.png"
CSV_COLUMNS = ("file", "given", "suggested", "score")
GALLERY_MAX = 16  # as the mistakes gallery: a 4×4 grid still reads at report width
DEFAULT_RECIPE = "lite0-photo"  # the photo recipe's backbone (imgclf.train.choose)


@dataclass(frozen=True)
class LabelCheck:
    """What a check found and wrote. ``indices``: the training images' indices in the
    data set, in the order of ``labels``, ``probs`` (out-of-fold) and ``issues``' per-image
    arrays; ``written``: every file written; ``notes``: files that could not be."""

    dataset: str
    recipe: str
    folds: int
    indices: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    issues: LabelIssues
    rows: list[tuple[str, str, str, str]]  # the CSV's rows, most suspect first
    written: list[Path]
    notes: list[str]
    feature_seconds: float
    fold_seconds: float
    features_reused: bool = False  # read from the data set's folder (an earlier check's)

    @property
    def accuracy(self) -> float:
        """Out-of-fold accuracy against the given labels."""
        return float((self.probs.argmax(axis=1) == self.labels).mean())


def check_recipe(recipe: str | Path | Recipe, model: str | None) -> Recipe:
    """The recipe whose backbone gives the features; ``model`` replaces its model (at
    that model's own input size)."""
    overrides = [f"model={model}", "input_size=null"] if model else []
    return load_recipe(recipe, overrides)


def find_label_issues(
    data: str | Path | Dataset,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    recipe: str | Path | Recipe = DEFAULT_RECIPE,
    model: str | None = None,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    rank_by: RankBy = "self_confidence",
    device: str | None = None,
    say: Callable[[str], None] = print,
) -> LabelCheck:
    """Rank the training images of ``data`` whose given label the out-of-fold model finds
    improbable (confident learning), and write :data:`CSV_NAME` and :data:`PNG_NAME` into
    ``out_dir`` (default ``./NAME-check/``) and the data set's folder."""
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    out = Path(out_dir) if out_dir is not None else default_check_dir(ds)
    check_output_dir(out)  # before minutes of features, not after
    rec = check_recipe(recipe, model)
    indices = ds.indices("train")
    fitted = out_of_fold(ds, rec, indices, folds, seed, device, say)
    labels = np.asarray(ds.labels[indices], dtype=np.int64)
    issues = confident_issues(fitted.probs, labels, rank_by)
    rows = issue_rows(ds, indices, labels, issues)
    written, notes = write_outputs(ds, out, indices, labels, issues, rows)
    times = {
        "feature_seconds": fitted.feature_seconds,
        "fold_seconds": fitted.fold_seconds,
        "features_reused": fitted.features_reused,
    }
    return LabelCheck(
        ds.name, rec.name, folds, indices, labels, fitted.probs, issues, rows, written, notes,
        **times,
    )  # fmt: skip


def issue_rows(
    ds: Dataset, indices: np.ndarray, labels: np.ndarray, issues: LabelIssues
) -> list[tuple[str, str, str, str]]:
    """The CSV's rows (:data:`CSV_COLUMNS`), most suspect first."""
    files = relative_files(ds)
    return [
        (
            files[int(indices[i])],
            ds.classes[int(labels[i])],
            ds.classes[int(issues.suggested[i])],
            f"{issues.score[i]:.6f}",
        )
        for i in issues.ranked
    ]


def write_outputs(
    ds: Dataset,
    out: Path,
    indices: np.ndarray,
    labels: np.ndarray,
    issues: LabelIssues,
    rows: list[tuple[str, str, str, str]],
) -> tuple[list[Path], list[str]]:
    """The CSV and the gallery into ``out``, then copies into the data set's folder (a
    folder that cannot be written to, e.g. a shared read-only cache, is a note, not an
    error: the check's own output is in ``out``). No issues: the CSV holds its header
    alone, and an older gallery is removed (it would show issues that are gone)."""
    make_folder(out, "--out")
    figure = gallery(ds, indices, labels, issues) if rows else None
    written: list[Path] = []
    notes: list[str] = []
    version = ds.version_root or ds.root
    for folder in (out, version):
        try:
            files = _write_into(folder, rows, figure)
            # Said as the data set's name in the cache where that still is this version.
            shown = (
                ds.root if folder == version and ds.root.resolve() == version.resolve() else folder
            )
            written += [shown / f.name for f in files]
        except (OSError, UserError) as exc:
            if folder == out:
                raise
            notes.append(f"{folder}: not written ({getattr(exc, 'strerror', None) or exc})")
    return written, notes


def _write_into(folder: Path, rows: list[tuple[str, str, str, str]], figure) -> list[Path]:
    from imgclf.evaluate.plots import save_figure

    write_csv(folder / CSV_NAME, [CSV_COLUMNS, *rows])
    if figure is None:
        (folder / PNG_NAME).unlink(missing_ok=True)
        return [folder / CSV_NAME]
    save_figure(figure, folder / PNG_NAME)
    return [folder / CSV_NAME, folder / PNG_NAME]


def gallery(ds: Dataset, indices: np.ndarray, labels: np.ndarray, issues: LabelIssues):
    """The :data:`GALLERY_MAX` most suspect training images, captioned."""
    from imgclf.evaluate.mistakes import thumbnail_grid

    top = issues.ranked[:GALLERY_MAX]
    images = [ds.images[int(indices[i])] for i in top]
    captions = [
        f"given: {ds.classes[int(labels[i])]}\n"
        f"suggested: {ds.classes[int(issues.suggested[i])]}\n"
        f"score {issues.score[i]:.3f}"
        for i in top
    ]
    title = (
        f"{ds.name}: the {len(top)} most suspect of {len(issues.ranked)} training labels "
        "(lower score = more suspect)"
    )
    return thumbnail_grid(images, captions, title=title)


def describe(check: LabelCheck, shown: int = 10) -> list[str]:
    """What ``data check --labels`` prints: the count, the top ``shown`` suspects, the
    files written."""
    n, found = len(check.labels), len(check.rows)
    features = (
        "features reused from the data set's folder"
        if check.features_reused
        else f"features {check.feature_seconds:.1f} s"
    )
    lines = [
        f"label issues in {check.dataset!r}: {found} of {n} training images "
        f"({found / max(n, 1):.1%}); out-of-fold accuracy {check.accuracy:.1%} "
        f"(recipe {check.recipe}, {check.folds} folds: {features}, "
        f"folds {check.fold_seconds:.1f} s)"
    ]
    lines += [f"  {f}: {g} → {s} (score {sc})" for f, g, s, sc in check.rows[:shown]]
    if found > shown:
        lines.append(f"  … {found - shown} more in {CSV_NAME}")
    lines.append("wrote " + ", ".join(str(p) for p in check.written))
    lines += [f"note: {note}" for note in check.notes]
    return lines
