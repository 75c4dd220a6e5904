"""Non-finite weights: the one check that training and every checkpoint loader share.

A NaN or an infinity in a weight does not heal: every output it touches is NaN from then
on, and a model saved with one predicts ``nan`` confidences for every file (issue #31,
item 6). The trainer runs :func:`nonfinite` every few steps and before each save; a
checkpoint or weights file is refused on load when it holds such a tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn


def nonfinite(tensors: Mapping[str, object]) -> list[str]:
    """Names of the floating-point tensors among ``tensors``' values holding a NaN or an
    infinity, in order (other values are skipped). One device sync, whatever the count."""
    named = [
        (name, t)
        for name, t in tensors.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()
    ]
    if not named:
        return []
    # One flag per tensor, stacked where the tensors are and copied to the CPU once per
    # device (one sync on a GPU, not one per tensor).
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    ok = [True] * len(named)
    for index in by_device.values():
        flags = _finite_flags([named[i][1] for i in index])
        for i, flag in zip(index, flags, strict=True):
            ok[i] = flag
    return [name for (name, _), good in zip(named, ok, strict=True) if not good]


@torch.no_grad()
def _finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor (all on one device) is finite. A NaN or an infinity anywhere
    makes a tensor's sum non-finite, so one sum per tensor screens them all; only a sum
    that is not finite is checked element by element (finite values whose sum overflows,
    e.g. fp16 ones, are not flagged). The sums ran Lite0's 296 tensors in 1-3 ms where
    ``isfinite(t).all()`` per tensor took 110-130 ms on a 2-core CPU (docs/results.md,
    issue #30), and the trainer checks every few steps and before each save."""
    sums = torch.stack([t.sum() for t in tensors])
    screened = torch.isfinite(sums).cpu().tolist()
    return [
        good or bool(torch.isfinite(t).all()) for good, t in zip(screened, tensors, strict=True)
    ]


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s parameters and buffers by name (BatchNorm's running statistics count: a
    NaN there is a NaN in every prediction, though the training loss never sees it)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def checkpoint_tensors(state: Mapping[str, object]) -> dict[str, object]:
    """A checkpoint dict's weights by name: its ``model_state``, and its weight EMA's
    (``ema_state``'s ``weights``, named ``ema <name>``) when it keeps one."""
    ema = state.get("ema_state")
    ema_weights = ema.get("weights") if isinstance(ema, Mapping) else None
    return {
        **_named(state.get("model_state"), ""),
        **_named(ema_weights, "ema "),
    }


def _named(obj: object, prefix: str) -> dict[str, object]:
    return {f"{prefix}{k}": v for k, v in obj.items()} if isinstance(obj, Mapping) else {}


def describe(names: Iterable[str], limit: int = 3) -> str:
    """``names`` for a one-line message: the first ``limit``, then how many more."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    more = len(names) - limit
    return shown + (f" and {more} more" if more > 0 else "")
