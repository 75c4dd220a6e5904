"""What a run is built from before its first step: the model, the loaders, the batch
shared among data-parallel ranks, the loss's class weights, a whitening stem's fit, and
``config.yaml``, which records all of it."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import yaml

from imgclf import __version__
from imgclf.data.cache import Dataset
from imgclf.data.loader import Augment, BatchLoader
from imgclf.errors import CheckpointError, DataError, RecipeError
from imgclf.models import create, model_spec
from imgclf.runtime.device import Hardware
from imgclf.runtime.distributed import Dist
from imgclf.train.adapt import Adapted, class_weights, sample_weights
from imgclf.train.final import training_indices
from imgclf.train.recipe import Recipe, recipe_yaml
from imgclf.train.stages import resolve_groups

# Images used to fit a whitening stem (airbench94 uses 5,000).
WHITENING_IMAGES = 5000


def build_model(recipe: Recipe, num_classes: int, hw: Hardware, *, fresh: bool) -> nn.Module:
    """The recipe's model on ``hw``'s device and memory format. A resumed run (not
    ``fresh``) gets its weights from the checkpoint: pretrained ones are never fetched or
    read again; nor are they for a run that starts from another run's (``init``)."""
    r = recipe
    size = r.input_size or model_spec(r.model).input_size
    kwargs = {**r.model_args, "input_size": size}
    if model_spec(r.model).kind == "pretrained":
        kwargs.update(
            pretrained=r.pretrained and fresh and r.init is None,
            weights=r.weights if fresh else None,
            head=r.head.model_dump(exclude_none=True) if r.head else None,
        )
    elif r.weights is not None or r.head is not None:  # else silently left unused
        key, noun = (
            (f"weights: {r.weights}", "weights file")
            if r.weights is not None
            else ("head", "new head")
        )
        raise RecipeError(
            f"{key}: model {r.model!r} is trained from scratch and takes no {noun}; a "
            "pretrained one does (imgclf models)"
        )
    try:
        model = create(r.model, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:  # bad model_args or input_size in the recipe
        raise RecipeError(f"model {r.model!r}: {exc}") from exc
    memory = torch.channels_last if hw.channels_last else torch.preserve_format
    return model.to(hw.device, memory_format=memory)


def check_groups(model: nn.Module, recipe: Recipe) -> None:
    """Every group name the recipe uses exists in ``model``: a bad one fails now, before
    any file is written."""
    for stage in recipe.stages:
        resolve_groups(model, stage.groups())
        if stage.freeze_after:
            resolve_groups(model, list(stage.freeze_after), "freeze_after")
    if recipe.optimizer.bias_lr_groups:
        resolve_groups(model, recipe.optimizer.bias_lr_groups, "bias_lr_groups")


def make_loaders(
    recipe: Recipe,
    ds: Dataset,
    model: nn.Module,
    hw: Hardware,
    dist: Dist,
    batch: int,
    final: bool = False,
) -> tuple[BatchLoader, BatchLoader | None]:
    """The training loader (this rank's share of each global ``batch``, augmented) and
    the validation one (None without a validation split, or in a ``final`` fit, which
    trains on it: imgclf.train.final), at the model's input."""
    common = dict(size=model.input_size, mean=model.mean, std=model.std)
    common.update(channels_last=hw.channels_last, device=hw.device)
    train_idx = training_indices(ds, final)
    if len(train_idx) == 0:
        raise CheckpointError(f"dataset {ds.name!r} has no training images")
    if len(train_idx) < dist.world_size:
        raise DataError(
            f"dataset {ds.name!r} has {len(train_idx)} training images, fewer than the "
            f"{dist.world_size} processes: run fewer processes"
        )
    labels = ds.labels[train_idx]
    train = BatchLoader(
        ds.images[train_idx],
        labels,
        batch_size=batch // dist.world_size,
        shuffle=True,
        augment=Augment(**recipe.augment.model_dump()),
        seed=recipe.seed,
        drop_last=len(train_idx) > batch,
        rank=dist.rank,
        world_size=dist.world_size,
        sample_weights=(
            sample_weights(labels, len(ds.classes)) if recipe.class_balance == "sampler" else None
        ),
        **common,
    )
    val = None
    if ds.has_split("val") and not final:
        val_idx = ds.indices("val")
        val = BatchLoader(
            ds.images[val_idx], ds.labels[val_idx], batch_size=recipe.eval_batch_size, **common
        )
    return train, val


def loss_weights(
    recipe: Recipe, train: BatchLoader, num_classes: int, hw: Hardware
) -> torch.Tensor | None:
    """Per-class weights of the loss when the recipe balances classes in the loss."""
    if recipe.class_balance != "loss":
        return None
    return class_weights(train.labels.cpu().numpy(), num_classes).to(hw.device)


def init_from_data(model: nn.Module, train: BatchLoader, seed: int) -> None:
    """Fit a whitening stem (a model with ``init_whitening``) on up to WHITENING_IMAGES
    training images drawn with ``seed``; other models need nothing."""
    init = getattr(model, "init_whitening", None)
    if init is None:
        return
    n = min(WHITENING_IMAGES, train.num_samples)
    idx = torch.randperm(train.num_samples, generator=torch.Generator().manual_seed(seed))[:n]
    init(train.batch(idx).float())


def share_batch(adapted: Adapted, dist: Dist) -> Adapted:
    """The global batch split among the ranks. The recipe's own batch was checked to
    divide (distributed.per_rank_batch); one shrunk for a small data set (adapt) is rounded
    down to a multiple of the processes, the learning rate following linearly as adapt's
    rule does."""
    batch = adapted.batch_size
    if batch % dist.world_size == 0:
        return adapted
    shared = max(dist.world_size, batch - batch % dist.world_size)
    return dataclasses.replace(
        adapted,
        batch_size=shared,
        lr_scale=adapted.lr_scale * shared / batch,
        notes=(
            *adapted.notes,
            f"batch {shared} instead of {batch}: a multiple of the {dist.world_size} processes",
        ),
    )


def config_yaml(
    recipe: Recipe,
    ds: Dataset,
    adapted: Adapted,
    hw: Hardware,
    threads: int,
    dist: Dist,
    train: BatchLoader,
    final: bool = False,
) -> str:
    """``config.yaml``: the recipe, then the data set, what adapt() changed, the hardware
    and (data-parallel) the processes; ``final: true`` for a final fit."""
    extra: dict[str, Any] = {
        "dataset": {"name": ds.name, "path": str(ds.root), "classes": ds.classes},
        "adapted": {
            "batchnorm": "frozen" if adapted.freeze_bn else "train",
            "batch_size": adapted.batch_size,
            "lr_scale": adapted.lr_scale,
        },
        "hardware": {
            "device": str(hw.device),
            "precision": hw.precision,
            "channels_last": hw.channels_last,
            "threads": threads,
            "torch": str(torch.__version__),
        },
    }
    if dist.enabled:
        extra["distributed"] = {
            "world_size": dist.world_size,
            "backend": dist.backend,
            "batch_per_process": train.batch_size,
        }
    if final:  # read back as a recipe, config.yaml drops it (recipe.RUN_INFO_KEYS)
        extra["final"] = True
    extra["imgclf_version"] = __version__
    return recipe_yaml(recipe) + yaml.safe_dump(extra, sort_keys=False)
