"""Runs loaded for inference, and run sets: several runs with unique names, one class
order, and the options that say how they vote (``--prefer``, ``--weights``, ``--vote``).

Every command that uses trained runs (``eval``, ``predict``, ``serve``, ``export``) loads
them here, so all of them name, order and weigh runs the same way. An ensemble folder
(``imgclf train A B --data D``, :mod:`imgclf.runtime.ensemble_file`) is expanded here
into its members, and its ensemble.yaml's vote is the set's unless the command gives one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgclf.ensemble import VOTE_METHODS, EnsembleError
from imgclf.errors import CheckpointError, UserError
from imgclf.inference.exported import is_exported, load_exported
from imgclf.models import build_model_from_checkpoint
from imgclf.runtime.checkpoint import load_checkpoint
from imgclf.runtime.ensemble_file import (
    ENSEMBLE_FILE,
    is_ensemble_dir,
    member_dirs,
    read_ensemble,
)
from imgclf.runtime.schema import SummaryError, read_summary

RunLike = str | os.PathLike[str]
Weights = Mapping[str, float] | Sequence[float] | Sequence[str] | None


# ---------------------------------------------------------------------------- one run


@dataclass
class LoadedRun:
    """A checkpoint rebuilt for inference: where it came from, its (unique) name, the model
    and the checkpoint's state (class names, preprocessing, progress)."""

    path: Path
    name: str
    model: torch.nn.Module
    state: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        """The model's output classes, in its output column order."""
        return list(self.state["class_names"])

    @property
    def exported(self) -> bool:
        """Whether this is an exported ONNX file (no PyTorch model: it runs on ONNX Runtime)."""
        return "exported" in self.state


def load_run(run: str | Path | Any, device: torch.device | str = "cpu") -> LoadedRun:
    """Load a run for inference and rebuild its model on ``device``.

    ``run``: a run folder (its ``best.pt``, else ``last.pt``), a checkpoint file, an ONNX
    file written by ``imgclf export`` (:mod:`imgclf.inference.exported`: it runs on ONNX
    Runtime), or any object with a ``path`` (a ``Run`` from ``imgclf.train``). The name is
    the run folder's. Raises :class:`~imgclf.errors.CheckpointError` for a missing or
    unreadable checkpoint.
    """
    path = Path(getattr(run, "path", run))
    if is_ensemble_dir(path):
        raise UserError(
            f"{path} is an ensemble ({ENSEMBLE_FILE}), several runs: give it where runs vote "
            "(imgclf eval/predict/serve/export, imgclf.load)"
        )
    if is_exported(path):
        net, state = load_exported(path)
        return LoadedRun(path, path.parent.name, net, state)
    state = load_checkpoint(path)
    model = build_model_from_checkpoint(state).to(device)
    folder = path if path.is_dir() else path.parent
    return LoadedRun(path, folder.name, model, state)


def validation_accuracy(lr: LoadedRun) -> float | None:
    """The run's validation accuracy: summary.json, else (no such file, or no accuracy in
    it) the checkpoint's best so far. A summary.json that is not what training wrote is
    one :class:`SummaryError` line: a weight read from it would silently change the vote.
    An exported file: the int8 accuracy its export measured, else none (the summary.json
    beside a copied file need not be its run's)."""
    if lr.exported:
        quantization = lr.state["exported"].get("quantization")
        try:
            return float(quantization["int8_accuracy"])
        except (TypeError, KeyError, ValueError):
            return None
    folder = lr.path if lr.path.is_dir() else lr.path.parent
    try:
        summary = read_summary(folder / "summary.json") or {}
    except SummaryError as exc:
        raise SummaryError(
            f"{exc}; the weighted vote weighs each run by its val_accuracy: repair or delete "
            "the file (the checkpoint's best accuracy is used then), or give --weights RUN:W"
        ) from None
    acc = summary.get("val_accuracy")
    if acc is None:
        best = (lr.state.get("progress") or {}).get("best_val_acc", -1.0)
        acc = best if best is not None and best >= 0 else None
    return None if acc is None else float(acc)


# ---------------------------------------------------------------------------- run sets


@dataclass
class RunSet:
    """Loaded runs with unique names, and how to put each one's outputs in one class order.

    ``orders[k][i]`` is run k's output column for ``classes[i]`` (the first run's order).
    """

    runs: list[LoadedRun]
    given: list[str]  # each run as the caller named it (a path)
    classes: list[str]
    orders: list[np.ndarray]
    # The ensemble folders' own vote and tie-break order (run names), where every run came
    # from ensemble folders that agree on one: what a command uses unless given --vote.
    vote: str | None = None
    prefer: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """The runs' unique names, in the order given."""
        return [lr.name for lr in self.runs]

    def index(self, name: str, option: str) -> int:
        """A run by its (unique) name, or by the path it was given as."""
        for i, (lr, given) in enumerate(zip(self.runs, self.given, strict=True)):
            if name == lr.name or os.path.normpath(name) == os.path.normpath(given):
                return i
        raise UserError(f"{option} {name!r}: no such run; runs are: {', '.join(self.names)}")


def unique_names(names: Sequence[str]) -> list[str]:
    """Folder names, made unique by suffixes ``-2``, ``-3``… in the order given."""
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in out or (candidate != name and candidate in names):
            n += 1
            candidate = f"{name}-{n}"
        out.append(candidate)
    return out


