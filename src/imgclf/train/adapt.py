"""Settings a recipe leaves to the data: BatchNorm mode, batch size on small data sets,
class weights. Pure functions of the recipe and the training labels, so a resumed run
derives the same values again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imgclf.train.recipe import Recipe

# `batchnorm: auto` keeps a pretrained backbone's BatchNorm statistics when its layers are
# unfrozen, whatever the data set's size (the Keras EfficientNet fine-tuning advice). On
# small photo sets batch statistics of shuffled batches are a noisy, shifted estimate of
# what the pretrained layers were calibrated on (issue #9: 98.9% → 73.5% on the same
# weights). On large sets too: `lite0-cpu --time 15m` on CIFAR-10 (45,000 images at 96 px,
# 2-core AMD EPYC family 26, bf16) fine-tuned 1.1 epochs after its head to 73.34% with batch
# statistics, below the head's 76.38%, and 1.6 epochs to 86.64% with them kept (the same
# budget: eval-mode BatchNorm trains at 104-113 images/s against 76-86). Likely why: the
# head was trained on features normalized by the pretrained statistics, and batch
# statistics change them at once (not isolated by a measurement). A long run on a far
# domain may still gain from re-estimating (unmeasured): `batchnorm: train`.
# The smallest batch the small-data rule goes down to: below it batches are mostly noise
# and per-step overhead.
MIN_BATCH = 16


@dataclass(frozen=True)
class Adapted:
    """What the trainer uses instead of the recipe's literal values, and why."""

    freeze_bn: bool
    batch_size: int
    lr_scale: float
    notes: tuple[str, ...]


def adapt(recipe: Recipe, pretrained_model: bool, n_train: int) -> Adapted:
    notes = []
    if recipe.batchnorm == "auto":
        freeze_bn = pretrained_model
        if freeze_bn:
            notes.append(
                "batchnorm: frozen (pretrained backbone: its running statistics are kept; "
                "--set batchnorm=train to re-estimate them)"
            )
    else:
        freeze_bn = recipe.batchnorm == "frozen"
    batch, lr_scale = small_data_batch(recipe.batch_size, n_train, recipe.min_steps_per_epoch)
    if lr_scale != 1.0:
        notes.append(
            f"small data set: batch {batch} instead of {recipe.batch_size} "
            f"({n_train:,} images → {n_train // batch} steps an epoch), "
            f"learning rates ×{lr_scale:.3g}"
        )
    return Adapted(freeze_bn, batch, lr_scale, tuple(notes))


def small_data_batch(batch_size: int, n_train: int, min_steps: int) -> tuple[int, float]:
    """(batch, learning-rate factor): the batch shrinks until an epoch has ``min_steps``
    steps, never below MIN_BATCH, and the rate follows it linearly (the linear scaling rule
    of Goyal et al. 2017, arXiv 1706.02677), so each image moves the weights as much as
    with the recipe's batch. 250 photos at the recipe's 128 were two steps an epoch."""
    batch = min(batch_size, n_train)
    if min_steps <= 0 or n_train // batch >= min_steps:
        return batch, 1.0
    batch = max(min(MIN_BATCH, batch), n_train // min_steps)
    return batch, batch / batch_size


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so that a balanced data set gets weights 1: class c
    weighs n / (classes present · n_c) (scikit-learn's ``class_weight="balanced"``).
    Classes without training images get 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def sample_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Per-sample draw weights that give every class the same expected share of an epoch."""
    return class_weights(labels, num_classes)[torch.from_numpy(np.asarray(labels))]
