"""Metrics, confusion matrices and curves.

Called as a function, ``imgclf.evaluate(run, data, ...)`` scores a run on a dataset
(:func:`imgclf.evaluate.runs.evaluate`: its arguments, ``help(imgclf.evaluate.runs.evaluate)``)::

    print(imgclf.evaluate("runs/fast-1", "photos", split="val").accuracy)

Plots live in :mod:`imgclf.evaluate.plots` and are not imported here, so scoring does not
pay for importing matplotlib.
"""

from __future__ import annotations

import sys
import types

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


class _CallableModule(types.ModuleType):
    # `imgclf.evaluate` is both this package and the documented function
    # `imgclf.evaluate(run, data=...)`: once the package is imported, Python binds the
    # package to that name, so the package itself must be callable (module __class__
    # assignment, Python ≥ 3.5, is the supported way).
    def __call__(self, *args, **kwargs) -> Metrics:
        from imgclf.evaluate.runs import evaluate

        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
