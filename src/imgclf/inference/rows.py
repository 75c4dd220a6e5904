"""Votes → rows: how a run set's probabilities become one label per file.

A :class:`Plan` holds the vote (``hard``, ``soft`` or ``weighted``, with its tie-break
order and weights) and the output columns. ``predict`` writes its rows to a CSV; ``serve``
asks it for the voted labels and scores (:meth:`Plan.decide`), so one file gets one answer
through both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from imgclf.ensemble import vote as ensemble_vote
from imgclf.errors import UserError
from imgclf.inference.decode import Item
from imgclf.inference.runs import RunSet, Weights, prefer_order, resolve_weights


@dataclass
class Plan:
    """How rows are labelled and written: the vote and the output columns.

    ``format``: ``"default"`` (``file,label,confidence[,label_<run>...],error``) or
    ``"kaggle"`` (``id,label``, the file stem as id).
    """

    classes: list[str]
    names: list[str]
    vote: str
    prefer: list[int] | None
    weights: list[float] | None
    format: str

    @classmethod
    def for_runs(
        cls,
        rs: RunSet,
        vote: str,
        prefer: Sequence[str] | None = None,
        weights: Weights = None,
        format: str = "default",
    ) -> Plan:
        """The plan of ``rs``'s ``vote``. ``prefer``: run names in hard-vote tie-break
        order. ``weights``: for a weighted vote of several runs (default: each run's
        validation accuracy). Raises :class:`~imgclf.errors.UserError` for an option the
        vote does not take. Check the method first (:func:`~imgclf.inference.runs.check_vote`).
        """
        many = len(rs.runs) > 1
        plan = cls(
            classes=rs.classes,
            names=rs.names,
            vote=vote,
            prefer=prefer_order(rs, prefer),
            weights=resolve_weights(rs, weights) if vote == "weighted" and many else None,
            format=format,
        )
        if vote != "hard" and plan.prefer is not None:
            raise UserError(f"--prefer breaks hard-vote ties; it does not apply to --vote {vote}")
        if vote != "weighted" and weights is not None:
            raise UserError(f"--weights apply to --vote weighted, not --vote {vote}")
        return plan

    def header(self) -> list[str]:
        """The output columns."""
        if self.format == "kaggle":
            return ["id", "label"]
        per_model = [f"label_{n}" for n in self.names] if len(self.names) > 1 else []
        return ["file", "label", "confidence", *per_model, "error"]

    def rows(self, items: list[Item], reasons: list[str | None], probs: np.ndarray) -> list:
        """One row per item (``probs``: models × items × classes): the vote's label and
        score, each model's label, and the reason where the file could not be read."""
        ok = np.array([r is None for r in reasons], dtype=bool)
        labels = np.full(len(items), -1, dtype=np.int64)
        confidence = np.zeros(len(items), dtype=np.float64)
        per_model = np.full((len(self.names), len(items)), -1, dtype=np.int64)
        if ok.any():
            good = probs[:, ok]
            voted, scores = self.decide(good)
            labels[ok] = voted
            confidence[ok] = scores[np.arange(len(voted)), voted]
            per_model[:, ok] = good.argmax(axis=2)
        return [
            self._row(items[i], reasons[i], labels[i], confidence[i], per_model[:, i])
            for i in range(len(items))
        ]

    def decide(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The vote on ``probs`` (models × N × classes): labels (N) and each class's score
        (N × classes): one run's probabilities, vote shares (hard) or (weighted) mean
        probabilities. Tie-breaks as :mod:`imgclf.ensemble`."""
        if len(probs) == 1:
            return probs[0].argmax(axis=1), probs[0]
        weights = self.weights if self.vote == "weighted" else None
        return ensemble_vote(self.vote, probs, prefer_order=self.prefer, weights=weights)

    def _row(self, item: Item, reason, label: int, confidence: float, models) -> list[str]:
        name = self.classes[label] if label >= 0 else ""
        if self.format == "kaggle":
            return [PurePosixPath(item.file).stem, name]
        per_model = [self.classes[m] if m >= 0 else "" for m in models]
        conf = f"{confidence:.6f}" if label >= 0 else ""
        return [item.file, name, conf, *(per_model if len(self.names) > 1 else []), reason or ""]


def top_k_pairs(probs: np.ndarray, classes: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` best (class, score) pairs of one row of scores, by descending score; equal
    scores in class order (a stable sort, as the vote's own tie-break by class index)."""
    order = np.argsort(-np.asarray(probs), kind="stable")[:k]
    return [(classes[int(c)], float(probs[c])) for c in order]
