"""What a report shows of a run folder, read from its files (nothing is recomputed).

A run folder is one with ``summary.json`` or ``metrics.csv`` (a run stopped early has only
the latter); every other file is optional, and what is missing is left out of the report.
An ensemble folder (ensemble.yaml) is its members' run folders, in its order.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imgclf.csv_safe import read_dicts
from imgclf.data.cache import resolve_dataset_dir
from imgclf.data.dup_check import PAIRS_PNG, SUMMARY_JSON
from imgclf.data.sources import natural_key
from imgclf.errors import DataError
from imgclf.evaluate.label_issues import CSV_NAME as LABEL_ISSUES_CSV
from imgclf.evaluate.label_issues import PNG_NAME as LABEL_ISSUES_PNG
from imgclf.inference.runs import unique_names
from imgclf.runtime.ensemble_file import is_ensemble_dir, member_dirs
from imgclf.runtime.schema import SummaryError, read_summary
from imgclf.train.rundir import read_metrics

# The run folder's images, in the order a run section shows them.
IMAGES = {
    "curves": "curves.png",
    "confusion": "confusion_matrix.png",
    "reliability": "reliability.png",
    "mistakes": "mistakes.png",
}
MISTAKES_SHOWN = 16  # rows of mistakes.csv a report lists: the ones in mistakes.png
LABEL_ISSUES_NOTE = (
    "training images whose given label the out-of-fold predictions of a pretrained "
    "backbone contradict (imgclf data check --labels; lower score = more suspect)"
)


def is_run_dir(path: Path) -> bool:
    return (path / "summary.json").is_file() or (path / "metrics.csv").is_file()


def find_runs(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """Run folders, each given directly or as a folder of run folders (natural order)."""
    found: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.is_dir():
            raise DataError(f"{path}: no such folder; give run folders or a folder of them")
        if is_run_dir(path):
            runs = [path]
        elif is_ensemble_dir(path):
            runs = member_dirs(path)
        else:
            children = [c for c in path.iterdir() if c.is_dir() and is_run_dir(c)]
            runs = sorted(children, key=lambda c: natural_key(c.name))
        if not runs:
            raise DataError(
                f"{path}: not a run folder (no summary.json or metrics.csv) "
                "and no run folders inside"
            )
        found += [r for r in runs if r.resolve() not in {f.resolve() for f in found}]
    return found


def vote_sources(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """What the report's ensemble section votes over: an ensemble folder as it is (so its
    ensemble.yaml's vote is the vote), every other path as its run folders."""
    out: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        out += [path] if is_ensemble_dir(path) else find_runs([path])
    return out


# How the report marks a final fit, which has no validation score: its training saw the
# validation images (issue #34).
FINAL_MARK = "final fit (trained on val)"


