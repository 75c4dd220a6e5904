"""Guard rails: what the trainer checks besides training, as pure functions of numbers.

A run that learns nothing, a fine-tuning stage that undoes the stage before it, and a loss
that stops being finite all end looking like runs unless something says so. Each check
here turns measured numbers into the message to show (or None); the trainer decides when
to call it and where the message goes (``summary.json``'s warnings, stderr, an error).

:class:`CtrlC` is the other guard: it turns the first Ctrl-C into a request that the loop
acts on between two steps.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from imgclf.runtime.finite import describe

# Validation accuracy this close to the majority-class rate counts as "learned nothing".
CHANCE_MARGIN = 0.02
# A stage ending below the previous one by more than this (or two standard errors of the
# validation accuracy, if larger) is reported.
STAGE_DROP_MIN = 0.01
# Marks a chance-level warning, so that a stage warns once.
_CHANCE_MARK = "most common class"


def majority_rate(labels: torch.Tensor | None) -> float:
    """The accuracy of always answering the most common class of ``labels`` (NaN without
    labels)."""
    if labels is None or len(labels) == 0:
        return float("nan")
    return torch.bincount(labels.cpu()).max().item() / len(labels)


def chance_warning(
    stage: int, epoch: int, val_acc: float, majority: float, earlier: Sequence[str] = ()
) -> str | None:
    """The warning when validation accuracy ``val_acc`` after global ``epoch`` of stage
    index ``stage`` is within CHANCE_MARGIN of ``majority`` (always answering the most
    common class), unless ``earlier`` warnings hold one for this stage already: a run that
    learns nothing otherwise ends looking normal. None: nothing to say (NaN never warns)."""
    if not val_acc <= majority + CHANCE_MARGIN:
        return None
    key = f"stage {stage + 1}: "
    if any(w.startswith(key) and _CHANCE_MARK in w for w in earlier):
        return None
    return (
        f"{key}epoch {epoch} val accuracy {val_acc:.4f} is no better than always "
        f"answering the {_CHANCE_MARK} ({majority:.4f}, {CHANCE_MARGIN * 100:.0f} "
        "points of margin): the model has learned next to nothing. Likely causes: a "
        "learning rate far too high or too low, labels that do not match the images, "
        "an input size far from the images'. Try --set optimizer.lr=<10x lower>, check "
        "`imgclf data info`, or a recipe made for this data (imgclf recipes)"
    )


def noise(accuracy: float, n: int) -> float:
    """How far a validation accuracy of ``n`` images moves by chance: two binomial standard
    errors (2·sqrt(p(1-p)/n), a ~95% band), at least STAGE_DROP_MIN (one standard error
    warned too often: docs/results.md, "Notes moved from the code")."""
    se = math.sqrt(accuracy * (1 - accuracy) / n) if n else 0.0
    return max(STAGE_DROP_MIN, 2 * se)


def stage_drop_warning(stage: int, val_acc: float, previous: float, n_val: int) -> str | None:
    """The warning when stage index ``stage`` (not the first) ended at ``val_acc``, below
    where the stage before it ended (``previous``) by more than the :func:`noise` of
    ``n_val`` validation images: fine-tuning that undid what the earlier stage learned
    (issue #9: 80.6% → 70.7% on clothing). None: no drop beyond the noise."""
    if not val_acc < previous - noise(previous, n_val):
        return None
    return (
        f"stage {stage + 1} ended at val accuracy {val_acc:.4f}, below stage {stage}'s "
        f"{previous:.4f}: it undid what the earlier stage learned. Likely causes: "
        "a learning rate too high for the unfrozen layers (lower stages.N.lr or "
        "lower_lr_mult), BatchNorm re-estimated on small batches (--set "
        "batchnorm=frozen), too few images for the layers trained. best.pt keeps the "
        "best epoch, which eval and predict use"
    )


def diverged_message(
    loss: float,
    stage: int,
    epoch: int,
    step: int | None,
    checkpoint: Path | None,
    weights: Sequence[str] = (),
) -> str:
    """The TrainingDiverged message for a non-finite ``loss`` at step index ``step`` of
    global ``epoch`` in stage index ``stage``; ``loss`` is finite when another process
    diverged; ``step`` None: the validation loss after the epoch; ``weights``: the names of
    the tensors found non-finite (the loss may still be finite: a step with an infinite
    learning rate leaves NaN weights behind a finite loss). ``checkpoint``: the last one
    saved (None: none yet), good because a save refuses non-finite weights."""
    where = f"stage {stage + 1}, epoch {epoch}" + (f", step {step + 1}" if step is not None else "")
    if weights:
        what = f"weights became NaN or infinite ({describe(weights)}) by {where}"
    elif step is None:
        what = f"validation loss became {loss} after {where}"
    elif math.isfinite(loss):
        what = f"loss or weights became non-finite on another process at {where}"
    else:
        what = f"loss became {loss} at {where}"
    kept = f"last good checkpoint: {checkpoint}" if checkpoint is not None else "no checkpoint"
    return f"{what}; lower the learning rate ({kept})"


class CtrlC:
    """While training, the first Ctrl-C only sets ``requested``; the loop checks it between
    steps, checkpoints and raises KeyboardInterrupt. A second Ctrl-C interrupts at once.
    Installed only where Python's own handler is (the main thread, SIGINT not ignored)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None

    def __enter__(self) -> CtrlC:
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None
