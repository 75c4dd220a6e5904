"""What Muon's orthogonalization costs per step, against the step itself (issue #11).

    python benchmarks/bench_muon_step.py --recipe fast --rounds 5

Times, on the recipe's model and batch: one forward/backward on random images, one
optimizer step with the recipe's optimizer (Muon: Newton–Schulz on every filter bank),
and the same step with plain SGD on the same parameter groups. Prints the median of the
rounds and Muon's extra time as a share of a whole training step. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from imgclf.models import create
from imgclf.runtime.device import resolve_hardware
from imgclf.train.optim import build_optimizer
from imgclf.train.recipe import load_recipe


def timed(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="fast")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    recipe = load_recipe(args.recipe)
    sgd_recipe = load_recipe(args.recipe, ["optimizer.name=sgd"])
    # The trainer's precision and memory format for this machine (bf16 autocast only where
    # the CPU has it natively): the step Muon's cost is compared with is the one users get.
    hw = resolve_hardware(None, "auto", "auto")
    fmt = torch.channels_last if hw.channels_last else torch.contiguous_format
    model = create(recipe.model, num_classes=10, input_size=recipe.input_size,
                   **recipe.model_args).to(hw.device, memory_format=fmt)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(recipe.batch_size, 3, recipe.input_size, recipe.input_size, generator=gen)
    x = x.to(hw.device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (recipe.batch_size,), generator=gen).to(hw.device)
    autocast = torch.autocast(
        hw.device.type, dtype=hw.autocast_dtype, enabled=hw.autocast_dtype is not None
    )

    def forward_backward() -> None:
        model.zero_grad(set_to_none=False)
        with autocast:
            logits = model(x).float()
        F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing).backward()

    forward_backward()  # gradients for the optimizer steps below
    results: dict = {"recipe": args.recipe, "batch": recipe.batch_size}
    results["optimizer"] = recipe.optimizer.name
    results["forward_backward_s"] = timed(forward_backward, args.rounds)
    for name, r in (("recipe_step_s", recipe), ("sgd_step_s", sgd_recipe)):
        opt = build_optimizer(model, r, r.stages[0])
        results[name] = timed(opt.step, args.rounds)
    extra = results["recipe_step_s"] - results["sgd_step_s"]
    whole = results["forward_backward_s"] + results["recipe_step_s"]
    results = {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}
    results["extra_share_of_step"] = round(extra / whole, 4)
    results["threads"] = torch.get_num_threads()
    results["precision"] = hw.precision
    print(json.dumps(results))


if __name__ == "__main__":
    main()
