"""End of a run: evaluate the best weights on the validation split and write the
confusion matrix, per-class scores, curves and ``summary.json``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from imgclf.evaluate.metrics import compute_metrics, infer, write_confusion_csv, write_per_class_csv
from imgclf.evaluate.tta import TTA
from imgclf.train.checkpoint import load_checkpoint
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
            title=f"{trainer.recipe.name}: validation accuracy {metrics.accuracy:.4f}",
        )
        summary.update(
            val_accuracy=round(metrics.accuracy, 6),
            val_loss=round(metrics.loss, 6),
            val_macro_f1=round(metrics.macro_f1, 6),
            val_count=metrics.count,
            tta=trainer.recipe.tta,
            eval_seconds=round(time.perf_counter() - started, 2),
        )
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    summary["torch_threads"] = torch.get_num_threads()
    write_json(out / "summary.json", summary)
    return summary