def load_runs(runs: Sequence[RunLike], device: torch.device | str = "cpu") -> RunSet:
    """Load every run (see :func:`load_run`) as one :class:`RunSet`.

    All runs must share one class set, in any order: the first run's order is the set's,
    and ``orders`` maps every run's outputs to it. Runs with the same folder name get
    suffixes (``run``, ``run-2``…). Raises :class:`~imgclf.errors.UserError` for no runs,
    :class:`~imgclf.errors.CheckpointError` for different class sets.
    """
    if not runs:
        raise UserError("give at least one run folder or checkpoint")
    runs, vote, preferred = _expand(runs)
    loaded = [load_run(r, device) for r in runs]
    for lr, name in zip(loaded, unique_names([lr.name for lr in loaded]), strict=True):
        lr.name = name
    first = loaded[0]
    orders = []
    for lr in loaded:
        if sorted(lr.classes) != sorted(first.classes):
            raise CheckpointError(
                f"runs have different classes: {first.name} {first.classes} "
                f"vs {lr.name} {lr.classes}"
            )
        where = {c: i for i, c in enumerate(lr.classes)}
        orders.append(np.array([where[c] for c in first.classes], dtype=np.int64))
    prefer = [loaded[i].name for i in preferred]
    return RunSet(loaded, [str(r) for r in runs], first.classes, orders, vote, prefer)


def _expand(runs: Sequence[RunLike]) -> tuple[list[Any], str | None, list[int]]:
    """``runs`` with every ensemble folder replaced by its members' run folders; the vote
    of the ensembles (None unless every run came from one and they agree on it) and their
    hard-vote preference, as indices into the expanded list."""
    out: list[Any] = []
    votes: set[str | None] = set()
    preferred: list[int] = []
    for run in runs:
        path = Path(getattr(run, "path", run))
        if not is_ensemble_dir(path):
            out.append(run)
            votes.add(None)
            continue
        spec = read_ensemble(path)
        members = member_dirs(path, spec)
        paths = [m.path for m in spec.members]
        preferred += [len(out) + paths.index(name) for name in spec.prefer]
        out += members
        votes.add(spec.vote)
    vote = votes.pop() if len(votes) == 1 else None
    return out, vote, preferred if vote == "hard" else []


def declared_vote(runs: Sequence[RunLike]) -> str | None:
    """The vote the ensemble folders among ``runs`` declare (as :func:`load_runs` would
    take it), read from their ensemble.yaml alone: no model is loaded."""
    votes = {
        read_ensemble(p).vote if is_ensemble_dir(p) else None
        for p in (Path(getattr(r, "path", r)) for r in runs)
    }
    return votes.pop() if len(votes) == 1 else None


def voting(
    rs: RunSet, vote: str | None, prefer: Sequence[str] | None, default: str = "hard"
) -> tuple[str, list[str] | None]:
    """The vote and tie-break order a command uses: those given, else the ensemble
    folders' own (:attr:`RunSet.vote`), else ``default`` with no preference. An ensemble's
    preference stays with a hard vote given explicitly, unless ``prefer`` replaces it."""
    vote = vote or rs.vote or default
    check_vote(vote)
    if prefer is None and vote == "hard" and rs.prefer:
        prefer = list(rs.prefer)
    return vote, list(prefer) if prefer is not None else None


# ---------------------------------------------------------------------------- vote options


def check_vote(method: str | None) -> None:
    """Raise :class:`~imgclf.ensemble.EnsembleError` unless ``method`` is a vote method
    (None: not given, the runs' own or the command's default, :func:`voting`)."""
    if method is not None and method not in VOTE_METHODS:
        raise EnsembleError(
            f"unknown vote method {method!r}; choose one of: {', '.join(VOTE_METHODS)}"
        )


def prefer_order(rs: RunSet, prefer: Sequence[str] | None) -> list[int] | None:
    """``--prefer`` names → model indices (the hard vote's tie-break order)."""
    if not prefer:
        return None
    order = [rs.index(name, "--prefer") for name in prefer]
    if len(set(order)) != len(order):
        raise UserError(f"--prefer {' '.join(prefer)}: a run is named twice")
    return order


def parse_weights(texts: Sequence[str]) -> dict[str, float]:
    """``["simple-1:0.5", "fast-2:1"]`` → ``{"simple-1": 0.5, "fast-2": 1.0}``."""
    out: dict[str, float] = {}
    for text in texts:
        name, sep, value = str(text).rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise UserError(f"--weights {text!r}: expected RUN:WEIGHT, e.g. simple-1:0.5") from None
    return out


def resolve_weights(rs: RunSet, weights: Weights) -> list[float]:
    """One weight per run: given by name (``RUN:W`` strings or a mapping) or in run order;
    by default each run's validation accuracy."""
    if weights is None:
        accs = [validation_accuracy(lr) for lr in rs.runs]
        missing = [lr.name for lr, a in zip(rs.runs, accs, strict=True) if a is None]
        if missing:
            raise UserError(
                f"no validation accuracy for {', '.join(missing)} to weight the vote by; "
                "pass --weights RUN:W for every run"
            )
        return [float(a) for a in accs]
    if not isinstance(weights, Mapping) and all(isinstance(w, str) for w in weights):
        weights = parse_weights(weights)  # type: ignore[arg-type]
    if isinstance(weights, Mapping):
        by_index = {rs.index(name, "--weights"): float(w) for name, w in weights.items()}
        missing = [lr.name for i, lr in enumerate(rs.runs) if i not in by_index]
        if missing:
            raise UserError(f"--weights: give a weight for every run; missing {', '.join(missing)}")
        return [by_index[i] for i in range(len(rs.runs))]
    values = [float(w) for w in weights]  # type: ignore[union-attr]
    if len(values) != len(rs.runs):
        raise UserError(f"got {len(values)} weights for {len(rs.runs)} runs")
    return values
