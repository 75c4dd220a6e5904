"""Where a model runs for ``predict`` and ``serve``: PyTorch eager, or ONNX Runtime.

The ONNX backend is a drop-in ``nn.Module``: :class:`OnnxNet` takes the same normalized
float batch the PyTorch model takes (preprocessing stays :mod:`imgclf.data.preprocess`,
on both backends) and returns its logits as a tensor. The graph is the one ``imgclf
export`` writes, with a dynamic batch, exported once per checkpoint and kept in
``$IMGCLF_HOME/onnx/`` under a hash of the checkpoint's bytes, the exporter's versions and
the wrapper (TTA or not), so later runs load it in milliseconds instead of re-exporting
(2–8 s here).

Default: per model, the one measured faster on this project's CPU (:data:`ONNX_FASTER`,
benchmarks/bench_onnx.py, docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf import __version__
from imgclf.errors import UserError
from imgclf.io_utils import atomic_path
from imgclf.paths import imgclf_home

BACKENDS = ("torch", "onnx")
# Models ONNX Runtime runs faster than PyTorch eager on the CPU, measured by
# benchmarks/bench_onnx.py (docs/benchmarks.md §6, 2-core AMD EPYC, idle): Lite0 at
# 224 px 4.5× (depthwise convolutions), `fast` at 32 px 1.26× (under load the two tied).
# Every model not measured stays on PyTorch.
ONNX_FASTER = frozenset({"efficientnet_lite0", "fast"})


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ORT wants a C-contiguous float32 array; the loader hands channels_last views.
        array = np.ascontiguousarray(x.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def _cache_key(checkpoint: str | os.PathLike[str], wrapper: str) -> str:
    import onnx
    import onnxruntime

    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    versions = f"{wrapper}|{__version__}|{torch.__version__}|{onnx.__version__}"
    digest.update(f"{versions}|{onnxruntime.__version__}".encode())
    return digest.hexdigest()[:32]


def onnx_net(
    module: nn.Module,
    input_size: int,
    checkpoint: str | os.PathLike[str] | None,
    *,
    wrapper: str = "plain",
    threads: int | None = None,
) -> OnnxNet:
    """``module`` exported to ONNX (dynamic batch), cached by ``checkpoint``'s bytes."""
    from imgclf.export import onnx_bytes, ort_session

    cached: Path | None = None
    if checkpoint is not None:
        cached = imgclf_home() / "onnx" / f"{_cache_key(checkpoint, wrapper)}.onnx"
        if cached.is_file():
            try:
                return OnnxNet(ort_session(cached, threads))
            except Exception:  # a damaged cache file: export again and replace it
                pass
    example = torch.zeros(2, 3, input_size, input_size)
    data = onnx_bytes(module.eval(), example, dynamic_batch=True, output_name="logits")
    if cached is not None:
        with atomic_path(cached) as tmp:
            tmp.write_bytes(data)
    return OnnxNet(ort_session(data, threads))
