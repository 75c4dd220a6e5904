"""The run folder: resolved config, metrics CSV, TensorBoard events, plots, summary.

``runs/<recipe>-<n>/`` holds everything needed to judge and reuse a run:
``config.yaml``, ``metrics.csv``, ``last.pt``/``best.pt``, ``curves.png``,
``confusion_matrix.png``/``confusion.csv``, ``per_class.csv``, ``summary.json`` and
TensorBoard event files (``tb/``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgclf.io_utils import atomic_write_text

METRIC_COLUMNS = [
    "stage",
    "epoch",
    "stage_epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "seconds",
    "images_per_second",
]


def new_run_dir(recipe_name: str, base: Path = Path("runs")) -> Path:
    """``runs/<recipe>-<n>`` with the next free n, created now (so two runs never share)."""
    base.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", recipe_name) or "run"
    taken = [
        int(m.group(1))
        for p in base.iterdir()
        if (m := re.fullmatch(re.escape(safe) + r"-(\d+)", p.name))
    ]
    n = max(taken, default=0) + 1
    while True:
        path = base / f"{safe}-{n}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        conv: dict[str, Any] = {}
        for k, v in row.items():
            if k in ("stage", "epoch", "stage_epoch"):
                conv[k] = int(v)
            else:
                conv[k] = float(v) if v not in ("", None) else float("nan")
        out.append(conv)
    return out


@dataclass
class MetricsLog:
    """metrics.csv, rewritten atomically each epoch (a few KB): never a torn row."""

    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)

    def truncate(self, global_epoch: int) -> None:
        """Keep rows up to ``global_epoch``: a resume discards rows past its checkpoint."""
        self.rows = [r for r in read_metrics(self.path) if r["epoch"] <= global_epoch]
        self._write()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _fmt(r.get(k)) for k in METRIC_COLUMNS})
        atomic_write_text(self.path, buf.getvalue())


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if v != v else f"{v:.6g}"
    return v


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


class TensorBoard:
    """TensorBoard scalars; a no-op where tensorboard is not installed."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional at run time: the CSV holds the same numbers
            self.writer = None
        else:
            self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = row["epoch"]
        for key in ("train_loss", "val_loss"):
            if row.get(key) == row.get(key):  # skip NaN
                self.writer.add_scalar(f"loss/{key[:-5]}", row[key], step)
        for key in ("train_acc", "val_acc"):
            if row.get(key) == row.get(key):
                self.writer.add_scalar(f"accuracy/{key[:-4]}", row[key], step)
        self.writer.add_scalar("lr", row["lr"], step)
        self.writer.add_scalar("images_per_second", row["images_per_second"], step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
