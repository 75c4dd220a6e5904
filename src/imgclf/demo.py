"""``imgclf demo``: one command from nothing to a trained, evaluated CIFAR-10 run.

Data, first that works: the cached dataset ``cifar10``; ``--archive PATH`` imported as
``cifar10``; a torchvision download. Offline without an archive, scikit-learn's bundled
8×8 digits (1,797 images, 10 classes, no download) stand in, so the demo always finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from imgclf.data import import_dataset, import_named, list_datasets, load_dataset
from imgclf.data.cache import Dataset
from imgclf.data.importer import import_arrays
from imgclf.errors import DataError
from imgclf.train import Run, train

Say = Callable[[str], None]

DIGITS_SOURCE = "sklearn.datasets.load_digits"


# The demo's default length: a budget, so it takes the same few minutes on every machine
# (2 epochs of `fast` on a slow 2-core CPU, many more on a fast one or a GPU).
DEMO_TIME = "5m"


def run_demo(
    archive: Path | None = None,
    epochs: int | None = None,
    recipe: str | Path = "fast",
    time_budget: str | float | None = None,
    out: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    device: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    say: Say = print,
) -> Run:
    """Train ``recipe`` on CIFAR-10 (or the digits fallback); returns the evaluated run."""
    ds = demo_dataset(archive, say)
    if epochs is None and time_budget is None:
        time_budget = DEMO_TIME
        say(f"training for a {DEMO_TIME} budget (--epochs N or --time T to choose)")
    # A mirrored digit is another glyph (or none): no flips, in training or at test time.
    no_flips = ["augment.flip=false", "tta=false"] if ds.name == "digits" else []
    return train(
        recipe,
        ds,
        out=out,
        epochs=epochs,
        time_budget=time_budget,
        overrides=[*no_flips, *overrides],
        device=device,
        threads=threads,
        progress=progress,
    )


def demo_dataset(archive: Path | None = None, say: Say = print) -> Dataset:
    if "cifar10" in list_datasets():
        return load_dataset("cifar10")
    if archive is not None:
        say(f"importing {archive} as dataset 'cifar10' (once; later runs use the cache)")
        return import_dataset(archive, "cifar10")
    try:
        return import_named("cifar10")
    except DataError as exc:
        why = str(exc).split(";")[0]  # "cannot download cifar10 (URLError: offline?)"
        say(
            f"{why}: training on scikit-learn's 8×8 digits instead "
            "(1,797 images, 10 classes; pass --archive PATH for CIFAR-10)"
        )
    return digits_dataset()


def digits_dataset() -> Dataset:
    """scikit-learn's digits as dataset ``digits``: grey 0..16 → RGB 0..255, 8×8."""
    if "digits" in list_datasets():
        return load_dataset("digits")
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)  # N×8×8×3
    classes = [str(int(c)) for c in digits.target_names]
    return import_arrays(rgb, digits.target, classes, "digits", source=DIGITS_SOURCE)
