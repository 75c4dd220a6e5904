"""A stage's training precision on a CPU, chosen by timing it rather than by CPU flags.

``precision: auto`` picks bf16 autocast on CPUs that report native bf16 (AVX512-BF16 or
AMX; imgclf.runtime.device). Whether bf16 is actually faster depends on the CPU *and*
the network: on a 2-core Xeon with AVX512-BF16 and no AMX (family 6 model 207), Lite0
trained at 14.6 images/s in bf16 and 19.5 in fp32, and its layers after ``blocks3`` on
cached activations at 30.8 against 64.6 (docs/benchmarks.md §11), while the ``fast`` net
trains faster in bf16 on the AVX512-BF16 EPYCs (§2). So each trained stage times a few
of its own forward-backward passes both ways and keeps the faster; the choice is saved
in the checkpoint (a resumed stage keeps it, so a resume is bit for bit the run it
continues) and rank 0's choice is every rank's.

Only ``auto`` on a CPU with native bf16 is measured: a precision named in the recipe is
kept, GPUs keep their bf16/fp16, and a CPU without native bf16 runs fp32 (so does every
CPU with ``IMGCLF_CPU_BF16=0``, which the test suite sets). A probe's answer is kept per
machine, torch, thread count, network and sample shape (imgclf.train.probe_cache), so
the same stage on the same machine is timed once (issue #32, item 6).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from imgclf.runtime.device import Hardware
from imgclf.runtime.distributed import Dist
from imgclf.train import probe_cache

NAMES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
# Images per timed pass: Lite0's per-image speed at 16 is within 3% of 32 and 64 on the
# Xeon above, and a probe of 1 + 2 passes per precision then costs a few seconds.
PROBE_IMAGES = 16
PROBE_PASSES = 2


def name_of(dtype: torch.dtype | None) -> str:
    return next(k for k, v in NAMES.items() if v == dtype)


def measured(recipe_precision: str, hw: Hardware) -> bool:
    """Whether a stage's precision is chosen by timing (see the module docstring)."""
    return recipe_precision == "auto" and hw.device.type == "cpu" and hw.autocast_dtype is not None


def pass_seconds(net: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> float:
    """Median seconds of PROBE_PASSES forward-backward passes of ``net`` on ``x`` under
    autocast to ``dtype`` (None: fp32), after one warm-up (oneDNN's primitive creation)."""
    params = [p for p in net.parameters() if p.requires_grad]
    y = torch.zeros(len(x), dtype=torch.int64, device=x.device)
    times = []
    for i in range(PROBE_PASSES + 1):
        t = time.perf_counter()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x).float(), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True) if params else ()
        del grads
        if i:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def choose(net: nn.Module, sample: torch.Tensor, hw: Hardware) -> tuple[str, str]:
    """(precision, why) for training ``net`` (in its training mode) on batches like
    ``sample``: the cached answer for this machine and network (imgclf.train.probe_cache),
    or the faster of bf16 and fp32 timed now (:func:`probe`) and cached."""
    x = sample[:PROBE_IMAGES]
    key = probe_cache.key(net, x)
    entry = probe_cache.lookup(key)
    if entry is not None:
        when = entry.get("when", "earlier")
        return entry["choice"], f"{_verdict(entry)} on {when}; from {probe_cache.cache_file()}"
    seconds = probe(net, x)
    entry = {"choice": min(seconds, key=seconds.__getitem__), "seconds": seconds}
    entry |= {"passes": PROBE_PASSES, "images": len(x)}
    failed = probe_cache.store(key, entry)
    where = f"not cached: {failed}" if failed else f"cached in {probe_cache.cache_file()}"
    return entry["choice"], f"{_verdict(entry)}; {where}"


def probe(net: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Seconds per forward-backward pass in each precision, on a copy of ``net``, so that
    BatchNorm statistics and the RNG of the run are untouched."""
    rng = torch.get_rng_state()
    try:
        copied = copy.deepcopy(net)
        # A copy made here is an ordinary tensor even when ``x`` was made in inference
        # mode (cached activations), which autograd refuses to save for backward.
        x = x.clone()
        return {name: pass_seconds(copied, x, NAMES[name]) for name in ("bf16", "fp32")}
    finally:
        torch.set_rng_state(rng)


def _verdict(entry: dict) -> str:
    """E.g. ``bf16 1.40x slower in a probe of 2 passes of 16 images``."""
    bf16, fp32 = entry["seconds"]["bf16"], entry["seconds"]["fp32"]
    ratio, word = (bf16 / fp32, "slower") if bf16 > fp32 else (fp32 / bf16, "faster")
    passes, images = entry.get("passes", "?"), entry.get("images", "?")
    return f"bf16 {ratio:.2f}x {word} in a probe of {passes} passes of {images} images"


def stage_precision(
    net: nn.Module,
    sample: Callable[[], torch.Tensor],
    hw: Hardware,
    recipe_precision: str,
    saved: str | None,
    dist: Dist,
    say: Callable[[str], None],
) -> torch.dtype | None:
    """The autocast dtype a stage trains in: ``saved`` (the checkpoint's, on resume), a
    timed choice (:func:`measured`), or the hardware's."""
    if saved is not None:
        return NAMES[saved]
    if not measured(recipe_precision, hw):
        return hw.autocast_dtype
    name, why = choose(net, sample(), hw) if dist.is_main else ("fp32", "")
    name = dist.broadcast(name)
    if dist.is_main:
        say(f"precision: {name} for this stage ({why})")
    return NAMES[name]
