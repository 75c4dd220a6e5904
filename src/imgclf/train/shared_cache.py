"""One frozen pass for two stages: a head stage's features derived from the next stage's
feature cache.

The default photo recipe (``lite0-photo``) trains the head on cached features of the whole
backbone, then fine-tunes the last blocks on cached activations of the first ones. Built
separately, the two caches are two passes over the photos: on a 2-core AVX2 EPYC the head
stage's (2 views of 3,409 photos through all of Lite0 at 224 px, with its ONNX export) took
79 s and the fine-tuning stage's (4 views through stem–blocks3 at 192 px) 64 s, of 343 s in
all (docs/results.md, issue #30). When the first stage trains a later part than the next
one, at the same size, on views the next stage's cache already holds (the photo and its
mirror are its views 0 and 1), the first stage's features are the next stage's cached
activations carried through the blocks between the two cuts: the shared part runs once,
and the head stage pays only for the middle blocks (at 12 and 6 px).

Two stages share only at one training size, so ``lite0-photo`` (head at 224 px, the last
blocks at 192) does not: with its head stage moved to 192 px to share, the run took 252 s
instead of 297 s on that EPYC, but the head, trained at 192 and tested at 224, ended at a
validation loss of 0.54 against 0.45 and the run at 90.6% against 92.1% (docs/results.md).
A recipe whose stages train at one size gets the shared pass without a word in it.

The derived features equal the separate pass's to the engines' float tolerance
(tests/test_shared_cache.py): both run the frozen network in eval mode; only the order of
the fp32 sums differs.

Not shared under data parallelism (each rank would repeat the middle pass), nor when a
stage's cache was decided against (a resumed stage keeps its decision).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from imgclf.data.loader import Augment, BatchLoader
from imgclf.runtime.device import Hardware
from imgclf.runtime.distributed import Dist
from imgclf.train import prefix_pass
from imgclf.train.feature_cache import FeatureCache, views_for
from imgclf.train.recipe import Recipe
from imgclf.train.stages import split_at_first_trained, stage_size

if TYPE_CHECKING:  # the budget imports this module
    from imgclf.train.budget import PlanInputs


def first_trained(model: nn.Module, groups: list[str] | None) -> str | None:
    """The first trained group of a stage that can cache (None: it cannot split)."""
    if split_at_first_trained(model, groups) is None:
        return None
    assert groups is not None
    return next(g for g in model.param_groups() if g in groups)


def between(model: nn.Module, start: str, end: str) -> nn.Module:
    """The model's modules from group ``start`` up to, not including, group ``end``."""
    names = [g for g, _ in model.sequence()]
    modules = [m for _, m in model.sequence()]
    return nn.Sequential(*modules[names.index(start) : names.index(end)])


def source_stage(model: nn.Module, recipe: Recipe, si: int, distributed: bool) -> int | None:
    """The next stage, when stage ``si``'s feature cache can be derived from its cache:
    both cache, at one training size, the next one's prefix is shorter, and its views
    start with ``si``'s (the image; its mirror when ``si`` flips); else None."""
    if distributed or not recipe.feature_cache or si + 1 >= len(recipe.stages):
        return None
    stage, later = recipe.stages[si], recipe.stages[si + 1]
    views, later_views = views_for(recipe, stage), views_for(recipe, later)
    if views is None or later_views is None or stage.bn_update or later.bn_update:
        return None
    if stage_size(stage, model) != stage_size(later, model):
        return None
    cut, later_cut = first_trained(model, stage.groups()), first_trained(model, later.groups())
    if cut is None or later_cut is None:
        return None
    order = list(model.param_groups())
    if order.index(later_cut) >= order.index(cut):
        return None
    aug, later_aug = stage.augment_for(recipe), later.augment_for(recipe)
    if aug.crop_padding > 0 or views > later_views:
        return None
    if views == 2 and (not later_aug.flip or later_aug.flip != aug.flip):
        return None
    return si + 1


