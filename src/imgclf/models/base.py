"""The interface every model answers, scratch or pretrained.

Stages, checkpoints and prediction talk to a model only through these attributes, so they
never need to know which network it is: parameter groups by name (``stem``, ``block1`` …,
``head``) instead of indices like ``m[0][6:]``; the input size and normalization the data
layer must produce; and the constructor arguments a checkpoint needs to rebuild it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

# CIFAR-10 training-set per-channel mean and std in 0..1 scale; the same values airbench
# uses (github.com/KellerJordan/cifar10-airbench). The std is over all pixels of the set
# (not the often-quoted mean of per-image stds, 0.2023/0.1994/0.2010). The scratch nets
# were designed on CIFAR-10, and with BatchNorm exact statistics matter little for other
# natural-image datasets: roughly zero-mean, unit-variance input is what counts.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)


class Classifier(nn.Module):
    """Base class of every model in the registry.

    Subclasses call ``super().__init__(num_classes, input_size, **config)`` with every
    other constructor argument in ``config``: that dict plus ``num_classes`` and
    ``input_size`` is :attr:`model_args`, enough to rebuild the same architecture with
    ``create(name, **model.model_args)``.
    """

    # Name of the group holding the final classification layer (the one to replace or
    # train first in transfer learning).
    head_group = "head"
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD

    def __init__(self, num_classes: int, input_size: int, **config: Any) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.input_size = input_size
        # The registry overwrites this with the name the model was created under.
        self.name = type(self).__name__.lower()
        self._model_args = {"num_classes": num_classes, "input_size": input_size, **config}

    @property
    def model_args(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this architecture: ``create(name, **model_args)``."""
        return dict(self._model_args)

    def param_groups(self) -> dict[str, list[str]]:
        """Group name → parameter names (as in ``named_parameters()``), in network order.

        Every parameter appears in exactly one group, frozen ones included. By default the
        named steps of :meth:`sequence`, so a model lists its groups once.
        """
        return self.groups_from_modules({g: m for g, m in self.sequence() if g is not None})

    def frozen_parameter_names(self) -> set[str]:
        """Parameters that are fixed by design and must keep ``requires_grad=False``
        whatever a training stage unfreezes (e.g. a whitening stem)."""
        return set()

    # The forward pass as attribute names, one group each, for models that are a plain
    # chain of submodules; "pool" and "flatten" are parameter-free glue (self.pool, and
    # nn.Flatten(1)). Models that are no such chain override sequence() instead.
    steps: tuple[str, ...] = ()

    def forward(self, x: Any) -> Any:
        """Apply :attr:`steps` in turn (models that are no plain chain override this)."""
        if not self.steps:
            raise NotImplementedError(f"{type(self).__name__} does not define forward()")
        for name in self.steps:
            x = x.flatten(1) if name == "flatten" else getattr(self, name)(x)
        return x

    def sequence(self) -> list[tuple[str | None, nn.Module]]:
        """The forward pass as an ordered list of (group name or None, module) such that
        applying the modules in turn equals ``forward``. ``None`` marks parameter-free glue
        (pooling, flatten). Used to split a model at a group (:meth:`split_at`)."""
        if not self.steps:
            raise NotImplementedError(f"{type(self).__name__} does not define sequence()")
        glue = {"pool": lambda: self.pool, "flatten": lambda: nn.Flatten(1)}
        return [(None, glue[s]()) if s in glue else (s, getattr(self, s)) for s in self.steps]

    def split_at(self, group: str) -> tuple[nn.Module, nn.Module]:
        """(prefix, suffix) with ``suffix(prefix(x)) == self(x)``; ``group`` starts the suffix.

        The frozen-prefix feature cache (imgclf.train.feature_cache) runs the prefix once.
        """
        seq = self.sequence()
        names = [g for g, _ in seq]
        if group not in names:
            raise ValueError(f"{self.name}: no group {group!r} in {names}")
        cut = names.index(group)
        return nn.Sequential(*(m for _, m in seq[:cut])), nn.Sequential(*(m for _, m in seq[cut:]))

    def groups_from_modules(self, modules: Mapping[str, nn.Module]) -> dict[str, list[str]]:
        """Build :meth:`param_groups` from named submodules, checking full coverage.

        Raises RuntimeError when a parameter is in no group or in two: that is a bug in the
        model definition, better caught at the first call than as a silently frozen layer.
        """
        full_name = {id(p): n for n, p in self.named_parameters()}
        groups: dict[str, list[str]] = {}
        seen: set[str] = set()
        for group, module in modules.items():
            names = [full_name[id(p)] for p in module.parameters()]
            repeated = seen.intersection(names)
            if repeated:
                raise RuntimeError(f"{self.name}: parameters in two groups: {sorted(repeated)}")
            seen.update(names)
            groups[group] = names
        missing = [n for n in full_name.values() if n not in seen]
        if missing:
            raise RuntimeError(f"{self.name}: parameters in no group: {missing}")
        return groups


def check_input_size(model_name: str, input_size: int, multiple: int, minimum: int) -> None:
    """Raise ValueError unless ``input_size`` is a multiple of ``multiple`` and ≥ ``minimum``.

    ``multiple`` is the network's total pooling factor: sizes that are not a multiple of it
    lose border pixels to floor division and change the flatten size.
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise ValueError(f"{model_name}: input_size must be an integer, got {input_size!r}")
    if input_size < minimum or input_size % multiple:
        raise ValueError(
            f"{model_name}: input_size must be a multiple of {multiple} (its total pooling "
            f"factor) and at least {minimum}, got {input_size}; "
            f"e.g. {max(minimum, input_size // multiple * multiple)}"
        )
