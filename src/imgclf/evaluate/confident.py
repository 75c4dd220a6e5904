"""The confident-learning rule: which given labels out-of-sample probabilities contradict.

Northcutt, Jiang & Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels",
JAIR 70 (2021) 1373-1411 (arXiv 1911.00068), §3.1 "Count" and §3.2 "Rank and Prune":

* Eq. (2): each class j's threshold t_j is the mean self-confidence p̂(ỹ=j; x) of the
  images *labelled* j: what the model's probability of a class looks like on its own
  members, so a class the model is timid about gets a low bar (no global cut-off).
* Eq. (1): an image labelled i counts towards the confident joint C[i][j] when its
  probability of j reaches t_j; where several classes reach theirs, the likeliest of
  them (argmax over {l : p̂_l ≥ t_l}). Images that reach no threshold count nowhere.
* §3.2, method "C_ỹ,y*": the images off the joint's diagonal (labelled i, confidently j ≠ i)
  are the label issues, ranked by self-confidence or by normalized margin.

This is the rule cleanlab implements as ``count.compute_confident_joint`` and
``filter.find_label_issues(filter_by="confident_learning")``, including its two
adjustments: thresholds lowered by 1e-6 so that a class whose probabilities all equal
its mean still reaches it in float arithmetic, and no issue where the model's own
prediction is the given label (cleanlab's filter drops those: an image under its class's
mean but still predicted as it is a hard example, not a contradiction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

RankBy = Literal["self_confidence", "normalized_margin"]
RANK_BY: tuple[str, ...] = ("self_confidence", "normalized_margin")
# cleanlab count.py: "thresholds ... - 1e-6" against float ties at the threshold.
_TIE = 1e-6


@dataclass(frozen=True)
class LabelIssues:
    """Per image: ``issue`` (off the confident joint's diagonal), ``suggested`` (its
    confident class, -1 where none reaches its threshold) and ``score`` (label quality in
    0..1, lower = more suspect); ``ranked``: the issues, most suspect first; ``joint``:
    the confident joint, given × confident class."""

    issue: np.ndarray  # N bool
    suggested: np.ndarray  # N int64
    score: np.ndarray  # N float64
    ranked: np.ndarray  # indices of the issues, by score ascending
    thresholds: np.ndarray  # C
    joint: np.ndarray  # C×C int64


def thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Eq. (2): t_j = mean of p̂(j) over the images labelled j; +inf for a class no image
    is labelled (nothing can be confidently in it)."""
    n, classes = probs.shape
    counts = np.bincount(labels, minlength=classes)
    sums = np.bincount(labels, weights=probs[np.arange(n), labels], minlength=classes)
    out = np.full(classes, np.inf)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out


def confident_classes(probs: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Eq. (1)'s y*: per image, the likeliest class among those at or above their
    threshold, or -1 where there is none."""
    above = probs >= t - _TIE
    best = np.where(above, probs, -np.inf).argmax(axis=1)
    return np.where(above.any(axis=1), best, -1)


def confident_joint(labels: np.ndarray, confident: np.ndarray, classes: int) -> np.ndarray:
    """C[i][j]: images labelled i whose confident class is j (Eq. 1)."""
    counted = confident >= 0
    flat = labels[counted] * classes + confident[counted]
    return np.bincount(flat, minlength=classes * classes).reshape(classes, classes)


def label_quality(probs: np.ndarray, labels: np.ndarray, rank_by: RankBy) -> np.ndarray:
    """Per image in 0..1, lower = more suspect: ``self_confidence`` p̂(given), or
    ``normalized_margin`` (p̂(given) − max other p̂ + 1) / 2 (§3.2; cleanlab's rank.py)."""
    rows = np.arange(len(labels))
    given = probs[rows, labels]
    if rank_by == "self_confidence":
        return given
    if rank_by != "normalized_margin":
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    others = probs.copy()
    others[rows, labels] = -np.inf
    return (given - others.max(axis=1) + 1) / 2


def confident_issues(
    probs: np.ndarray, labels: np.ndarray, rank_by: RankBy = "self_confidence"
) -> LabelIssues:
    """The confident-learning issues of ``labels`` under out-of-sample ``probs`` (N×C)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (N, C) with N = {len(labels)} labels, got {probs.shape}")
    t = thresholds(probs, labels)
    confident = confident_classes(probs, t)
    issue = (confident >= 0) & (confident != labels) & (probs.argmax(axis=1) != labels)
    score = label_quality(probs, labels, rank_by)
    flagged = np.flatnonzero(issue)
    ranked = flagged[np.argsort(score[flagged], kind="stable")]
    joint = confident_joint(labels, confident, probs.shape[1])
    return LabelIssues(issue, confident, score, ranked, t, joint)
