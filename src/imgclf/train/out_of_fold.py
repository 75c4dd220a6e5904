"""Out-of-fold class probabilities for every training image: a pretrained backbone's
features computed once, then k-fold cross-validation of a logistic-regression head on them.

What ``imgclf data check --labels`` (imgclf.evaluate.label_issues) ranks labels by.
Confident learning needs *out-of-sample* probabilities: a model that saw an image's own
label during training agrees with it, wrong or not (Northcutt et al., JAIR 2021, §4: "we
use cross-validation to obtain out-of-sample predicted probabilities"; cleanlab's
``estimate_cv_predicted_probabilities``, 5 folds by default).

The features are the pretrained backbone's before its head (for Lite0 its pooled 1,280
channels), from the one pass over the data set that imgclf.train.backbone_features runs
and keeps in the data set's folder, the pass ``data check``'s near copies by embedding
read too: whichever check comes first computes them, the other reads them back. Images
are resized to the model's input by the one preprocessing definition
(imgclf.data.preprocess), so a 32-px set goes to Lite0 at 224 px as in training. Each fold
then fits a multinomial logistic regression on the other folds' (scaled) features
with L-BFGS from zero weights: convex, so the same features give the same probabilities
(no seed in the fit), in a fraction of a second per fold at a few thousand images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.data.cache import Dataset
from imgclf.errors import DataError
from imgclf.train.backbone_features import dataset_features
from imgclf.train.recipe import Recipe

DEFAULT_FOLDS = 5  # cleanlab's default (estimate_cv_predicted_probabilities, cv_n_folds=5)
# L2 penalty on the weights (the loss is the mean cross-entropy plus WEIGHT_DECAY/2·|W|²)
# on features scaled to unit root-mean-square (fit_predict): of 0.01, 0.1, 1 and 10, the
# one with the lowest out-of-fold log loss against the given labels on the clothing photos
# with 5% of them flipped (docs/results.md, "Suspect labels"), a criterion that needs no
# clean labels; it also ranked the flips best.
WEIGHT_DECAY = 0.1
# L-BFGS iterations per fold: at 100 the clothing photos' probabilities equalled those
# after 300 (the fit meets L-BFGS's tolerance first); at 50 they were 0.01 off.
MAX_ITER = 100


@dataclass(frozen=True)
class OutOfFold:
    """``probs[i]``: class probabilities of training image ``i`` from the head fitted on
    the folds without it; ``fold[i]``: its fold; the two parts' seconds, and whether the
    features were read from the data set's folder (an earlier check's) instead."""

    probs: np.ndarray  # N×C float64
    fold: np.ndarray  # N int64
    feature_seconds: float
    fold_seconds: float
    features_reused: bool = False


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's fold in 0..folds-1: every class shuffled (seeded) and dealt round
    the folds, so each fold holds each class's share (scikit-learn's StratifiedKFold
    idea), and which fold deals first turns with the class so small classes do not all
    leave fold 0 the largest."""
    gen = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int64)
    start = 0
    for c in np.unique(labels):
        members = gen.permutation(np.flatnonzero(labels == c))
        out[members] = (start + np.arange(len(members))) % folds
        start += len(members)
    return out


def fit_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    weight_decay: float = WEIGHT_DECAY,
) -> torch.Tensor:
    """Softmax probabilities of ``test_x`` from a logistic regression fitted on
    (``train_x``, ``train_y``): features centred on the training rows' mean and divided by
    their one root-mean-square, L2 penalty ``weight_decay`` on the weights (not the bias),
    L-BFGS from zeros."""
    # One scale for all features, not one per feature: a feature almost constant in the
    # training folds (a channel that rarely fires) was blown up by its tiny std into a
    # huge value on a held-out row (a generated test image scored 0.000 for its own
    # class); with one scale, the clothing photos' out-of-fold log loss was the same
    # (0.657 against 0.660 per feature, docs/results.md).
    mean = train_x.mean(0)
    scale = (train_x - mean).square().mean().sqrt().clamp_min(1e-12)
    x, test = (train_x - mean) / scale, (test_x - mean) / scale
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=MAX_ITER, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = F.cross_entropy(x @ w + b, train_y) + weight_decay / 2 * w.square().sum()
        value.backward()
        return value

    opt.step(loss)
    with torch.no_grad():
        return torch.softmax(test @ w + b, dim=1)


def cross_validate(
    features: torch.Tensor,
    labels: np.ndarray,
    num_classes: int,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    weight_decay: float = WEIGHT_DECAY,
) -> tuple[np.ndarray, np.ndarray]:
    """(out-of-fold probabilities N×C, each row's fold) of a logistic regression on
    ``features`` (N×D) with ``labels``, in float64 (a few thousand rows: milliseconds more,
    and no fp32 ties in the ranking)."""
    x = features.to(torch.float64).flatten(1)
    y = torch.as_tensor(labels, dtype=torch.int64)
    fold = stratified_folds(np.asarray(labels), folds, seed)
    probs = np.zeros((len(labels), num_classes))
    for k in range(folds):
        held = torch.as_tensor(fold == k)
        probs[held.numpy()] = fit_predict(
            x[~held], y[~held], x[held], num_classes, weight_decay
        ).numpy()
    return probs, fold


def check_folds(ds: Dataset, labels: np.ndarray, folds: int) -> None:
    """A set k-fold cross-validation can score: two classes or more in train, and each
    one given to at least ``folds`` images (each fold holds one of them out)."""
    counts = np.bincount(labels, minlength=len(ds.classes))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        only = f" ({ds.classes[present[0]]!r})" if len(present) else ""
        raise DataError(
            f"dataset {ds.name!r}: {len(present)} class{only} in its training split; "
            "suspect labels need two classes or more: import the other classes too"
        )
    small = [(ds.classes[c], int(counts[c])) for c in present if counts[c] < folds]
    if small:
        name, n = min(small, key=lambda s: s[1])
        more = f" and {len(small) - 1} more" if len(small) > 1 else ""
        raise DataError(
            f"dataset {ds.name!r}: class {name!r}{more} has {n} training image(s), fewer "
            f"than the {folds} folds; use --folds {max(2, n)} or add images to it"
        )


def out_of_fold(
    ds: Dataset,
    recipe: Recipe,
    indices: np.ndarray,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    device: str | None = None,
    say: Callable[[str], None] = print,
) -> OutOfFold:
    """Out-of-fold probabilities of images ``indices`` of ``ds`` under their given labels
    (checked first: :func:`check_folds`)."""
    labels = np.asarray(ds.labels[indices], dtype=np.int64)
    check_folds(ds, labels, folds)
    started = time.perf_counter()
    stored = dataset_features(ds, recipe, device, say)
    features = torch.from_numpy(np.asarray(stored.features[indices], dtype=np.float32))
    fitted = time.perf_counter()
    probs, fold = cross_validate(features, labels, len(ds.classes), folds, seed)
    done = time.perf_counter()
    return OutOfFold(probs, fold, fitted - started, done - fitted, stored.reused)
