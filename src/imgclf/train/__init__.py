"""Training: recipes (YAML), stages (freeze/unfreeze by group name), the loop, checkpoints."""

import sys
import types

from imgclf.train.loop import Run, train
from imgclf.train.recipe import Recipe, list_recipes, load_recipe

__all__ = ["Recipe", "Run", "list_recipes", "load_recipe", "train"]


class _CallableModule(types.ModuleType):
    # `imgclf.train` is both this package and the documented function
    # `imgclf.train(recipe, data=...)`: once the package is imported, Python binds the
    # package to that name, so the package itself must be callable (module __class__
    # assignment, Python ≥ 3.5, is the supported way).
    def __call__(self, *args, **kwargs) -> Run:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
