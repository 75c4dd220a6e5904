"""PyTorch eager against ONNX Runtime on this CPU: images/s of the model forward.

The two models issue #13 names: `fast` at 32 px (batch 256, predict's default) and
EfficientNet-Lite0 at 224 px, the photo recipe's resolution (batch 32). Both backends get
the same normalized float batches, as predict and serve feed them; the ONNX graph is the
one ``imgclf export`` / ``--backend onnx`` builds (dynamic batch, opset 18). Weights are
untrained: speed does not depend on them. Median of ``--repeats`` timed passes after one
warm-up each; torch in channels_last (what predict uses), ORT in NCHW (what it takes).

    python benchmarks/bench_onnx.py
    python benchmarks/bench_onnx.py --repeats 3 --lite0-batch 16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch

from imgclf.models import create
from imgclf.runtime.device import physical_cores
from imgclf.runtime.onnx import OnnxNet, onnx_bytes, ort_session


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def images_per_second(run, x: torch.Tensor, repeats: int) -> float:
    run(x)  # warm-up: allocations, ORT's first-run graph work
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def compare(name: str, size: int, batch: int, repeats: int, **kwargs) -> tuple[float, float]:
    model = create(name, num_classes=10, input_size=size, **kwargs).eval()
    x = torch.randn(batch, 3, size, size)
    eager = model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch_ips = images_per_second(eager, x_cl, repeats)
    data = onnx_bytes(model, x[:2], dynamic_batch=True, output_name="logits")
    net = OnnxNet(ort_session(data, threads=torch.get_num_threads()))
    ort_ips = images_per_second(net, x, repeats)
    return torch_ips, ort_ips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fast-batch", type=int, default=256)
    parser.add_argument("--lite0-batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(physical_cores())
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| model | input | batch | PyTorch eager images/s | ONNX Runtime images/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = [
        ("fast", 32, args.fast_batch, {}),
        ("efficientnet_lite0", 224, args.lite0_batch, {"pretrained": False}),
    ]
    for name, size, batch, kwargs in rows:
        t, o = compare(name, size, batch, args.repeats, **kwargs)
        print(f"| {name} | {size} | {batch} | {t:.0f} | {o:.0f} | {o / t:.2f} |", flush=True)


if __name__ == "__main__":
    main()
