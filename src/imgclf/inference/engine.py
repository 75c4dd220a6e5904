"""The forward passes: a run over a cached data set's split (:func:`run_logits`, what
``imgclf eval`` scores).

Both feed a model what its training and validation images were fed
(:mod:`imgclf.data.preprocess`), on the device and at the precision
:mod:`imgclf.runtime.device` chooses.
"""

from __future__ import annotations

import numpy as np
import torch

from imgclf.data.cache import Dataset
from imgclf.data.loader import BatchLoader
from imgclf.data.preprocess import Preprocess
from imgclf.errors import CheckpointError, DataError
from imgclf.evaluate.metrics import infer
from imgclf.evaluate.tta import TTA
from imgclf.inference.runs import LoadedRun
from imgclf.runtime.device import resolve_hardware

# ---------------------------------------------------------------------------- data sets


def label_map(run_classes: list[str], ds: Dataset) -> np.ndarray:
    """Data label index → run class index; error when the class sets differ."""
    if sorted(run_classes) != sorted(ds.classes):
        raise CheckpointError(
            f"checkpoint classes {run_classes} do not match data classes {ds.classes}"
        )
    where = {c: i for i, c in enumerate(run_classes)}
    return np.array([where[c] for c in ds.classes], dtype=np.int64)


def run_loader(lr: LoadedRun, images, labels, batch_size: int, device) -> BatchLoader:
    """Batches of ``images`` (uint8, at the run's source size) as the run's input."""
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
