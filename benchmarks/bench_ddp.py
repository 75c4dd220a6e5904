"""Data-parallel training on one machine (issue #12): 2 processes × 1 thread against
1 process × 2 threads, side by side, and the accuracy of each.

    python benchmarks/bench_ddp.py --data c10sub --models simple fast --epochs 1

For each model, trains ``--epochs`` of a one-stage recipe on ``--data`` (an imported data
set with a validation split) once as one process with ``--threads 2`` and once under
``torchrun --nproc-per-node 2`` with ``--threads 1`` each (gloo on the CPU), alternating
``--rounds`` times, and prints the trainer's own images/s (metrics.csv, reduced across
ranks) and the final validation accuracy of each. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

RECIPES = {
    # Recipe settings as the bundled ones, one stage, a global batch that divides by 2.
    "simple": {"batch_size": 128, "input_size": 32, "lr": 0.05},
    "fast": {"batch_size": 512, "input_size": 32, "lr": 0.2},
}


def recipe_file(model: str, epochs: int, folder: Path) -> Path:
    cfg = RECIPES[model]
    recipe = {
        "name": f"ddp-{model}",
        "model": model,
        "input_size": cfg["input_size"],
        "batch_size": cfg["batch_size"],
        "augment": {"crop_padding": 4, "flip": True},
        "optimizer": {"name": "sgd", "lr": cfg["lr"], "momentum": 0.9, "nesterov": True},
        "scheduler": {"name": "onecycle", "pct_start": 0.25},
        "label_smoothing": 0.1,
        "stages": [{"epochs": epochs}],
    }
    path = folder / f"{model}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def read(out: Path) -> tuple[float, float]:
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ips = sum(float(r["images_per_second"]) for r in rows) / len(rows)
    summary = json.loads((out / "summary.json").read_text())
    return ips, summary["val_accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--models", nargs="+", default=["simple", "fast"], choices=sorted(RECIPES))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    imgclf = [sys.executable, "-m", "imgclf"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for model in args.models:
            recipe = recipe_file(model, args.epochs, base)
            for r in range(args.rounds):
                one = base / f"{model}-1x2-{r}"
                run(
                    [
                        *imgclf,
                        "train",
                        str(recipe),
                        "--data",
                        args.data,
                        "--out",
                        str(one),
                        "--threads",
                        "2",
                        "--quiet",
                    ]
                )
                two = base / f"{model}-2x1-{r}"
                run(
                    [
                        *torchrun,
                        "--nproc-per-node",
                        "2",
                        "-m",
                        "imgclf",
                        "train",
                        str(recipe),
                        "--data",
                        args.data,
                        "--out",
                        str(two),
                        "--threads",
                        "1",
                        "--quiet",
                    ]
                )
                (ips1, acc1), (ips2, acc2) = read(one), read(two)
                results.append(
                    {
                        "model": model,
                        "epochs": args.epochs,
                        "1 process x 2 threads images/s": round(ips1, 1),
                        "2 processes x 1 thread images/s": round(ips2, 1),
                        "speed ratio 2x1 / 1x2": round(ips2 / ips1, 3),
                        "val accuracy 1x2": acc1,
                        "val accuracy 2x1": acc2,
                    }
                )
                print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
