"""End of a run: evaluate the best weights on the validation split and write the
confusion matrix, per-class scores, the most confident mistakes, the reliability diagram,
curves and ``summary.json``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from imgclf.data.cache import Dataset
from imgclf.data.dup_check import train_duplicates
from imgclf.data.loader import BatchLoader
from imgclf.evaluate.metrics import (
    compute_metrics,
    duplicate_free_scores,
    infer,
    write_confusion_csv,
    write_per_class_csv,
)
from imgclf.evaluate.mistakes import GRID_MAX, plot_mistakes, top_mistakes, write_mistakes_csv
from imgclf.evaluate.tta import TTA
from imgclf.models.restore import load_weights
from imgclf.runtime.checkpoint import load_checkpoint
from imgclf.runtime.device import Hardware
from imgclf.train.adapt import Adapted
from imgclf.train.budget import Plan
from imgclf.train.cached_eval import CachedVal, final_network
from imgclf.train.final import FinalFit
from imgclf.train.recipe import Recipe
from imgclf.train.rundir import write_json
from imgclf.train.state import Progress


@dataclass
class FinishInputs:
    """What the end of a run reads: the run folder and model, what it was trained from
    and with, and what training recorded (metrics rows, progress, a budget's plan)."""

    out: Path
    model: nn.Module
    recipe: Recipe
    ds: Dataset
    val_loader: BatchLoader | None
    rows: list[dict[str, Any]]  # metrics.csv, one row an epoch
    progress: Progress
    plan: Plan | None
    steps_per_epoch: int
    adapted: Adapted
    hw: Hardware
    threads: int
    started: float  # time.perf_counter() when train() began, in this process
    final: FinalFit | None = None  # a final fit (no validation split to evaluate on)
    train_images: int = 0  # images an epoch trains on
    # The last stage's cached validation activations (imgclf.train.cached_eval).
    cached_val: CachedVal | None = None


def finish_run(run: FinishInputs) -> dict[str, Any]:
    """Load ``best.pt`` into the model, evaluate it on the validation split (with TTA when
    the recipe has it), write the confusion matrix, per-class scores, mistakes, curves and
    ``summary.json``; returns the summary."""
    from imgclf.evaluate.plots import plot_curves

    out, model = run.out, run.model
    best = out / "best.pt"
    state = load_checkpoint(best)["model_state"] if best.is_file() else None
    # Decided before best.pt is loaded: while the model holds the cached prefix's weights.
    cached = final_network(run.cached_val, model, state, run.recipe, run.hw)
    if state is not None:
        load_weights(model, state, str(best))
    summary: dict[str, Any] = {
        "recipe": run.recipe.name,
        "model": model.name,
        "dataset": run.ds.name,
        "classes": list(run.ds.classes),
        "input_size": model.input_size,
        "epochs": len(run.rows),
        "best_epoch": run.progress.best_epoch,
        "train_seconds": round(run.progress.seconds, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(run.hw.device),
        "precision": run.hw.precision,
        "threads": run.threads,
    }
    if run.rows:
        summary["images_per_second"] = round(run.rows[-1]["images_per_second"], 1)
        plot_curves(run.rows, out / "curves.png", title=f"{run.recipe.name} on {run.ds.name}")
    if run.val_loader is not None:
        summary.update(_evaluate(run, cached))
    summary["images_seen"] = run.progress.images_seen
    # A final fit trained on the validation images: no val_* score (its val_loader is None)
    # and, instead, the run whose validation chose its settings (imgclf.train.final).
    summary["final"] = run.final is not None
    if run.final is not None:
        summary.update(run.final.summary(run.ds, run.train_images))
    summary["init_from"] = run.recipe.init  # the weights it started from (--init), or None
    if run.plan is not None:  # what a time budget bought on this machine
        summary.update(_budget_summary(run.plan, run.steps_per_epoch))
    summary["batchnorm"] = "frozen" if run.adapted.freeze_bn else "train"
    summary["batch_size"] = run.adapted.batch_size
    summary["source_size"] = list(run.ds.image_size)
    # Guard-rail warnings (chance level, a stage ending below the previous one): a run
    # that learnt nothing must not look like a finished one.
    summary["warnings"] = list(run.progress.warnings)
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    # From train() to here in this process (a resumed run counts from its resume).
    summary["wall_seconds"] = round(time.perf_counter() - run.started, 2)
    summary["torch_threads"] = torch.get_num_threads()
    write_json(out / "summary.json", summary)
    return summary


def _evaluate(run: FinishInputs, cached: CachedVal | None = None) -> dict[str, Any]:
    """The validation split's scores and files: confusion, per-class, mistakes and the
    reliability diagram (calibration, imgclf.evaluate.calibration). ``cached``: the
    prefix's activations the network's forward would compute first (final_network)."""
    from imgclf.evaluate.plots import plot_confusion, plot_reliability

    started = time.perf_counter()
    name, classes = run.recipe.name, run.ds.classes
    assert run.val_loader is not None
    net, batches = TTA(run.model) if run.recipe.tta else run.model, run.val_loader
    if cached is not None:
        net, batches = cached.suffix, cached.batches(run.val_loader.batch_size)
    logits, labels = infer(net, batches, autocast_dtype=run.hw.autocast_dtype)
    metrics = compute_metrics(logits, labels, classes)
    write_confusion_csv(metrics, run.out / "confusion.csv")
    write_per_class_csv(metrics, run.out / "per_class.csv")
    plot_confusion(
        metrics.confusion,
        classes,
        run.out / "confusion_matrix.png",
        title=f"{name}: validation accuracy {metrics.accuracy:.4f}, "
        f"balanced {metrics.balanced_accuracy:.4f}",
    )
    _write_mistakes(run, logits, labels)
    assert metrics.calibration is not None  # compute_metrics always bins the predictions
    plot_reliability(metrics.calibration, run.out / "reliability.png", title=f"{name}: validation")
    top5 = {} if metrics.top5_accuracy is None else {"val_top5_accuracy": metrics.top5_accuracy}
    return dict(
        val_accuracy=round(metrics.accuracy, 6),
        val_balanced_accuracy=round(metrics.balanced_accuracy, 6),
        val_loss=round(metrics.loss, 6),
        val_macro_f1=round(metrics.macro_f1, 6),
        **{k: round(v, 6) for k, v in top5.items()},
        val_ece=round(metrics.calibration.ece, 6),
        val_count=metrics.count,
        # Accuracy without the val images that have a near duplicate in train (null
        # when none has): imgclf.data.dup_check.train_duplicates.
        val_duplicate_free=duplicate_free_scores(logits, labels, train_duplicates(run.ds, "val")),
        tta=run.recipe.tta,
        eval_seconds=round(time.perf_counter() - started, 2),
    )


def _budget_summary(plan: Plan, steps_per_epoch: int) -> dict[str, Any]:
    return {
        "budget_seconds": plan.budget_seconds,
        "planned_epochs": round(sum(plan.stage_epochs), 3),
        # Trained, after any re-plan on the way (the plan shrinks when the machine is
        # slower than its probe said).
        "trained_epochs": round(plan.epochs_done(steps_per_epoch), 3),
        "plan": plan.text,
    }


def _dataset_files(ds: Dataset) -> list[str] | None:
    # Source paths make a mistake findable on disk; a dataset without a readable files.csv
    # (or one out of step with its arrays) still gets its mistakes, without paths.
    try:
        files = ds.files()
    except (OSError, KeyError, ValueError):
        return None
    return files if len(files) == len(ds.labels) else None


def _write_mistakes(run: FinishInputs, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """``mistakes.csv`` (every wrong validation prediction, most confident first) and
    ``mistakes.png`` (the first :data:`GRID_MAX` of them as captioned thumbnails)."""
    out, ds = run.out, run.ds
    probs = torch.softmax(logits.float(), dim=1).numpy()
    mistakes = top_mistakes(probs, labels.numpy(), k=None)
    val_idx = ds.indices("val")  # the val loader's order: position i is sample val_idx[i]
    write_mistakes_csv(
        mistakes,
        ds.classes,
        out / "mistakes.csv",
        dataset_indices=val_idx,
        files=_dataset_files(ds),
    )
    grid = mistakes[:GRID_MAX]
    if not grid:
        # a resumed run may have left one behind: no image means no mistakes
        (out / "mistakes.png").unlink(missing_ok=True)
        return
    images = ds.images[val_idx[[m.index for m in grid]]]  # only these pages of the memmap
    shown = f"all {len(grid)}" if len(grid) == len(mistakes) else f"{len(grid)} of {len(mistakes)}"
    title = (
        f"{run.recipe.name}: {shown} validation mistakes ({len(labels)} images), "
        "most confident first"
    )
    plot_mistakes(images, grid, ds.classes, out / "mistakes.png", title=title)
