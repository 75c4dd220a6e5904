"""Votes → rows: how a run set's probabilities become one label per file.

A :class:`Plan` holds the vote (``hard``, ``soft`` or ``weighted``, with its tie-break
order and weights) and the output columns. ``predict`` writes its rows to a CSV (or JSON
Lines); ``serve`` asks it for the voted labels and scores (:meth:`Plan.decide`), so one
file gets one answer through both.

The scores behind ``confidence``, the top-k columns and ``prob_<class>`` are the vote's:
one run's probabilities, the soft vote's mean or the weighted vote's weighted mean
probability, or a hard vote's shares of the runs (the fraction of runs whose top-1 label
is the class). A hard vote of several runs has no probabilities, so ``probs`` is refused
for it rather than filled with shares under a name that says probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from imgclf.ensemble import vote as ensemble_vote
from imgclf.errors import UserError
from imgclf.inference.decode import Item
from imgclf.inference.runs import RunSet, Weights, prefer_order, resolve_weights, voting

ROW_FORMATS = ("default", "kaggle", "jsonl")


def top_k_pairs(probs: np.ndarray, classes: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` highest-scoring classes of one sample's ``probs`` (C,), as (class,
    probability) pairs: highest first, equal probabilities in class order."""
    order = np.argsort(-np.asarray(probs), kind="stable")[:k]  # stable: ties keep class order
    return [(classes[int(c)], float(probs[c])) for c in order]


