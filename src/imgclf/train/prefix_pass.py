"""How a frozen prefix runs over a data set for the feature cache: the faster of eager
PyTorch and ONNX Runtime on this machine, measured on one batch before the pass.

The cache's pass is inference only, so it may run on another engine than training does:
on the CPU, ONNX Runtime ran EfficientNet-Lite0's prefix 2.6× faster than eager PyTorch's
best setting and 3.6× faster than eager at batch 64 (docs/benchmarks.md §3), but which
wins depends on the CPU and the network, so each cache measures both on the same batch,
keeps the faster, and uses ONNX Runtime only where its outputs equal eager fp32's within
:data:`ATOL` (the tolerance of ``imgclf export``'s own check).

Those timings and that check are kept per machine, thread count and prefix (its graph's
key: layers, weights, input shape, versions) in ``$IMGCLF_HOME/probes/engine.json``
(imgclf.train.probe_cache), as the precision probe's are: every ``lite0-photo`` run
freezes the same ImageNet prefixes, and timing both engines cost a 250-photo run about
5 s of its 25 (docs/results.md, issue #30). A later run takes the same engine, so the
same features, without running either twice.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from imgclf.errors import one_line
from imgclf.train import probe_cache

# Images per ONNX Runtime call: batch 8 ran Lite0's prefix fastest of 8, 16 and 64 up to
# the head on a 2-core CPU, level with 16 up to blocks6 (docs/benchmarks.md §3); eager
# keeps the loader's batch.
ORT_BATCH = 8
# Largest difference from eager fp32, relative to the activations' own scale (their largest
# magnitude, at least 1): export's verification (issue #13) holds logits to 1e-4, and
# Lite0's activations after blocks3 reach magnitudes of 50, where ONNX Runtime's fp32
# rounding differs from PyTorch's by up to 4.5e-4 (9e-6 of the scale) on clothing photos.
ATOL = 1e-4
# IMGCLF_CACHE_ENGINE=torch forces eager PyTorch (to compare, or where ONNX Runtime misbehaves).
ENGINE_ENV = "IMGCLF_CACHE_ENGINE"
# A pass that eager PyTorch finishes sooner than this stays eager: exporting the prefix
# and checking it take a few seconds of their own.
WORTH_SECONDS = 30.0

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PrefixPass:
    """The engine chosen for a prefix: ``run(x)`` → activations (fp32), its batch size,
    a short description for the cache's printout, and the seconds per image measured
    (what a time budget prices the pass at; 0 where nothing was measured)."""

    run: Runner
    batch_size: int
    engine: str
    seconds_per_image: float = 0.0
    eager_seconds_per_image: float = 0.0  # eager PyTorch's, measured either way


def eager(prefix: nn.Module, dtype: torch.dtype | None, device: torch.device) -> Runner:
    """The prefix in PyTorch (autocast to ``dtype`` when given), fp32 out."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return prefix(x).float()

    return run


def choose(
    prefix: nn.Module,
    sample: torch.Tensor,
    passes: int,
    dtype: torch.dtype | None,
    say: Callable[[str], None] = print,
) -> PrefixPass:
    """Eager or ONNX Runtime for ``prefix``, timed on ``sample`` (one batch of inputs, at
    the loader's batch size), for a cache of ``passes`` images in all; on a CPU, the
    timings and the check kept from an earlier run where there are some (and kept now
    where there were none)."""
    run = eager(prefix, dtype, sample.device)
    if sample.device.type != "cpu":  # probes are kept for CPUs (machine: the CPU's model)
        with torch.inference_mode():
            eager_s = _seconds(run, sample) / len(sample)
        return PrefixPass(run, len(sample), "PyTorch", eager_s, eager_s)
    path = _kept_path(prefix, sample)
    key = _key(path.stem, sample, dtype)
    kept = probe_cache.lookup(key, "engine")
    timed = dict(kept or {})
    try:
        return _engine(prefix, sample, passes, run, path, timed, say)
    finally:
        if timed != (kept or {}):
            probe_cache.store(key, timed, "engine")  # unwritable: timed again next time


