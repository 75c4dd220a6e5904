"""A checkpoint's weights into a model, every tensor checked against the model first.

``nn.Module.load_state_dict`` reports a wrong shape as a ``RuntimeError`` listing every
mismatch over many lines; an edited or foreign checkpoint (a head for 5 classes in a
model built for 3) is instead one :class:`CheckpointError` line naming the file and the
first tensor that does not fit (issue #31, item 9). The checkpoint's other fields are
checked before the model is built (:mod:`imgclf.runtime.schema`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from imgclf.errors import CheckpointError


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], where: str) -> None:
    """``model.load_state_dict(weights)`` (strict), once every tensor of ``weights`` has
    the name and shape the model expects; else one :class:`CheckpointError` line naming
    ``where`` (the checkpoint) and the tensor."""
    problem = weights_mismatch(model.state_dict(), weights)
    if problem:
        raise CheckpointError(
            f"{where}: model_state: {problem}; the checkpoint was edited or damaged, or "
            "belongs to another model"
        )
    model.load_state_dict(weights)


def weights_mismatch(
    own: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]
) -> str | None:
    """What first keeps ``weights`` from loading into a model whose state is ``own``:
    a wrong shape, a missing tensor, an unexpected one (None: they fit)."""
    for name, tensor in own.items():
        if name in weights and tuple(weights[name].shape) != tuple(tensor.shape):
            got, want = list(weights[name].shape), list(tensor.shape)
            return f"tensor {name!r} has shape {got}, the model's is {want}"
    for label, names in (
        ("no tensor", [n for n in own if n not in weights]),
        ("unexpected tensor", [n for n in weights if n not in own]),
    ):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            return f"{label} {names[0]!r}{more}"
    return None
