"""Inference and metrics, kept apart: ``infer`` turns batches into logits once, and
everything else (metrics, ensembles, prediction files) is a function of those logits.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imgclf.csv_safe import write_csv
from imgclf.evaluate.calibration import ECE_BINS, Reliability, reliability, top_k_accuracy

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]

# Probabilities are clipped before the log, as sklearn.metrics.log_loss does with the
# machine epsilon of the input dtype: float32 here, the dtype our models produce.
_PROB_EPS = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------------- inference


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    # Restore each module's own flag rather than calling model.train(): the trainer keeps
    # frozen BatchNorm layers in eval mode, and a blanket train() would wake them up.
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def infer(
    model: torch.nn.Module,
    batches: Iterable[tuple[Any, Any]],
    *,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over ``(x, y)`` batches.

    Returns ``(logits, labels)``: float32 ``(N, C)`` and int64 ``(N,)``, both on the CPU.
    ``device`` defaults to the model's own device; inputs are moved there. Autocast is
    used only when ``autocast_dtype`` is given (e.g. ``torch.bfloat16``). Each module's
    train/eval flag is restored afterwards. No batches gives empty tensors.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    logits_parts: list[torch.Tensor] = []
    label_parts: list[torch.Tensor] = []
    with _eval_mode(model), torch.inference_mode(), _autocast(device, autocast_dtype):
        for x, y in batches:
            logits = model(x.to(device, non_blocking=True))
            logits_parts.append(logits.float().cpu())
            label_parts.append(torch.as_tensor(y).reshape(-1).to("cpu", torch.int64))
    if not logits_parts:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(logits_parts), torch.cat(label_parts)


# ---------------------------------------------------------------------------- metrics


# eq=False: a generated __eq__ would compare numpy arrays and raise on truth value
@dataclass(frozen=True, eq=False)
class Metrics:
    """Scores of one set of predictions. Per-class arrays follow ``class_names``."""

    class_names: list[str]
    count: int
    accuracy: float  # fraction in [0, 1]
    # Mean recall over the classes that occur in the labels, as sklearn's
    # balanced_accuracy_score: a class with no samples has no recall (0/0) and is left out
    # rather than counted as 0. Equals accuracy when every class has the same support.
    balanced_accuracy: float
    loss: float  # mean cross-entropy (NLL of clipped probabilities when scored from probs)
    confusion: np.ndarray  # (C, C) int64, rows = true class, cols = predicted class
    precision: np.ndarray  # (C,), 0 where nothing was predicted as the class
    recall: np.ndarray  # (C,), 0 where the class has no samples
    f1: np.ndarray  # (C,)
    support: np.ndarray  # (C,) int64, true samples per class
    # Unweighted means over *all* classes, as sklearn's average="macro" with every class
    # listed and zero_division=0: a class with no samples scores 0 precision, recall and
    # F1 (none of its predictions can be right), so it pulls these means down. Kept as
    # sklearn defines it, so the numbers can be checked against sklearn directly.
    macro_precision: float
    macro_recall: float
    macro_f1: float
    # Whether the true class is among the 5 highest scores (ImageNet's classic measure);
    # None with 5 classes or fewer, where it says nothing.
    top5_accuracy: float | None = None
    # The predictions binned by confidence, and their expected calibration error
    # (imgclf.evaluate.calibration, Guo et al. 2017, 15 bins).
    calibration: Reliability | None = None
    # Accuracy without the images that have a near duplicate in train, when some do
    # (duplicate_free_scores); None otherwise.
    duplicate_free: dict[str, Any] | None = None
    # The splits among these images that the scored model trained on (empty: held out),
    # as imgclf.evaluate.runs finds them; None: not asked (scores inside training, votes).
    trained_on: tuple[str, ...] | None = None

    @property
    def ece(self) -> float | None:
        return None if self.calibration is None else self.calibration.ece

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; non-finite numbers become ``None`` (JSON has no NaN)."""
        per_class = [
            {
                "class": name,
                "precision": _json_float(self.precision[i]),
                "recall": _json_float(self.recall[i]),
                "f1": _json_float(self.f1[i]),
                "support": int(self.support[i]),
            }
            for i, name in enumerate(self.class_names)
        ]
        held_out = {}
        if self.trained_on is not None:
            held_out = {"held_out": not self.trained_on, "trained_on": list(self.trained_on)}
        return {
            **held_out,
            "count": self.count,
            "accuracy": _json_float(self.accuracy),
            "balanced_accuracy": _json_float(self.balanced_accuracy),
            "loss": _json_float(self.loss),
            "macro_precision": _json_float(self.macro_precision),
            "macro_recall": _json_float(self.macro_recall),
            "macro_f1": _json_float(self.macro_f1),
            "top5_accuracy": None if self.top5_accuracy is None else float(self.top5_accuracy),
            "ece": None if self.ece is None else _json_float(self.ece),
            "ece_bins": None if self.calibration is None else self.calibration.bins,
            "class_names": list(self.class_names),
            "per_class": per_class,
            "confusion": self.confusion.tolist(),
            "duplicate_free": self.duplicate_free,
        }


def duplicate_free_scores(
    logits: ArrayLike, labels: ArrayLike, leaked: np.ndarray | None
) -> dict[str, Any] | None:
    """Accuracy on the images without a near duplicate in train (``leaked`` False), with
    how many there are and how many were left out; None when none was left out. Barz &
    Denzler (J. Imaging 2020) found 3.3% of CIFAR-10's test images near-duplicated in
    its training set: on those a model is partly scored on images it trained on."""
    if leaked is None or not leaked.any():
        return None
    correct = _to_numpy(logits).argmax(axis=1) == _to_numpy(labels)
    clean = correct[~leaked]
    return {
        "accuracy": float(clean.mean()) if len(clean) else None,
        "count": len(clean),
        "with_train_duplicate": int(leaked.sum()),
    }


