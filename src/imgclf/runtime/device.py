"""Device, precision, memory format and threads: chosen for the hardware, overridable.

Defaults (measured in benchmarks/bench_models.py, see docs/benchmarks.md):
* device: cuda, then mps, then cpu;
* precision: bf16 autocast on GPUs that support it and on CPUs with native bf16
  (AVX512-BF16 or AMX); fp16 with a gradient scaler on older GPUs; fp32 otherwise. On an
  AVX2-only CPU bf16 is emulated and was 10× *slower* than fp32 here;
* channels_last: on (oneDNN and cuDNN convolutions prefer NHWC; the loader emits it free);
* threads: physical cores (hyper-threads add contention, not FLOPs, to GEMM-bound work).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch

from imgclf.errors import UserError


@dataclass(frozen=True)
class Hardware:
    """Where and how a model runs: device, autocast dtype (None: fp32), whether fp16 needs a
    gradient scaler, and the memory format."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    use_scaler: bool
    channels_last: bool

    @property
    def precision(self) -> str:
        names = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        return names[self.autocast_dtype]


def resolve_device(name: str | None = None) -> torch.device:
    """The device named (``cpu``, ``cuda``, ``cuda:N``, ``mps``), or the best available."""
    if name and name != "auto":
        try:
            dev = torch.device(name)
        except RuntimeError as exc:
            raise UserError(f"--device {name!r}: {exc}; use cpu, cuda, cuda:N or mps") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available here; use cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@cache
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_hardware(device: str | None, precision: str, channels_last: str) -> Hardware:
    """Device, precision (``auto``, ``fp32``, ``bf16``, ``fp16``) and memory format for
    ``device`` (module docstring: the defaults and why)."""
    dev = resolve_device(device)
    dtype: torch.dtype | None
    scaler = False
    if precision == "fp32":
        dtype = None
    elif precision == "bf16":
        dtype = torch.bfloat16
    elif precision == "fp16":
        dtype, scaler = torch.float16, dev.type == "cuda"
    elif dev.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        scaler = dtype == torch.float16
    elif dev.type == "cpu":
        # IMGCLF_CPU_BF16=0: fp32 on a bf16 CPU too, so that results compare to the last
        # digit across machines (the test suite sets it: its equalities between paths,
        # processes and ONNX are fp32 ones).
        native = cpu_has_native_bf16() and os.environ.get("IMGCLF_CPU_BF16", "1") != "0"
        dtype = torch.bfloat16 if native else None
    else:
        dtype = None
    cl = channels_last != "off"
    return Hardware(dev, dtype, scaler, cl)


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    logical = logical or 1
    try:
        with open("/proc/cpuinfo") as f:
            blocks = f.read().strip().split("\n\n")
    except OSError:
        return logical
    cores = set()
    for block in blocks:
        fields = dict(
            (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in block.splitlines())
        )
        cores.add((fields.get("physical id"), fields.get("core id")))
    # Never more than the CPUs this process may run on (containers, taskset).
    return max(1, min(len(cores) or logical, logical))


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads (default: the physical cores); returns the number set."""
    n = threads or physical_cores()
    torch.set_num_threads(n)
    return n
