"""What a run leaves behind, checked before anything is built from it: a checkpoint's
fields (:func:`check_checkpoint_fields`) and ``summary.json`` (:func:`read_summary`).

Both are files a person can edit, copy between versions or damage. Read unchecked, a
missing ``class_names``, five class names for three outputs, a NaN mean or a summary that
is a list ended in a ``KeyError``/``TypeError``/``ValueError`` traceback far from the
cause, or worse in a model that runs and answers wrongly (issue #31, items 9 and 10).
Each file is validated by one pydantic schema here, as recipes are
(:mod:`imgclf.train.recipe`), and a bad field is one line naming the file and the field.

The checkpoint's weight *values* (non-finite tensors) are not this module's business; the
shapes of its tensors against the model are checked where the model is built
(:mod:`imgclf.models.restore`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from imgclf.errors import CheckpointError, UserError, one_line

# Sizes up to 8192 px: the largest input any registered model or recipe uses is 600 px;
# a bound keeps an edited size from allocating a tensor of the machine's memory.
MAX_SIZE = 8192

_Size = Annotated[int, Field(strict=True, ge=1, le=MAX_SIZE)]
_Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_Positive = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)]
_Count = Annotated[int, Field(strict=True, ge=0)]
_Fraction = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1)]


# ---------------------------------------------------------------------------- checkpoints


class _ModelArgs(BaseModel):
    """``create(model_name, **model_args)``: the two arguments every model takes, checked
    here; the others are the model's own, checked by building it."""

    model_config = ConfigDict(extra="allow")

    num_classes: int = Field(strict=True, ge=1)
    input_size: _Size


class _Position(BaseModel):
    stage: _Count
    epoch: _Count
    batch: _Count


class _Progress(BaseModel):
    """What a run measured (:class:`imgclf.train.state.Progress`); ``best_val_acc`` is
    also the weighted vote's weight of a run without summary.json."""

    model_config = ConfigDict(extra="allow")

    best_val_acc: float = Field(-1.0, strict=True)


class CheckpointFields(BaseModel):
    """The fields every reader of a checkpoint uses (:func:`imgclf.train.state.to_checkpoint`
    writes them): the model and its weights, its classes in output order, and what turns a
    file into its input. ``position`` and ``progress`` are a resume's (absent: not
    resumable, :func:`imgclf.runtime.checkpoint.load_resumable` says so)."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)

    model_name: str = Field(strict=True, min_length=1)
    model_args: _ModelArgs
    class_names: list[Annotated[str, Field(strict=True)]] = Field(min_length=1)
    input_size: _Size
    mean: tuple[_Finite, _Finite, _Finite]
    std: tuple[_Positive, _Positive, _Positive]
    # Absent in checkpoints from before it existed (imgclf.data.preprocess crops to the
    # input size then).
    source_size: tuple[_Size, _Size] | None = None
    model_state: dict[str, torch.Tensor]
    position: _Position | None = None
    progress: _Progress | None = None

    @field_validator("class_names")
    @classmethod
    def _names(cls, names: list[str], info: ValidationInfo) -> list[str]:
        blank = [i for i, name in enumerate(names) if not name.strip()]
        if blank:
            raise ValueError(f"class name {blank[0]} is empty")
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(f"class {name!r} is named twice")
            seen.add(name)
        args = info.data.get("model_args")
        if args is not None and args.num_classes != len(names):
            raise ValueError(
                f"{len(names)} names for a model with {args.num_classes} outputs "
                "(model_args.num_classes)"
            )
        return names

    @field_validator("input_size")
    @classmethod
    def _same_size(cls, size: int, info: ValidationInfo) -> int:
        args = info.data.get("model_args")
        if args is not None and args.input_size != size:
            raise ValueError(f"{size}, but model_args.input_size is {args.input_size}")
        return size


def check_checkpoint_fields(state: dict[str, Any], path: str | Path) -> None:
    """Raise one :class:`CheckpointError` line naming ``path`` and the first bad field of
    ``state`` (an imgclf checkpoint's dict), before anything is built from it."""
    try:
        CheckpointFields.model_validate(state)
    except ValidationError as exc:
        raise CheckpointError(
            f"{path}: {describe(exc)}; the checkpoint was edited or damaged: use an "
            "unchanged copy, or train again"
        ) from None


# ---------------------------------------------------------------------------- summary.json


class SummaryError(UserError):
    """A run's summary.json that is not what training wrote."""


class SummaryFields(BaseModel):
    """The fields of a run's ``summary.json`` that ``predict``/``serve``/``export``
    (``val_accuracy``: the weighted vote's weight) and ``report`` read; training writes
    more (:mod:`imgclf.train.finish`), kept as they are. Each is optional: a run without
    a validation split has no scores."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, strict=True)
    recipe: str | None = Field(None, strict=True)
    dataset: str | None = Field(None, strict=True)
    device: str | None = Field(None, strict=True)
    precision: str | None = Field(None, strict=True)
    input_size: _Size | None = None
    epochs: _Count | None = None
    parameters: _Count | None = None
    train_seconds: Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)] | None = None
    val_accuracy: _Fraction | None = None
    val_balanced_accuracy: _Fraction | None = None
    val_macro_f1: _Fraction | None = None
    val_top5_accuracy: _Fraction | None = None  # more than 5 classes only
    val_ece: _Fraction | None = None  # expected calibration error, 15 bins
    val_loss: float | None = Field(None, strict=True)  # inf where a class had probability 0
    val_count: _Count | None = None


def read_summary(path: Path) -> dict[str, Any] | None:
    """A run's ``summary.json`` as a dict, checked (:class:`SummaryFields`); None where
    there is none (a run stopped before its end has only metrics.csv). Unreadable, not
    JSON, not an object, or a field of the wrong kind: one :class:`SummaryError` line
    naming the file and the field."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise SummaryError(f"{path}: unreadable ({one_line(str(exc))})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SummaryError(f"{path}: not valid JSON ({one_line(str(exc))})") from None
    if not isinstance(data, dict):
        raise SummaryError(f"{path}: not a JSON object but a {type(data).__name__}")
    try:
        SummaryFields.model_validate(data)
    except ValidationError as exc:
        raise SummaryError(f"{path}: {describe(exc)}") from None
    return data


def describe(exc: ValidationError) -> str:
    """pydantic's first error as ``field: what is wrong``, one line (``mean.1``: the
    second value of ``mean``)."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(the whole file)"
    msg = "missing" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
    msg = re.sub(r" or instance of \w+", "", msg)  # the schema's class names mean nothing here
    if err["type"] not in ("missing", "value_error") and "input" in err:
        msg += f", got {_short(err['input'])}"
    return one_line(f"{loc}: {msg}")


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"
