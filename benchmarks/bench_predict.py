"""``imgclf predict`` throughput against the model's own forward throughput.

Issue #5's bar: over a folder of 10,000 32×32 JPEGs with one fast run, predict runs at
≥ 0.8× the model's forward throughput on in-memory batches, because reading and decoding
(in a thread pool) overlap with compute. Both sides use the same device, batch size,
preprocessing (BatchLoader) and autocast; the model is untrained (speed does not depend
on the weights).

    python benchmarks/bench_predict.py                      # 10,000 images, model fast
    python benchmarks/bench_predict.py --images 2000 --model simple --device cpu
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgclf.data.decode import decode
from imgclf.evaluate.metrics import infer
from imgclf.models import create
from imgclf.predict import predict
from imgclf.runtime.checkpoint import save_checkpoint
from imgclf.runtime.device import resolve_hardware

CLASSES = [f"class{i}" for i in range(10)]


def write_jpegs(folder: Path, n: int, size: int = 32) -> list[Path]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, size, size, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        # a few distinct pictures, shifted per file: realistic JPEG sizes, cheap to make
        arr = np.roll(base[i % 64], i % size, axis=1)
        path = folder / f"{i}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def write_run(folder: Path, model_name: str) -> Path:
    model = create(model_name, num_classes=len(CLASSES))
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        {
            "model_name": model.name,
            "model_args": model.model_args,
            "class_names": CLASSES,
            "input_size": model.input_size,
            "mean": list(model.mean),
            "std": list(model.std),
            "model_state": model.state_dict(),
        },
        folder / "best.pt",
    )
    return folder


def forward_throughput(run: Path, images: np.ndarray, batch: int, device: str | None) -> float:
    from imgclf.inference.engine import run_loader
    from imgclf.inference.runs import load_run

    hw = resolve_hardware(device, "auto", "auto")
    lr = load_run(run)
    lr.model.to(hw.device, memory_format=torch.channels_last)
    labels = np.zeros(len(images), dtype=np.int64)
    loader = run_loader(lr, images, labels, batch, hw.device)  # uint8 already on the device
    infer(lr.model, loader, autocast_dtype=hw.autocast_dtype)  # warm-up
    if hw.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    infer(lr.model, loader, autocast_dtype=hw.autocast_dtype)  # ends with .cpu(): synced
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--model", default="fast")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        folder.mkdir()
        paths = write_jpegs(folder, args.images)
        run = write_run(tmp / f"{args.model}-1", args.model)
        decoded = np.stack([decode(None, str(p), None)[0] for p in paths])
        predict([run], folder, tmp / "warm.csv", batch_size=args.batch_size, device=args.device)
        # Alternate the two, so a change in machine load hits both sides alike.
        forwards, predicts = [], []
        for i in range(args.repeats):
            forwards.append(forward_throughput(run, decoded, args.batch_size, args.device))
            result = predict(
                [run], folder, tmp / f"p{i}.csv", batch_size=args.batch_size, device=args.device
            )
            predicts.append(result.images_per_second)
    forward, best = float(np.median(forwards)), float(np.median(predicts))
    hw = resolve_hardware(args.device, "auto", "auto")
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{hw.device} {hw.precision}, {torch.get_num_threads()} threads"
    )
    print(f"{args.images} {args.model} 32×32 JPEGs, batch {args.batch_size}, ", end="")
    print(f"median of {args.repeats}")
    print(f"forward on in-memory batches: {forward:10.0f} images/s")
    print(f"predict over the folder:      {best:10.0f} images/s")
    print(f"ratio:                        {best / forward:10.2f}  (issue #5 asks ≥ 0.80)")


if __name__ == "__main__":
    main()
