"""Run state: where training stands, what it has measured, and the checkpoint that holds both.

A checkpoint (``last.pt``, ``best.pt``) is one dict; :func:`to_checkpoint` writes it and
:func:`from_checkpoint` / :func:`restore_stage` read it back. Its keys are read elsewhere
too (imgclf.runtime.checkpoint, models, evaluate, data.preprocess, rundir), so they stay as
they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from imgclf import __version__
from imgclf.data.cache import Dataset
from imgclf.errors import CheckpointError
from imgclf.models.restore import load_weights
from imgclf.runtime.final_fit import FINAL_KEY
from imgclf.train.budget import Plan
from imgclf.train.lookahead import Lookahead
from imgclf.train.recipe import Recipe


@dataclass
class Run:
    """A finished (or stopped) run and where its files are."""

    path: Path
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    def __repr__(self) -> str:
        acc = self.summary.get("val_accuracy")
        return f"Run({str(self.path)!r}, val_accuracy={acc})"


@dataclass
class Position:
    """Where training stands: stage index, epochs done in it, batches done in the next."""

    stage: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class Progress:
    """What a run has measured so far, saved in every checkpoint."""

    best_val_acc: float = -1.0
    best_epoch: int = 0
    epochs_since_best: int = 0
    partial: dict[str, float] = field(default_factory=dict)  # mid-epoch accumulators
    seconds: float = 0.0  # training wall time so far, across resumes
    stage_end_acc: list[float] = field(default_factory=list)  # val accuracy ending each stage
    images_seen: int = 0  # training images processed, across resumes
    wall_seconds: float = 0.0  # wall time of the run's processes up to the last checkpoint
    warnings: list[str] = field(default_factory=list)  # guard-rail warnings, for summary.json
    # The weights best.pt holds: "trained", or "ema" (the average, imgclf.train.ema).
    best_weights: str = "trained"
    # Stage index (as text) → the precision it trains in, once chosen (imgclf.train.precision).
    stage_precision: dict[str, str] = field(default_factory=dict)
    # Stage index (as text) → whether it trains on a feature cache (imgclf.train.feature_cache).
    stage_cached: dict[str, bool] = field(default_factory=dict)

    def record_epoch(
        self, epoch: int, val_acc: float, min_delta: float, weights: str = "trained"
    ) -> bool:
        """Count global ``epoch``, whose ``weights`` validated at ``val_acc``, for early
        stopping; True when they are the best so far (or there is no validation to tell):
        best.pt."""
        improved = val_acc == val_acc and val_acc > self.best_val_acc + min_delta
        no_val = val_acc != val_acc
        if improved or no_val:
            self.best_val_acc = val_acc if improved else self.best_val_acc
            self.best_epoch = epoch
            self.best_weights = weights
            self.epochs_since_best = 0
        else:
            self.epochs_since_best += 1
        return improved or no_val


def to_checkpoint(
    model: nn.Module,
    ds: Dataset,
    recipe: Recipe,
    position: Position,
    progress: Progress,
    plan: Plan | None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    lookahead: Lookahead | None = None,
    ema_state: dict[str, Any] | None = None,
    final: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of a run: the model and what rebuilds its input (name, args,
    classes, size, normalisation, the cache's image size), the recipe and data set, where
    training stands, and, mid-stage, the optimizer, schedule and Lookahead states (None at
    a stage's end: the next stage builds its own), the weight EMA's state (whenever the
    stage keeps one: the next stage may carry it on; None otherwise, and in checkpoints
    from before it existed), the global RNG, a budget's plan and a final fit's record
    (imgclf.runtime.final_fit; None: a normal run)."""
    mid_stage = optimizer is not None
    return {
        "imgclf_version": __version__,
        "model_name": model.name,
        "model_args": model.model_args,
        "class_names": list(ds.classes),
        "input_size": model.input_size,
        "mean": list(model.mean),
        "std": list(model.std),
        # What turns a raw file into this model's input (imgclf.data.preprocess):
        # files are cropped to the training cache's size, then resized on the batch.
        "source_size": list(ds.image_size),
        "recipe": recipe.model_dump(mode="json"),
        "dataset": str(ds.root),
        "position": vars(position).copy(),
        "progress": vars(progress).copy(),
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict() if mid_stage else None,
        "lookahead_state": lookahead.state_dict() if mid_stage and lookahead is not None else None,
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "ema_state": ema_state,
        "torch_rng": torch.get_rng_state(),
        "plan": plan.to_dict() if plan is not None else None,
        FINAL_KEY: final,
    }


def best_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """best.pt's dict: ``state`` with the weights that were validated as ``model_state``,
    the EMA's when the stage keeps one (eval, predict and export read ``model_state``; the
    same tensors as ``ema_state``'s, so torch.save stores them once)."""
    ema = state.get("ema_state")
    return state if ema is None else {**state, "model_state": ema["weights"]}


def from_checkpoint(
    state: dict[str, Any], model: nn.Module
) -> tuple[Position, Progress, Plan | None]:
    """Load a checkpoint's weights into ``model``; return where it stood, its progress and
    its budget's plan (None: no budget). A resumed run keeps the plan of its budget.
    Weights that do not fit ``model``, or a ``progress`` this version does not know, are one
    :class:`CheckpointError` line (its other fields: :mod:`imgclf.runtime.schema`)."""
    where = state.get("path", "checkpoint")
    _same_model(state, model, where)
    load_weights(model, state["model_state"], where)
    plan = Plan.from_dict(state["plan"]) if state.get("plan") else None
    pos = state["position"]
    try:
        progress = Progress(**state["progress"])
    except TypeError as exc:  # a key Progress does not have
        raise CheckpointError(f"{where}: progress: {exc}") from None
    return Position(pos["stage"], pos["epoch"], pos["batch"]), progress, plan


def _same_model(state: dict[str, Any], model: nn.Module, where: str) -> None:
    """A resume trains the model its saved recipe builds: a checkpoint that describes
    another one (name, or an argument of another value or that the model has not) was
    edited. Arguments it lacks are accepted: written before the model had them."""
    name, args = getattr(model, "name", None), getattr(model, "model_args", {})
    if state["model_name"] != name:
        raise CheckpointError(
            f"{where}: model_name: {state['model_name']!r}, but its recipe builds {name!r}"
        )
    for key, value in state["model_args"].items():
        if key not in args or args[key] != value:
            raise CheckpointError(
                f"{where}: model_args {{{key!r}: {value!r}}} are not those of the model its "
                f"recipe builds ({args})"
            )


def restore_stage(
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    lookahead: Lookahead | None,
) -> None:
    """Continue the stage a checkpoint stopped in: its optimizer, schedule and Lookahead
    states when it was saved mid-stage, and in any case the global RNG, last, so that the
    next random number is the one the interrupted run would have drawn."""
    if state.get("optimizer_state") is not None:
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        if lookahead is not None and state.get("lookahead_state"):
            lookahead.load_state_dict(state["lookahead_state"])
    torch.set_rng_state(state["torch_rng"])
