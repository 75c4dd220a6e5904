"""End of a run: evaluate the best weights on the validation split and write the
confusion matrix, per-class scores, the most confident mistakes, curves and
``summary.json``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from imgclf.evaluate.metrics import compute_metrics, infer, write_confusion_csv, write_per_class_csv
from imgclf.evaluate.mistakes import GRID_MAX, plot_mistakes, top_mistakes, write_mistakes_csv
from imgclf.evaluate.tta import TTA
from imgclf.runtime.checkpoint import load_checkpoint
from imgclf.train.rundir import write_json

if TYPE_CHECKING:
    from imgclf.train.loop import Trainer


def finish_run(trainer: Trainer) -> dict[str, Any]:
    from imgclf.evaluate.plots import plot_confusion, plot_curves

    out, model = trainer.out, trainer.model
    best = out / "best.pt"
    if best.is_file():
        model.load_state_dict(load_checkpoint(best)["model_state"])
    summary: dict[str, Any] = {
        "recipe": trainer.recipe.name,
        "model": model.name,
        "dataset": trainer.ds.name,
        "classes": list(trainer.ds.classes),
        "input_size": model.input_size,
        "epochs": len(trainer.log.rows),
        "best_epoch": trainer.progress.best_epoch,
        "train_seconds": round(trainer.progress.seconds, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(trainer.hw.device),
        "precision": trainer.hw.precision,
        "threads": trainer.threads,
    }
    rows = trainer.log.rows
    if rows:
        summary["images_per_second"] = round(rows[-1]["images_per_second"], 1)
        plot_curves(rows, out / "curves.png", title=f"{trainer.recipe.name} on {trainer.ds.name}")
    if trainer.val_loader is not None:
        started = time.perf_counter()
        net = TTA(model) if trainer.recipe.tta else model
        logits, labels = infer(net, trainer.val_loader, autocast_dtype=trainer.hw.autocast_dtype)
        metrics = compute_metrics(logits, labels, trainer.ds.classes)
        write_confusion_csv(metrics, out / "confusion.csv")
        write_per_class_csv(metrics, out / "per_class.csv")
        plot_confusion(
            metrics.confusion,
            trainer.ds.classes,
            out / "confusion_matrix.png",
            title=f"{trainer.recipe.name}: validation accuracy {metrics.accuracy:.4f}, "
            f"balanced {metrics.balanced_accuracy:.4f}",
        )
        _write_mistakes(trainer, logits, labels)
        summary.update(
            val_accuracy=round(metrics.accuracy, 6),
            val_balanced_accuracy=round(metrics.balanced_accuracy, 6),
            val_loss=round(metrics.loss, 6),
            val_macro_f1=round(metrics.macro_f1, 6),
            val_count=metrics.count,
            tta=trainer.recipe.tta,
            eval_seconds=round(time.perf_counter() - started, 2),
        )
    summary["images_seen"] = trainer.progress.images_seen
    if trainer.plan is not None:  # what a time budget bought on this machine
        summary["budget_seconds"] = trainer.plan.budget_seconds
        summary["planned_epochs"] = round(sum(trainer.plan.stage_epochs), 3)
        # Trained, after any re-plan on the way (the plan shrinks when the machine is
        # slower than its probe said).
        summary["trained_epochs"] = round(trainer.plan.epochs_done(len(trainer.train_loader)), 3)
        summary["plan"] = trainer.plan.text
    summary["batchnorm"] = "frozen" if trainer.adapted.freeze_bn else "train"
    summary["batch_size"] = trainer.adapted.batch_size
    summary["source_size"] = list(trainer.ds.image_size)
    # Guard-rail warnings (chance level, a stage ending below the previous one): a run
    # that learnt nothing must not look like a finished one.
    summary["warnings"] = list(trainer.progress.warnings)
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    # From train() to here in this process (a resumed run counts from its resume).
    summary["wall_seconds"] = round(time.perf_counter() - trainer.started, 2)
    summary["torch_threads"] = torch.get_num_threads()
    write_json(out / "summary.json", summary)
    return summary


def _dataset_files(trainer: Trainer) -> list[str] | None:
    # Source paths make a mistake findable on disk; a dataset without a readable files.csv
    # (or one out of step with its arrays) still gets its mistakes, without paths.
    try:
        files = trainer.ds.files()
    except (OSError, KeyError, ValueError):
        return None
    return files if len(files) == len(trainer.ds.labels) else None


def _write_mistakes(trainer: Trainer, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """``mistakes.csv`` (every wrong validation prediction, most confident first) and
    ``mistakes.png`` (the first :data:`GRID_MAX` of them as captioned thumbnails)."""
    out, ds = trainer.out, trainer.ds
    probs = torch.softmax(logits.float(), dim=1).numpy()
    mistakes = top_mistakes(probs, labels.numpy(), k=None)
    val_idx = ds.indices("val")  # the val loader's order: position i is sample val_idx[i]
    write_mistakes_csv(
        mistakes,
        ds.classes,
        out / "mistakes.csv",
        dataset_indices=val_idx,
        files=_dataset_files(trainer),
    )
    grid = mistakes[:GRID_MAX]
    if not grid:
        # a resumed run may have left one behind: no image means no mistakes
        (out / "mistakes.png").unlink(missing_ok=True)
        return
    images = ds.images[val_idx[[m.index for m in grid]]]  # only these pages of the memmap
    shown = f"all {len(grid)}" if len(grid) == len(mistakes) else f"{len(grid)} of {len(mistakes)}"
    title = (
        f"{trainer.recipe.name}: {shown} validation mistakes ({len(labels)} images), "
        "most confident first"
    )
    plot_mistakes(images, grid, ds.classes, out / "mistakes.png", title=title)
