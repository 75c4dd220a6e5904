"""Votes over per-model class probabilities.

Every function takes ``probs_list``: an array of shape ``(models, N, C)`` or a list of
``(N, C)`` arrays (tensors are fine too), one per model, and works on all N samples at
once with numpy; there is no Python loop over samples, only over the few models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from imgclf.errors import UserError


class EnsembleError(UserError, ValueError):
    """Bad ensemble input: unknown method, or weights / preference order that do not fit.

    A ValueError for library callers, a UserError so the CLI prints it on one line.
    """


def _stack(probs_list: Any) -> np.ndarray:
    if isinstance(probs_list, np.ndarray):
        probs = probs_list
    else:
        probs = np.stack(
            [np.asarray(p.detach().cpu() if hasattr(p, "detach") else p) for p in probs_list]
        )
    if probs.ndim != 3 or probs.shape[0] == 0:
        raise EnsembleError(
            f"need per-model probabilities of shape (models, N, C), got {probs.shape}"
        )
    return probs


def _preference(prefer_order: Sequence[int] | None, num_models: int) -> np.ndarray:
    """Full model order: the listed models first, then the others by index."""
    listed = [int(m) for m in (prefer_order or [])]
    if len(set(listed)) != len(listed) or any(not 0 <= m < num_models for m in listed):
        raise EnsembleError(f"prefer_order {listed} must name distinct models 0..{num_models - 1}")
    rest = [m for m in range(num_models) if m not in listed]
    return np.array(listed + rest, dtype=np.int64)


def hard_vote(probs_list: Any, prefer_order: Sequence[int] | None = None) -> np.ndarray:
    """Majority of the models' top-1 labels, shape ``(N,)`` int64.

    When several labels tie for the most votes, the winner is the tied label voted by the
    earliest model in ``prefer_order`` (default: model 0, 1, 2, …; a partial list puts the
    listed models first, then the rest by index). With three models this is the original
    study's rule: 2 against 1 → the majority; all three different → the preferred model.
    """
    probs = _stack(probs_list)
    order = _preference(prefer_order, probs.shape[0])
    top = probs.argmax(axis=2)[order]  # (M, N) top-1 labels, most preferred model first
    # votes[m, n]: how many models agree with model m on sample n. (M, M, N) booleans,
    # small for the handful of models an ensemble has, and never an (N, C) table.
    votes = (top[:, None, :] == top[None, :, :]).sum(axis=1)
    # The first model (in preference order) whose label has the most votes decides;
    # without a tie every such model votes the same label anyway.
    decider = (votes == votes.max(axis=0)).argmax(axis=0)
    return top[decider, np.arange(top.shape[1])].astype(np.int64)


def vote_shares(probs_list: Any) -> np.ndarray:
    """Fraction of models whose top-1 label is each class, shape ``(N, C)``."""
    probs = _stack(probs_list)
    num_models, num_samples, num_classes = probs.shape
    shares = np.zeros((num_samples, num_classes), dtype=np.float32)
    samples = np.arange(num_samples)
    for top in probs.argmax(axis=2):  # loop over models, not samples
        shares[samples, top] += 1.0 / num_models
    return shares


def soft_vote(probs_list: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the models' probabilities: ``(labels (N,), mean_probs (N, C))``."""
    probs = _stack(probs_list)
    mean_probs = probs.mean(axis=0)
    return mean_probs.argmax(axis=1).astype(np.int64), mean_probs


def _normalized_weights(weights: Sequence[float], num_models: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != num_models:
        raise EnsembleError(f"got {len(w)} weights for {num_models} models")
    if not np.isfinite(w).all() or (w < 0).any():
        raise EnsembleError(f"weights must be finite and non-negative, got {w.tolist()}")
    if w.sum() == 0:
        raise EnsembleError("weights are all zero")
    return w / w.sum()


def weighted_vote(probs_list: Any, weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of probabilities (weights normalized to sum 1): ``(labels, probs)``."""
    probs = _stack(probs_list)
    w = _normalized_weights(weights, probs.shape[0])
    mixed = np.tensordot(w.astype(probs.dtype, copy=False), probs, axes=1)  # (N, C)
    return mixed.argmax(axis=1).astype(np.int64), mixed


# ---------------------------------------------------------------------------- dispatch


def _hard(probs: Any, prefer_order: Sequence[int] | None, weights: Any) -> tuple:
    _reject("weights", weights, "hard")
    return hard_vote(probs, prefer_order), vote_shares(probs)


def _soft(probs: Any, prefer_order: Sequence[int] | None, weights: Any) -> tuple:
    _reject("weights", weights, "soft")
    _reject("prefer_order", prefer_order, "soft")
    return soft_vote(probs)


def _weighted(probs: Any, prefer_order: Sequence[int] | None, weights: Any) -> tuple:
    _reject("prefer_order", prefer_order, "weighted")
    if weights is None:
        raise EnsembleError("method 'weighted' needs one weight per model")
    return weighted_vote(probs, weights)


def _reject(option: str, value: Any, method: str) -> None:
    # an option the method would silently ignore is almost always a mistake
    if value is not None:
        raise EnsembleError(f"{option} does not apply to method {method!r}")


_VOTES: dict[str, Callable[[Any, Any, Any], tuple[np.ndarray, np.ndarray]]] = {
    "hard": _hard,
    "soft": _soft,
    "weighted": _weighted,
}
VOTE_METHODS: tuple[str, ...] = tuple(_VOTES)


def vote(
    method: str,
    probs_list: Any,
    *,
    prefer_order: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble by ``method`` ('hard', 'soft' or 'weighted'): ``(labels (N,), probs (N, C))``.

    For 'hard' the probabilities are the vote shares (:func:`vote_shares`); the labels,
    which carry the tie-break, are authoritative.
    """
    if method not in _VOTES:
        raise EnsembleError(
            f"unknown vote method {method!r}; choose one of: {', '.join(VOTE_METHODS)}"
        )
    return _VOTES[method](probs_list, prefer_order, weights)
