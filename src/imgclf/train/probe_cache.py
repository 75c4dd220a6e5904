"""Probes' results, kept per machine and network so that a run times them once.

A stage's bf16-or-fp32 probe (imgclf.train.precision) costs seconds; its answer depends
on the CPU, its flags, torch, the thread count, the network and the sample's shape, and
on nothing else that a later run changes. So the answer is stored in one small JSON file
(``$IMGCLF_HOME/probes/precision.json``), keyed by all of those, written atomically. The
feature cache's choice of engine (imgclf.train.prefix_pass: eager PyTorch's and ONNX
Runtime's seconds per image, and whether their activations agreed) is kept the same way
in ``probes/engine.json``. An unreadable or malformed file, or entry, is treated as
missing and rewritten; delete the file to time again.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import torch.nn as nn

from imgclf.errors import UserError
from imgclf.io_utils import atomic_write_text
from imgclf.paths import imgclf_home

# A cache file past this size is not ours to parse (one entry is ~200 bytes); it is
# ignored and rewritten. The oldest entries go first past MAX_ENTRIES.
MAX_BYTES = 1 << 20
MAX_ENTRIES = 500


def cache_file(kind: str = "precision") -> Path:
    """The file of one kind of probe: ``precision`` or ``engine``."""
    return imgclf_home() / "probes" / f"{kind}.json"


@cache
def machine() -> str:
    """The CPU's model name and a hash of its flags (``/proc/cpuinfo``, Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break  # the first CPU's block says it for all
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = " ".join(sorted(fields.get("flags", "").split()))
    return f"{name} flags:{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def key(net: nn.Module, x: torch.Tensor) -> str:
    """What a probe's answer depends on: machine, torch, threads, network, sample shape.
    The network is its class, its parameter counts and a hash of every parameter's name,
    shape and whether it trains (which stage of which architecture)."""
    named = [(n, p) for n, p in net.named_parameters() if not _lazy(p)]
    params = sum(p.numel() for _, p in named)
    trained = sum(p.numel() for _, p in named if p.requires_grad)
    layers = ";".join(f"{n}{tuple(p.shape)}{'+' if p.requires_grad else ''}" for n, p in named)
    digest = hashlib.sha256(layers.encode()).hexdigest()[:12]
    layout = memory_layout(x)
    shape = "x".join(map(str, x.shape))
    return (
        f"{machine()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
        f"{type(net).__name__} {params} params, {trained} trained, layers:{digest} | "
        f"{shape} {layout}"
    )


def _lazy(p: torch.Tensor) -> bool:
    return isinstance(p, nn.parameter.UninitializedParameter)


def memory_layout(x: torch.Tensor) -> str:
    """``channels_last`` or ``contiguous``: what a probe's timing also depends on."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return "channels_last" if x.dim() == 4 and channels_last else "contiguous"


def _read(path: Path, valid: Callable[[object], bool]) -> dict[str, dict]:
    try:
        if path.stat().st_size > MAX_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if valid(v)}


def _valid_precision(entry: object) -> bool:
    if not isinstance(entry, dict) or entry.get("choice") not in ("bf16", "fp32"):
        return False
    seconds = entry.get("seconds")
    return isinstance(seconds, dict) and all(
        isinstance(seconds.get(n), (int, float)) and seconds[n] > 0 for n in ("bf16", "fp32")
    )


def _valid_engine(entry: object) -> bool:
    """Eager PyTorch's seconds per image, and ONNX Runtime's with whether its activations
    agreed with eager's where it was tried."""
    if not isinstance(entry, dict) or not _positive(entry.get("eager")):
        return False
    if "ort" not in entry:
        return True
    return _positive(entry["ort"]) and isinstance(entry.get("same"), bool)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


_VALID: dict[str, Callable[[object], bool]] = {
    "precision": _valid_precision,
    "engine": _valid_engine,
}


def lookup(k: str, kind: str = "precision") -> dict | None:
    """The stored entry for key ``k`` in the ``kind`` file (precision: choice, seconds per
    pass of each precision, passes, images, when), or None."""
    return _read(cache_file(kind), _VALID[kind]).get(k)


def store(k: str, entry: dict, kind: str = "precision") -> str | None:
    """Add ``entry`` under ``k``; None on success, else why it was not stored (a cache that
    cannot be written costs a probe next time, never the run)."""
    path = cache_file(kind)
    data = _read(path, _VALID[kind])
    data.pop(k, None)
    data[k] = entry | {"when": time.strftime("%Y-%m-%d %H:%M:%S")}
    data = dict(list(data.items())[-MAX_ENTRIES:])
    try:
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    except (OSError, UserError) as exc:  # UserError: make_folder found a file in the way
        return f"{type(exc).__name__}: {exc}"
    return None