@dataclass
class RunInfo:
    path: Path
    name: str
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    per_class: list[dict[str, str]] = field(default_factory=list)
    # rows of mistakes.csv, most confident first; None when the run wrote none (older runs,
    # no validation split), [] when the model made no mistake
    mistakes: list[dict[str, str]] | None = None
    images: dict[str, Path] = field(default_factory=dict)  # key of IMAGES → existing file
    # The run's data set's last `imgclf data check` (its duplicates.json), if it was run
    duplicates: dict[str, Any] | None = None
    # rows of label_issues.csv in the run's data set folder (`imgclf data check --labels`),
    # most suspect first; None when that data set was never checked
    label_issues: list[dict[str, str]] | None = None

    # ------------------------------------------------------------ what the report shows

    def recipe_rows(self) -> list[tuple[str, str]]:
        s, c = self.summary, self.config
        dataset = c.get("dataset") or {}
        rows = [
            ("model", str(s.get("model") or c.get("model") or "?")),
            ("recipe", str(s.get("recipe") or c.get("name") or "?")),
            ("input size", _px(self.input_size)),
            ("epochs", str(self.epochs)),
            ("batch size", str(c.get("batch_size", "?"))),
            ("optimizer", describe_optimizer(c.get("optimizer") or {})),
            ("scheduler", describe_scheduler(c.get("scheduler") or {})),
            ("augmentation", describe_augment(c.get("augment") or {})),
            ("dataset", str(s.get("dataset") or dataset.get("name") or "?")),
            ("device", f"{s.get('device', '?')}, {s.get('precision', '?')}"),
        ]
        if c.get("label_smoothing"):
            rows.append(("label smoothing", str(c["label_smoothing"])))
        if self.final:
            rows.append(("fit", self.final_text()))
        return rows

    @property
    def final(self) -> bool:
        """A final fit (imgclf.train.final): config.yaml says so from its start."""
        return bool(self.summary.get("final") or self.config.get("final"))

    def final_text(self) -> str:
        """What a final fit trained on, and the validation run that chose its settings."""
        s = self.summary
        images = f", {s['final_images']:,} images" if s.get("final_images") else ""
        source = s.get("final_from") or {}
        chosen = "no validation run named"
        if source.get("run"):
            chosen = f"settings chosen by {source['run']}"
            if source.get("val_accuracy") is not None:
                chosen += f" at val accuracy {source['val_accuracy']:.4f}"
        return f"{FINAL_MARK}: train + val{images}, no validation score; {chosen}"

    def stage_rows(self) -> list[dict[str, str]]:
        """One row per stage of the recipe, with what its epochs reached."""
        stages = self.config.get("stages") or []
        default_lr = (self.config.get("optimizer") or {}).get("lr")
        count = max(len(stages), max((int(r["stage"]) for r in self.metrics), default=0))
        out = []
        for i in range(count):
            stage = stages[i] if i < len(stages) else {}
            rows = [r for r in self.metrics if int(r["stage"]) == i + 1]  # 1-based in the CSV
            val = [r["val_acc"] for r in rows if _finite(r.get("val_acc"))]
            trains = stage.get("train", "?")
            out.append(
                {
                    "stage": str(i + 1),
                    "name": str(stage.get("name") or ""),
                    "epochs": f"{len(rows)}/{stage.get('epochs', len(rows))}",
                    "trains": ", ".join(trains) if isinstance(trains, list) else str(trains),
                    "lr": _num(stage.get("lr") or default_lr),
                    "best val acc": f"{max(val):.4f}" if val else "",
                    "last train loss": f"{rows[-1]['train_loss']:.4f}" if rows else "",
                }
            )
        return out

    def score_rows(self) -> list[tuple[str, str]]:
        """The best weights' validation scores (empty for a run without a summary of them)."""
        s = self.summary
        shown = [
            ("accuracy", "val_accuracy"),
            ("balanced accuracy", "val_balanced_accuracy"),
            ("macro F1", "val_macro_f1"),
            ("top-5 accuracy", "val_top5_accuracy"),  # more than 5 classes only
            ("expected calibration error (15 bins)", "val_ece"),
            ("loss", "val_loss"),
        ]
        rows = [(label, _score(s.get(key))) for label, key in shown if s.get(key) is not None]
        if rows and s.get("val_count") is not None:
            rows.append(("images", str(s["val_count"])))
        return rows

    def mistake_rows(self) -> list[dict[str, str]]:
        """The mistakes the report lists: those in mistakes.png, confidence as a percent."""
        rows = []
        for row in (self.mistakes or [])[:MISTAKES_SHOWN]:
            rows.append(
                {
                    "#": row.get("rank", ""),
                    "true": row.get("true", ""),
                    "predicted": row.get("predicted", ""),
                    "confidence": _percent(row.get("confidence") or ""),
                    "file": row.get("file") or f"val image {row.get('val_index', '?')}",
                }
            )
        return rows

    def label_issue_rows(self) -> list[dict[str, str]]:
        """The suspect labels the report lists: those in the data set's gallery."""
        rows = (self.label_issues or [])[:MISTAKES_SHOWN]
        return [{"#": str(i), **row} for i, row in enumerate(rows, start=1)]

    @property
    def dataset_name(self) -> str:
        dataset = self.config.get("dataset") or {}
        return str(self.summary.get("dataset") or dataset.get("name") or "?")

    def comparison_row(self) -> dict[str, str]:
        s = self.summary
        acc = self.val_accuracy
        return {
            "run": self.name,
            "model": str(s.get("model") or self.config.get("model") or "?"),
            "recipe": str(s.get("recipe") or self.config.get("name") or "?"),
            "input": _px(self.input_size),
            "epochs": str(self.epochs),
            "params": f"{s['parameters']:,}" if "parameters" in s else "",
            "train time": _duration(s.get("train_seconds")),
            "val accuracy": FINAL_MARK if self.final else f"{acc:.4f}" if acc is not None else "",
            # older runs, and runs stopped before their summary, have neither: left blank
            "val balanced acc": _score(s.get("val_balanced_accuracy")),
            "val macro F1": _score(s.get("val_macro_f1")),
        }

    @property
    def input_size(self) -> Any:
        return self.summary.get("input_size") or self.config.get("input_size")

    @property
    def epochs(self) -> int:
        return int(self.summary.get("epochs") or len(self.metrics))

    @property
    def val_accuracy(self) -> float | None:
        acc = self.summary.get("val_accuracy")
        if acc is None:  # a run stopped before its summary: the best epoch so far
            val = [r["val_acc"] for r in self.metrics if _finite(r.get("val_acc"))]
            acc = max(val) if val else None
        return None if acc is None else float(acc)


