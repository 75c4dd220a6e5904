"""The trainer's loop against a bare loop of the same model, side by side (issue #11):
efficiency = imgclf's training images/s ÷ a bare forward/backward/step loop's on
pre-made batches. Target: ≥ 0.95.

    python benchmarks/bench_loop_efficiency.py --model fast --size 32 --source 32
    python benchmarks/bench_loop_efficiency.py --recipe fast --images 10240 --rounds 3
    python benchmarks/bench_loop_efficiency.py --model efficientnet_lite0 --size 96 --source 224 \\
        --batch 64 --images 512
    python benchmarks/bench_loop_efficiency.py --model efficientnet_lite0 --size 224 --source 224 \\
        --batch 32 --images 256

imgclf's side is a real ``imgclf.train`` run (one epoch over ``--images`` random images
stored at ``--source`` px, with random crops and flips, and the resize to ``--size`` on
every batch when the two differ), timed by the trainer itself (metrics.csv images/s).
The bare side runs the same model, optimizer, precision and memory format on batches
made before the clock starts. The two alternate ``--rounds`` times; the best of each is
compared (the least disturbed by other processes). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def training_recipe(args: argparse.Namespace):
    """The validated recipe both sides run: a bundled one as a user runs it (its
    optimizer, Lookahead, flips, freezing; the small-data rule off so that the batch stays
    the recipe's), or a plain SGD one for ``--model``. One epoch."""
    from imgclf.train.recipe import load_recipe

    if args.recipe:
        return load_recipe(args.recipe, ["min_steps_per_epoch=0", *args.set], epochs=1)
    return load_recipe(
        {
            "name": "eff",
            "model": args.model,
            "input_size": args.size,
            "batch_size": args.batch,
            "augment": {"crop_padding": 4, "flip": True},
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True},
            "pretrained": False,
            "batchnorm": "train",
            "feature_cache": False,
            "stages": [{"epochs": 1, "train": "all"}],
        }
    )


def imgclf_images_per_second(recipe, ds, out: Path) -> float:
    from imgclf.train import train

    run = train(recipe, data=ds, out=out, progress=False)
    with open(run.path / "metrics.csv", newline="") as f:
        return float(next(csv.DictReader(f))["images_per_second"])


def bare_images_per_second(recipe, images: int) -> float:
    """The recipe's model, optimizer (SGD or Muon, its parameter groups) and label
    smoothing on batches made before the clock starts."""
    from imgclf.models import create
    from imgclf.runtime.device import resolve_hardware
    from imgclf.train.optim import build_optimizer

    hw = resolve_hardware(None, "auto", "auto")
    fmt = torch.channels_last if hw.channels_last else torch.contiguous_format
    size, batch = recipe.input_size, recipe.batch_size
    model = create(recipe.model, num_classes=10, input_size=size, **recipe.model_args)
    model = model.to(hw.device, memory_format=fmt)
    model.train()
    opt = build_optimizer(model, recipe, recipe.stages[0])
    steps = images // batch
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=fmt)
        for _ in range(steps)
    ]
    labels = torch.randint(0, 10, (batch,), generator=gen)
    autocast = torch.autocast(
        hw.device.type, dtype=hw.autocast_dtype, enabled=hw.autocast_dtype is not None
    )
    started = time.perf_counter()
    for x in batches:
        with autocast:
            loss = F.cross_entropy(model(x).float(), labels, label_smoothing=recipe.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fast")
    p.add_argument("--size", type=int, default=32, help="model input size")
    p.add_argument("--source", type=int, default=32, help="stored image size")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--recipe",
        help="run this bundled recipe's training settings (its model and batch override "
        "--model/--batch) on the imgclf side, its optimizer on the bare side",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a --recipe field, as `imgclf train --set` (repeatable)",
    )
    args = p.parse_args()
    recipe = training_recipe(args)
    args.model, args.batch, args.size = recipe.model, recipe.batch_size, recipe.input_size

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["IMGCLF_HOME"] = tmp
        from imgclf.data.importer import import_arrays

        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.images, args.source, args.source, 3), np.uint8)
        labels = rng.integers(0, 10, args.images)
        ds = import_arrays(images, labels, [str(c) for c in range(10)], "eff", val_fraction=0)
        ours, bare = [], []
        for r in range(args.rounds):
            bare.append(bare_images_per_second(recipe, args.images))
            ours.append(imgclf_images_per_second(recipe, ds, Path(tmp) / f"run{r}"))
    result = {
        "recipe": args.recipe,
        "model": args.model,
        "input": args.size,
        "stored": args.source,
        "batch": args.batch,
        "imgclf_images_per_s": [round(v, 1) for v in ours],
        "bare_images_per_s": [round(v, 1) for v in bare],
        "efficiency": round(max(ours) / max(bare), 3),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
