"""Ensemble recipes: a YAML file that lists member recipes and how they vote.

A recipe file with a ``members`` key is an ensemble recipe (``recipes/study-vote.yaml``)::

    description: "..."
    members:
      - scratch-medium                                   # a recipe as it is
      - {recipe: mobilenet_v2-64, set: [stages.0.epochs=2]}   # with its own --set changes
    vote: hard
    prefer: [mobilenet_v2-64]                            # hard-vote ties: this member first

``imgclf train NAME --data D`` trains its members into one ensemble folder
(:mod:`imgclf.train.ensemble`); ``imgclf recipes`` lists it beside the single recipes. It
is read as a recipe is (bounded, safe YAML without aliases, validated with pydantic); an
unknown key or a member recipe that does not exist is one line naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from imgclf.errors import RecipeError, one_line
from imgclf.train.recipe import _read_recipe_text, _recipe_path, _yaml, load_recipe


class MemberRecipe(BaseModel):
    """One member recipe and the ``--set`` changes it trains with."""

    model_config = ConfigDict(extra="forbid")

    recipe: str = Field(strict=True, min_length=1)
    set: list[Annotated[str, Field(strict=True)]] = Field(default_factory=list)


class EnsembleRecipe(BaseModel):
    """An ensemble recipe: its member recipes, the vote and the hard vote's preference
    (member recipe names, most preferred first)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "ensemble"
    description: str = ""
    members: list[MemberRecipe] = Field(min_length=1, max_length=100)
    vote: Literal["hard", "soft", "weighted"] = "soft"
    prefer: list[Annotated[str, Field(strict=True)]] = Field(default_factory=list)

    @field_validator("members", mode="before")
    @classmethod
    def _names(cls, members: Any) -> Any:
        # A bare name is a member recipe with no changes.
        if isinstance(members, list):
            return [{"recipe": m} if isinstance(m, str) else m for m in members]
        return members


def _read(name_or_path: str | Path) -> tuple[Path, Any] | None:
    """The recipe file's path and YAML; None where the name is no recipe file or the file
    is no YAML (load_recipe then says why)."""
    try:
        path = _recipe_path(name_or_path)
        return path, _yaml(_read_recipe_text(path))
    except (RecipeError, OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def is_ensemble_recipe(name_or_path: Any) -> bool:
    """Whether ``name_or_path`` names an ensemble recipe (a mapping with ``members``)."""
    if not isinstance(name_or_path, str | Path):
        return False
    read = _read(name_or_path)
    return read is not None and isinstance(read[1], dict) and "members" in read[1]


def load_ensemble_recipe(name_or_path: str | Path) -> EnsembleRecipe:
    """An ensemble recipe, validated; its member recipes are checked where they are loaded
    (:func:`imgclf.train.recipe.load_recipe`), with their ``set`` changes."""
    read = _read(name_or_path)
    if read is None or not isinstance(read[1], dict):
        raise RecipeError(f"{name_or_path}: not an ensemble recipe (a YAML mapping with members)")
    path, data = read
    data.setdefault("name", path.stem)
    try:
        ens = EnsembleRecipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise RecipeError(f"{path}: {where}: {one_line(err['msg'])}") from None
    names = [m.recipe for m in ens.members]
    unknown = [p for p in ens.prefer if p not in names]
    if unknown:
        raise RecipeError(f"{path}: prefer: {unknown[0]!r} is not one of its members {names}")
    return ens


def ensemble_recipe_yaml(name_or_path: str | Path) -> str:
    """The ensemble recipe, validated, as YAML (``imgclf recipes NAME``); each member's
    resolved recipe is ``imgclf recipes MEMBER`` with its ``set`` changes."""
    ens = load_ensemble_recipe(name_or_path)
    for m in ens.members:  # each member recipe exists and takes its changes
        load_recipe(m.recipe, m.set)
    return yaml.safe_dump(ens.model_dump(mode="json"), sort_keys=False)
