"""Frozen-prefix feature cache: compute a frozen prefix's activations once per stage.

When a stage trains only groups from some point on (``[layer4, head]``, ``head``) and
its augmentation is off or limited to a fixed set of views (the flip: two views), the
frozen prefix maps each image to the same activations every epoch. Computing them once
and training the rest on them gives the same result as running the full network each
epoch, at the cost of one forward pass per view instead of one per epoch.

The prefix runs in eval mode in both paths (a frozen prefix is a fixed feature
extractor: BatchNorm statistics, dropout and stochastic depth are off), so the cached and
uncached paths agree to float tolerance (tests/test_feature_cache.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.nn as nn

from imgclf.data.loader import BatchLoader, epoch_generator, epoch_order
from imgclf.train.recipe import Recipe, StageConfig
from imgclf.train.stages import split_at_first_trained

# Largest cache, by default: activations are fp32 and live in RAM (or GPU memory).
DEFAULT_LIMIT_GB = 4.0


def cache_limit_bytes() -> float:
    return float(os.environ.get("IMGCLF_FEATURE_CACHE_GB", DEFAULT_LIMIT_GB)) * 2**30


def views_for(recipe: Recipe, stage: StageConfig) -> int | None:
    """How many fixed views the augmentation has (1, or 2 with flips); None: not cacheable."""
    aug = stage.augment_for(recipe)
    if aug.crop_padding > 0:
        return None
    return 2 if aug.flip else 1


class FeatureCache:
    """A stage's train (and val) activations after the frozen prefix."""

    def __init__(
        self,
        prefix: nn.Module,
        suffix: nn.Module,
        train: BatchLoader,
        val: BatchLoader | None,
        views: int,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.suffix = suffix
        self.views = views
        self.train_loader = train
        self.batch_size = train.batch_size
        self.drop_last = train.drop_last
        self.seed = train.seed
        self.labels = train.labels
        self.sample_weights = train.sample_weights
        self.features = [
            _features(prefix, train, flip=v == 1, dtype=autocast_dtype) for v in range(views)
        ]
        self.val_features = _features(prefix, val, False, autocast_dtype) if val else None
        self.val_labels = val.labels if val else None
        self.epoch = 0

    @classmethod
    def build(
        cls,
        model: nn.Module,
        recipe: Recipe,
        stage: StageConfig,
        train: BatchLoader,
        val: BatchLoader | None,
        autocast_dtype: torch.dtype | None,
        say=print,
    ) -> FeatureCache | None:
        views = views_for(recipe, stage)
        split = split_at_first_trained(model, stage.groups())
        if views is None or split is None or stage.bn_update:
            return None
        prefix, suffix = split
        prefix.eval()
        with torch.inference_mode():
            probe = prefix(train.batch(torch.arange(1)))
        n = train.num_samples + (val.num_samples if val else 0)
        need = probe[0].numel() * 4 * n * views
        if need > cache_limit_bytes():
            say(
                f"feature cache skipped: it would take {need / 2**30:.1f} GB "
                "(raise IMGCLF_FEATURE_CACHE_GB to allow it)"
            )
            return None
        say(
            f"feature cache: {views} view(s) of {n} images after the frozen prefix "
            f"({need / 2**20:.0f} MB)"
        )
        return cls(prefix, suffix, train, val, views, autocast_dtype)

    # The trainer iterates this like a BatchLoader.
    def __len__(self) -> int:
        return len(self.train_loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = epoch_order(
            n, epoch=self.epoch, seed=self.seed, shuffle=True, weights=self.sample_weights
        )
        # Which view each sample shows this epoch: a coin per sample, as a random flip.
        gen = epoch_generator(self.seed + 2, self.epoch)
        view = torch.randint(0, self.views, (n,), generator=gen)
        for i, begin in enumerate(range(0, n, self.batch_size)):
            idx = order[begin : begin + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            if i < start:
                continue
            x = torch.empty(
                (len(idx), *self.features[0].shape[1:]),
                dtype=self.features[0].dtype,
                device=self.features[0].device,
            )
            for v in range(self.views):
                mask = view[idx] == v
                if mask.any():
                    x[mask.to(x.device)] = self.features[v][idx[mask].to(x.device)]
            yield x, self.labels[idx.to(self.labels.device)]

    def val_batches(self, batch_size: int = 1024) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        assert self.val_features is not None and self.val_labels is not None
        for begin in range(0, len(self.val_labels), batch_size):
            sl = slice(begin, begin + batch_size)
            yield self.val_features[sl], self.val_labels[sl]


@torch.inference_mode()
def _features(
    prefix: nn.Module, loader: BatchLoader, flip: bool, dtype: torch.dtype | None
) -> torch.Tensor:
    parts = []
    device = loader.device
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for begin in range(0, loader.num_samples, loader.batch_size):
            idx = torch.arange(begin, min(begin + loader.batch_size, loader.num_samples))
            x = loader.batch(idx)
            if flip:
                x = x.flip(-1)
            parts.append(prefix(x).float())
    return torch.cat(parts)
