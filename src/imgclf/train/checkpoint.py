"""Checkpoints that survive a kill, and that rebuild a model without the recipe.

Written to a temporary file and renamed (``os.replace``): a reader, or a resume after
``kill -9`` during a save, sees the previous file or the new one, never half of one.
Loaded with ``weights_only=True``: a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from imgclf.errors import CheckpointError
from imgclf.io_utils import atomic_path

FORMAT = "imgclf-checkpoint-1"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    state = {"format": FORMAT, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({_why_unreadable(exc)})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an imgclf checkpoint")
    state["path"] = str(path)
    return state


# Lines of torch's message that say nothing about the file, or advise weights_only=False,
# which would let a checkpoint from elsewhere run code: never pass that on.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _why_unreadable(exc: BaseException) -> str:
    """The first line of torch's message that says what is wrong with the file."""
    if isinstance(exc, EOFError):
        return "empty or truncated file"
    for line in str(exc).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if not line or "weights_only" in line or line.startswith(_TORCH_BOILERPLATE):
            continue
        return line.split(". ")[0].rstrip(".")
    return type(exc).__name__


def build_model_from_checkpoint(state: dict[str, Any]) -> torch.nn.Module:
    from imgclf.models import create

    model = create(state["model_name"], **state["model_args"])
    model.load_state_dict(state["model_state"])
    model.eval()
    return model
