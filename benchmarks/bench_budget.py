"""A budgeted run against one of chosen epochs (issue #11): is ``--time T`` as good as
``--epochs E`` when T is what E epochs took?

    python benchmarks/bench_budget.py --data c10 --recipe fast --epochs 4

Trains RECIPE for --epochs E and measures its wall time W (train() call to the end of the
final evaluation); then trains the same recipe with ``time_budget=W``. Prints both
validation accuracies, the budgeted run's wall time against W (target: within +5%), and
what the budget bought (epochs, images). Run it alone on the machine: the budgeted run
plans from a probe of this machine's speed, and a second heavy job changes that speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "")
    has = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()]
    return f"{fields.get('Model name', '?').strip()} ({', '.join(has) or 'no AVX2'})"


def main() -> None:
    from imgclf.train import train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="an imported dataset with a val split")
    p.add_argument("--recipe", default="fast")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--runs-dir", default="runs/bench-budget")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    runs = Path(args.runs_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    started = time.perf_counter()
    by_epochs = train(
        args.recipe,
        args.data,
        epochs=args.epochs,
        overrides=args.set,
        out=runs / f"epochs-{stamp}",
        progress=False,
    )
    wall = time.perf_counter() - started

    started = time.perf_counter()
    by_time = train(
        args.recipe,
        args.data,
        time_budget=wall,
        overrides=args.set,
        out=runs / f"time-{stamp}",
        progress=False,
    )
    budget_wall = time.perf_counter() - started

    a, b = by_epochs.summary, by_time.summary
    result = {
        "cpu": cpu_model(),
        "recipe": args.recipe,
        "data": args.data,
        "epochs": args.epochs,
        "epochs_wall_s": round(wall, 1),
        "epochs_val_accuracy": a["val_accuracy"],
        "budget_s": round(wall, 1),
        "budget_wall_s": round(budget_wall, 1),
        "budget_overrun": round(budget_wall / wall - 1, 4),
        "budget_planned_epochs": b["planned_epochs"],
        "budget_trained_epochs": b["trained_epochs"],
        "budget_images_seen": b["images_seen"],
        "budget_val_accuracy": b["val_accuracy"],
        "accuracy_gap_points": round(100 * (b["val_accuracy"] - a["val_accuracy"]), 2),
        "plan": b["plan"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
