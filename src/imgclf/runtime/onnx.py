"""ONNX mechanics, and where a model runs for ``predict`` and ``serve``: PyTorch eager, or
ONNX Runtime.

The low layer of ``imgclf export`` and of the ONNX backend: :func:`onnx_bytes` exports a
module with ``torch.onnx.export(dynamo=True)``, :func:`ort_session` opens a graph in ONNX
Runtime (``onnx`` and ``onnxruntime`` are imported when used: the CLI's --help stays
instant). What a graph means (the preprocessing, the vote, the metadata) is
:mod:`imgclf.export`'s business, not this module's.

The ONNX backend is a drop-in ``nn.Module``: :class:`OnnxNet` takes the same normalized
float batch the PyTorch model takes (preprocessing stays :mod:`imgclf.data.preprocess`,
on both backends) and returns its logits as a tensor. The graph is the one ``imgclf
export`` writes, with a dynamic batch, exported once per checkpoint and kept in
``$IMGCLF_HOME/onnx/`` under a hash of the checkpoint's bytes, the exporter's versions and
the wrapper (TTA or not), so later runs load it in milliseconds instead of re-exporting
(2–8 s here). A cached graph is checked before use (input shape, class count, its logits
on a probe image against those saved beside it at export) and exported again where it is
not this checkpoint's (a file there may have been replaced, copied or damaged).

Default backend: per model, the one measured faster on this project's CPU
(:data:`ONNX_FASTER`, benchmarks/bench_onnx.py, docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf import __version__
from imgclf.errors import ExportError, UserError
from imgclf.io_utils import atomic_path, atomic_write_text
from imgclf.paths import imgclf_home

# Opset 18: the first whose Resize has the ``antialias`` attribute, needed to shrink an
# ensemble member's input as the batch loader does (antialiased bilinear).
DEFAULT_OPSET = 18

BACKENDS = ("torch", "onnx")
# Models ONNX Runtime runs faster than PyTorch eager on the CPU, measured by
# benchmarks/bench_onnx.py (docs/benchmarks.md §6, 2-core AMD EPYC, idle): Lite0 at
# 224 px 4.5× (depthwise convolutions), `fast` at 32 px 1.26× (under load the two tied).
# Every model not measured stays on PyTorch.
ONNX_FASTER = frozenset({"efficientnet_lite0", "fast"})


# ---------------------------------------------------------------------------- export


_OP_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'"),
    re.compile(r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]"),
    re.compile(r"operator '([^']+)'"),
)


def unsupported_reason(exc: BaseException) -> str:
    """One line naming the operator that stopped the exporter, when the message has one."""
    text = "\n".join(str(e) for e in (exc, exc.__cause__, exc.__context__) if e is not None)
    for pattern in _OP_PATTERNS:
        found = pattern.search(text)
        if found:
            return f"operator {found.group(1)} has no ONNX translation"
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}"


def onnx_bytes(
    module: nn.Module,
    example: torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    metadata: Mapping[str, str] | None = None,
    output_name: str = "output",
) -> bytes:
    """``module`` as an ONNX model (bytes), input ``input``, batch dynamic or fixed at
    ``example``'s. Raises :class:`ExportError` naming the operator that cannot be exported."""
    module.eval()
    dynamic = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    # torch.export specializes a batch of 1 to a constant: trace a dynamic batch with 2.
    if dynamic_batch and example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).clone()
    buffer = io.BytesIO()
    try:
        # The exporter narrates every step on stdout and warns about its own internals.
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            torch.inference_mode(False),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Named(module),
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=["input"],
                output_names=[output_name],
                dynamic_shapes=dynamic,
                verbose=False,
            )
            assert program is not None
            program.save(buffer)
    except ExportError:
        raise
    except Exception as exc:  # the exporter raises many types; all mean "cannot export"
        raise ExportError(f"cannot export to ONNX: {unsupported_reason(exc)}") from exc
    return set_metadata(buffer.getvalue(), metadata or {})


