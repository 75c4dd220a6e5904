"""Export a run, or a soft vote of runs, as one self-describing model file.

``export(runs, out)`` writes an ONNX graph (or TorchScript) whose input is the tensor the
run's preprocessing (:mod:`imgclf.data.preprocess`) produces: N×3×H×W float32, normalized
with the run's mean/std, at its input size. Everything a consumer needs to go from an image
file to a label travels in the file's metadata (ONNX ``metadata_props``; TorchScript
``_extra_files``): class names, source size, input size, mean/std and the resize policies,
so an ONNX Runtime user needs neither imgclf nor PyTorch (tests/test_export.py does it with
PIL and numpy alone).

Every export is checked before it is written: the exported model runs (ONNX Runtime for
ONNX) on a batch of the run's own validation images, else random pixels, and its outputs
must equal PyTorch's on the same images within ``ATOL``. The file is written atomically,
and only once it passed.

An ensemble (``vote="soft"`` or ``"weighted"``) is one graph that averages the members'
probabilities, in the first run's class order. Members that differ in input size or
normalization take the image at the runs' common source size and re-normalize and resize
inside the graph: normalization is a per-channel affine map, which commutes with the
bilinear resize, so this is exactly ``predict``'s "normalize, then resize from the source
size". Runs trained on caches of different sizes cannot share one input (a file is cropped
to each size separately, before any tensor exists); that is an error that says so.

Exporter: ``torch.onnx.export(dynamo=True)``, the torch.export-based exporter that is
PyTorch's default since 2.9 (the TorchScript-based one is deprecated, and it cannot export
the antialiased resize an ensemble needs: no ``aten::_upsample_bilinear2d_aa``).
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgclf import __version__
from imgclf.data.preprocess import Preprocess, batch_to_input
from imgclf.errors import ExportError, UserError
from imgclf.inference.runs import RunSet, declared_vote, load_runs, resolve_weights
from imgclf.io_utils import atomic_path, check_output_file
from imgclf.runtime.onnx import DEFAULT_OPSET, onnx_bytes, ort_session, run_onnx, unsupported_reason

FORMATS = ("onnx", "torchscript")
VOTES = ("soft", "weighted")  # the votes one graph can compute: means of probabilities
ATOL = 1e-4  # issue #13: exported outputs equal PyTorch's within 1e-4
VERIFY_IMAGES = 16
METADATA_KEY = "imgclf"  # the whole description as one JSON value, beside the flat keys
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


# ---------------------------------------------------------------------------- graphs


class Renormalize(nn.Module):
    """One member inside an ensemble graph: the graph's input (normalized with the graph's
    mean/std at the graph's size) → this member's input → its probabilities, columns in
    the graph's class order."""

    def __init__(self, model: nn.Module, pre: Preprocess, graph: Preprocess, order: np.ndarray):
        super().__init__()
        self.model = model
        # x_graph = (p - m0) / s0 and x_member = (p - m) / s, so x_member = x_graph · s0/s
        # + (m0 - m)/s: exact for the pixels, so a member sees what batch_to_input gives it.
        s0, m0 = torch.tensor(graph.std), torch.tensor(graph.mean)
        s, m = torch.tensor(pre.std), torch.tensor(pre.mean)
        self.same_norm = pre.mean == graph.mean and pre.std == graph.std
        self.register_buffer("scale", (s0 / s).view(1, 3, 1, 1))
        self.register_buffer("shift", ((m0 - m) / s).view(1, 3, 1, 1))
        self.register_buffer("order", torch.from_numpy(np.asarray(order, dtype=np.int64)))
        self.size = (pre.input_size, pre.input_size)
        self.graph_size = _size(graph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.same_norm:
            x = x * self.scale + self.shift
        if self.size != self.graph_size:
            # batch_to_input's resize, from the source size: antialiased when shrinking
            shrink = self.size[0] < self.graph_size[0] or self.size[1] < self.graph_size[1]
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=shrink)
        return torch.softmax(self.model(x).float(), dim=1).index_select(1, self.order)


