"""Cutout (augment.cutout): one clipped square per training image, filled with the mean
colour, drawn from the epoch's stream so a resume replays it; never at evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgclf.data.loader import Augment, BatchLoader, cutout_masks
from imgclf.train.feature_cache import views_for
from imgclf.train.recipe import Recipe

# Output = pixel - 128 (mean 128/255, std 1/255): the fill reads 0, a white pixel 127.
CENTRED = {"mean": (128 / 255,) * 3, "std": (1 / 255,) * 3}


def white_loader(n: int, size: int, cutout: int, **kw) -> BatchLoader:
    images = np.full((n, size, size, 3), 255, np.uint8)
    return BatchLoader(
        images, np.arange(n), batch_size=n, augment=Augment(cutout=cutout), **CENTRED, **kw
    )


def test_each_image_gets_one_clipped_square_of_the_mean_colour():
    n, side, cut = 200, 12, 4
    loader = white_loader(n, side, cut, shuffle=True, seed=5)
    x, _ = next(iter(loader))
    filled = (x == 0).all(dim=1)  # B×H×W: pixels at the mean colour on every channel
    untouched = (x == 127).all(dim=1)
    assert torch.equal(filled | untouched, torch.ones_like(filled))  # nothing else changes
    heights, widths = set(), set()
    for m in filled:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert m.sum() == h * w, "the filled pixels form one rectangle"
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
        heights.add(h), widths.add(w)
    # Centres anywhere in the image: full 4-px squares, and squares cut by an edge (2 px
    # at least: a centre on the first row keeps rows 0..1 of its square).
    assert heights == {2, 3, 4} and widths == {2, 3, 4}


def test_inner_pixels_are_covered_by_their_window_share_edge_pixels_less():
    side, cut = 8, 4
    masks = cutout_masks(40_000, side, side, cut, torch.Generator().manual_seed(0))
    share = masks.float().mean(0)  # each pixel's cover rate
    # Uniform centres: an inner pixel is covered when the centre falls in the 4×4 window
    # around it (16 of 64 centres); a corner pixel only by the 3×3 centres whose square
    # reaches it (a square spans centre - 2 .. centre + 1), 9 of 64.
    assert abs(share[3:5, 3:5].mean().item() - 16 / 64) < 0.01
    assert abs(share[0, 0].item() - 9 / 64) < 0.01


def test_cutout_replays_on_resume_and_stays_out_of_evaluation():
    images = np.random.default_rng(1).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    kw = {"batch_size": 8, "shuffle": True, "seed": 0}
    loader = BatchLoader(images, np.arange(40), augment=Augment(2, "alternate", 3), **kw)
    loader.set_epoch(2)
    full = [x for x, _ in loader]
    later = [x for x, _ in loader.iter_from(3)]
    assert all(torch.equal(a, b) for a, b in zip(full[3:], later, strict=True))
    plain = BatchLoader(images, np.arange(40), augment=Augment(2, "alternate", 0), **kw)
    plain.set_epoch(2)
    # Cutout draws after a batch's crops and flips: the first batch has the same crops, so
    # its images differ only inside each one's 3×3 square (at most 9 pixels an image).
    changed = (full[0] != next(iter(plain))[0]).any(dim=1).flatten(1).sum(1)
    assert changed.max() <= 9 and changed.sum() > 0
    idx = torch.arange(8)
    assert torch.equal(loader.batch(idx), plain.batch(idx))  # no generator: no cutout


def test_recipe_key_and_the_feature_cache():
    recipe = Recipe.model_validate({"model": "fast", "augment": {"cutout": 8}})
    assert recipe.augment.cutout == 8
    assert views_for(recipe, recipe.stages[0]) is None  # a fresh square per step: no cache
    plain = Recipe.model_validate({"model": "fast", "augment": {"flip": True}})
    assert views_for(plain, plain.stages[0]) == 2
    for bad in (-1, True, 8.0):  # YAML's `true` is not a size, nor is a float
        with pytest.raises(Exception, match="cutout"):
            Recipe.model_validate({"model": "fast", "augment": {"cutout": bad}})
    with pytest.raises(Exception, match="crop_padding"):
        Recipe.model_validate({"model": "fast", "augment": {"crop_padding": True}})
