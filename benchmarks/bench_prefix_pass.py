"""The feature cache's prefix pass on each engine, side by side (issue #30 item 2):
eager PyTorch in fp32 and bf16 autocast at several batch sizes, and ONNX Runtime, on the
frozen prefix a stage caches. Prints images/s per row; run it alone on the machine.

    python benchmarks/bench_prefix_pass.py                       # Lite0, 224 px, up to head
    python benchmarks/bench_prefix_pass.py --split blocks6        # the prefix before blocks6
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def rate(run, x: torch.Tensor, batch: int, rounds: int) -> float:
    """Best images/s of ``rounds`` passes over ``x`` in batches of ``batch``."""
    best = 0.0
    with torch.inference_mode():
        run(x[:batch])  # warm-up: allocation, planning
        for _ in range(rounds):
            started = time.perf_counter()
            for b in range(0, len(x), batch):
                run(x[b : b + batch])
            best = max(best, len(x) / (time.perf_counter() - started))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--split", default="head", help="the first trained group (default head)")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    from imgclf.models import create
    from imgclf.runtime.device import set_threads
    from imgclf.runtime.onnx import onnx_net
    from imgclf.train.prefix_pass import eager

    threads = set_threads(None)
    model = create(args.model, num_classes=10, input_size=args.size, pretrained=False).eval()
    prefix, _ = model.split_at(args.split)
    prefix = prefix.to(memory_format=torch.channels_last)
    x = torch.randn(args.images, 3, args.size, args.size)
    x = x.contiguous(memory_format=torch.channels_last)
    cpu = torch.device("cpu")
    rows = []
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for batch in (8, 16, 64):
            ips = rate(eager(prefix, dtype, cpu), x, batch, args.rounds)
            rows.append(
                {"engine": f"PyTorch {name}", "batch": batch, "images_per_s": round(ips, 1)}
            )
    ort = onnx_net(prefix, args.size, None, threads=threads)
    for batch in (8, 16, 64):
        ips = rate(ort, x, batch, args.rounds)
        rows.append({"engine": "ONNX Runtime fp32", "batch": batch, "images_per_s": round(ips, 1)})
    for row in rows:
        print(json.dumps({"model": args.model, "size": args.size, "split": args.split, **row}))


if __name__ == "__main__":
    main()
