"""Frozen-prefix feature cache: compute a frozen prefix's activations once per stage.

When a stage trains only groups from some point on (``[layer4, head]``, ``head``) and
its augmentation is off or limited to a fixed set of views (the flip: two views), the
frozen prefix maps each image to the same activations every epoch. Computing them once
and training the rest on them gives the same result as running the full network each
epoch, at the cost of one forward pass per view instead of one per epoch.

The prefix runs in eval mode in both paths (a frozen prefix is a fixed feature
extractor: BatchNorm statistics, dropout and stochastic depth are off), so the cached and
uncached paths agree to float tolerance (tests/test_feature_cache.py).

In data-parallel training (imgclf.runtime.distributed) each rank runs the prefix over its
shard of the images (samples ``rank::world_size``) and the shards are all-gathered, so the
expensive pass is split N ways; every rank then holds all features, because each epoch
reshuffles which rank trains on which sample, exactly as the uncached loader does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from imgclf.data.loader import (
    Augment,
    BatchLoader,
    alternate_flips,
    epoch_generator,
    epoch_order,
    num_batches,
    shifted,
)
from imgclf.errors import RecipeError
from imgclf.runtime.distributed import SINGLE, Dist
from imgclf.train import prefix_pass
from imgclf.train.cache_store import Placement, place
from imgclf.train.prefix_pass import PrefixPass
from imgclf.train.recipe import Recipe, StageConfig
from imgclf.train.stages import split_at_first_trained

# feature_cache_dtype auto: fp16 from this fp32 size on (a few thousand photos cached
# after Lite0's blocks3, 4 views: 1.6 GB in fp32).
FP16_ABOVE_GB = 1.0
# Largest magnitude stored in fp16 (its maximum is 65,504); beyond it the cache stays fp32.
FP16_SAFE = 60000.0


def storage_dtype(setting: str, fp32_bytes: float) -> torch.dtype:
    """The dtype cached activations are kept in (the recipe's ``feature_cache_dtype``)."""
    if setting == "fp16" or (setting == "auto" and fp32_bytes > FP16_ABOVE_GB * 2**30):
        return torch.float16
    return torch.float32


def views_for(recipe: Recipe, stage: StageConfig) -> int | None:
    """How many fixed views of each image the cache holds: 1, 2 with flips, or the
    augmentation's ``cache_views`` with random crops; None: not cacheable."""
    aug = stage.augment_for(recipe)
    if aug.cutout > 0:
        return None
    if aug.crop_padding > 0:
        return aug.cache_views or None
    return 2 if aug.flip else 1


@dataclass(frozen=True)
class View:
    """One fixed view of every image: mirrored or not, and moved by up to the stage's
    crop padding (view 0: the image; 1: its mirror, with flips; then crops, drawn once)."""

    index: int
    flip: bool
    padding: int
    seed: int

    @staticmethod
    def all(count: int, aug: Augment, seed: int) -> list[View]:
        first_crop = 2 if aug.flip else 1
        return [
            View(v, v == 1 and bool(aug.flip), aug.crop_padding if v >= first_crop else 0, seed)
            for v in range(count)
        ]

    def draws(self, n: int) -> tuple[torch.Tensor, ...] | None:
        """Each of ``n`` samples' shift (dy, dx) and mirror in this view, drawn once for
        the whole pass and per sample over all ``n``, so a sample's view does not depend
        on the batch or the rank that computes it; None for a view without crops."""
        if self.padding == 0:
            return None
        gen = epoch_generator(self.seed + 3, self.index)
        p = self.padding
        dy, dx = (torch.randint(-p, p + 1, (n, 1), generator=gen) for _ in range(2))
        return dy, dx, torch.rand(n, 1, generator=gen) < 0.5

    @staticmethod
    def indices(draws: tuple[torch.Tensor, ...] | None, idx: torch.Tensor, h: int, w: int):
        """Source rows and columns of samples ``idx`` under ``draws`` (:meth:`draws`), or
        None for the plain image."""
        if draws is None:
            return None
        dy, dx, mirror = draws
        rows, cols = shifted(h, w, dy[idx], dx[idx])
        return rows, torch.where(mirror[idx], cols.flip(1), cols)


class FeatureCache:
    """A stage's train (and val) activations after the frozen prefix."""

    def __init__(
        self,
        suffix: nn.Module,
        train: BatchLoader,
        features: list[torch.Tensor],
        val_features: torch.Tensor | None,
        val_labels: torch.Tensor | None,
    ) -> None:
        """``features[v]``: every training image's activations in view ``v`` (all rows, on
        every rank); ``val_features``: the validation images' at the test size, or None."""
        self.suffix = suffix
        self.views = len(features)
        self.alternate = train.augment.flip == "alternate"
        self.train_loader = train
        self.batch_size = train.batch_size
        self.drop_last = train.drop_last
        self.seed = train.seed
        self.labels = train.labels
        self.sample_weights = train.sample_weights
        self.rank, self.world_size = train.rank, train.world_size
        self.features = features
        self.val_features = val_features
        self.val_labels = val_labels
        # The prefix whose eager fp32 activations val_features are, batch for batch as the
        # validation loader yields them (set by build; None: another engine, batch or
        # dtype): what lets the final evaluation start from them (imgclf.train.cached_eval).
        self.val_prefix: nn.Module | None = None
        self.epoch = 0

    @classmethod
    def compute(
        cls,
        suffix: nn.Module,
        train: BatchLoader,
        val: BatchLoader | None,
        views: list[View],
        engine: PrefixPass,
        dist: Dist = SINGLE,
        val_engine: PrefixPass | None = None,
        storage: Placement | None = None,
    ) -> FeatureCache:
        """The cache of ``views`` of the training images (and the validation images once)
        through ``engine``'s prefix."""
        features = [
            dist.all_gather_rows(
                _features(engine, train, view, dist.rank, dist.world_size, storage),
                train.num_samples,
            )
            for view in views
        ]
        plain = View(0, False, 0, train.seed)
        val_engine = val_engine or engine
        val_features = _features(val_engine, val, plain, storage=storage) if val else None
        return cls(suffix, train, features, val_features, val.labels if val else None)

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
        dist: Dist = SINGLE,
        with_val: bool = True,
        epochs: float | None = None,
        saved: bool | None = None,
    ) -> FeatureCache | None:
        """The stage's cache, or None when it cannot or should not have one: too large,
        or (for a stage of ``epochs``) slower than running the prefix in every step
        (:func:`pays`; ``saved``: a resumed stage's decision, kept). Under data
        parallelism every rank takes rank 0's decision and ``with_val=False`` skips the
        validation features of ranks that do not validate."""
        views = views_for(recipe, stage)
        split = split_at_first_trained(model, stage.groups())
        if views is None or split is None or stage.bn_update or saved is False:
            return None
        prefix, suffix = split
        prefix.eval()
        n = train.num_samples + (val.num_samples if val else 0)
        storage = _storage(recipe, prefix, train, n, views, say, dist.enabled)
        if storage is None:
            return None
        sample = train.batch(torch.arange(min(train.batch_size, train.num_samples)))
        # This rank's share of the pass: every view of the training images, the validation
        # images once.
        n_val = val.num_samples if val is not None and with_val else 0
        passes = train.num_samples * views // dist.world_size + n_val
        engine = prefix_pass.choose(prefix, sample, passes, autocast_dtype, say)
        if saved is None and epochs is not None:
            n_all = train.num_samples + (val.num_samples if val is not None else 0)
            saved = dist.broadcast(pays(engine, passes, epochs * n_all // dist.world_size))
        if saved is False:
            say(
                f"feature cache: not built ({views} view(s) cost more than the stage's "
                f"{epochs:g} epoch(s) running the frozen part in every step)"
            )
            return None
        say(
            f"feature cache: {views} view(s) of {n} images after the frozen prefix "
            f"({storage.nbytes / 2**20:.0f} MB in {str(storage.dtype).removeprefix('torch.')}, "
            f"{storage.where}; {engine.engine})"
        )
        aug = Augment(**stage.augment_for(recipe).model_dump())
        fixed = View.all(views, aug, train.seed)
        val_engine = _val_engine(prefix, train, val, autocast_dtype) or engine
        val = val if with_val else None
        cache = cls.compute(suffix, train, val, fixed, engine, dist, val_engine, storage)
        if val is not None and _eager_fp32(val_engine, val, autocast_dtype, storage):
            cache.val_prefix = prefix
        return cache

    # The trainer iterates this like a BatchLoader.
    def __len__(self) -> int:
        return len(self.train_loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = epoch_order(
            n,
            epoch=self.epoch,
            seed=self.seed,
            shuffle=True,
            rank=self.rank,
            world_size=self.world_size,
            weights=self.sample_weights,
        )
        # Which view each sample shows this epoch: a coin per sample, as a random flip.
        # Drawn for all n samples on every rank, so a sample's view does not depend on
        # which rank trains on it.
        if self.alternate and self.views == 2:  # flip: alternate, as the image loader
            view = alternate_flips(n, self.seed, self.epoch).long()
        else:
            gen = epoch_generator(self.seed + 2, self.epoch)
            view = torch.randint(0, self.views, (n,), generator=gen)
        steps = num_batches(n, self.batch_size, self.rank, self.world_size, self.drop_last)
        for i in range(steps):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
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
            yield x.float(), self.labels[idx.to(self.labels.device)]

    def val_batches(self, batch_size: int = 1024) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        assert self.val_features is not None and self.val_labels is not None
        for begin in range(0, len(self.val_labels), batch_size):
            sl = slice(begin, begin + batch_size)
            yield self.val_features[sl].float(), self.val_labels[sl]


def _storage(
    recipe: Recipe,
    prefix: nn.Module,
    train: BatchLoader,
    n: int,
    views: int,
    say,
    distributed: bool = False,
) -> Placement | None:
    """Where a cache of ``views`` of the training images and the validation ones once
    (``n`` images in all) goes: in memory, memory-mapped on disk when over the memory
    limit, or None, said, when over both."""
    with torch.inference_mode():
        probe = prefix(train.batch(torch.arange(1)))
    fp32 = probe[0].numel() * 4 * (train.num_samples * views + n - train.num_samples)
    dtype = storage_dtype(recipe.feature_cache_dtype, fp32)
    unmappable = None
    if distributed:  # every rank gathers all rows in memory (Dist.all_gather_rows)
        unmappable = "data-parallel caches are not memory-mapped"
    elif probe.is_cuda:
        unmappable = "a cache on the GPU is not memory-mapped"
    placed = place(dtype, fp32 * dtype.itemsize / 4, unmappable)
    if isinstance(placed, str):
        say(f"feature cache skipped: {placed}; the stage runs the whole network instead")
        return None
    return placed


def _val_engine(
    prefix: nn.Module, train: BatchLoader, val: BatchLoader | None, dtype: torch.dtype | None
) -> PrefixPass | None:
    """A stage trained smaller than the test size (FixRes) validates at the test size:
    eager PyTorch at the validation loader's batch, as the engine chosen for the
    training images may be fixed to their size; None: the training images' engine."""
    if val is None or val.size == train.size:
        return None
    return PrefixPass(prefix_pass.eager(prefix, dtype, val.device), val.batch_size, "PyTorch")


def _eager_fp32(
    engine: PrefixPass, val: BatchLoader, autocast_dtype: torch.dtype | None, storage: Placement
) -> bool:
    """Whether the validation activations are the prefix's own in the validation loader's
    forward: eager PyTorch, fp32, at that loader's batch size, over all of its images in
    order (one process, unshuffled, unaugmented), kept in fp32, on the CPU."""
    return (
        engine.engine == "PyTorch"
        and engine.batch_size == val.batch_size
        and autocast_dtype is None
        and storage.dtype == torch.float32
        and val.device.type == "cpu"
        and (val.rank, val.world_size) == (0, 1)
        and not val.shuffle
        and not val.augment.enabled
    )


def pays(engine: PrefixPass, passes: int, uncached: float) -> bool:
    """Whether the cache's ``passes`` on ``engine`` cost less than the ``uncached``
    forward passes of the prefix that training without it runs (eager PyTorch: each epoch
    over the training and validation images). A 1-epoch stage with 4 views on a small set
    is faster without; the default photo stage's 3 epochs with 4 views on ONNX Runtime
    (5x eager's speed) are faster with."""
    return engine.seconds_per_image * passes < engine.eager_seconds_per_image * uncached


@torch.inference_mode()
def _features(
    engine: PrefixPass,
    loader: BatchLoader,
    view: View,
    rank: int = 0,
    world_size: int = 1,
    storage: Placement | None = None,
) -> torch.Tensor:
    """Prefix activations of samples ``rank::world_size`` (all of them in one process),
    seen through ``view``, stored as ``storage`` says (fp16: values beyond its range fail;
    memory-mapped: written into the mapped file batch by batch)."""
    storage = storage or Placement(torch.float32, 0.0)
    n, h, w = loader.images.shape[:3]
    parts: list[torch.Tensor] = []
    mapped: torch.Tensor | None = None
    mine = torch.arange(rank, loader.num_samples, world_size)
    draws = view.draws(n)  # once: per batch it was O(n) draws, O(n²/batch) in all
    for begin in range(0, len(mine), engine.batch_size):
        idx = mine[begin : begin + engine.batch_size]
        x = loader.batch(idx, view=View.indices(draws, idx, h, w))
        if view.flip:
            x = x.flip(-1)
        out = engine.run(x)
        if storage.dtype == torch.float16 and not bool(out.abs().max() <= FP16_SAFE):
            raise RecipeError(
                "feature cache: activations beyond fp16's range; "
                "set feature_cache_dtype: fp32 in the recipe"
            )
        if storage.directory is None:
            parts.append(out.to(storage.dtype))
            continue
        if mapped is None:
            mapped = storage.empty((len(mine), *out.shape[1:]))
        mapped[begin : begin + len(idx)] = out.to(mapped.device, storage.dtype)
    return mapped if mapped is not None else torch.cat(parts)
