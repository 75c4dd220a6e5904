"""Training throughput of every registered model at its recipe's resolution.

For each model: images/s of a full training step (forward, backward, SGD step) in
fp32 against bf16 autocast, NCHW against channels_last, eager against ``torch.compile``.
The trainer's defaults (imgclf.runtime.device) should pick the fastest row on the hardware.

    python benchmarks/bench_models.py                 # all models, default batch
    python benchmarks/bench_models.py --models fast simple --steps 3 --no-compile
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time

import torch
import torch.nn.functional as F

from imgclf.models import create, list_models
from imgclf.runtime.device import cpu_has_native_bf16, physical_cores

# Resolution each model is trained at by its bundled recipe.
RECIPE_SIZE = {"simple": 32, "complex": 32, "medium": 64, "fast": 32}


def images_per_second(
    name: str, size: int, batch: int, steps: int, bf16: bool, channels_last: bool, compiled: bool
) -> float:
    torch.manual_seed(0)
    kwargs = {"pretrained": False} if _is_pretrained(name) else {}
    model = create(name, num_classes=10, input_size=size, **kwargs)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=memory)
    y = torch.randint(0, 10, (batch,))
    net = torch.compile(model) if compiled else model

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: oneDNN primitive creation, compilation
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def _is_pretrained(name: str) -> bool:
    return next(s for s in list_models() if s.name == name).kind == "pretrained"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", help="default: every registered model")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--threads", type=int, default=physical_cores())
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--size", type=int, help="input size for every model (default: recipe's)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models or [s.name for s in list_models()]
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, native bf16: {cpu_has_native_bf16()}, batch {args.batch}"
    )
    print(f"{'model':<18} {'px':>4} {'precision':>9} {'layout':>13} {'mode':>8} {'img/s':>8}")
    modes = [False] if args.no_compile else [False, True]
    for name in names:
        size = args.size or RECIPE_SIZE.get(name, 64)
        bf16s = [p == "bf16" for p in args.precisions]
        for bf16, cl, compiled in itertools.product(bf16s, [False, True], modes):
            try:
                ips = images_per_second(name, size, args.batch, args.steps, bf16, cl, compiled)
                shown = f"{ips:8.1f}"
            except Exception as exc:  # a mode unsupported here is a row, not a crash
                shown = f"failed: {type(exc).__name__}"
            layout = "channels_last" if cl else "NCHW"
            mode = "compile" if compiled else "eager"
            prec = "bf16" if bf16 else "fp32"
            print(f"{name:<18} {size:>4} {prec:>9} {layout:>13} {mode:>8} {shown}", flush=True)


if __name__ == "__main__":
    main()