def _engine(
    prefix: nn.Module,
    sample: torch.Tensor,
    passes: int,
    run: Runner,
    path: Path,
    timed: dict,
    say: Callable[[str], None],
) -> PrefixPass:
    """:func:`choose`'s decision, from the seconds and the check in ``timed`` (its kept
    entry), measuring and adding to ``timed`` what it lacks."""
    if "eager" not in timed:
        with torch.inference_mode():
            timed["eager"] = _seconds(run, sample) / len(sample)
    eager_s = timed["eager"]
    torch_pass = PrefixPass(run, len(sample), "PyTorch", eager_s, eager_s)
    h, w = sample.shape[-2:]
    if h != w or os.environ.get(ENGINE_ENV) == "torch":
        return torch_pass
    if eager_s * passes < WORTH_SECONDS and not path.is_file():
        return torch_pass  # an export and a check would cost more than they save
    earlier = timed.get("when", "earlier") if "ort" in timed else None
    try:
        ort = _onnx_runner(prefix, sample, path) if timed.get("same") is not False else None
        if ort is not None and earlier is None:
            with torch.inference_mode():
                timed["same"] = same_activations(ort(sample), prefix(sample))
                timed["ort"] = _seconds(ort, sample[:ORT_BATCH]) / len(sample[:ORT_BATCH])
    except Exception as exc:  # an op the exporter or ONNX Runtime lacks: stay eager
        for tried in ("ort", "same", "when"):  # and try again next time
            timed.pop(tried, None)
        say(f"feature cache: PyTorch (ONNX Runtime failed: {one_line(str(exc))[:120]})")
        return torch_pass
    if ort is None or not timed["same"]:
        say("feature cache: PyTorch (ONNX Runtime's activations differ from PyTorch's)")
        return torch_pass
    ort_s = timed["ort"]
    if ort_s < eager_s:
        speed = f"ONNX Runtime, {eager_s / ort_s:.1f}× PyTorch's speed"
        speed += f", timed {earlier}" if earlier else ""
        return PrefixPass(ort, ORT_BATCH, speed, ort_s, eager_s)
    return torch_pass


def _key(graph: str, sample: torch.Tensor, dtype: torch.dtype | None) -> str:
    """What the timings and the check depend on: the machine, the threads, the prefix's
    graph (:func:`imgclf.runtime.onnx.module_key`: layers, weights, input shape, torch,
    onnx and onnxruntime versions), the batch, its memory layout and eager's autocast."""
    layout = probe_cache.memory_layout(sample)
    return (
        f"{probe_cache.machine()} | {torch.get_num_threads()} threads | graph {graph} | "
        f"batch {len(sample)} {layout} | autocast {dtype}"
    )


def same_activations(got: torch.Tensor, want: torch.Tensor) -> bool:
    """``got`` equals ``want`` within :data:`ATOL` of ``want``'s scale (max |want|, at
    least 1): an elementwise relative test fails on the activations near zero that every
    conv layer has, where fp32 rounding alone differs."""
    scale = max(1.0, float(want.abs().max()))
    return bool((got - want).abs().max() <= ATOL * scale)


def _onnx_runner(prefix: nn.Module, sample: torch.Tensor, path: Path) -> Runner:
    """``prefix`` on ONNX Runtime for inputs shaped as ``sample`` (any batch): images, or
    an earlier part's activations (imgclf.train.shared_cache); its graph kept at ``path``
    (:func:`_kept_path`) or exported there now."""
    from imgclf.runtime.onnx import OnnxNet, kept_onnx_session

    threads = torch.get_num_threads()
    example = _example(sample)
    return OnnxNet(
        kept_onnx_session(prefix.eval(), example, threads=threads, spin=False, path=path)
    )


def _example(sample: torch.Tensor) -> torch.Tensor:
    """What a prefix's graph is exported (and kept) for: two fp32 inputs shaped as
    ``sample``'s."""
    return torch.zeros_like(sample[:2], device="cpu", dtype=torch.float32)


def _kept_path(prefix: nn.Module, sample: torch.Tensor) -> Path:
    """Where an earlier run kept this prefix's graph (the same frozen ImageNet layers in
    every run of a recipe): a file there means no export is paid, and a short pass may
    use it too (a 250-photo set's head cache: ~12 s of eager PyTorch on a 2-core CPU)."""
    from imgclf.runtime.onnx import kept_onnx_path

    return kept_onnx_path(prefix, _example(sample))


def _seconds(run: Runner, x: torch.Tensor) -> float:
    """Seconds of one call after a warm-up call (the first runs allocate and plan)."""
    run(x)
    _sync(x)
    started = time.perf_counter()
    run(x)
    _sync(x)
    return time.perf_counter() - started


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:  # CUDA kernels run asynchronously: the clock must wait for them
        torch.cuda.synchronize(x.device)


def silent(text: str) -> None:
    """A time budget's probe says nothing of the engines it tries: each cache says its
    own when it is built."""
