"""Evaluate trained runs on a dataset: by name from the cache, or an image folder path.

Classes are matched by name, never by index: a checkpoint trained on
``[cat, dog]`` scores a folder whose classes sort as ``[dog, cat]`` correctly, and a
different class set is an error that shows both.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgclf.data.cache import Dataset, load_dataset, resolve_dataset_dir
from imgclf.data.decode import Size
from imgclf.data.importer import import_dataset
from imgclf.data.loader import BatchLoader
from imgclf.data.preprocess import Preprocess
from imgclf.errors import CheckpointError, DataError
from imgclf.evaluate.metrics import Metrics, compute_metrics, infer
from imgclf.evaluate.tta import TTA
from imgclf.models import build_model_from_checkpoint
from imgclf.runtime.checkpoint import load_checkpoint
from imgclf.runtime.device import resolve_hardware


@dataclass
class LoadedRun:
    """A checkpoint rebuilt for inference."""

    path: Path
    name: str
    model: torch.nn.Module
    state: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.state["class_names"])


def load_run(run: str | Path | Any, device: torch.device | str = "cpu") -> LoadedRun:
    """A run folder (its best.pt, else last.pt), a checkpoint file, or a ``Run``."""
    path = Path(getattr(run, "path", run))
    state = load_checkpoint(path)
    model = build_model_from_checkpoint(state).to(device)
    folder = path if path.is_dir() else path.parent
    return LoadedRun(path, folder.name, model, state)


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


def label_map(run_classes: list[str], ds: Dataset) -> np.ndarray:
    """Data label index → run class index; error when the class sets differ."""
    if sorted(run_classes) != sorted(ds.classes):
        raise CheckpointError(
            f"checkpoint classes {run_classes} do not match data classes {ds.classes}"
        )
    where = {c: i for i, c in enumerate(run_classes)}
    return np.array([where[c] for c in ds.classes], dtype=np.int64)


def run_loader(lr: LoadedRun, images, labels, batch_size: int, device) -> BatchLoader:
    pre = Preprocess.from_state(lr.state)
    return BatchLoader(
        images,
        labels,
        batch_size=batch_size,
        size=pre.input_size,
        mean=pre.mean,
        std=pre.std,
        channels_last=True,
        device=device,
    )


def run_logits(
    lr: LoadedRun,
    ds: Dataset,
    split: str,
    *,
    tta: bool = False,
    batch_size: int = 512,
    device: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one run on a split, with labels in the run's class order."""
    hw = resolve_hardware(device, "auto", "auto")
    mapping = label_map(lr.classes, ds)
    idx = ds.indices(split)
    if len(idx) == 0:
        raise DataError(f"dataset {ds.name!r}: split {split!r} is empty")
    labels = mapping[ds.labels[idx]]
    loader = run_loader(lr, ds.images[idx], labels, batch_size, hw.device)
    lr.model.to(hw.device, memory_format=torch.channels_last)
    net = TTA(lr.model) if tta else lr.model
    return infer(net, loader, autocast_dtype=hw.autocast_dtype)


def evaluate(
    run: str | Path | Any,
    data: str | Path | Dataset,
    *,
    split: str | None = None,
    tta: bool = False,
    batch_size: int = 512,
    device: str | None = None,
) -> Metrics:
    """Accuracy, loss, per-class scores and confusion matrix of a run on a dataset."""
    lr = load_run(run)
    ds = open_data_for(data, [lr])[0]
    split = split or default_split(ds)
    logits, labels = run_logits(lr, ds, split, tta=tta, batch_size=batch_size, device=device)
    return compute_metrics(logits, labels, lr.classes)
