"""Tiny trained runs for the predict, eval-ensemble and report tests.

Three `simple` runs, one epoch each on a generated 32×32 colour-plus-noise dataset:
``run32`` at its native 32 px, ``run16`` at input_size 16 (so its batches are resized), and
``swapped``, trained on data whose cat and dog colours are exchanged, so that it disagrees
with the others on cats and dogs (ties for the hard vote to break). Seconds on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

COLOURS = {"bird": (40, 40, 200), "cat": (200, 40, 40), "dog": (40, 200, 40)}
SWAPPED = {"bird": COLOURS["bird"], "cat": COLOURS["dog"], "dog": COLOURS["cat"]}


def noisy_image(colour, size=(32, 32), rng=None) -> np.ndarray:
    rng = rng or np.random.default_rng(0)
    pixels = np.array(colour, dtype=np.float64) + rng.normal(0, 30, (*size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_folder(root: Path, colours=COLOURS, per_class: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls, colour in colours.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(noisy_image(colour, rng=rng)).save(root / cls / f"{i}.png")
    return root


def _recipe(**changes) -> dict:
    recipe = {"model": "simple", "stages": [{"epochs": 1}], "batch_size": 16, "seed": 0}
    recipe["optimizer"] = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
    return {**recipe, **changes}


def build_runs(base: Path) -> SimpleNamespace:
    from imgclf.data.importer import import_dataset
    from imgclf.train import train

    def quiet(msg: str) -> None:
        pass

    src = make_folder(base / "src")
    ds = import_dataset(src, "tiny", val_fraction=0.25, dest=base / "cache" / "tiny", warn=quiet)
    other = make_folder(base / "swapped-src", SWAPPED, seed=1)
    ds_swapped = import_dataset(
        other, "swapped", val_fraction=0.25, dest=base / "cache" / "swapped", warn=quiet
    )
    runs = base / "runs"
    run32 = train(_recipe(name="s32"), data=ds, out=runs / "run32", progress=False).path
    run16 = train(_recipe(name="s16", input_size=16), data=ds, out=runs / "run16", progress=False)
    swapped = train(_recipe(name="swap"), data=ds_swapped, out=base / "swapped", progress=False)
    return SimpleNamespace(
        ds=ds, src=src, runs_dir=runs, run32=run32, run16=run16.path, swapped=swapped.path
    )


_BUILT: dict[str, SimpleNamespace] = {}


def session_runs(tmp_path_factory) -> SimpleNamespace:
    """The runs, trained once per test session and shared by every module that asks (a
    fixture imported into several modules would be built once per module). Read-only."""
    if "runs" not in _BUILT:
        _BUILT["runs"] = build_runs(tmp_path_factory.mktemp("trained"))
    return _BUILT["runs"]
