"""What the trainer's NaN/infinity check of the weights costs against a training step
(issue #31, item 6): one check (imgclf.runtime.finite.nonfinite over every parameter and
buffer), one step (forward, loss, backward, SGD step) of the same model and batch, and the
check's share of a step when it runs every step and every WEIGHT_CHECK_EVERY steps.

    python benchmarks/bench_weight_check.py --model fast --size 32 --batch 256
    python benchmarks/bench_weight_check.py --model fast --size 32 --batch 256 --device cuda

Medians of ``--repeats`` timings after two warm-up runs; a GPU is synchronised before
each clock reading (the check's own result is read on the CPU, so it waits anyway).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after two warm-up runs."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from imgclf.models import create
    from imgclf.runtime.finite import model_tensors, nonfinite
    from imgclf.train.steps import WEIGHT_CHECK_EVERY

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fast")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = create(args.model, args.classes, input_size=args.size).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # the trainer reads every step's loss too

    def check() -> None:
        assert not nonfinite(model_tensors(model))

    step_s, check_s = timed(step, args.repeats, device), timed(check, args.repeats, device)
    tensors = model_tensors(model)
    n = sum(t.numel() for t in tensors.values())
    print(f"{args.model} at {args.size} px, batch {args.batch}, {device}, {args.threads} threads")
    print(f"weights checked: {len(tensors)} tensors, {n:,} values")
    print(f"one step:  {step_s * 1e3:9.3f} ms")
    print(f"one check: {check_s * 1e3:9.3f} ms")
    print(f"share of a step, checked every step: {check_s / step_s:.2%}")
    every = WEIGHT_CHECK_EVERY
    print(f"share of a step, checked every {every} steps: {check_s / (every * step_s):.4%}")


if __name__ == "__main__":
    main()
