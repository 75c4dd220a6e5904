"""Seeded, stratified train/val splits."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices (into ``labels``) of a validation subset holding ``fraction`` of each class.

    Each class gives ``round(n * fraction)`` samples, at least one when it has two or more,
    so rare classes are still validated; a class with one sample stays in train.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        k = round(len(idx) * fraction)
        k = min(max(k, 1), len(idx) - 1) if len(idx) >= 2 else 0
        chosen.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)
