"""``imgclf train RECIPE --data D --init RUN``: a new run that starts from another run's weights.

Fine-tuning a trained model on new photos, or on newly labelled data, keeps what it
learnt: every tensor comes from RUN's best.pt (else last.pt, or the .pt file given) except
the classifier's rows, which are matched by class name. A class in both keeps its row; a
class new to the data gets the row the recipe's fresh model has (a pretrained backbone's
head starts at zero, imgclf.models.backbones.build_head; a scratch net's at PyTorch's
default init); a class of RUN's that the data lacks is dropped. The network must be the
same (model and arguments, the head included); the input size may differ where no
weight depends on it (every net here pools globally before its head).

The checkpoint is read as every checkpoint is (imgclf.runtime.checkpoint.load_checkpoint:
``weights_only=True``, its fields checked): a bad file is one line, as is another model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from imgclf.errors import CheckpointError, RecipeError
from imgclf.models.restore import load_weights, weights_mismatch
from imgclf.runtime.checkpoint import load_checkpoint
from imgclf.train.recipe import Recipe

# Model arguments that may differ between RUN and the new run.
FREE_ARGS = ("num_classes", "input_size")


def load_source(recipe: Recipe) -> dict[str, Any]:
    """The checkpoint ``recipe.init`` names, checked against the recipe's model before
    anything is built (one line naming both models when they differ)."""
    if recipe.weights is not None:
        raise RecipeError(
            "init and weights both give the starting weights (--init, --weights): give one"
        )
    state = load_checkpoint(recipe.init)
    if state["model_name"] != recipe.model:
        raise CheckpointError(
            f"--init {state['path']}: that run's model is {state['model_name']!r}, this "
            f"recipe's is {recipe.model!r}; --init needs the same architecture (give a "
            f"recipe with model {state['model_name']!r}, or train from scratch)"
        )
    return state


def start_from(model: nn.Module, state: dict[str, Any], classes: list[str]) -> str:
    """Load ``state``'s weights into the freshly built ``model`` whose outputs are
    ``classes``, rows of the classifier matched by name; returns the line that says what
    was matched, new and dropped."""
    where = f"--init {state['path']}"
    _same_architecture(model, state, where)
    old = list(state["class_names"])
    source = [old.index(c) if c in old else None for c in classes]
    own = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights = dict(state["model_state"])
    for name in classifier_tensors(model):
        fresh, saved = own[name].clone(), weights.get(name)
        if saved is None or saved.shape[0] != len(old) or saved.shape[1:] != fresh.shape[1:]:
            got = None if saved is None else list(saved.shape)
            raise CheckpointError(
                f"{where}: its classifier {name!r} has shape {got}, not {len(old)} rows of "
                f"{list(fresh.shape[1:])}: the checkpoint was edited or belongs to another model"
            )
        for row, src in enumerate(source):
            if src is not None:
                fresh[row] = saved[src]
        weights[name] = fresh
    problem = weights_mismatch(own, weights)
    if problem:  # a weight that depends on the input size, or an edited file
        sizes = f"input size {state['input_size']} there, {model.input_size} here"
        raise CheckpointError(f"{where}: {problem} ({sizes}); --init needs the same network")
    load_weights(model, weights, where)
    return _line(state["path"], old, classes, source)


def _same_architecture(model: nn.Module, state: dict[str, Any], where: str) -> None:
    ours, theirs = _args(model.model_args), _args(state["model_args"])
    if state["model_name"] != model.name or ours != theirs:
        raise CheckpointError(
            f"{where}: that run's model is {state['model_name']!r} {theirs}, this recipe "
            f"builds {model.name!r} {ours}; --init needs the same architecture (only the "
            "classes and the input size may differ)"
        )


def _args(args: dict[str, Any]) -> dict[str, Any]:
    """Model arguments as compared: lists and tuples alike (a checkpoint's JSON or
    pickle may hold either), the free ones left out."""
    return {
        k: list(v) if isinstance(v, list | tuple) else v
        for k, v in sorted(args.items())
        if k not in FREE_ARGS
    }


def classifier_tensors(model: nn.Module) -> list[str]:
    """The state-dict names of the classifier's weight and bias: the last linear layer
    with one output per class (an MLP head's hidden layer comes before it)."""
    last = None
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == model.num_classes:
            last = (prefix, module)
    if last is None:
        raise CheckpointError(f"--init: model {model.name!r} has no linear classifier to match")
    prefix, module = last
    names = [f"{prefix}.weight"] + ([f"{prefix}.bias"] if module.bias is not None else [])
    return names


def _line(path: str, old: list[str], classes: list[str], source: list[int | None]) -> str:
    new = [c for c, s in zip(classes, source, strict=True) if s is None]
    dropped = [c for c in old if c not in classes]
    matched = len(classes) - len(new)
    return (
        f"init: weights of {Path(path)}: {matched} classes matched, {len(new)} new"
        f"{_names(new)}, {len(dropped)} dropped{_names(dropped)}"
    )


def _names(names: list[str], shown: int = 5) -> str:
    if not names:
        return ""
    more = f", … {len(names) - shown} more" if len(names) > shown else ""
    return f" ({', '.join(names[:shown])}{more})"


def as_override(init: str | Path) -> str:
    """``--init RUN`` as the recipe field it sets: the checkpoint file's absolute path (a
    run folder's best.pt, else its last.pt, as load_checkpoint chooses), so config.yaml
    and summary.json say which weights the run started from. JSON quoting is YAML too: a
    path with ':' or '#' stays one string."""
    path = Path(init).expanduser().resolve()
    if path.is_dir():
        path = next((path / n for n in ("best.pt", "last.pt") if (path / n).is_file()), path)
    return f"init={json.dumps(str(path))}"