class MeanVote(nn.Module):
    """Weighted mean of the members' probabilities: the soft (equal weights) and weighted
    votes of :mod:`imgclf.ensemble`, as one graph."""

    def __init__(self, members: Sequence[Renormalize], weights: Sequence[float]):
        super().__init__()
        self.members = nn.ModuleList(members)
        w = np.asarray(weights, dtype=np.float64)
        self.weights = [float(v) for v in w / w.sum()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x) * self.weights[0]
        for member, w in zip(self.members[1:], self.weights[1:], strict=True):
            out = out + member(x) * w
        return out


def _size(pre: Preprocess) -> tuple[int, int]:
    return (pre.input_size, pre.input_size)


@dataclass
class Graph:
    """What gets exported: the module, the preprocessing its input follows, and what it
    outputs (``logits`` for one run, ``probabilities`` for a vote)."""

    module: nn.Module
    preprocess: Preprocess
    classes: list[str]
    runs: list[str]
    output: str
    vote: str | None = None
    weights: list[float] | None = None
    members: list[dict[str, Any]] = field(default_factory=list)

    def metadata(self) -> dict[str, str]:
        """ONNX ``metadata_props``: string → string. Flat keys for a reader in a hurry, and
        the same facts as one JSON object under ``imgclf``."""
        pre = self.preprocess.to_dict()
        info = {
            "format": "imgclf-export-1",
            "imgclf_version": __version__,
            "classes": self.classes,
            "input": "float32 N×3×H×W, RGB, (pixels/255 - mean) / std",
            "input_name": "input",
            "output": self.output,
            "output_name": self.output,
            **pre,
            "preprocessing": pre,
            "runs": self.runs,
            "vote": self.vote,
            "weights": self.weights,
            "members": self.members,
        }
        flat = {k: json.dumps(v) for k, v in info.items() if not isinstance(v, str)}
        flat.update({k: v for k, v in info.items() if isinstance(v, str)})
        return {**flat, METADATA_KEY: json.dumps(info)}

    def onnx(self, example: torch.Tensor, opset: int, dynamic_batch: bool) -> bytes:
        """The graph as ONNX bytes with its metadata (``export``; ``export --int8``
        quantizes these)."""
        options = {"opset": opset, "dynamic_batch": dynamic_batch, "output_name": self.output}
        return onnx_bytes(self.module, example, metadata=self.metadata(), **options)


def build_graph(rs: RunSet, vote: str = "soft", weights: Sequence[float] | None = None) -> Graph:
    """One run's model, or the mean vote of several, with the preprocessing of its input."""
    pres = [Preprocess.from_state(lr.state) for lr in rs.runs]
    for lr in rs.runs:
        lr.model.eval()
    if len(rs.runs) == 1:
        return Graph(rs.runs[0].model, pres[0], rs.classes, rs.names, "logits")
    if vote not in VOTES:
        raise ExportError(
            f"--vote {vote}: an exported ensemble averages probabilities; use --vote soft or "
            "--vote weighted (a hard vote's tie-break is not a tensor op worth exporting)"
        )
    sources = {p.source_size for p in pres}
    if len(sources) > 1:
        shown = ", ".join(f"{n} {p.source_size}" for n, p in zip(rs.names, pres, strict=True))
        raise ExportError(
            f"runs were trained on images of different sizes ({shown}): a file is cropped to "
            "each size before any tensor exists, so one graph input cannot serve them all; "
            "export them separately"
        )
    first = pres[0]
    if len({p.input_size for p in pres}) == 1:
        graph_pre = first  # one input size: the graph takes the first run's input as is
    else:
        # Sizes differ: the graph takes the image at the common source size, and each
        # member resizes it as batch_to_input would have. Non-square sources are rare
        # (imports crop squares); the resize inside the graph handles them all the same.
        h, w = first.source_size
        if h != w:
            raise ExportError(
                f"runs with different input sizes and a non-square source size {h}×{w}: "
                "export them separately"
            )
        graph_pre = Preprocess(first.source_size, h, first.mean, first.std)
    members = [
        Renormalize(lr.model, pre, graph_pre, order)
        for lr, pre, order in zip(rs.runs, pres, rs.orders, strict=True)
    ]
    w = [1.0] * len(members) if vote == "soft" else list(resolve_weights(rs, weights))
    described = [
        {"run": n, "model": lr.state["model_name"], **p.to_dict()}
        for n, lr, p in zip(rs.names, rs.runs, pres, strict=True)
    ]
    return Graph(
        MeanVote(members, w),
        graph_pre,
        rs.classes,
        rs.names,
        "probabilities",
        vote=vote,
        weights=[float(v) for v in np.asarray(w) / sum(w)],
        members=described,
    )


