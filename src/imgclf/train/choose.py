"""The recipe for a data set when the user names none: ``imgclf train --data D``.

Small images (CIFAR's 32 px, digits, up to SMALL_IMAGE_SIDE) train best and fastest with
the ``fast`` net from scratch at 32 px; a pretrained backbone would have to upscale them
several times over to reach the size its features were learnt at. Anything larger is
a photo: ``lite0-photo`` fine-tunes ImageNet weights (its last blocks, at 192 px; tested at
224), which on a few hundred to a few thousand photos beats any net trained from scratch.
"""

from __future__ import annotations

from imgclf.data.cache import Dataset

# Images up to this side count as small: CIFAR (32), Fashion-MNIST (28), digits (8),
# SVHN (32), Tiny-ImageNet (64).
SMALL_IMAGE_SIDE = 64
SMALL_IMAGES = "fast"
PHOTOS = "lite0-photo"


def choose_recipe(ds: Dataset) -> tuple[str, str]:
    """(recipe name, why) for a data set."""
    h, w = ds.image_size
    n = len(ds.indices("train"))
    if max(h, w) <= SMALL_IMAGE_SIDE:
        why = (
            f"{ds.name!r} holds small images ({h}×{w}): the fast net trained from scratch at 32 px"
        )
        return SMALL_IMAGES, why
    why = (
        f"{ds.name!r} holds photos ({h}×{w}, {n:,} for training): EfficientNet-Lite0 "
        "with ImageNet weights, its last blocks fine-tuned at 192 px, tested at 224"
    )
    return PHOTOS, why