def read_run(path: Path, name: str) -> RunInfo:
    info = RunInfo(path, name)
    info.summary = _summary(path / "summary.json")
    info.config = _read_yaml(path / "config.yaml")
    info.metrics = read_metrics(path / "metrics.csv")
    info.per_class = _read_csv(path / "per_class.csv")
    if (path / "mistakes.csv").is_file():
        info.mistakes = _read_csv(path / "mistakes.csv")
    info.images = {k: path / f for k, f in IMAGES.items() if (path / f).is_file()}
    _read_check(info)
    _read_label_issues(info)
    return info


def _read_check(info: RunInfo) -> None:
    """The duplicates summary and picture ``imgclf data check`` kept beside the run's
    data set (found by the path config.yaml records, else by name), when there is one."""
    places = []
    recorded = (info.config.get("dataset") or {}).get("path")
    if recorded:
        places.append(Path(recorded))
    name = info.summary.get("dataset")
    if isinstance(name, str) and name:
        with contextlib.suppress(DataError):  # a data set removed since: nothing to show
            places.append(resolve_dataset_dir(name))
    for place in places:
        folder = place.resolve()
        try:
            info.duplicates = json.loads((folder / SUMMARY_JSON).read_text())
        except (OSError, ValueError):
            continue
        if (folder / PAIRS_PNG).is_file():
            info.images["duplicates"] = folder / PAIRS_PNG
        return


def _read_label_issues(info: RunInfo) -> None:
    """The suspect labels that `imgclf data check --labels` left in the folder of the data
    set the run was trained on (config.yaml's dataset path), when there are any."""
    dataset = info.config.get("dataset") or {}
    if not isinstance(dataset, dict) or not dataset.get("path"):
        return
    folder = Path(str(dataset["path"]))
    if (folder / LABEL_ISSUES_CSV).is_file():
        info.label_issues = _read_csv(folder / LABEL_ISSUES_CSV)
    if (folder / LABEL_ISSUES_PNG).is_file():
        info.images["label_issues"] = folder / LABEL_ISSUES_PNG


def read_runs(paths: list[str | os.PathLike[str]]) -> list[RunInfo]:
    folders = find_runs(paths)
    names = unique_names([f.name for f in folders])
    return [read_run(f, n) for f, n in zip(folders, names, strict=True)]


# ---------------------------------------------------------------------------- describing


def describe_optimizer(opt: dict[str, Any]) -> str:
    if not opt:
        return "?"
    parts = [str(opt.get("name", "?")), f"lr {_num(opt.get('lr'))}"]
    if opt.get("name") == "sgd":
        parts.append(f"momentum {_num(opt.get('momentum'))}")
        if opt.get("nesterov"):
            parts.append("nesterov")
    if opt.get("weight_decay"):
        parts.append(f"weight decay {_num(opt['weight_decay'])}")
    return ", ".join(parts)