def reference_outputs(rs: RunSet, graph: Graph, pixels: torch.Tensor) -> np.ndarray:
    """What ``predict`` computes on these uint8 source-size pixels, through PyTorch: logits
    for one run, the mean of the members' probabilities for a vote."""
    outs = []
    with torch.inference_mode():
        for lr, order in zip(rs.runs, rs.orders, strict=True):
            x = Preprocess.from_state(lr.state).batch_to_input(pixels, channels_last=False)
            logits = lr.model(x).float()
            if len(rs.runs) == 1:
                return logits.numpy()
            outs.append(torch.softmax(logits, dim=1)[:, torch.from_numpy(order)].numpy())
    w = np.asarray(graph.weights, dtype=np.float64)
    return np.tensordot(w, np.stack(outs).astype(np.float64), axes=1).astype(np.float32)


# ---------------------------------------------------------------------------- verify data


def sample_pixels(rs: RunSet, graph: Graph, count: int = VERIFY_IMAGES) -> tuple[torch.Tensor, str]:
    """``count`` uint8 images at the source size: the first run's validation images when
    its data set is still in the cache, else random pixels (and the description says so)."""
    from imgclf.data.cache import load_dataset

    size = graph.preprocess.source_size
    where = rs.runs[0].state.get("dataset")
    try:
        ds = load_dataset(where) if where else None
    except (UserError, OSError, ValueError, KeyError):
        ds = None
    if ds is not None and ds.image_size == tuple(size):
        split = "val" if ds.has_split("val") and len(ds.indices("val")) else "all"
        idx = ds.indices(split)[:count]
        if len(idx):
            images = torch.from_numpy(np.array(ds.images[idx]))
            return images, f"{len(idx)} {split} images of {ds.name!r}"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, *size, 3), dtype=np.uint8)
    return torch.from_numpy(images), f"{count} random images (the run's data set is not here)"


# ---------------------------------------------------------------------------- exporters


def _exported(
    graph: Graph,
    format: str,
    x: torch.Tensor,
    example: torch.Tensor,
    opset: int,
    dynamic_batch: bool,
) -> tuple[bytes, np.ndarray, str]:
    """The file's bytes, its outputs on ``x`` (run by its runtime) and that runtime's name."""
    if format == "onnx":
        data = graph.onnx(example, opset, dynamic_batch)
        return data, run_onnx(ort_session(data), x.numpy(), dynamic_batch), "ONNX Runtime"
    data, traced = _torchscript_bytes(graph, example)
    with torch.inference_mode():
        got = traced(x).float().numpy()
    return data, got, "TorchScript"


def _torchscript_bytes(graph: Graph, example: torch.Tensor) -> tuple[bytes, Any]:
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        try:
            traced = torch.jit.trace(graph.module, example, check_trace=False)
        except Exception as exc:
            raise ExportError(f"cannot trace to TorchScript: {unsupported_reason(exc)}") from exc
        buffer = io.BytesIO()
        extra = {"imgclf.json": graph.metadata()[METADATA_KEY]}
        torch.jit.save(traced, buffer, _extra_files=extra)
    return buffer.getvalue(), traced


