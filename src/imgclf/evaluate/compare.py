"""Several runs side by side: each model's scores and each vote's, on one split.

``compare_runs(runs, data)`` scores every run as ``imgclf eval`` would (same logits, same
accuracy), then the three votes of :mod:`imgclf.ensemble` over their probabilities. The
run-set helpers here (unique names, one class order, ``--prefer`` and ``--weights``) are
shared with :mod:`imgclf.predict`, so both commands name and combine runs the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgclf.data.cache import Dataset
from imgclf.ensemble import VOTE_METHODS, EnsembleError, hard_vote, vote_shares, weighted_vote
from imgclf.errors import CheckpointError, UserError
from imgclf.evaluate.metrics import Metrics, compute_metrics
from imgclf.evaluate.runs import LoadedRun, default_split, load_run, open_data_for, run_logits

RunLike = str | os.PathLike[str]
Weights = Mapping[str, float] | Sequence[float] | Sequence[str] | None


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

    @property
    def names(self) -> list[str]:
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
    """Load every run; all must share one class set (any order). Names are made unique."""
    if not runs:
        raise UserError("give at least one run folder or checkpoint")
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
    return RunSet(loaded, [str(r) for r in runs], first.classes, orders)


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


def validation_accuracy(lr: LoadedRun) -> float | None:
    """The run's validation accuracy: summary.json, else the checkpoint's best so far."""
    folder = lr.path if lr.path.is_dir() else lr.path.parent
    try:
        acc = json.loads((folder / "summary.json").read_text()).get("val_accuracy")
    except (OSError, ValueError):
        acc = None
    if acc is None:
        best = (lr.state.get("progress") or {}).get("best_val_acc", -1.0)
        acc = best if best is not None and best >= 0 else None
    return None if acc is None else float(acc)


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


def check_vote(method: str) -> None:
    if method not in VOTE_METHODS:
        raise EnsembleError(
            f"unknown vote method {method!r}; choose one of: {', '.join(VOTE_METHODS)}"
        )


# ---------------------------------------------------------------------------- comparison

# Accuracy alone hides a model that ignores a rare class; balanced accuracy (mean recall)
# and macro F1 show it. The three columns of every score table, text and report alike.
SCORE_HEADER = "accuracy  balanced acc  macro F1"


def score_cells(metrics: Metrics) -> str:
    """The three scores, aligned under :data:`SCORE_HEADER`."""
    return f"{metrics.accuracy:8.4f}  {metrics.balanced_accuracy:12.4f}  {metrics.macro_f1:8.4f}"


def _scores(metrics: Metrics) -> dict[str, float]:
    return {
        "accuracy": metrics.accuracy,
        "balanced_accuracy": metrics.balanced_accuracy,
        "macro_f1": metrics.macro_f1,
    }


@dataclass(eq=False)
class Comparison:
    """Each model's and each vote's scores on one split, all in one class order."""

    names: list[str]
    classes: list[str]
    dataset: str
    split: str
    count: int
    models: dict[str, Metrics]
    votes: dict[str, Metrics]  # "hard", "soft" and (when weights exist) "weighted"
    vote: str  # the ensemble's vote: what ``accuracy`` and the confusion image show
    weights: dict[str, float] | None
    prefer: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def best_model(self) -> str:
        """The most accurate single model (the first one listed on a tie)."""
        return max(self.names, key=lambda n: self.models[n].accuracy)

    @property
    def accuracy(self) -> float:
        return self.votes[self.vote].accuracy

    def to_dict(self) -> dict[str, Any]:
        chosen = self.votes[self.vote]
        return {
            "accuracy": self.accuracy,
            "balanced_accuracy": chosen.balanced_accuracy,
            "macro_f1": chosen.macro_f1,
            "vote": self.vote,
            "dataset": self.dataset,
            "split": self.split,
            "count": self.count,
            # accuracy alone, as before; "scores" has all three numbers of each
            "models": {n: m.accuracy for n, m in self.models.items()},
            "votes": {v: m.accuracy for v, m in self.votes.items()},
            "scores": {
                "models": {n: _scores(m) for n, m in self.models.items()},
                "votes": {v: _scores(m) for v, m in self.votes.items()},
            },
            "best_model": self.best_model,
            "weights": self.weights,
            "prefer": self.prefer,
            "notes": self.notes,
        }

    def rows(self) -> list[tuple[str, str, Metrics]]:
        """(kind, name, metrics): every model, then every vote."""
        out = [("model", n, self.models[n]) for n in self.names]
        out += [("vote", v, m) for v, m in self.votes.items()]
        return out

    def table(self) -> str:
        width = max(len(n) for n in [*self.names, "vote weighted"])
        lines = [f"{self.dataset} {self.split}: {self.count} images, {len(self.names)} models"]
        lines.append(f"{'':<{width}}  {SCORE_HEADER}")
        for kind, name, metrics in self.rows():
            label = name if kind == "model" else f"vote {name}"
            mark = ""
            if kind == "model" and name == self.best_model:
                mark = "  best model"
            elif kind == "vote" and name == self.vote:
                mark = "  ensemble"
            lines.append(f"{label:<{width}}  {score_cells(metrics)}{mark}")
        if self.weights:
            shown = ", ".join(f"{n} {w:.4g}" for n, w in self.weights.items())
            lines.append(f"weights: {shown}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def confusion_panels(self) -> list[tuple[str, np.ndarray]]:
        best = self.best_model
        return [
            (f"best model {best}: {self.models[best].accuracy:.4f}", self.models[best].confusion),
            (f"{self.vote} vote: {self.accuracy:.4f}", self.votes[self.vote].confusion),
        ]

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Best single model's and the ensemble's confusion matrices side by side (PNG)."""
        from imgclf.evaluate.plots import plot_confusions_side_by_side

        plot_confusions_side_by_side(self.confusion_panels(), self.classes, path)
        return Path(path)