def describe_scheduler(sched: dict[str, Any]) -> str:
    name = sched.get("name")
    if not name:
        return "?"
    detail = {
        "step": lambda: f"×{_num(sched.get('gamma'))} every {sched.get('step_size')} epochs",
        "multistep": lambda: f"×{_num(sched.get('gamma'))} at epochs {sched.get('milestones')}",
        "onecycle": lambda: f"peak at {_num(sched.get('pct_start'))} of the steps",
    }.get(name, lambda: "")()
    if sched.get("warmup_epochs"):
        detail = ", ".join(filter(None, [detail, f"warm-up {sched['warmup_epochs']} epochs"]))
    return f"{name} ({detail})" if detail else str(name)


def describe_augment(aug: dict[str, Any]) -> str:
    parts = []
    if aug.get("crop_padding"):
        parts.append(f"random crop (padding {aug['crop_padding']})")
    if aug.get("flip"):
        parts.append("horizontal flip")
    if aug.get("cutout"):
        parts.append(f"cutout ({aug['cutout']} px)")
    return ", ".join(parts) or "none"


def short_number(value: str) -> str:
    """'0.912345' → '0.9123' (four decimals are what a reader compares); '3' stays '3'."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value else f"{number:.4f}"


def _percent(text: str) -> str:
    try:
        return f"{float(text):.1%}"
    except ValueError:
        return text


def _score(value: Any) -> str:
    return f"{float(value):.4f}" if _finite(value) else ""


def _num(value: Any) -> str:
    return "?" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _px(size: Any) -> str:
    return f"{size}×{size}" if isinstance(size, int) else str(size or "?")


def _duration(seconds: Any) -> str:
    if seconds is None:
        return ""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _summary(path: Path) -> dict[str, Any]:
    """The run's summary.json (:func:`imgclf.runtime.schema.read_summary`); ``{}`` where
    there is none, or where it is not what training wrote. A report shows every run it is
    given: one whose summary was edited or damaged is shown as a run stopped before its
    summary is (from metrics.csv and config.yaml), with a warning line naming the file and
    field, rather than failing the report of all the others."""
    try:
        return read_summary(path) or {}
    except SummaryError as exc:
        print(f"warning: {exc}; the report shows this run without it", file=sys.stderr)
        return {}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return read_dicts(f)  # names as they were, not as neutralised for spreadsheets
    except OSError:
        return []


ENSEMBLE_HEADER = ["", "kind", "accuracy", "balanced acc", "macro F1", ""]


def ensemble_table(comparison: Any) -> tuple[list[str], list[list[str]]]:
    """The ensemble table of both report formats, header and rows: each model, then each
    vote, with its role ("best model", "ensemble") in the last cell (empty for others)."""
    c = comparison
    rows = []
    for kind, name, m in c.rows():
        role = "best model" if kind == "model" and name == c.best_model else ""
        role = "ensemble" if kind == "vote" and name == c.vote else role
        label = name if kind == "model" else f"{name} vote"
        scores = [f"{m.accuracy:.4f}", f"{m.balanced_accuracy:.4f}", f"{m.macro_f1:.4f}"]
        rows.append([label, kind, *scores, role])
    return ENSEMBLE_HEADER, rows


def weights_text(comparison: Any) -> str | None:
    """ "weighted vote weights: a 0.5, b 1" where the vote was weighted, else None."""
    if not comparison.weights:
        return None
    shown = ", ".join(f"{n} {w:.4g}" for n, w in comparison.weights.items())
    return f"weighted vote weights: {shown}"


@dataclass
class Page:
    """What a report shows, whatever its format: the runs, then the comparison table of
    all of them, then the ensemble (``{"comparison": Comparison, "png": bytes}``)."""

    runs: list[RunInfo]
    title: str
    generated: str  # when, as text
    ensemble: dict | None = None

    def comparison_table(self) -> tuple[list[str], list[list[str]]]:
        rows = [r.comparison_row() for r in self.runs]
        return list(rows[0]), [list(row.values()) for row in rows]
