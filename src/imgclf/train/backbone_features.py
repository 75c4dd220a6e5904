"""A pretrained backbone's features of a data set's images: one pass, kept with the data set.

The features are the frozen prefix's (everything before the ``head`` group: for Lite0
its pooled 1,280 channels) through the feature-cache machinery a head stage of training
uses (imgclf.train.feature_cache): the pass runs on ONNX Runtime where that is faster
(the graph kept under $IMGCLF_HOME/onnx and shared with the photo recipe's head stage),
images resized to the model's input by the one preprocessing definition
(imgclf.data.preprocess), unaugmented.

Two checks read them: ``data check --labels`` (out-of-fold probabilities,
imgclf.train.out_of_fold) and ``data check``'s near copies by embedding
(imgclf.evaluate.near_copies). :func:`dataset_features` runs the pass once over every
image of the data set and keeps the result in its version folder as
``features-MODEL-SIZE.npy`` (fp16: 2,560 bytes an image for Lite0, ~1.7% of the 150 KB
of pixels a 224-px image takes in images.npy) beside a JSON record of what made them;
a later check with the same model, size, weights and precision reads them back instead
of running the network again. A new import is a new version folder, so features never
outlive the images they came from.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgclf.data.cache import Dataset
from imgclf.data.loader import BatchLoader
from imgclf.errors import RecipeError
from imgclf.io_utils import atomic_path, atomic_write_text
from imgclf.models import model_spec
from imgclf.runtime.device import Hardware, resolve_hardware
from imgclf.train.feature_cache import FP16_SAFE, FeatureCache
from imgclf.train.recipe import AugmentConfig, Recipe, StageConfig
from imgclf.train.setup import build_model

# Bumped when what a stored file holds changes (the layer, the resizing): a file of
# another version is computed again, never mixed with new ones.
FEATURES_VERSION = 1


@dataclass(frozen=True)
class StoredFeatures:
    """``features``: N×D, one row per image of the data set in index order (fp16 where
    the values fit, memory-mapped when read back); ``reused``: read from the data set's
    folder, no pass run; ``path``: the file (None where it could not be written)."""

    features: np.ndarray
    identity: dict
    reused: bool
    seconds: float
    path: Path | None


def _pretrained(recipe: Recipe) -> None:
    spec = model_spec(recipe.model)
    if spec.kind != "pretrained" or not recipe.pretrained:
        raise RecipeError(
            f"model {recipe.model!r} would start untrained here: suspect labels need a "
            "pretrained backbone's features; use the default recipe (lite0-photo) or "
            "another with pretrained: true"
        )


def backbone_features(
    ds: Dataset, recipe: Recipe, hw: Hardware, say: Callable[[str], None] = print
) -> torch.Tensor:
    """Features N×D (fp32, CPU) of every image of ``ds`` (read from the memory-mapped
    images without a copy) before the model's head: ``recipe``'s pretrained model at its
    input size, through :class:`~imgclf.train.feature_cache.FeatureCache` as a head-only
    stage (which says the engine it chose)."""
    model = build_model(recipe, len(ds.classes), hw, fresh=True)
    # One view, the image itself: a head stage without augmentation.
    stage = StageConfig(train=model.head_group, augment=AugmentConfig(crop_padding=0, flip=False))
    loader = BatchLoader(
        ds.images,
        ds.labels,
        batch_size=recipe.batch_size,
        size=model.input_size,
        mean=model.mean,
        std=model.std,
        channels_last=hw.channels_last,
        device=hw.device,
    )
    cache = FeatureCache.build(model, recipe, stage, loader, None, hw.autocast_dtype, say)
    if cache is None:
        raise RecipeError(
            f"model {recipe.model!r}: no features cached before its head (the line above "
            "says why, or the model cannot be split there)"
        )
    return cache.features[0].float().cpu().flatten(1)


def feature_identity(ds: Dataset, recipe: Recipe, hw: Hardware) -> dict:
    """What made a data set's stored features: equal records, equal features."""
    spec = model_spec(recipe.model)
    weights = Path(recipe.weights) if recipe.weights else None
    if weights is None and spec.local_weights is not None:
        weights = spec.local_weights()
    try:
        made_from = f"{weights.name}, {weights.stat().st_size} bytes" if weights else "download"
    except OSError:
        made_from = str(weights)
    return {
        "version": FEATURES_VERSION,
        "model": recipe.model,
        "input_size": recipe.input_size or spec.input_size,
        "weights": made_from,
        "precision": str(hw.autocast_dtype or torch.float32).removeprefix("torch."),
        "images": len(ds.labels),
    }


def features_file(ds: Dataset, identity: dict) -> Path:
    root = ds.version_root or ds.root
    return root / f"features-{identity['model']}-{identity['input_size']}.npy"


def _read(path: Path, identity: dict) -> np.ndarray | None:
    """The stored features at ``path`` if its record is ``identity``, else None."""
    try:
        if json.loads(path.with_suffix(".json").read_text()) != identity:
            return None
        features = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    return features if features.ndim == 2 and len(features) == identity["images"] else None


def dataset_features(
    ds: Dataset,
    recipe: Recipe,
    device: str | None = None,
    say: Callable[[str], None] = print,
) -> StoredFeatures:
    """Every image's backbone features (:func:`backbone_features`), read from the data
    set's folder when a pass with the same identity stored them, else computed and
    stored (a folder that cannot be written to keeps nothing: the features are used
    now and computed again next time)."""
    _pretrained(recipe)
    hw = resolve_hardware(device, recipe.precision, recipe.channels_last)
    identity = feature_identity(ds, recipe, hw)
    path = features_file(ds, identity)
    stored = _read(path, identity)
    if stored is not None:
        return StoredFeatures(stored, identity, True, 0.0, path)
    started = time.perf_counter()
    features = backbone_features(ds, recipe, hw, say).numpy()
    # fp16 halves the file; its 3 significant digits are far finer than the cosine
    # threshold or the logistic regression need. Values beyond its range stay fp32.
    if np.abs(features).max(initial=0.0) <= FP16_SAFE:
        features = features.astype(np.float16)
    seconds = time.perf_counter() - started
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, features)
        atomic_write_text(path.with_suffix(".json"), json.dumps(identity, indent=2))
    except OSError:
        path = None
    return StoredFeatures(features, identity, False, seconds, path)
