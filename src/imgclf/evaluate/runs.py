"""``imgclf eval`` of one run: on a dataset by name from the cache, or an image folder path.

Classes are matched by name, never by index: a checkpoint trained on
``[cat, dog]`` scores a folder whose classes sort as ``[dog, cat]`` correctly, and a
different class set is an error that shows both. Loading the run and its forward pass
are :mod:`imgclf.inference`'s; this module opens the data, scores, and draws the
reliability diagram (``eval_reliability.png`` in the run folder by default: the latest
eval's, beside training's own ``reliability.png`` of the validation split).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.data.cache import Dataset, load_dataset, resolve_dataset_dir
from imgclf.data.decode import Size
from imgclf.data.dup_check import train_duplicates
from imgclf.data.importer import import_dataset
from imgclf.data.preprocess import Preprocess
from imgclf.errors import DataError
from imgclf.evaluate.metrics import Metrics, compute_metrics, duplicate_free_scores
from imgclf.inference.engine import run_logits
from imgclf.inference.runs import LoadedRun, load_run
from imgclf.io_utils import check_output_file
from imgclf.runtime.final_fit import final_record, trained_on

EVAL_RELIABILITY = "eval_reliability.png"


def open_data(data: str | Path | Dataset, source_size: Size | None = None) -> Dataset:
    """A cached dataset by name or folder, or any importable source (imported to a temp
    cache first, with no validation split carved out, read into memory and the temp cache
    removed: evaluating a folder leaves nothing behind).

    ``source_size``: the run's training-cache size (its checkpoint's ``source_size``). A
    source is imported at that size, so its files become exactly the tensors ``predict``
    makes of them and the validation images were (imgclf.data.preprocess); a size guessed
    from the photos instead cost 14 points on portrait photos (issue #9).
    """
    if isinstance(data, Dataset):
        return data
    try:
        return load_dataset(resolve_dataset_dir(data))
    except DataError:
        if not Path(data).expanduser().exists():
            raise
    square = source_size is not None and source_size[0] == source_size[1]
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-eval-"))
    try:
        ds = import_dataset(
            data,
            "adhoc",
            val_fraction=0.0,
            dest=tmp / "adhoc",
            image_size=source_size[0] if square else None,
        )
        return dataclasses.replace(ds, images=np.array(ds.images))  # off the memory map
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_data_for(data: str | Path | Dataset, runs: list[LoadedRun]) -> list[Dataset]:
    """The dataset each run is scored on: a cached dataset as it is, or a source imported
    once per distinct training-cache size among the runs (open_data decides which)."""
    by_size: dict[Size, Dataset] = {}
    sizes = [Preprocess.from_state(lr.state).source_size for lr in runs]
    for size in sizes:
        if size not in by_size:
            by_size[size] = open_data(data, size)
    return [by_size[size] for size in sizes]


def default_split(ds: Dataset) -> str:
    for split in ("test", "val"):
        if ds.has_split(split):
            return split
    return "all"


def evaluate(
    run: str | Path | Any,
    data: str | Path | Dataset,
    *,
    split: str | None = None,
    tta: bool = False,
    batch_size: int = 512,
    device: str | None = None,
    reliability_png: str | Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> Metrics:
    """Accuracy, loss, per-class scores, confusion matrix, top-5 accuracy (more than 5
    classes) and calibration of a run on a dataset (``imgclf eval``). Also callable as
    ``imgclf.evaluate(run, data)``.

    Args:
        run: a run folder, a checkpoint file or a ``Run`` (from :func:`imgclf.train`).
        data: a cached dataset's name or folder, a :class:`~imgclf.data.cache.Dataset`,
            or any importable source (a folder of class folders, an archive…), imported
            for the occasion at the run's training-cache size and removed after.
            Classes are matched by name.
        split: ``test``, ``val``, ``train`` or ``all`` (default: ``test``, else ``val``,
            else ``all``).
        tta: average over the image and its mirror (and one-pixel shifts for images of
            64 px or less, :mod:`imgclf.evaluate.tta`).
        batch_size: images per forward pass.
        device: ``"cpu"``, ``"cuda"``…; None: a GPU when there is one.
        reliability_png: where to draw the reliability diagram (checked before scoring;
            :func:`reliability_path`).
        warn: called with the warning line when the run trained on these images (a final
            fit on its validation split; default: stderr); ``trained_on`` says which.

    Returns:
        :class:`~imgclf.evaluate.metrics.Metrics`: ``accuracy``, ``balanced_accuracy``,
        ``loss``, per-class ``precision``/``recall``/``f1``, ``confusion``,
        ``calibration`` (ECE), ``duplicate_free`` (accuracy without the images that
        have a near duplicate in train, when some do) and ``to_dict()``.

    Example::

        m = imgclf.evaluate("runs/fast-1", "photos", split="val")
        print(f"{m.accuracy:.2%}", m.confusion)
    """
    lr = load_run(run)
    if reliability_png is not None:
        check_output_file(reliability_png, "--out-dir")  # before the data is scored
    ds = open_data_for(data, [lr])[0]
    split = split or default_split(ds)
    logits, labels = run_logits(lr, ds, split, tta=tta, batch_size=batch_size, device=device)
    metrics = _held_out_metrics(lr, ds, split, logits, labels, warn)
    if reliability_png is not None and metrics.calibration is not None:
        from imgclf.evaluate.plots import plot_reliability  # matplotlib only when drawing

        title = f"{lr.name} on {ds.name} {split}"
        plot_reliability(metrics.calibration, reliability_png, title=title)
    return metrics


def _held_out_metrics(lr, ds: Dataset, split: str, logits, labels, warn) -> Metrics:
    """The scores, with what they cannot claim: the accuracy without the images that have
    a near duplicate in train, and the splits the run trained on (warned about)."""
    metrics = compute_metrics(logits, labels, lr.classes)
    free = duplicate_free_scores(logits, labels, train_duplicates(ds, split))
    seen = trained_on(lr.state, ds.root, split)
    if seen:
        (warn or _stderr_warn)(not_held_out(lr.name, lr.state, ds.name, split, seen))
    return dataclasses.replace(metrics, duplicate_free=free, trained_on=seen)


def not_held_out(
    name: str, state: dict[str, Any], dataset: str, split: str, seen: tuple[str, ...]
) -> str:
    """The warning for scores of run ``name`` (its checkpoint ``state``) on ``split`` of
    ``dataset``, which holds the splits it trained on, ``seen``: a final fit on its own
    validation split above all, whose training saw those images
    (:func:`imgclf.runtime.final_fit.trained_on`)."""
    what = " (a final fit)" if final_record(state) is not None else ""
    return (
        f"{name}{what} trained on the {' and '.join(seen)} images of {dataset!r}: its "
        f"{split} scores are not held-out ones; score it on the test split, or a folder it "
        "never saw"
    )


def _stderr_warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def reliability_path(run: str | Path | Any, out_dir: str | Path | None = None) -> Path | None:
    """Where ``imgclf eval`` draws a run's reliability diagram: ``out_dir``, else the run
    folder (a checkpoint's own folder), as :data:`EVAL_RELIABILITY`; None when that
    default folder cannot be written (a run on a read-only disk is still evaluated)."""
    path = Path(getattr(run, "path", run))
    folder = Path(out_dir) if out_dir is not None else path if path.is_dir() else path.parent
    if out_dir is None and not os.access(folder, os.W_OK):
        return None
    return folder / EVAL_RELIABILITY
