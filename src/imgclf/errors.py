"""Errors a person can act on.

Every mistake a user can make (a bad path, option, file or recipe) raises a subclass of
:class:`UserError`. The CLI prints its message on one line as ``error: ...`` and exits 2,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, fixable by the user. Message is one line."""

    exit_code = 2


class DataError(UserError):
    """Unusable dataset source, cache or split."""


class RecipeError(UserError):
    """Unknown key or bad value in a recipe or a ``--set`` override."""


class UnknownModel(UserError):
    """A model name that is not in the registry."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or incompatible with the data."""


class WeightsMissing(CheckpointError):
    """Pretrained weights that are not on this machine and cannot be downloaded."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""

    exit_code = 3


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, newlines included, as one space: a foreign
    error (YAML, torch) quoted inside a one-line message stays one line."""
    return " ".join(text.split())


class ExportError(UserError):
    """A model that cannot be exported, or an export that does not match PyTorch."""
