"""Checkpoints that survive a kill, and the one safe way to read a torch file.

Written to a temporary file and renamed (``os.replace``): a reader, or a resume after
``kill -9`` during a save, sees the previous file or the new one, never half of one.
Loaded with ``weights_only=True``: a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from imgclf.errors import CheckpointError
from imgclf.io_utils import atomic_path
from imgclf.runtime.finite import checkpoint_tensors, describe, nonfinite
from imgclf.runtime.schema import check_checkpoint_fields

FORMAT = "imgclf-checkpoint-1"


# What a resume reads from a checkpoint (imgclf.train): without one, it cannot go on.
RESUME_KEYS = ("recipe", "dataset", "class_names", "model_state", "position", "progress")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` (a dict of tensors and plain values) to ``path`` atomically, with
    the imgclf format marker; a full disk is an ``OSError(ENOSPC)`` and leaves no file."""
    state = {"format": FORMAT, **state}
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except RuntimeError as exc:
        # torch's zip writer reports a full disk as "unexpected pos N vs M" or "file write
        # failed", without an errno: say ENOSPC when there is no room for this checkpoint
        # (the partial file is gone by now), so callers see the full disk as one.
        free = shutil.disk_usage(Path(path).parent).free
        if free >= _nbytes(state):
            raise
        raise OSError(
            errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free:,} bytes free)", str(path)
        ) from exc


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj``: about what torch.save needs on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0


def load_checkpoint(path: str | Path, needs: tuple[str, ...] = ()) -> dict[str, Any]:
    """An imgclf checkpoint, read safely (:func:`safe_load`): ``path`` is a ``.pt`` file
    or a run folder (its ``best.pt``, else ``last.pt``). Anything else, a damaged file,
    a field that is missing or wrong (:mod:`imgclf.runtime.schema`), or one of the
    ``needs`` (a resume's keys) missing, is one :class:`CheckpointError` line naming the file."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path}: no best.pt or last.pt in this run folder")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    state = safe_load(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an imgclf checkpoint")
    missing = [key for key in needs if key not in state]
    if missing:  # said before its fields: a resume reads the recipe first
        raise CheckpointError(
            f"{path}: cannot resume from this checkpoint (no {', '.join(missing)})"
        )
    check_checkpoint_fields(state, path)
    check_finite(state, path)
    state["path"] = str(path)
    return state


def check_finite(state: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose weights (or their EMA) hold a NaN or an infinity: it would
    predict ``nan`` for every file, or resume into a run that cannot recover."""
    bad = nonfinite(checkpoint_tensors(state))
    if bad:
        raise CheckpointError(
            f"{path}: its weights hold NaN or infinite values ({describe(bad)}): the "
            "training that wrote it diverged; use an earlier checkpoint, or train again "
            "with a lower learning rate"
        )


def safe_load(path: Path, what: str, *, mmap: bool = False, allow: tuple[type, ...] = ()) -> Any:
    """``torch.load`` with ``weights_only=True`` (a file from elsewhere cannot run code),
    its failures one :class:`CheckpointError` naming the file and ``what`` it should be.
    ``allow``: plain classes the file may also hold (``torch.serialization.safe_globals``)."""
    # torch.serialization.safe_globals is torch >= 2.5; before it, ``allow`` is not honoured
    # and such a file is refused as unreadable, as it was before ``allow`` existed.
    scope = getattr(torch.serialization, "safe_globals", None)
    try:
        with scope(list(allow)) if scope and allow else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable {what} ({why_unreadable(exc)})") from exc
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
        # Bytes that are no torch file reach the legacy pickle reader, whose weights-only
        # unpickler fails on them in other ways (a text file "hello": KeyError 101).
        why = f"not a PyTorch file: {type(exc).__name__}"
        raise CheckpointError(f"{path}: unreadable {what} ({why})") from exc


def load_resumable(path: str | Path) -> dict[str, Any]:
    """:func:`load_checkpoint`, and everything a resume reads is there (one line if not)."""
    return load_checkpoint(path, RESUME_KEYS)


def check_same_dataset(state: dict[str, Any], root: Path) -> None:
    """Refuse to resume on another data set than the checkpoint's (``--new-data`` allows it).

    Compared by folder: a data set imported again under its name keeps its folder, and the
    last component is not resolved since a cache entry is a link to its current version.
    """
    saved = Path(state["dataset"])
    if folder_key(saved) == folder_key(root):
        return
    raise CheckpointError(
        f"{state['path']} was trained on data set {saved.name!r} ({saved}), but --data gives "
        f"{root.name!r} ({root}): drop --data to continue on {saved.name!r}, or add "
        "--new-data to continue on the new one"
    )


def folder_key(path: Path) -> Path:
    """How two data set paths are compared: the folder resolved, the last component not
    (a cache entry is a link to its current version)."""
    path = path.expanduser()
    return path.parent.resolve() / path.name


def checkpoint_position(path: Path) -> dict[str, int] | None:
    """The ``position`` saved in ``path``, or None where it cannot be read. Memory-mapped:
    reads the small pickle, not the weights."""
    try:
        return dict(safe_load(path, "checkpoint", mmap=True)["position"])
    except (CheckpointError, KeyError, TypeError):
        return None


# Lines of torch's message that say nothing about the file, or advise weights_only=False,
# which would let a checkpoint from elsewhere run code: never pass that on.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def why_unreadable(exc: BaseException) -> str:
    """The first line of torch's message that says what is wrong with the file."""
    if isinstance(exc, EOFError):
        return "empty or truncated file"
    for line in str(exc).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if not line or "weights_only" in line or line.startswith(_TORCH_BOILERPLATE):
            continue
        return line.split(". ")[0].rstrip(".")
    return type(exc).__name__
