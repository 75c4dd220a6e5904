"""The final evaluation on the last stage's cached validation activations, where they are
provably what the network computes first.

The end of a run evaluates ``best.pt`` on the validation split (imgclf.train.finish): the
whole network over every image, in eager PyTorch. A stage that caches its frozen prefix
(imgclf.train.feature_cache) also caches that prefix's activations of the validation
images; where it computed them in eager PyTorch, in fp32, batch for batch as the
validation loader yields them (a FixRes stage does: it trains smaller and validates at
the test size), and kept them in fp32, the network's own forward over those batches
computes exactly those tensors first: the same modules, in eval mode, on the same inputs
in the same batches. So where ``best.pt`` holds that prefix's weights unchanged (the
prefix stayed frozen since), the final evaluation runs only the rest of the network on
the cached activations and gets the same logits, bit for bit (tests/test_cached_eval.py).
On a 250-photo set the prefix of ``lite0-photo``'s last stage (stem to blocks3 at 224 px)
is most of the evaluation's 2-3 s (docs/results.md, issue #30).

Not with test-time augmentation (other inputs), autocast (the run's precision could
differ from the cache's), nor off the CPU (kernels chosen per call on a GPU).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from imgclf.runtime.device import Hardware
from imgclf.train.feature_cache import FeatureCache
from imgclf.train.recipe import Recipe


@dataclass(frozen=True)
class CachedVal:
    """A stage's validation activations that are exactly its ``prefix``'s (see
    :attr:`FeatureCache.val_prefix`), and the network after it (``suffix``)."""

    prefix: nn.Module
    suffix: nn.Module
    features: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, cache: FeatureCache | None) -> CachedVal | None:
        """The validation part of ``cache`` (not its training rows), where it is exact."""
        if cache is None or cache.val_prefix is None or cache.val_features is None:
            return None
        assert cache.val_labels is not None
        return cls(cache.val_prefix, cache.suffix, cache.val_features, cache.val_labels)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The activations in the validation loader's batches (its order, its size)."""
        for begin in range(0, len(self.labels), batch_size):
            rows = slice(begin, begin + batch_size)
            yield self.features[rows], self.labels[rows]


def final_network(
    cached: CachedVal | None,
    model: nn.Module,
    best: Mapping[str, torch.Tensor] | None,
    recipe: Recipe,
    hw: Hardware,
) -> CachedVal | None:
    """``cached`` when the final evaluation of ``model`` with the weights ``best`` (the
    state about to be loaded; None: the model's own) may start from its activations:
    no TTA, fp32 on the CPU, and every tensor of the prefix (its BatchNorm statistics
    too) equal in ``best`` to the one the activations came from; else None. Called
    before ``best`` is loaded, while the model still holds the cached prefix's weights."""
    if cached is None or recipe.tta or hw.autocast_dtype is not None:
        return None
    if hw.device.type != "cpu" or cached.features.dtype != torch.float32:
        return None
    if best is None:
        return cached
    mine = {id(t) for t in cached.prefix.state_dict(keep_vars=True).values()}
    own = [(n, t) for n, t in model.state_dict(keep_vars=True).items() if id(t) in mine]
    if len(own) != len(mine):  # a prefix tensor the model does not name: not provable
        return None
    for name, tensor in own:
        saved = best.get(name)
        if saved is None or saved.dtype != tensor.dtype or not torch.equal(saved, tensor.data):
            return None
    return cached
