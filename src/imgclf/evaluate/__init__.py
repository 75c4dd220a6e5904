"""Metrics, confusion matrices and curves.

Plots live in :mod:`imgclf.evaluate.plots` and are not imported here, so scoring does not
pay for importing matplotlib.
"""

from __future__ import annotations

from imgclf.evaluate.metrics import (
    Metrics,
    compute_metrics,
    infer,
    write_confusion_csv,
    write_per_class_csv,
)

__all__ = [
    "Metrics",
    "compute_metrics",
    "infer",
    "write_confusion_csv",
    "write_per_class_csv",
]
