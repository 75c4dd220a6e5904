"""Training: recipes (YAML), stages (freeze/unfreeze by group name), the loop, run folders.

Called as a function, ``imgclf.train(recipe, data, ...)`` trains and returns the run
(:func:`imgclf.train.api.train`: its arguments, ``help(imgclf.train.train)``)::

    run = imgclf.train("fast", data="cifar10", epochs=2)

Exports are imported lazily (as in :mod:`imgclf`), so a module that needs one piece of
training (``imgclf.train.recipe``, ``imgclf.train.rundir``) does not load the trainer.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS = {
    "Run": "imgclf.train.state",
    "Callback": "imgclf.train.callbacks",
    "TrainState": "imgclf.train.callbacks",
    "train": "imgclf.train.api",
    "Recipe": "imgclf.train.recipe",
    "list_recipes": "imgclf.train.recipe",
    "load_recipe": "imgclf.train.recipe",
}

__all__ = list(_EXPORTS)


class _CallableModule(types.ModuleType):
    # `imgclf.train` is both this package and the documented function
    # `imgclf.train(recipe, data=...)`: once the package is imported, Python binds the
    # package to that name, so the package itself must be callable (module __class__
    # assignment, Python ≥ 3.5, is the supported way).
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.train(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in _EXPORTS:
            return getattr(importlib.import_module(_EXPORTS[name]), name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


sys.modules[__name__].__class__ = _CallableModule
