"""Calibration and top-k accuracy: scores that need more of a prediction than its argmax.

Expected calibration error (ECE) as Guo et al. define it ("On Calibration of Modern Neural
Networks", ICML 2017, section 2, eq. 3): each prediction's confidence is its top-1
probability; the predictions fall into M equal-width bins B_m = ((m-1)/M, m/M], and

    ECE = sum over m of |B_m| / n * |acc(B_m) - conf(B_m)|

where acc(B_m) is the fraction of B_m predicted right and conf(B_m) its mean confidence.
M = 15, as in the paper's tables. A model that says 80% and is right 80% of the
time scores 0; the reliability diagram (:func:`imgclf.evaluate.plots.plot_reliability`)
shows acc(B_m) per bin against the diagonal of perfect calibration.

Both functions here are plain numpy over (N, C) arrays, so scoring stays cheap for the
end of every training run: no sort of the N × C scores, only comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECE_BINS = 15  # Guo et al. 2017


# eq=False: a generated __eq__ would compare numpy arrays and raise on truth value
@dataclass(frozen=True, eq=False)
class Reliability:
    """Predictions binned by confidence: what the ECE sums and the diagram draws."""

    counts: np.ndarray  # (M,) int64, predictions per bin
    accuracy: np.ndarray  # (M,) fraction right per bin, NaN where the bin is empty
    confidence: np.ndarray  # (M,) mean confidence per bin, NaN where the bin is empty
    ece: float  # in [0, 1]

    @property
    def bins(self) -> int:
        return len(self.counts)

    @property
    def edges(self) -> np.ndarray:
        """(M + 1,) bin edges, 0 to 1."""
        return np.linspace(0.0, 1.0, self.bins + 1)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Bin ``probs`` (N, C; each row sums to 1) by top-1 probability against ``labels``
    (N,) and sum the ECE. A confidence on an edge goes to the bin below, as the paper's
    right-closed bins ((m-1)/M, m/M] have it."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    confidence = probs.max(axis=1)
    right = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    where = np.searchsorted(edges[1:-1], confidence, side="left")  # 0 .. bins - 1
    counts = np.bincount(where, minlength=bins)
    right_sums = np.bincount(where, weights=right, minlength=bins)
    confidence_sums = np.bincount(where, weights=confidence, minlength=bins)
    # |B_m|/n * |acc - conf| = |right in B_m - confidence summed over B_m| / n
    ece = float(np.abs(right_sums - confidence_sums).sum() / len(labels))
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty bin is NaN, not drawn
        accuracy, mean_confidence = right_sums / counts, confidence_sums / counts
    return Reliability(counts.astype(np.int64), accuracy, mean_confidence, ece)


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows of ``scores`` (N, C: logits or probabilities) whose true label is
    among the ``k`` highest, equal scores ranked in class order (as
    :func:`imgclf.inference.rows.top_k_pairs` ranks them in prediction files)."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    true = scores[np.arange(len(labels)), labels][:, None]
    earlier = np.arange(scores.shape[1])[None, :] < labels[:, None]
    ahead = (scores > true).sum(axis=1) + ((scores == true) & earlier).sum(axis=1)
    return float((ahead < k).mean())
