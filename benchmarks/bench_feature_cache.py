"""Head-only stage with and without the frozen-prefix feature cache.

Trains the same head-only stage twice on a CIFAR-10 slice (or generated images when the
shared archive is missing): once computing the frozen backbone every epoch, once from
cached features. Prints whole-stage wall time (cache build included) and the speedup.

    python benchmarks/bench_feature_cache.py --model mobilenet_v2 --size 64 --epochs 15
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ARCHIVE = Path(__file__).resolve().parents[2] / "shared/data/cifar10-train-jpg.tar.gz"


def dataset(n: int):
    from imgclf.data.importer import import_arrays, import_dataset

    if ARCHIVE.is_file():
        full = import_dataset(ARCHIVE, "bench-cache-full", warn=lambda m: None)
        idx = np.random.default_rng(0).permutation(len(full.labels))[:n]
        return import_arrays(
            np.asarray(full.images[idx]), full.labels[idx], full.classes, "bench-cache"
        )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return import_arrays(images, rng.integers(0, 10, n), [str(i) for i in range(10)], "bench-cache")


def stage_seconds(ds, model: str, size: int, epochs: int, cached: bool) -> float:
    from imgclf.train import train

    recipe = {
        "name": "bench-cache",
        "model": model,
        "input_size": size,
        "pretrained": model == "efficientnet_lite0",
        "batch_size": 128,
        "augment": {"crop_padding": 0, "flip": True},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "stages": [{"epochs": epochs, "train": "head"}],
        "feature_cache": cached,
    }
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        train(recipe, ds, out=Path(out) / "run", progress=False)
        return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--images", type=int, default=2000)
    args = p.parse_args()
    os.environ.setdefault("IMGCLF_HOME", tempfile.mkdtemp(prefix="imgclf-bench-"))
    ds = dataset(args.images)
    plain = stage_seconds(ds, args.model, args.size, args.epochs, cached=False)
    cached = stage_seconds(ds, args.model, args.size, args.epochs, cached=True)
    print(
        f"# {args.model} at {args.size} px, head-only stage, {args.epochs} epochs, "
        f"{args.images} images (train+val), flips as 2 cached views"
    )
    print(f"{'uncached s':>11} {'cached s':>9} {'speedup':>8}")
    print(f"{plain:11.1f} {cached:9.1f} {plain / cached:8.2f}")


if __name__ == "__main__":
    main()
