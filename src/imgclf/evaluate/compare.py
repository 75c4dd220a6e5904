"""Several runs side by side: each model's scores and each vote's, on one split.

``compare_runs(runs, data)`` scores every run as ``imgclf eval`` would (same logits, same
accuracy), then the three votes of :mod:`imgclf.ensemble` over their probabilities. The
runs are loaded as a run set of :mod:`imgclf.inference.runs` (unique names, one class
order, ``--prefer`` and ``--weights``), as ``predict``, ``serve`` and ``export`` load
them, so every command names and combines runs the same way.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgclf.data.cache import Dataset
from imgclf.ensemble import hard_vote, vote_shares, weighted_vote
from imgclf.errors import UserError
from imgclf.evaluate.metrics import Metrics, compute_metrics
from imgclf.evaluate.runs import default_split, not_held_out, open_data_for
from imgclf.inference.engine import run_logits
from imgclf.inference.runs import (
    RunLike,
    RunSet,
    Weights,
    check_vote,
    load_runs,
    prefer_order,
    resolve_weights,
    voting,
)
from imgclf.runtime.final_fit import trained_on

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


def _weighted(
    rs: RunSet,
    stacked: np.ndarray,
    labels: np.ndarray,
    weights: Weights,
    vote: str,
    votes: dict[str, Metrics],
    notes: list[str],
) -> dict[str, float] | None:
    """Add the weighted vote's scores to ``votes`` and return the weights by run; without
    weights, a note instead (an error when ``vote`` is the weighted one)."""
    try:
        weight_list = resolve_weights(rs, weights)
    except UserError as exc:
        if vote == "weighted":
            raise
        notes.append(f"weighted vote left out: {exc}")
        return None
    _, mixed = weighted_vote(stacked, weight_list)
    votes["weighted"] = compute_metrics(mixed, labels, rs.classes, from_probs=True)
    return dict(zip(rs.names, weight_list, strict=True))


def compare_runs(
    runs: Sequence[RunLike],
    data: str | os.PathLike[str] | Dataset,
    split: str | None = None,
    vote: str | None = None,
    prefer: Sequence[str] | None = None,
    weights: Weights = None,
    tta: bool = False,
    *,
    batch_size: int = 512,
    device: str | None = None,
) -> Comparison:
    """Score each run and the hard, soft and weighted votes of all of them on ``split``.

    Per-model scores are exactly ``imgclf eval``'s. An ensemble folder counts as its
    members, and ``vote`` (None) is its own (else hard). ``prefer`` (run names) breaks
    hard-vote ties; ``weights`` (``{run: w}``, ``["run:w"]`` or one number per run) default to each
    run's validation accuracy; without them the weighted vote is left out with a note,
    unless ``vote="weighted"`` asks for it.
    """
    check_vote(vote)
    rs = load_runs(runs)
    vote, prefer = voting(rs, vote, prefer)
    prefer_idx = prefer_order(rs, prefer)
    datasets = open_data_for(data, rs.runs)
    ds = datasets[0]
    split = split or default_split(ds)
    probs, models, labels = [], {}, None
    notes: list[str] = []
    for lr, order, run_ds in zip(rs.runs, rs.orders, datasets, strict=True):
        logits, run_labels = run_logits(
            lr, run_ds, split, tta=tta, batch_size=batch_size, device=device
        )
        logits = logits[:, torch.from_numpy(order)]  # columns in the first run's order
        if labels is None:
            labels = run_labels.numpy()  # the first run's class order is the reference
        seen = trained_on(lr.state, run_ds.root, split)
        if seen:  # the vote's scores are not held out either
            notes.append(not_held_out(lr.name, lr.state, run_ds.name, split, seen))
        scores = compute_metrics(logits, labels, rs.classes)
        models[lr.name] = dataclasses.replace(scores, trained_on=seen)
        probs.append(_softmax(logits))
    assert labels is not None
    stacked = np.stack(probs)
    votes = {"hard": _hard_metrics(stacked, labels, rs.classes, prefer_idx)}
    votes["soft"] = compute_metrics(stacked.mean(axis=0), labels, rs.classes, from_probs=True)
    weight_map = _weighted(rs, stacked, labels, weights, vote, votes, notes)
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
