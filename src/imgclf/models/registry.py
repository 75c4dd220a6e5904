"""One registry for every model: ``@register`` adds a constructor, ``create`` builds one.

Pattern after timm's model registry: names are the only way the rest of imgclf (recipes,
the CLI, checkpoints) refers to an architecture.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from imgclf.errors import CheckpointError, UnknownModel, WeightsMissing, one_line
from imgclf.models.base import Classifier
from imgclf.models.restore import load_weights

KINDS = ("scratch", "pretrained")


@dataclass(frozen=True)
class ModelSpec:
    """What ``imgclf models`` lists: enough to choose a model without building it."""

    name: str
    description: str
    input_size: int  # default square input resolution
    kind: str  # "scratch" (random init) or "pretrained" (downloads weights)
    # The weights file a pretrained model finds on this machine, or None where it would
    # download them (`imgclf models` shows which); not set for models without such a file.
    local_weights: Callable[[], Path | None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class _Entry:
    spec: ModelSpec
    build: Callable[..., Classifier]


_MODELS: dict[str, _Entry] = {}

Builder = TypeVar("Builder", bound=Callable[..., Classifier])


def register(
    name: str,
    *,
    description: str,
    input_size: int,
    kind: str = "scratch",
    local_weights: Callable[[], Path | None] | None = None,
) -> Callable[[Builder], Builder]:
    """Register a Classifier subclass or factory under ``name``.

    The constructor is called as ``build(num_classes=..., input_size=..., **kwargs)``.
    A variant factory must accept every key of the model_args it produces, so that
    ``create(name, **model.model_args)`` works, e.g.::

        @register("fast_large", description="...", input_size=32)
        def fast_large(num_classes, input_size=32, widths=(128, 384, 384), **kwargs):
            return FastNet(num_classes, input_size, widths=widths, **kwargs)
    """
    if kind not in KINDS:
        raise ValueError(f"model {name!r}: kind must be one of {KINDS}, got {kind!r}")

    def add(build: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        spec = ModelSpec(name, description, input_size, kind, local_weights)
        _MODELS[name] = _Entry(spec, build)
        return build

    return add


# Names outside the registry that a resolver can still build (backbones.py: any
# torchvision classification model; timm_models.py: timm/<name>). Each resolver maps a
# name to (spec, build) or None, lists its names for "did you mean", adds a hint to the
# unknown-model message and a summary line to `imgclf models`.
@dataclass(frozen=True)
class _Fallback:
    resolve: Callable[[str], tuple[ModelSpec, Callable[..., Classifier]] | None]
    names: Callable[[], Iterable[str]]
    hint: str
    summary: str


_FALLBACKS: list[_Fallback] = []

# difflib's default cutoff (0.6) suggests 'resnet50' for 'resnet9000'; 0.8 still catches
# typos like 'simpel' (0.83) and 'mobilenetv2' (0.96).
SUGGEST_CUTOFF = 0.8


def register_fallback(
    resolve: Callable[[str], tuple[ModelSpec, Callable[..., Classifier]] | None],
    *,
    names: Callable[[], Iterable[str]],
    hint: str,
    summary: str,
) -> None:
    """Let ``create``/``model_spec`` build names that are not registered.

    Registered names always win; ``list_models`` lists only registered ones, and
    :func:`other_models` the fallbacks' ``summary`` (``{n}``: how many names it has).
    """
    _FALLBACKS.append(_Fallback(resolve, names, hint, summary))


def other_models() -> list[str]:
    """One line per fallback: the names it builds beyond the registered ones."""
    return [f.summary.format(n=len(list(f.names()))) for f in _FALLBACKS]


def _entry(name: str) -> _Entry:
    if name in _MODELS:
        return _MODELS[name]
    for fallback in _FALLBACKS:
        found = fallback.resolve(name)
        if found is not None:
            return _Entry(*found)
    choices = ", ".join(sorted(_MODELS))
    close = difflib.get_close_matches(name.lower(), list(_MODELS), n=1, cutoff=SUGGEST_CUTOFF)
    for fallback in _FALLBACKS:
        if close:
            break
        close = difflib.get_close_matches(
            name.lower(), list(fallback.names()), n=1, cutoff=SUGGEST_CUTOFF
        )
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    extra = "".join(f" ({fallback.hint})" for fallback in _FALLBACKS)
    raise UnknownModel(f"unknown model {name!r}{hint} choose one of: {choices}{extra}")


def model_spec(name: str) -> ModelSpec:
    """The spec of a registered model; UnknownModel (with a suggestion) otherwise."""
    return _entry(name).spec


def list_models() -> list[ModelSpec]:
    """Every registered model, sorted by name."""
    return [_MODELS[name].spec for name in sorted(_MODELS)]


def create(name: str, num_classes: int, **kwargs: Any) -> Classifier:
    """Build model ``name`` with ``num_classes`` outputs.

    ``input_size`` defaults to the registered one; other kwargs go to the constructor.
    ``create(name, **model.model_args)`` rebuilds the same architecture.
    """
    entry = _entry(name)
    kwargs.setdefault("input_size", entry.spec.input_size)
    model = entry.build(num_classes=num_classes, **kwargs)
    if not isinstance(model, Classifier):
        raise TypeError(f"model {name!r} built a {type(model).__name__}, not a Classifier")
    model.name = name
    return model


def build_model_from_checkpoint(state: dict[str, Any]) -> Classifier:
    """The model a checkpoint (:func:`imgclf.runtime.checkpoint.load_checkpoint`)
    describes, its weights loaded, in eval mode: no recipe is needed. Its fields were
    checked when it was read (:mod:`imgclf.runtime.schema`); a name or arguments that
    build no model, or weights that do not fit it, are one :class:`CheckpointError` line."""
    where = state.get("path", "checkpoint")
    model = _create_saved(state["model_name"], state["model_args"], where)
    load_weights(model, state["model_state"], where)
    model.eval()
    return model


def _create_saved(name: str, args: dict[str, Any], where: str) -> Classifier:
    """``create(name, **args)`` for a checkpoint's fields: an unknown name, or arguments
    the model does not take, name ``where`` and the field."""
    try:
        return create(name, **args)
    except WeightsMissing:
        raise
    except UnknownModel as exc:
        raise CheckpointError(f"{where}: model_name: {exc}") from None
    except (TypeError, ValueError, CheckpointError) as exc:
        # A constructor's own complaint (an unexpected keyword, a bad value): the saved
        # arguments are not this model's.
        raise CheckpointError(
            f"{where}: model_args {args} do not build model {name!r} ({one_line(str(exc))})"
        ) from None