def _json_float(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _to_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _mean_nll(scores: np.ndarray, labels: np.ndarray, from_probs: bool) -> float:
    scores = scores.astype(np.float64, copy=False)
    rows = np.arange(len(labels))
    if from_probs:
        picked = np.clip(scores[rows, labels], _PROB_EPS, 1.0)
        return float(-np.log(picked).mean())
    # log-softmax via the max-shifted log-sum-exp, stable for large logits
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float((log_norm - shifted[rows, labels]).mean())


def _probabilities(scores: np.ndarray, from_probs: bool) -> np.ndarray:
    scores = scores.astype(np.float64, copy=False)
    if from_probs:
        return scores
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))  # softmax, overflow-free
    return shifted / shifted.sum(axis=1, keepdims=True)


def _check_inputs(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(
            f"scores must have shape (N, {num_classes}) to match class_names, got {scores.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(scores):
        raise ValueError(f"labels must have shape ({len(scores)},), got {labels.shape}")
    if len(labels) == 0:
        raise ValueError("no samples to score")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )


def _per_class(
    labels: np.ndarray, predicted: np.ndarray, num_classes: int
) -> tuple[np.ndarray, ...]:
    """The confusion matrix (true class by row) and each class's precision, recall, F1 and
    support, as ``sklearn.metrics.confusion_matrix`` and ``precision_recall_fscore_support
    (labels=every class, average=None, zero_division=0)`` compute them (sklearn 1.9
    ``_classification.py``: the same float64 divisions, F1 = 2·tp / (true + predicted), 0
    where a denominator is 0), so the same numbers to the bit (tests/test_evaluate.py)
    without importing sklearn and scipy: 1.5 s of a 250-photo run's start on a loaded
    2-core CPU (docs/results.md, issue #30)."""
    cells = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    confusion = cells.reshape(num_classes, num_classes).astype(np.int64)
    tp = np.diag(confusion)
    support, predicted_count = confusion.sum(axis=1), confusion.sum(axis=0)
    precision = _divide(tp, predicted_count)
    recall = _divide(tp, support)
    f1 = _divide(2.0 * tp, support.astype(np.float64) + predicted_count)
    return confusion, precision, recall, f1, support


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` in float64, 0 where the denominator is 0."""
    out = np.zeros(len(denominator), dtype=np.float64)
    return np.divide(numerator, denominator, out=out, where=denominator != 0)


def compute_metrics(
    logits_or_probs: ArrayLike,
    labels: ArrayLike,
    class_names: Sequence[str],
    *,
    from_probs: bool = False,
) -> Metrics:
    """Score ``(N, C)`` logits (or probabilities with ``from_probs=True``) against labels."""
    scores = _to_numpy(logits_or_probs)
    labels = _to_numpy(labels).astype(np.int64, copy=False)
    num_classes = len(class_names)
    _check_inputs(scores, labels, num_classes)

    predicted = scores.argmax(axis=1)
    # Every class gets a row, those absent from this split too.
    confusion, precision, recall, f1, support = _per_class(labels, predicted, num_classes)
    return Metrics(
        class_names=list(class_names),
        count=len(labels),
        accuracy=float((predicted == labels).mean()),
        balanced_accuracy=float(recall[support > 0].mean()),  # labels are non-empty: ≥ 1 class
        loss=_mean_nll(scores, labels, from_probs),
        confusion=confusion,
        precision=precision.astype(np.float64),
        recall=recall.astype(np.float64),
        f1=f1.astype(np.float64),
        support=support.astype(np.int64),
        macro_precision=float(precision.mean()),
        macro_recall=float(recall.mean()),
        macro_f1=float(f1.mean()),
        top5_accuracy=top_k_accuracy(scores, labels, 5) if num_classes > 5 else None,
        calibration=reliability(_probabilities(scores, from_probs), labels, ECE_BINS),
    )


# ---------------------------------------------------------------------------- writers


def _fmt(value: float) -> str:
    return f"{value:.6f}"


def write_confusion_csv(metrics: Metrics, path: str | os.PathLike[str]) -> None:
    """Confusion matrix as CSV: header ``true\\pred,<classes>``, one row per true class."""
    header = ["true\\pred", *metrics.class_names]
    rows = [
        [name, *(int(n) for n in counts)]
        for name, counts in zip(metrics.class_names, metrics.confusion, strict=True)
    ]
    write_csv(path, [header, *rows])  # class names neutralised (imgclf.csv_safe)


def write_per_class_csv(metrics: Metrics, path: str | os.PathLike[str]) -> None:
    """Columns ``class,precision,recall,f1,support``; then ``macro avg`` and ``accuracy``
    rows laid out as in sklearn's classification_report (accuracy in the f1 column)."""
    rows: list[list[Any]] = [["class", "precision", "recall", "f1", "support"]]
    for i, name in enumerate(metrics.class_names):
        rows.append(
            [
                name,
                _fmt(metrics.precision[i]),
                _fmt(metrics.recall[i]),
                _fmt(metrics.f1[i]),
                int(metrics.support[i]),
            ]
        )
    rows.append(
        [
            "macro avg",
            _fmt(metrics.macro_precision),
            _fmt(metrics.macro_recall),
            _fmt(metrics.macro_f1),
            metrics.count,
        ]
    )
    rows.append(["accuracy", "", "", _fmt(metrics.accuracy), metrics.count])
    write_csv(path, rows)
