"""Compute of whole recipes, side by side: per-image training-step time × epochs.

For each recipe, its model (with the recipe's ``model_args`` and input size) runs timed
training steps (forward, backward, SGD step) on random batches in the trainer's precision
and memory format; the recipes take turns round by round, so a slower moment of the
machine hits them all alike. Prints each recipe's images/s, its cost per epoch relative to
the first recipe, and its whole-schedule compute relative to the first recipe's (per-image
time × epochs): how issue #11's "fast-accurate at no more than 4× the compute of fast" is
measured.

    python benchmarks/bench_recipe_cost.py fast fast-accurate --rounds 5
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from imgclf.models import create, model_spec
from imgclf.runtime.device import resolve_hardware, set_threads
from imgclf.train.recipe import load_recipe


def build(name: str, hw):
    recipe = load_recipe(name)
    size = recipe.input_size or model_spec(recipe.model).input_size
    kwargs = dict(recipe.model_args)
    if model_spec(recipe.model).kind == "pretrained":
        kwargs["pretrained"] = False
    torch.manual_seed(0)
    model = create(recipe.model, num_classes=10, input_size=size, **kwargs)
    memory = torch.channels_last if hw.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.85, nesterov=True)
    return recipe, size, model, opt, memory


def step_seconds(model, opt, x, y, autocast_dtype, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="+")
    p.add_argument("--batch", type=int, default=256, help="timing batch (images per step)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    threads = set_threads(None)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{threads} threads"
    )
    entries = []
    for name in args.recipes:
        hw = resolve_hardware("cpu", "auto", "auto")
        recipe, size, model, opt, memory = build(name, hw)
        x = torch.randn(args.batch, 3, size, size).contiguous(memory_format=memory)
        y = torch.randint(0, 10, (args.batch,))
        step_seconds(model, opt, x, y, hw.autocast_dtype, 2)  # warm-up
        entries.append([name, recipe, model, opt, x, y, hw, []])
    for _ in range(args.rounds):
        for e in entries:
            _, _, model, opt, x, y, hw, times = e
            times.append(step_seconds(model, opt, x, y, hw.autocast_dtype, args.steps))
    base = None
    print("recipe | epochs | images/s | cost per epoch vs first | compute vs first")
    for name, recipe, _, _, _, _, hw, times in entries:
        per_image = sorted(times)[len(times) // 2] / args.batch  # median round
        epochs = recipe.total_epochs
        if base is None:
            base = (per_image, epochs)
        ratio = per_image / base[0]
        print(
            f"{name} | {epochs} | {1 / per_image:.0f} | {ratio:.2f} | "
            f"{ratio * epochs / base[1]:.2f}  ({hw.autocast_dtype or 'fp32'})"
        )


if __name__ == "__main__":
    main()
