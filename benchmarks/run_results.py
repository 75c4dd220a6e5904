"""Train recipes on a dataset and print accuracy and wall time: the numbers in
docs/results.md come from this script.

    python benchmarks/run_results.py --data cifar10 --runs-dir runs/results \\
        scratch-simple:5 scratch-complex:2 fast:2

Each argument is RECIPE[:EPOCHS][@SEED]. With --ensemble, the trained runs are then voted
together on the validation split (hard, soft, weighted) and compared with the best one.

What a quarter-hour buys, every bundled recipe on one machine (issue #11; 13 x 15 min):

    python benchmarks/run_results.py --data c10 --all --time 15m

--time gives every run without its own :EPOCHS a wall-time budget instead of the recipe's
epochs; the table then shows the epochs the budget bought. A recipe whose ImageNet
weights are not on this machine (offline, never downloaded), or that the budget cannot fit
(a 224-px feature cache of 45,000 images alone outlasts 15 min on a 2-core CPU), is listed
as not run, with the reason, and the rest go on.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def parse(spec: str) -> tuple[str, int | None, int | None]:
    seed = None
    if "@" in spec:
        spec, s = spec.split("@", 1)
        seed = int(s)
    epochs = None
    if ":" in spec:
        spec, e = spec.split(":", 1)
        epochs = int(e)
    return spec, epochs, seed


def main() -> None:
    from imgclf.errors import RecipeError, WeightsMissing
    from imgclf.evaluate.compare import compare_runs
    from imgclf.train import train
    from imgclf.train.ensemble_recipe import is_ensemble_recipe
    from imgclf.train.recipe import list_recipes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", metavar="RECIPE[:EPOCHS][@SEED]")
    p.add_argument("--all", action="store_true", help="every bundled recipe (imgclf recipes)")
    p.add_argument("--time", metavar="DURATION", help="budget per run (15m): see imgclf train")
    p.add_argument("--data", required=True)
    p.add_argument("--runs-dir", default="runs/results")
    p.add_argument("--ensemble", action="store_true", help="vote the runs together on val")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    singles = [name for name in list_recipes() if not is_ensemble_recipe(name)]
    specs = list(args.runs) + (singles if args.all else [])  # an ensemble: imgclf train
    if not specs:
        p.error("name at least one RECIPE, or --all")
    done = []
    print(f"{'recipe':<24} {'epochs':>6} {'seed':>4} {'val acc':>8} {'train s':>8} {'wall s':>8}")
    for spec in specs:
        recipe, epochs, seed = parse(spec)
        overrides = [f"seed={seed}"] if seed is not None else []
        started = time.perf_counter()
        try:
            run = train(
                recipe,
                args.data,
                epochs=epochs,
                time_budget=args.time if epochs is None else None,
                overrides=overrides,
                runs_dir=Path(args.runs_dir),
                threads=args.threads,
                progress=False,
            )
        except (WeightsMissing, RecipeError) as e:  # no weights here; a budget too short
            print(f"{recipe:<24} not run: {e}", flush=True)
            continue
        wall = time.perf_counter() - started
        s = run.summary
        bought = s.get("trained_epochs", s["epochs"])  # a budget's epochs, fractional
        print(
            f"{recipe:<24} {bought:>6.3g} {seed if seed is not None else 0:>4} "
            f"{s.get('val_accuracy', float('nan')):8.4f} {s['train_seconds']:8.1f} {wall:8.1f}"
            f"  {run.path}",
            flush=True,
        )
        done.append(run.path)
    if args.ensemble and len(done) > 1:
        comparison = compare_runs(done, args.data, split="val")
        print(comparison.table())


if __name__ == "__main__":
    main()