# ---------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    path: Path
    format: str
    runs: list[str]
    max_abs_diff: float
    verified_on: str
    runtime: str
    labels_agree: bool
    seconds: float
    metadata: dict[str, str]

    def summary(self) -> str:
        # Within 1e-4 a label can still flip where two classes tie to 1e-5: say so.
        labels = "same top-1 labels" if self.labels_agree else "top-1 differs on a near tie"
        return (
            f"wrote {self.path} ({self.format}, {', '.join(self.runs)}); {self.runtime} matches "
            f"PyTorch on {self.verified_on}: max |difference| {self.max_abs_diff:.1e} "
            f"≤ {ATOL:g}, {labels} ({self.seconds:.1f} s)"
        )


def _export_vote(runs: Sequence[str | os.PathLike[str]], vote: str | None) -> str:
    """The vote given, else the ensemble folders' own (read before any model loads), else
    soft; an ensemble's hard vote cannot be one graph, so it is one line asking for one."""
    if vote is not None:
        return vote
    declared = declared_vote(runs)
    if declared == "hard":
        raise ExportError(
            f"{runs[0]}: the ensemble votes hard, which one graph does not do (it averages "
            "probabilities): give --vote soft or --vote weighted"
        )
    return declared or "soft"


def default_out(runs: Sequence[str | os.PathLike[str]], format: str, vote: str) -> Path:
    """Beside the run for one run (``RUN/model.onnx``), here for an ensemble."""
    suffix = SUFFIXES[format]
    if len(runs) == 1:
        path = Path(runs[0])
        folder = path if path.is_dir() else path.parent
        return folder / f"model{suffix}"
    return Path(f"ensemble-{vote}{suffix}")


def export(
    runs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    format: str = "onnx",
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    vote: str | None = None,
    weights: Mapping[str, float] | Sequence[float] | Sequence[str] | None = None,
    verify_images: int = VERIFY_IMAGES,
) -> ExportResult:
    """Export one run, or the ``vote`` of several, to ``out``; verified before it is written.

    ``dynamic_batch``: the graph takes any batch size (default: a batch of 1, what most
    runtimes and converters expect). ``vote``: ``soft`` or ``weighted`` (None: an ensemble
    folder's own, else soft). ``weights``: for ``vote="weighted"``, as in predict.
    The runs are loaded as a run set (:func:`imgclf.inference.runs.load_runs`); the ONNX
    mechanics are :mod:`imgclf.runtime.onnx`'s.
    """
    started = time.perf_counter()
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")
    if format == "onnx" and not 7 <= opset <= 23:
        raise ExportError(f"--opset {opset}: choose an ONNX opset between 7 and 23")
    vote = _export_vote(runs, vote)
    path = Path(out) if out is not None else default_out(runs, format, vote)
    check_output_file(path)  # before the runs load and the graph is traced and verified
    rs = load_runs(runs)
    for lr in rs.runs:
        if lr.exported:  # an ONNX graph has no PyTorch module to export again
            raise ExportError(f"{lr.path} is already an exported model; give its run folder")
    graph = build_graph(rs, vote, weights if vote == "weighted" else None)
    pixels, described = sample_pixels(rs, graph, verify_images)
    pre = graph.preprocess
    x = batch_to_input(pixels, _size(pre), pre.mean, pre.std, channels_last=False)
    expected = reference_outputs(rs, graph, pixels)
    example = x[:2] if dynamic_batch else x[:1]
    data, got, runtime = _exported(graph, format, x, example, opset, dynamic_batch)
    diff = float(np.abs(got.astype(np.float64) - expected).max())
    agree = bool((got.argmax(1) == expected.argmax(1)).all())
    if not diff <= ATOL:
        raise ExportError(
            f"the {format} model differs from PyTorch by {diff:.2e} (> {ATOL:g}) on "
            f"{described}; nothing written"
        )
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return ExportResult(
        path=path,
        format=format if format != "onnx" else f"onnx, opset {opset}",
        runs=rs.names,
        max_abs_diff=diff,
        verified_on=described,
        runtime=runtime,
        labels_agree=agree,
        seconds=time.perf_counter() - started,
        metadata=graph.metadata(),
    )


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The imgclf description stored in an exported file (ONNX or TorchScript)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        return json.loads(props[METADATA_KEY])
    extra = {"imgclf.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra["imgclf.json"])