class StageCaches:
    """Each stage's feature cache, where a later stage's cache is built early to derive
    an earlier one's and held until that stage starts."""

    def __init__(
        self,
        model: nn.Module,
        train: BatchLoader,
        val: BatchLoader | None,
        hw: Hardware,
        dist: Dist,
        say=print,
    ) -> None:
        self.model, self.train, self.val = model, train, val
        self.hw, self.dist, self.say = hw, dist, say
        self.held: dict[int, FeatureCache] = {}

    def get(
        self, recipe: Recipe, si: int, epochs: Callable[[int], float], cached: dict[str, bool]
    ) -> FeatureCache | None:
        """Stage ``si`` of ``recipe`` (the run's now: ``--epochs`` on a finished run adds a
        stage)'s cache: held, derived from the next stage's (built now, then held), or its
        own. ``epochs(s)``: stage ``s``'s planned epochs; ``cached``: each stage's decision
        (a resumed run's progress), updated."""
        if si in self.held:
            return self.held.pop(si)
        sj = source_stage(self.model, recipe, si, self.dist.enabled)
        later = None
        if sj is not None and cached.get(str(si)) is not False:
            later = self.build(recipe, sj, epochs(sj), cached)
        if later is None:
            return self.build(recipe, si, epochs(si), cached)
        self.held[sj] = later
        cached[str(si)] = True
        return self.derive(recipe, si, later)

    def build(
        self, recipe: Recipe, si: int, epochs: float, cached: dict[str, bool]
    ) -> FeatureCache | None:
        """Stage ``si``'s own cache (imgclf.train.feature_cache), with the loader set to
        that stage's augmentation and size while it is built."""
        stage, loader = recipe.stages[si], self.train
        kept = loader.augment, loader.size
        loader.augment = Augment(**stage.augment_for(recipe).model_dump())
        loader.size = stage_size(stage, self.model)
        try:
            cache = FeatureCache.build(
                self.model,
                recipe,
                stage,
                loader,
                self.val,
                self.hw.autocast_dtype,
                say=self.say,
                dist=self.dist,
                with_val=self.dist.is_main,  # rank 0 alone validates
                epochs=epochs,
                saved=cached.get(str(si)),
            )
        finally:
            loader.augment, loader.size = kept
        cached[str(si)] = cache is not None
        return cache

    def derive(self, recipe: Recipe, si: int, later: FeatureCache) -> FeatureCache:
        """Stage ``si``'s cache from ``later``'s activations, through the blocks between."""
        stage = recipe.stages[si]
        views = views_for(recipe, stage) or 1
        start = first_trained(self.model, recipe.stages[si + 1].groups())
        cut = first_trained(self.model, stage.groups())
        assert start is not None and cut is not None
        middle = between(self.model, start, cut).eval()
        _, suffix = split_at_first_trained(self.model, stage.groups()) or (None, None)
        assert suffix is not None
        n = len(later.features[0])
        train = _through(middle, later.features[:views], views * n, self.say)
        val = None
        if later.val_features is not None:
            val = _through(middle, [later.val_features], len(later.val_features), self.say)[0]
        n_val = 0 if val is None else len(val)
        self.say(
            f"feature cache: {views} view(s) of {n + n_val} images from the next stage's "
            f"cache, through {start} to {cut} (the shared blocks run once)"
        )
        return FeatureCache(suffix, later.train_loader, train, val, later.val_labels)


@torch.inference_mode()
def _through(middle: nn.Module, parts: list[torch.Tensor], passes: int, say) -> list[torch.Tensor]:
    """``middle`` over each of ``parts`` (cached rows of one shape), on the engine that is
    faster for ``passes`` rows in all (chosen once), kept in the rows' dtype."""
    sample = parts[0][: prefix_pass.ORT_BATCH * 8].float()
    engine = prefix_pass.choose(middle, sample, passes, None, say)
    return [
        torch.cat(
            [
                engine.run(rows[b : b + engine.batch_size].float()).to(rows.dtype)
                for b in range(0, len(rows), engine.batch_size)
            ]
        )
        for rows in parts
    ]


def priced(job: PlanInputs, costs: list[Any]) -> list[Any]:
    """A time budget's stage costs (``imgclf.train.budget.StageCost``) with each derived
    cache's setup priced as what it runs: the middle blocks over the next stage's
    activations, on the engine the cache will choose (the next stage's own pass is priced
    in its own cost)."""
    out = list(costs)
    for si in range(len(costs)):
        sj = source_stage(job.model, job.recipe, si, job.distributed)
        if sj is not None:
            out[si] = replace(costs[si], setup=_middle_seconds(job, si, sj))
    return out


@torch.inference_mode()
def _middle_seconds(job: PlanInputs, si: int, sj: int) -> float:
    stage, later, loader = job.recipe.stages[si], job.recipe.stages[sj], job.train_loader
    start, cut = first_trained(job.model, later.groups()), first_trained(job.model, stage.groups())
    assert start is not None and cut is not None
    size, loader.size = loader.size, stage_size(stage, job.model)
    try:
        batch = loader.batch(torch.arange(min(loader.batch_size, loader.num_samples)))
    finally:
        loader.size = size
    prefix = split_at_first_trained(job.model, later.groups())
    assert prefix is not None
    sample = prefix[0].eval()(batch).float()
    n_val = job.val_loader.num_samples if job.val_loader is not None else 0
    passes = (views_for(job.recipe, stage) or 1) * loader.num_samples + n_val
    middle = between(job.model, start, cut).eval()
    engine = prefix_pass.choose(middle, sample, passes, None, prefix_pass.silent)
    return engine.seconds_per_image * passes
