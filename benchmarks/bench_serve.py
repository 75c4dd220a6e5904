"""A bounded load test of ``imgclf serve`` on loopback: p50/p99 latency and requests/s.

Starts the server in this process on 127.0.0.1 (a free port), with one `fast` checkpoint
(untrained weights: speed does not depend on them) or the runs given, and sends
``--requests`` single-image POST /predict requests from ``--clients`` concurrent clients
(httpx), 32×32 PNGs cycling through 20 generated images. Stops after the last request or
``--time-limit`` seconds; any non-200 answer counts as an error.

    python benchmarks/bench_serve.py                       # 500 requests, 8 clients, fast
    python benchmarks/bench_serve.py --backend onnx
    python benchmarks/bench_serve.py --runs runs/fast-1 --requests 200
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgclf.models import create
from imgclf.runtime.checkpoint import save_checkpoint
from imgclf.serve import Predictor, create_app, start_in_thread
from serve_load import load_test  # beside this script


def fast_checkpoint(folder: Path) -> Path:
    model = create("fast", num_classes=10, input_size=32).eval()
    state = {
        "model_name": "fast",
        "model_args": model.model_args,
        "model_state": model.state_dict(),
        "class_names": [f"class{i}" for i in range(10)],
        "input_size": 32,
        "mean": list(model.mean),
        "std": list(model.std),
        "source_size": [32, 32],
    }
    save_checkpoint(state, folder / "best.pt")
    return folder


def pngs(n: int = 20) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append((f"{i}.png", buf.getvalue()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", help="run folders (default: one untrained fast)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=300)
    parser.add_argument("--backend", choices=["torch", "onnx"], default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs or [fast_checkpoint(Path(tmp))]
        predictor = Predictor(runs, backend=args.backend)
        running = start_in_thread(create_app(predictor))
        try:
            result = load_test(
                running.url,
                pngs(),
                requests=args.requests,
                clients=args.clients,
                time_limit=args.time_limit,
            )
        finally:
            running.stop()
    print(f"backend {predictor.backend}, torch threads {torch.get_num_threads()}")
    print(result.summary())
    for error in result.errors[:5]:
        print(f"  error: {error}")


if __name__ == "__main__":
    main()