@dataclass
class Plan:
    """How rows are labelled and written: the vote and the output columns.

    ``format``: ``"default"`` (``file,label,confidence[,label_<k>,confidence_<k>...]
    [,label_<run>...][,prob_<class>...],error``), ``"kaggle"`` (``id,label``, the file stem
    as id) or ``"jsonl"`` (one JSON object per file, :meth:`_record`). ``top_k``: how many
    ranked (label, score) pairs a row has (1: the label alone). ``probs``: every class's
    score too.
    """

    classes: list[str]
    names: list[str]
    vote: str
    prefer: list[int] | None
    weights: list[float] | None
    format: str
    top_k: int = 1
    probs: bool = False

    @classmethod
    def for_runs(
        cls,
        rs: RunSet,
        vote: str | None,
        prefer: Sequence[str] | None = None,
        weights: Weights = None,
        format: str = "default",
        top_k: int = 1,
        probs: bool = False,
    ) -> Plan:
        """The plan of ``rs``'s ``vote`` (None: an ensemble folder's own, else hard:
        :func:`~imgclf.inference.runs.voting`). ``prefer``: run names in hard-vote tie-break
        order. ``weights``: for a weighted vote of several runs (default: each run's
        validation accuracy). ``top_k``, ``probs``: the extra columns (see the class).
        Raises :class:`~imgclf.errors.UserError` for an option the vote or format does
        not take. Check the method first (:func:`~imgclf.inference.runs.check_vote`).
        """
        many = len(rs.runs) > 1
        vote, prefer = voting(rs, vote, prefer)
        plan = cls(
            classes=rs.classes,
            names=rs.names,
            vote=vote,
            prefer=prefer_order(rs, prefer),
            weights=resolve_weights(rs, weights) if vote == "weighted" and many else None,
            format=format,
            top_k=top_k,
            probs=probs,
        )
        plan._check_columns()
        if vote != "hard" and plan.prefer is not None:
            raise UserError(f"--prefer breaks hard-vote ties; it does not apply to --vote {vote}")
        if vote != "weighted" and weights is not None:
            raise UserError(f"--weights apply to --vote weighted, not --vote {vote}")
        return plan

    def _check_columns(self) -> None:
        n, k = len(self.classes), self.top_k
        if not 1 <= k <= n:
            raise UserError(f"--top-k {k}: give 1 to {n}, the number of classes the runs know")
        if self.format == "kaggle" and (k > 1 or self.probs):
            raise UserError("--top-k and --probs add columns; --format kaggle writes id,label only")
        if self.probs and self.vote == "hard" and len(self.names) > 1:
            raise UserError(
                "--probs: a hard vote counts the runs' labels and has no probabilities; use "
                "--vote soft (their mean) or weighted, or --top-k for the hard vote's shares"
            )
        header = self.header()
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:  # a run named "2" has the column label_2, as the 2nd-ranked label does
            raise UserError(
                f"--top-k {k}: column {twice[0]} would be both a ranked label and a run's "
                "label; rename that run's folder or give a smaller --top-k"
            )

    def header(self) -> list[str]:
        """The output columns (a JSON Lines file has none)."""
        if self.format == "kaggle":
            return ["id", "label"]
        ranked = [f"{c}_{j}" for j in range(2, self.top_k + 1) for c in ("label", "confidence")]
        per_model = [f"label_{n}" for n in self.names] if len(self.names) > 1 else []
        probs = [f"prob_{c}" for c in self.classes] if self.probs else []
        return ["file", "label", "confidence", *ranked, *per_model, *probs, "error"]

    def rows(self, items: list[Item], reasons: list[str | None], probs: np.ndarray) -> list:
        """One row per item (``probs``: models × items × classes): the vote's label and
        score (with the ranked ones and every class's, when asked), each model's label,
        and the reason where the file could not be read. A row is a list of cells, or for
        ``format="jsonl"`` a dict."""
        ok = np.array([r is None for r in reasons], dtype=bool)
        labels = np.full(len(items), -1, dtype=np.int64)
        scores = np.zeros((len(items), len(self.classes)), dtype=np.float64)
        per_model = np.full((len(self.names), len(items)), -1, dtype=np.int64)
        if ok.any():
            good = probs[:, ok]
            voted, voted_scores = self.decide(good)
            labels[ok] = voted
            scores[ok] = voted_scores
            per_model[:, ok] = good.argmax(axis=2)
        write = self._record if self.format == "jsonl" else self._row
        return [
            write(items[i], reasons[i], labels[i], scores[i], per_model[:, i])
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

    def _ranked(self, scores: np.ndarray, label: int) -> list[tuple[str, float]]:
        """The top-k (class, score) pairs, the vote's label first: a hard vote's tie-break
        may pick a label that class order would put behind an equal share."""
        pairs = top_k_pairs(scores, self.classes, self.top_k)
        name = self.classes[label]
        if pairs[0][0] != name:
            rest = [p for p in pairs if p[0] != name]
            pairs = [(name, float(scores[label])), *rest[: self.top_k - 1]]
        return pairs

    def _row(self, item: Item, reason, label: int, scores: np.ndarray, models) -> list[str]:
        name = self.classes[label] if label >= 0 else ""
        if self.format == "kaggle":
            return [PurePosixPath(item.file).stem, name]
        per_model = [self.classes[m] if m >= 0 else "" for m in models]
        ranked: list[str] = []
        if self.top_k > 1:
            pairs = self._ranked(scores, label)[1:] if label >= 0 else []
            for j in range(self.top_k - 1):
                ranked += [pairs[j][0], f"{pairs[j][1]:.6f}"] if j < len(pairs) else ["", ""]
        probs = [f"{p:.6f}" if label >= 0 else "" for p in scores] if self.probs else []
        conf = f"{scores[label]:.6f}" if label >= 0 else ""
        several = per_model if len(self.names) > 1 else []
        return [item.file, name, conf, *ranked, *several, *probs, reason or ""]

    def _record(self, item: Item, reason, label: int, scores: np.ndarray, models) -> dict:
        """One JSON Lines object: ``file``, ``label``, ``confidence``, ``top_k`` ([label,
        score] pairs, the label first), ``models`` (each run's label, when several),
        ``probs`` (``{class: score}``, when asked) and ``error``; the same keys for every
        file, a failed one's null (its ``top_k`` empty)."""
        read = label >= 0
        record: dict = {
            "file": item.file,
            "label": self.classes[label] if read else None,
            "confidence": float(scores[label]) if read else None,
            "top_k": [list(p) for p in self._ranked(scores, label)] if read else [],
        }
        if len(self.names) > 1:
            pairs = zip(self.names, models, strict=True)
            record["models"] = {n: self.classes[m] if m >= 0 else None for n, m in pairs}
        if self.probs:
            every = zip(self.classes, map(float, scores), strict=True)
            record["probs"] = dict(every) if read else None
        record["error"] = reason
        return record
