"""Freeze and unfreeze parameter groups by name, as a recipe stage says.

Frozen BatchNorm layers are put in eval mode (their running statistics stay as they were,
the usual fine-tuning practice: torchvision's reference scripts and fastai's ``freeze``
keep pretrained statistics), unless the stage sets ``bn_update: true``.

With ``freeze_bn`` (the recipe's ``batchnorm: frozen``, and ``auto`` for pretrained
backbones) *every* BatchNorm layer stays in eval mode, trained ones
included: their scale and shift still learn, but they normalize with the pretrained
running statistics instead of each batch's. Keras's EfficientNet fine-tuning guide gives
this advice, and issue #9 measured why: a Lite0 head-stage checkpoint scored 98.9% with
BatchNorm in eval mode and 73.5% with the same weights normalizing by batch statistics,
so unfreezing with batch statistics threw away what the head stage had learned.
"""

from __future__ import annotations

import torch.nn as nn

from imgclf.errors import RecipeError

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def resolve_groups(
    model: nn.Module, groups: list[str] | None, field: str | None = None
) -> list[str]:
    """Validated group names (``None`` = all), in the model's order. ``field`` names the
    recipe key that listed them (freeze_after, bias_lr_groups); None: a stage's ``train``,
    the one key that also takes 'all'."""
    available = list(model.param_groups())
    if groups is None:
        return available
    unknown = [g for g in groups if g not in available]
    if unknown:
        said = "stage trains" if field is None else f"{field} names"
        also = " (or 'all')" if field is None else ""
        raise RecipeError(
            f"{said} unknown group(s) {unknown} of model {model.name!r}; "
            f"its groups are: {', '.join(available)}{also}"
        )
    return [g for g in available if g in groups]


def set_trainable(
    model: nn.Module,
    groups: list[str] | None,
    *,
    bn_update: bool = False,
    freeze_bn: bool = False,
) -> int:
    """Make exactly ``groups`` trainable; returns the number of trainable parameters."""
    chosen = resolve_groups(model, groups)
    param_groups = model.param_groups()
    train_names = {n for g in chosen for n in param_groups[g]} - model.frozen_parameter_names()
    for name, p in model.named_parameters():
        p.requires_grad_(name in train_names)
    train_mode(model, groups, bn_update, freeze_bn)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_bn_stats(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are all frozen in eval mode."""
    for module in model.modules():
        if isinstance(module, _BN):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def train_mode(
    model: nn.Module, groups: list[str] | None, bn_update: bool, freeze_bn: bool = False
) -> None:
    """Back to training mode for a stage (eval() elsewhere resets everything).

    A frozen prefix (every group before the first trained one) is a fixed feature
    extractor: fully in eval mode (BatchNorm statistics, dropout, stochastic depth), which
    is also what lets the feature cache reproduce this path exactly.
    """
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, _BN):
                module.eval()
    if bn_update:
        return
    freeze_bn_stats(model)
    prefix = frozen_prefix(model, groups)
    if prefix is not None:
        prefix.eval()


def split_at_first_trained(
    model: nn.Module, groups: list[str] | None
) -> tuple[nn.Module, nn.Module] | None:
    """(frozen prefix, rest) around the first trained group, for models that can split
    there; None when everything trains or the model cannot split."""
    if groups is None or not hasattr(model, "split_at"):
        return None
    order = list(model.param_groups())
    first = next((g for g in order if g in groups), None)
    if first is None or first == order[0]:
        return None
    try:
        return model.split_at(first)
    except (NotImplementedError, ValueError):
        return None


def frozen_prefix(model: nn.Module, groups: list[str] | None) -> nn.Module | None:
    split = split_at_first_trained(model, groups)
    return split[0] if split else None


def stage_size(stage, model: nn.Module) -> tuple[int, int]:
    """The training images' size in ``stage`` (a recipe StageConfig): its own
    ``input_size`` (FixRes: train smaller than the test size), or the model's."""
    size = stage.input_size or model.input_size
    return (size, size) if isinstance(size, int) else tuple(size)


def group_of(model: nn.Module) -> dict[str, str]:
    """Parameter name → its group name."""
    return {n: g for g, names in model.param_groups().items() for n in names}
