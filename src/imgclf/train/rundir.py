"""The run folder: resolved config, metrics CSV, TensorBoard events, plots, summary.

``runs/<recipe>-<n>/`` holds everything needed to judge and reuse a run:
``config.yaml``, ``metrics.csv``, ``last.pt``/``best.pt``, ``curves.png``,
``confusion_matrix.png``/``confusion.csv``, ``per_class.csv``, ``summary.json`` and
TensorBoard event files (``tb/``). The metrics CSV and TensorBoard are written each epoch
by callbacks (imgclf.train.callbacks), with :class:`MetricsLog`'s rows.

One process trains in a run folder at a time: :func:`claim_run_dir` holds an exclusive
``flock`` on ``.imgclf-train.lock`` inside it for as long as the run lasts, and refuses a
folder that already holds another run unless told to replace it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgclf.csv_safe import csv_text, read_dicts
from imgclf.errors import UserError
from imgclf.io_utils import atomic_write_text, check_output_dir, make_folder
from imgclf.runtime import distributed
from imgclf.runtime.checkpoint import checkpoint_position

LOCK_NAME = ".imgclf-train.lock"
# Rank 0 of a torchrun job names the job's agents here (every node's), so that a restarted
# job recognises its own folder (launched_here): the run to resume, or the folder its killed
# first attempt made before any checkpoint (imgclf.runtime.distributed.launch_id).
LAUNCH_MARKER = ".imgclf-launch"
LOCK_PATIENCE = 1.0  # seconds a claim waits for a lock held by someone's early check
# Any one of these says a folder holds a run (a finished one, or one to --resume).
RUN_MARKERS = ("config.yaml", "metrics.csv", "last.pt", "best.pt", "summary.json")
# Everything a run writes (imgclf.train.trainer and .finish); --exist-ok removes exactly these.
RUN_FILES = (
    *RUN_MARKERS,
    "curves.png",
    "confusion_matrix.png",
    "confusion.csv",
    "per_class.csv",
    "mistakes.csv",
    "mistakes.png",
    "tb",
)
# errno values that mean "no room to write": a full disk, or a full quota.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class RunDirError(UserError):
    """A run folder that is busy, already holds a run, or cannot be written."""


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
    make_folder(base, instead="give --out")
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


def write_launch_marker(folder: Path, launch_ids: list[str] | None) -> None:
    """Name, in ``folder``, the torchrun agents that launched its run (one
    :func:`~imgclf.runtime.distributed.launch_id` per process, gathered by rank 0); None:
    not under torchrun, nothing written."""
    if launch_ids:
        names = "".join(f"{name}\n" for name in sorted(set(launch_ids)))
        atomic_write_text(folder / LAUNCH_MARKER, names)


def launched_here(folder: Path) -> bool:
    """Whether this worker's torchrun agent launched the run in ``folder``: a worker of a
    restarted job, whatever its TORCHELASTIC_RESTART_COUNT says. Every node's agent is
    named: with several nodes, an agent whose own workers did not fail restarts them
    with the count unchanged (a new rendezvous round, not a failure of its own), and a
    killed worker's node may no longer hold rank 0 after the restart."""
    try:
        return distributed.launch_id() in (folder / LAUNCH_MARKER).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_MARKERS)


def check_run_dir(folder: Path, *, exist_ok: bool = False) -> None:
    """Refuse now, before a model is built, a folder that is busy or holds a run (nothing
    is created). :func:`claim_run_dir` checks again under the lock: this is only early."""
    check_output_dir(folder)
    if (folder / LOCK_NAME).is_file():
        with _locked(folder, create=False):
            pass
    if not exist_ok and holds_run(folder):
        raise _taken(folder)


@contextlib.contextmanager
def claim_run_dir(
    folder: Path, *, exist_ok: bool = False, resume: dict[str, Any] | None = None
) -> Iterator[None]:
    """Hold ``folder`` for this process while the body trains in it.

    A second process (or a second call in this one) gets a :class:`RunDirError` naming
    the holder's pid. A fresh run refuses a folder that holds a run, or with ``exist_ok``
    removes that run's files (:data:`RUN_FILES`, and temporary files of interrupted
    writes) and says so; other files stay. ``resume``: the checkpoint state being resumed,
    read before the lock was held; refused if its file has moved on since.
    """
    with _locked(folder, create=True):
        if resume is not None:
            _check_unchanged(folder, resume)
        elif holds_run(folder):
            if not exist_ok:
                raise _taken(folder)
            removed = _remove_run_files(folder)
            print(
                f"--exist-ok: removed the previous run in {folder} ({', '.join(removed)}); "
                "other files there are kept",
                file=sys.stderr,
            )
        yield


def _check_unchanged(folder: Path, state: dict[str, Any]) -> None:
    path = Path(state["path"])
    if checkpoint_position(path) != state["position"]:
        raise RunDirError(
            f"{path} changed after it was read: another process trained in {folder} "
            "meanwhile; run the command again to resume from where it is now"
        )


