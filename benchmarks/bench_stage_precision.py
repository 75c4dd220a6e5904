"""Training speed of a pretrained model's fine-tuning stages: bf16 autocast against fp32,
for the whole network and for the part after each group on cached activations (what a
stage ``train: [blocksN, ..., head]`` with the feature cache steps through).

BatchNorm is in eval mode, as ``batchnorm: auto`` keeps it for a pretrained backbone.
imgclf.train.precision times the same forward-backward pass to choose a stage's precision.

    python benchmarks/bench_stage_precision.py                       # Lite0 at 224, batch 32
    python benchmarks/bench_stage_precision.py --size 192 --after blocks3 blocks4
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from imgclf.models import create
from imgclf.runtime.device import cpu_has_native_bf16, physical_cores


def split(model: nn.Module, after: str | None) -> tuple[nn.Module, nn.Module]:
    """(frozen prefix, trained rest) of ``model`` after group ``after`` (None: all trains)."""
    if after is None:
        return nn.Identity(), model
    return model.split_at(next_group(model, after))


def next_group(model: nn.Module, after: str) -> str:
    order = list(model.param_groups())
    return order[order.index(after) + 1]


def images_per_second(
    name: str, size: int, batch: int, steps: int, after: str | None, bf16: bool
) -> float:
    torch.manual_seed(0)
    model = create(name, num_classes=10, input_size=size, pretrained=False)
    model = model.to(memory_format=torch.channels_last).train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    prefix, rest = split(model, after)
    for p in prefix.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        cached = prefix.eval()(x)
    y = torch.randint(0, 10, (batch,))
    params = [p for p in rest.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(rest(cached).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: oneDNN primitive creation
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--after",
        nargs="*",
        default=["none", "blocks2", "blocks3", "blocks4", "blocks5"],
        help="cache after these groups (none: the whole network trains)",
    )
    p.add_argument("--threads", type=int, default=physical_cores())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, native bf16: {cpu_has_native_bf16()}, "
        f"{args.model} at {args.size} px, batch {args.batch}, BatchNorm frozen"
    )
    print(f"{'trained part':<22} {'fp32 img/s':>10} {'bf16 img/s':>10} {'bf16/fp32':>9}")
    for after in args.after:
        cut = None if after == "none" else after
        fp32, bf16 = (
            images_per_second(args.model, args.size, args.batch, args.steps, cut, b)
            for b in (False, True)
        )
        label = "everything" if cut is None else f"after {cut}"
        print(f"{label:<22} {fp32:>10.1f} {bf16:>10.1f} {bf16 / fp32:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