def set_metadata(model_bytes: bytes, metadata: Mapping[str, str]) -> bytes:
    """The ONNX model with ``metadata`` as its ``metadata_props`` (any it had replaced)
    and imgclf as its producer."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "imgclf"
    model.producer_version = __version__
    return model.SerializeToString()


def kept_onnx_session(
    module: nn.Module,
    example: torch.Tensor,
    *,
    threads: int | None = None,
    spin: bool = True,
    path: Path | None = None,
):
    """An ONNX Runtime session (:func:`ort_session`) on ``module``'s graph with a dynamic
    batch (:func:`onnx_bytes`), kept in imgclf's cache under a hash of its layers, weights
    and input shape (``path``: :func:`kept_onnx_path`, where the caller has it), for
    graphs used inside one process and checked there against eager PyTorch (the feature
    cache's pass, imgclf.train.prefix_pass). Every ``lite0-photo`` run exports the same
    frozen ImageNet prefixes, which took the dynamo exporter 12.4 s (up to the head) and
    about 5 s (up to blocks4) each time on a 2-core AVX2 EPYC; the TorchScript exporter
    took 0.6 s but its graph ran the pass 3.4x eager's speed against 5.1x (docs/results.md,
    issue #30). A kept file that ONNX Runtime cannot open is exported again (the session
    that opens it is the one returned: one per graph); an unwritable cache keeps nothing."""
    path = path or kept_onnx_path(module, example)
    if path.is_file():
        try:
            return ort_session(path.read_bytes(), threads, spin)
        except Exception:  # a damaged file (ONNX Runtime raises its own types): again
            pass
    data = onnx_bytes(module, example, dynamic_batch=True)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError:
        pass  # a read-only cache folder: this run's export is all it costs
    return ort_session(data, threads, spin)


def kept_onnx_path(module: nn.Module, example: torch.Tensor) -> Path:
    """Where :func:`kept_onnx_session` keeps ``module``'s graph for inputs shaped as
    ``example`` (a file there means no export is needed)."""
    return imgclf_home() / "onnx" / f"module-{module_key(module, example)}.onnx"


def module_key(module: nn.Module, example: torch.Tensor) -> str:
    """Its layers (their repr), every tensor of its state (names, shapes, values), the
    input's shape and the versions that export and run the graph (30 ms for Lite0)."""
    digest = hashlib.sha256(repr(module).encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    shape = f"{tuple(example.shape[1:])}|{example.dtype}|{__version__}|{torch.__version__}"
    digest.update(f"{shape}|{onnx_versions()}".encode())
    return digest.hexdigest()[:32]


@functools.cache
def onnx_versions() -> str:
    """``onnx|onnxruntime`` versions, from the installed packages' metadata: the strings
    their ``__version__`` give, without importing onnx (1.3 s under load on a 2-core CPU,
    for a run whose graphs are all kept: docs/results.md, issue #30)."""
    found = []
    for name in ("onnx", "onnxruntime"):
        try:
            found.append(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:  # e.g. onnxruntime-gpu: ask it
            found.append(importlib.import_module(name).__version__)
    return "|".join(found)


class _Named(nn.Module):
    """Gives the exported graph's argument the name ``x`` its dynamic shape refers to."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def ort_session(
    model: bytes | str | os.PathLike[str], threads: int | None = None, spin: bool = True
):
    """An ONNX Runtime CPU session (import deferred: the CLI's --help stays instant);
    ``spin=False`` for a caller that runs PyTorch between its calls."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers
    if not spin:
        # Its threads sleep between calls instead of spinning: where PyTorch works between
        # two calls (the feature cache's pass resizes each batch) spinning threads take the
        # cores from it, and its OpenMP threads from ONNX Runtime. Lite0's prefix pass over
        # photos ran at 176-191 images/s spinning and 291-393 without (docs/benchmarks.md §11).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnx(session, x: np.ndarray, dynamic_batch: bool) -> np.ndarray:
    """The graph's output on ``x``: in one call, or image by image for a fixed batch of 1."""
    if dynamic_batch:
        return session.run(None, {"input": x})[0]
    return np.concatenate([session.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])


# ---------------------------------------------------------------------------- backend


def resolve_backend(backend: str | None, device: torch.device | str = "cpu") -> str:
    """``torch``, ``onnx``, or ``auto`` (no choice given: per model, see :func:`backend_for`)."""
    if backend is None:
        return "auto"
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "onnx" and torch.device(device).type != "cpu":
        raise UserError(f"--backend onnx runs on the CPU; drop --device {device} or use torch")
    return backend


def backend_for(backend: str, model_name: str, device: torch.device | str = "cpu") -> str:
    """The backend one model runs on: the one asked for, else the one measured faster."""
    if backend != "auto":
        return backend
    on_cpu = torch.device(device).type == "cpu"
    return "onnx" if on_cpu and model_name in ONNX_FASTER else "torch"


class OnnxNet(nn.Module):
    """An ONNX Runtime session behind the interface of the module it was exported from."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        # `imgclf export` writes a batch of 1 unless asked for a dynamic batch: such a
        # graph is run image by image, any batch size for the caller
        self.dynamic_batch = session.get_inputs()[0].shape[0] != 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ORT wants a C-contiguous float32 array; the loader hands channels_last views.
        array = np.ascontiguousarray(x.detach().cpu().float().numpy())
        if self.dynamic_batch:
            return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
        if len(array) == 0:  # nothing to split: the graph answers the empty batch's shape
            return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
        name = self.input_name
        one = [self.session.run(None, {name: array[i : i + 1]})[0] for i in range(len(array))]
        return torch.from_numpy(np.concatenate(one))


def _cache_key(checkpoint: str | os.PathLike[str], wrapper: str) -> str:
    """The checkpoint's content (its bytes: 21-27 ms for Lite0's 13.8 MB here, about what
    hashing its state dict costs), the wrapper and the versions that made the graph."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"{wrapper}|{__version__}|{torch.__version__}|{onnx_versions()}".encode())
    return digest.hexdigest()[:32]


def onnx_net(
    module: nn.Module,
    input_size: int,
    checkpoint: str | os.PathLike[str] | None,
    *,
    wrapper: str = "plain",
    threads: int | None = None,
    spin: bool = True,
    classes: int | None = None,
) -> OnnxNet:
    """``module`` exported to ONNX (dynamic batch), cached by ``checkpoint``'s bytes.

    The cached graph is used only once it takes ``input_size``, gives ``classes`` outputs
    (where given) and answers a probe image as it did when exported (:func:`_cache_problem`):
    a file in the cache replaced by another model's would otherwise answer wrongly without a
    word (issue #31, item 11). Otherwise it is exported again, with one warning line."""
    cached: Path | None = None
    if checkpoint is not None:
        cached = imgclf_home() / "onnx" / f"{_cache_key(checkpoint, wrapper)}.onnx"
        net = _cached_net(cached, input_size, classes, threads, spin)
        if net is not None:
            return net
    example = torch.zeros(2, 3, input_size, input_size)
    data = onnx_bytes(module.eval(), example, dynamic_batch=True, output_name="logits")
    session = ort_session(data, threads, spin)
    if cached is not None:
        with atomic_path(cached) as tmp:
            tmp.write_bytes(data)
        probe = _run_probe(session, input_size).tolist()
        atomic_write_text(_sidecar(cached), json.dumps({"probe": probe}))
    return OnnxNet(session)


# ---------------------------------------------------------------------------- cache checks

# The probe: one fixed image of normal noise (a normalized input's scale). ONNX Runtime
# answers it with the same logits run after run on one machine; the tolerance leaves room
# for another CPU's kernels (float32 sums in another order: ~1e-6 relative) and is far
# below how much another model's logits differ (order 1).
PROBE_SEED = 0
PROBE_TOLERANCE = 1e-3


def _sidecar(cached: Path) -> Path:
    """Beside each cached graph: its logits on the probe when it was exported."""
    return cached.with_suffix(".json")


def _run_probe(session: Any, input_size: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(PROBE_SEED)
    probe = torch.randn(1, 3, input_size, input_size, generator=generator).numpy()
    return session.run(None, {session.get_inputs()[0].name: probe})[0]


def _cached_net(
    cached: Path, input_size: int, classes: int | None, threads: int | None, spin: bool
) -> OnnxNet | None:
    """The cached graph where it is the one exported for this checkpoint; None (said in
    one warning line where there was a file) where it must be exported again."""
    if not cached.is_file():
        return None
    try:
        session = ort_session(cached, threads, spin)
    except Exception as exc:  # ONNX Runtime raises its own types for a damaged file
        why = f"unreadable by ONNX Runtime ({unsupported_reason(exc)})"
    else:
        why = _cache_problem(session, _sidecar(cached), input_size, classes)
        if why is None:
            return OnnxNet(session)
    print(f"warning: ONNX cache {cached}: {why}; exporting the model again", file=sys.stderr)
    return None


def _cache_problem(session: Any, sidecar: Path, input_size: int, classes: int | None) -> str | None:
    """Why ``session`` is not the graph exported for this checkpoint (None: it is): its
    input shape, its outputs, or its logits on the probe against those saved at export."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else None
    if shape is None or shape[1:] != [3, input_size, input_size]:
        dims = ", ".join(str(d) if isinstance(d, int) else "N" for d in shape or ())
        given = f"[{dims}]" if shape else f"{len(inputs)} inputs"
        return f"it takes {given}, not [N, 3, {input_size}, {input_size}]"
    width = outputs[0].shape[-1] if len(outputs) == 1 and outputs[0].shape else None
    if classes is not None and width != classes:
        return f"it has {width} outputs, the checkpoint {classes} classes"
    try:
        saved = json.loads(sidecar.read_text(encoding="utf-8"))
        expected = np.asarray(saved["probe"], dtype=np.float32)
    except (OSError, ValueError, KeyError, TypeError):
        return f"its probe file {sidecar.name} is missing or unreadable"
    try:
        got = _run_probe(session, input_size)
    except Exception as exc:  # ONNX Runtime's own types
        return f"it fails on a probe image ({unsupported_reason(exc)})"
    tol = PROBE_TOLERANCE
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=tol, atol=tol):
        return "its output on a probe image is not the exported model's"
    return None
