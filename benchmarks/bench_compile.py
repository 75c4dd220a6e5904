"""``torch.compile`` against eager for one model's training step, compile time included.

A training step (forward, loss, backward, SGD step) at the recipe's batch and size, in
fp32 channels_last (the trainer's CPU default): the first step of each (compilation, for
the compiled one) is timed on its own, then steps of the two alternate, so that the load
of a shared machine falls on both alike. The last line prices compilation over a run of
``--run-steps`` steps (default: the ``fast`` recipe's 10 epochs of 45,000 images at batch
500 = 900 steps).

    python benchmarks/bench_compile.py --model fast --size 32 --batch 500 --steps 10
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from imgclf.models import create
from imgclf.runtime.device import physical_cores


def trainer_step(net, params, x, y):
    """One training step of ``net``; returns its seconds."""
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True)

    def step() -> float:
        t = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fast")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--run-steps", type=int, default=900)
    p.add_argument("--threads", type=int, default=physical_cores())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 10, (args.batch,))
    steps = {}
    for mode in ("eager", "compile"):
        torch.manual_seed(0)
        model = create(args.model, num_classes=10, input_size=args.size)
        model = model.to(memory_format=torch.channels_last).train()
        net = torch.compile(model) if mode == "compile" else model
        params = [p for p in model.parameters() if p.requires_grad]
        steps[mode] = trainer_step(net, params, x, y)
    # First steps: oneDNN's primitives (eager) and compilation (compile).
    first = {mode: step() for mode, step in steps.items()}
    # Then alternated, so that the load of a shared machine falls on both alike.
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for _ in range(args.steps):
        for mode, step in steps.items():
            times[mode].append(step())
    steady = {mode: sorted(t)[len(t) // 2] for mode, t in times.items()}
    for mode in steps:
        print(
            f"{mode:8} first step {first[mode]:7.2f} s   median {steady[mode] * 1e3:7.1f} ms/step"
        )
    n = args.run_steps
    eager, compiled = n * steady["eager"], first["compile"] + (n - 1) * steady["compile"]
    print(
        f"over {n} steps: eager {eager:.0f} s, compiled {compiled:.0f} s "
        f"(steady speed-up {steady['eager'] / steady['compile']:.2f}x)"
    )


if __name__ == "__main__":
    main()
