"""Suspect labels (issue #33, item 2): how many planted label flips ``data check --labels``
finds, and what it costs.

Flips ``--flip`` (5%) of a data set's training labels at random (seeded: each chosen
image gets a uniformly drawn other class), imports that copy (``import_arrays``: the
shared data set is never modified), runs the check on it end to end and prints recall
and precision of the flipped images among the top-ranked suspects (the ranking of every
training image by score, and the confident-learning set the CSV lists), and the seconds
of the feature pass and of the folds. Then the same check on the data set as imported:
its top suspects, likely real label errors, to look at in its gallery. Prints JSON lines;
run it alone on the machine.

    IMGCLF_HOME=/tmp/labels-home python benchmarks/bench_label_issues.py clothing224
    ... --grid   # also the weight decays and rankings on one feature pass (docs/results.md)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def flip_labels(labels: np.ndarray, classes: int, share: float, seed: int) -> np.ndarray:
    """(a copy of ``labels`` with ``round(share × N)`` of them, drawn at random, each
    moved to a uniformly drawn other class; the indices moved)."""
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(labels), size=round(share * len(labels)), replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, classes, len(flipped))) % classes
    return noisy, np.sort(flipped)


def scores(check, flipped: np.ndarray) -> dict:
    """Recall and precision of ``flipped`` (positions in the check's training order)."""
    n, planted = len(check.labels), np.zeros(len(check.labels), bool)
    planted[flipped] = True
    order = np.argsort(check.issues.score, kind="stable")  # every image, most suspect first
    top10, topk = order[: n // 10], order[: len(flipped)]
    flagged = check.issues.ranked
    return {
        "images": n,
        "flipped": len(flipped),
        "recall_top10pct": round(float(planted[top10].sum() / len(flipped)), 4),
        "precision_top10pct": round(float(planted[top10].mean()), 4),
        "precision_at_flipped": round(float(planted[topk].mean()), 4),
        "flagged": len(flagged),
        "flagged_precision": round(float(planted[flagged].mean()), 4) if len(flagged) else None,
        "flagged_recall": round(float(planted[flagged].sum() / len(flipped)), 4),
    }


def run_check(ds, out: Path, **options) -> tuple[object, float]:
    from imgclf.evaluate.label_issues import find_label_issues

    started = time.perf_counter()
    check = find_label_issues(ds, out, say=lambda line: print(f"# {line}"), **options)
    return check, time.perf_counter() - started


def flipped_copy(ds, share: float, seed: int, home: Path):
    """The training split with ``share`` of its labels flipped, imported as its own set."""
    from imgclf.data.importer import import_arrays

    train = ds.indices("train")
    labels = np.asarray(ds.labels[train], dtype=np.int64)
    noisy, flipped = flip_labels(labels, len(ds.classes), share, seed)
    name = f"{ds.name}-flip{round(share * 100)}"
    copy = import_arrays(
        np.asarray(ds.images[train]),
        noisy,
        list(ds.classes),
        name,
        val_fraction=0.0,
        source=f"{ds.name}[train] with {len(flipped)} labels flipped (seed {seed})",
        warn=lambda line: None,
        dest=home / name,
    )
    return copy, labels, flipped


def grid(ds, seed: int) -> Iterator[tuple[float, str, float, object]]:
    """Weight decays × rankings on one feature pass of the flipped copy ``ds``."""
    import torch

    from imgclf.evaluate.confident import confident_issues
    from imgclf.train.backbone_features import dataset_features
    from imgclf.train.out_of_fold import cross_validate
    from imgclf.train.recipe import load_recipe

    idx = ds.indices("train")
    labels = np.asarray(ds.labels[idx], dtype=np.int64)
    stored = dataset_features(ds, load_recipe("lite0-photo"), say=lambda s: None)
    features = torch.from_numpy(np.asarray(stored.features[idx], dtype=np.float32))
    for decay in (0.01, 0.1, 1.0, 10.0):
        probs, _ = cross_validate(features, labels, len(ds.classes), seed=seed, weight_decay=decay)
        loss = float(-np.log(probs[np.arange(len(labels)), labels]).mean())
        for rank_by in ("self_confidence", "normalized_margin"):
            issues = confident_issues(probs, labels, rank_by)
            yield decay, rank_by, loss, issues


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("data", help="an imported data set (clothing224)")
    p.add_argument("--flip", type=float, default=0.05, help="share of labels flipped (0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the flips (0)")
    p.add_argument("--grid", action="store_true", help="also the weight-decay grid")
    args = p.parse_args()

    from imgclf.data import load_dataset

    ds = load_dataset(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy, clean, flipped = flipped_copy(ds, args.flip, args.seed, work / "datasets")
        check, seconds = run_check(copy, work / "flipped-check")
        row = scores(check, flipped)
        found = np.intersect1d(flipped, check.issues.ranked)  # flips in the CSV
        right = check.issues.suggested[found] == clean[found]
        row["found_suggested_true_class"] = round(float(right.mean()), 4) if len(found) else None
        row.update(
            feature_seconds=round(check.feature_seconds, 1),
            fold_seconds=round(check.fold_seconds, 1),
            total_seconds=round(seconds, 1),
            oof_accuracy_given=round(check.accuracy, 4),
            oof_accuracy_true=round(float((check.probs.argmax(1) == clean).mean()), 4),
        )
        print(json.dumps({"set": copy.name, **row}))
        if args.grid:
            planted = np.zeros(len(clean), bool)
            planted[flipped] = True
            n = len(clean)
            for decay, rank_by, loss, issues in grid(copy, args.seed):
                order = np.argsort(issues.score, kind="stable")[: n // 10]
                print(
                    json.dumps(
                        {
                            "weight_decay": decay,
                            "rank_by": rank_by,
                            "oof_log_loss": round(loss, 4),
                            "recall_top10pct": round(float(planted[order].sum() / len(flipped)), 4),
                            "flagged": len(issues.ranked),
                            "flagged_precision": round(float(planted[issues.ranked].mean()), 4),
                            "flagged_recall": round(
                                float(planted[issues.ranked].sum() / len(flipped)), 4
                            ),
                        }
                    )
                )
    out = Path(f"{ds.name}-check")
    check, seconds = run_check(ds, out)
    top = [dict(zip(("file", "given", "suggested", "score"), r, strict=True)) for r in check.rows]
    print(
        json.dumps(
            {
                "set": ds.name,
                "images": len(check.labels),
                "flagged": len(check.rows),
                "oof_accuracy": round(check.accuracy, 4),
                "feature_seconds": round(check.feature_seconds, 1),
                "fold_seconds": round(check.fold_seconds, 1),
                "total_seconds": round(seconds, 1),
                "top": top[:16],
                "out": str(out),
            }
        )
    )


if __name__ == "__main__":
    main()