def _taken(folder: Path) -> RunDirError:
    return RunDirError(
        f"{folder} already holds a run (one of {', '.join(RUN_MARKERS)}): choose another "
        f"--out, add --exist-ok to replace that run, or `imgclf train --resume {folder}` "
        "to continue it"
    )


@contextlib.contextmanager
def _locked(folder: Path, *, create: bool) -> Iterator[None]:
    """An exclusive, non-blocking flock on the folder's lock file. The kernel drops it when
    the file is closed or the process dies (kill -9 included): no stale locks to clean.
    The file itself stays: unlinking a flock file lets two processes lock two inodes."""
    try:
        import fcntl
    except ImportError:  # not Unix: no locking, as imgclf.data.cache's publish lock
        yield
        return
    if create:
        make_folder(folder, "--out")
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except OSError as exc:
        if not create:  # removed meanwhile, or unreadable: the claim decides
            yield
            return
        raise RunDirError(f"{folder}: cannot create {LOCK_NAME} ({exc.strerror})") from None
    try:
        # A claim retries for a moment: the holder may be another process's early check,
        # which takes the lock only for an instant.
        deadline = time.monotonic() + (LOCK_PATIENCE if create else 0.0)
        while not _try_flock(fcntl, fd):
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                raise RunDirError(
                    f"{folder} is in use: another imgclf process (pid {holder}) is training "
                    "in it; wait for it to end or choose another --out"
                )
            time.sleep(0.05)
        if create:  # only a claim names itself; the pid is a courtesy, so a full disk is no
            with contextlib.suppress(OSError):  # reason to refuse the lock
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _try_flock(fcntl: Any, fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def disk_full_is_an_error(folder: Path) -> Iterator[None]:
    """A write in the run that finds the disk (or quota) full becomes one line naming the
    folder and the checkpoint kept; metrics.csv loses the rows of epochs whose checkpoint
    was never written (the row is logged before the save), so it matches last.pt."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        last = folder / "last.pt"
        position = checkpoint_position(last) if last.is_file() else {"stage": 0, "epoch": 0}
        _roll_back_metrics(folder / "metrics.csv", position)
        if last.is_file():
            kept = f"the last good checkpoint {last} is kept; free some space, then `imgclf "
            kept += f"train --resume {folder}`"
        else:
            kept = "no checkpoint was written yet; free some space and train again"
        where = f" writing {Path(exc.filename).name}" if exc.filename else ""
        raise RunDirError(f"disk full in {folder}{where}: {kept}") from exc


def _roll_back_metrics(path: Path, position: dict[str, int] | None) -> None:
    if position is None or not path.is_file():  # unreadable last.pt: leave what is there
        return
    log = MetricsLog(path, read_metrics(path))
    with contextlib.suppress(OSError):  # still no room: a resume drops these rows itself
        log.roll_back(position["stage"], position["epoch"])


def _remove_run_files(folder: Path) -> list[str]:
    removed = []
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    for path in folder.glob(".*.tmp-*"):  # partial writes a kill left (imgclf.io_utils)
        if path.is_file():
            path.unlink(missing_ok=True)
    return removed


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = read_dicts(f)
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

    def roll_back(self, stage: int, epochs_done: int) -> None:
        """Keep rows up to a checkpoint's position (``stage`` 0-based, ``epochs_done`` in
        it), dropping epochs whose checkpoint was never written, on a full disk too: the
        file is cut in place, which needs no free block, where :meth:`truncate`'s atomic
        rewrite needs room for a second copy. Rows name their stage from 1."""
        self.rows = [
            r for r in self.rows if (r["stage"] - 1, r["stage_epoch"]) <= (stage, epochs_done)
        ]
        keep = self._text().encode("utf-8")
        try:
            with open(self.path, "r+b") as f:
                if f.read(len(keep)) == keep:
                    f.truncate(len(keep))
                    return
        except FileNotFoundError:
            pass
        self._write()  # not a prefix of what is there (never expected): rewrite it

    def _text(self) -> str:
        rows = [[_fmt(r.get(k)) for k in METRIC_COLUMNS] for r in self.rows]
        # Numbers only, which imgclf.csv_safe leaves as they are; \r\n as csv.DictWriter wrote.
        return csv_text([METRIC_COLUMNS, *rows], end="\r\n")

    def _write(self) -> None:
        atomic_write_text(self.path, self._text())


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if v != v else f"{v:.6g}"
    return v


def summary_line(row: dict, total_epochs: int, ema: bool = False) -> str:
    """The epoch's line in the trainer's printout, from its metrics.csv ``row``; ``ema``:
    the EMA's weights were validated, and it says so."""
    val = (
        ""
        if math.isnan(row["val_acc"])
        else f"  val{' (ema)' if ema else ''} loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
    )
    return (
        f"epoch {row['epoch']:>3}/{total_epochs} stage {row['stage']}  lr {row['lr']:.4g}  "
        f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}{val}  "
        f"{row['seconds']:.1f}s {row['images_per_second']:.0f} img/s"
    )


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
