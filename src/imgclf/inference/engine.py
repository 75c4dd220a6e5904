"""The forward passes: a run set's members over decoded chunks of files
(:func:`chunk_probs`, what ``predict``, ``serve`` and the Python predictor compute;
:func:`scored_chunks`, the files of ``predict`` and the predictor decoded ahead and scored
chunk by chunk), and one run over a cached data set's split (:func:`run_logits`, what
``imgclf eval`` scores).

Both feed a model what its training and validation images were fed
(:mod:`imgclf.data.preprocess`), on the device and at the precision
:mod:`imgclf.runtime.device` chooses. A member runs on PyTorch or, where asked or measured
faster, ONNX Runtime (:mod:`imgclf.runtime.onnx`); the preprocessing is the same on both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from imgclf.data.cache import Dataset
from imgclf.data.decode import Size
from imgclf.data.loader import BatchLoader
from imgclf.data.preprocess import Preprocess
from imgclf.errors import CheckpointError, DataError, UserError
from imgclf.evaluate.metrics import infer
from imgclf.evaluate.tta import TTA
from imgclf.inference.decode import Decoded, Item, decode_ahead
from imgclf.inference.runs import LoadedRun, RunSet
from imgclf.runtime.device import Hardware, resolve_hardware
from imgclf.runtime.onnx import backend_for, onnx_net

Autocast = Callable[[], contextlib.AbstractContextManager]

# ---------------------------------------------------------------------------- members


@dataclass
class Member:
    """One run, ready to score batches: network, preprocessing, column order."""

    name: str
    net: torch.nn.Module
    preprocess: Preprocess
    order: torch.Tensor  # output columns in the first run's class order
    backend: str = "torch"  # what runs ``net``: "torch" or "onnx"


def make_members(
    rs: RunSet, device: torch.device, tta: bool, backend: str = "torch"
) -> list[Member]:
    """Every run of ``rs`` as a :class:`Member` on ``device``, in evaluation mode.

    ``tta``: each net averages its test-time views (:mod:`imgclf.evaluate.tta`).
    ``backend``: ``"torch"``, ``"onnx"`` or ``"auto"`` (per model, the one measured
    faster: :func:`imgclf.runtime.onnx.backend_for`); ONNX nets are exported once per
    checkpoint and cached.
    """
    out = []
    for lr, order in zip(rs.runs, rs.orders, strict=True):
        lr.model.to(device, memory_format=torch.channels_last).eval()
        net = TTA(lr.model) if tta else lr.model
        pre = Preprocess.from_state(lr.state)
        # The same module, run by ONNX Runtime where asked or measured faster
        runs_on = _exported_backend(lr, backend) or backend_for(
            backend, lr.state["model_name"], device
        )
        if runs_on == "onnx" and not lr.exported:
            wrapper = "tta" if tta else "plain"
            path, classes = lr.state.get("path"), len(lr.classes)
            net = onnx_net(net, pre.input_size, path, wrapper=wrapper, classes=classes)
        out.append(Member(lr.name, net, pre, torch.from_numpy(order).to(device), runs_on))
    return out


def _exported_backend(lr: LoadedRun, backend: str) -> str | None:
    """``onnx`` for an exported file (already an ONNX graph), None for a checkpoint."""
    if not lr.exported:
        return None
    if backend == "torch":
        raise UserError(
            f"{lr.path}: an exported ONNX model runs on ONNX Runtime; drop --backend torch "
            "(or give the run folder)"
        )
    return "onnx"


def autocast_for(hw: Hardware, backend: str) -> Autocast:
    """The mixed-precision context of a forward pass: the hardware's autocast dtype, none
    without one or on the ONNX backend."""

    def autocast() -> contextlib.AbstractContextManager:
        if hw.autocast_dtype is None or backend == "onnx":
            return contextlib.nullcontext()
        return torch.autocast(hw.device.type, dtype=hw.autocast_dtype)

    return autocast


def chunk_probs(
    members: list[Member],
    decoded: Decoded,
    num_rows: int,
    num_classes: int,
    device: torch.device,
    autocast: Autocast,
) -> np.ndarray:
    """Probabilities ``(models, rows, classes)`` of a chunk, columns in the run set's class
    order; the rows of files that failed to decode stay NaN. Call under
    ``torch.inference_mode()``."""
    probs = np.full((len(members), num_rows, num_classes), np.nan, dtype=np.float32)
    for m, member in enumerate(members):
        positions, images = decoded.groups[member.preprocess.source_size]
        if len(positions) == 0:
            continue
        pixels = torch.from_numpy(images).to(device, non_blocking=True)
        # The loader's own preprocessing, so predict and eval feed models identically.
        x = member.preprocess.batch_to_input(pixels)
        with autocast():
            out = member.net(x).float()
        scores = torch.softmax(out, dim=1)
        probs[m, positions] = scores[:, member.order].cpu().numpy()
    return probs


def source_sizes(members: Sequence[Member]) -> list[Size]:
    """The distinct sizes files are decoded at for ``members`` (usually one)."""
    return list(dict.fromkeys(m.preprocess.source_size for m in members))


def scored_chunks(
    members: list[Member],
    items: list[Item],
    num_classes: int,
    device: torch.device,
    autocast: Autocast,
    batch_size: int,
    threads: int,
) -> Iterator[tuple[list[Item], Decoded, np.ndarray]]:
    """``items`` in chunks of ``batch_size``, in order: each chunk, its decoding (the reason
    each file failed) and its probabilities (:func:`chunk_probs`). Chunks are decoded ahead
    in ``threads`` threads (:func:`~imgclf.inference.decode.decode_ahead`) while the models
    run on earlier ones; closing the iterator stops the threads."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    decoding = decode_ahead(chunks, source_sizes(members), threads)
    # closing: on an error, or a caller that stops early, stop the decoding threads now
    with torch.inference_mode(), contextlib.closing(decoding):
        for chunk, decoded in decoding:
            probs = chunk_probs(members, decoded, len(chunk), num_classes, device, autocast)
            yield chunk, decoded, probs


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