def _softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=1).numpy()


def _hard_metrics(
    probs: np.ndarray, labels: np.ndarray, classes: list[str], prefer: list[int] | None
) -> Metrics:
    voted = hard_vote(probs, prefer)
    # compute_metrics takes the argmax of the scores, and vote shares can tie: a bonus
    # smaller than one vote (1/M) makes the tie-broken label the argmax.
    scores = vote_shares(probs)
    scores[np.arange(len(voted)), voted] += 0.5 / probs.shape[0]
    scores /= scores.sum(axis=1, keepdims=True)
    return compute_metrics(scores, labels, classes, from_probs=True)


def compare_runs(
    runs: Sequence[RunLike],
    data: str | os.PathLike[str] | Dataset,
    split: str | None = None,
    vote: str = "hard",
    prefer: Sequence[str] | None = None,
    weights: Weights = None,
    tta: bool = False,
    *,
    batch_size: int = 512,
    device: str | None = None,
) -> Comparison:
    """Score each run and the hard, soft and weighted votes of all of them on ``split``.

    Per-model scores are exactly ``imgclf eval``'s. ``prefer`` (run names) breaks hard-vote
    ties; ``weights`` (``{run: w}``, ``["run:w"]`` or one number per run) default to each
    run's validation accuracy; without them the weighted vote is left out with a note,
    unless ``vote="weighted"`` asks for it.
    """
    check_vote(vote)
    rs = load_runs(runs)
    prefer_idx = prefer_order(rs, prefer)
    datasets = open_data_for(data, rs.runs)
    ds = datasets[0]
    split = split or default_split(ds)
    probs, models, labels = [], {}, None
    for lr, order, run_ds in zip(rs.runs, rs.orders, datasets, strict=True):
        logits, run_labels = run_logits(
            lr, run_ds, split, tta=tta, batch_size=batch_size, device=device
        )
        logits = logits[:, torch.from_numpy(order)]  # columns in the first run's order
        if labels is None:
            labels = run_labels.numpy()  # the first run's class order is the reference
        models[lr.name] = compute_metrics(logits, labels, rs.classes)
        probs.append(_softmax(logits))
    assert labels is not None
    stacked = np.stack(probs)
    votes = {"hard": _hard_metrics(stacked, labels, rs.classes, prefer_idx)}
    votes["soft"] = compute_metrics(stacked.mean(axis=0), labels, rs.classes, from_probs=True)
    notes, weight_map = [], None
    try:
        weight_list = resolve_weights(rs, weights)
    except UserError as exc:
        if vote == "weighted":
            raise
        notes.append(f"weighted vote left out: {exc}")
    else:
        _, mixed = weighted_vote(stacked, weight_list)
        votes["weighted"] = compute_metrics(mixed, labels, rs.classes, from_probs=True)
        weight_map = dict(zip(rs.names, weight_list, strict=True))
    return Comparison(
        names=rs.names,
        classes=rs.classes,
        dataset=ds.name,
        split=split,
        count=len(labels),
        models=models,
        votes=votes,
        vote=vote,
        weights=weight_map,
        prefer=[rs.names[i] for i in prefer_idx] if prefer_idx else [],
        notes=notes,
    )
