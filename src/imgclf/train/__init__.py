"""Training: recipes (YAML), stages (freeze/unfreeze by group name), the loop, checkpoints."""

from imgclf.train.loop import Run, train
from imgclf.train.recipe import Recipe, list_recipes, load_recipe

__all__ = ["Recipe", "Run", "list_recipes", "load_recipe", "train"]
