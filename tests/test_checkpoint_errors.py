"""Unreadable checkpoints are one line that never suggests ``weights_only=False`` (#10.15)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from imgclf.errors import CheckpointError
from imgclf.runtime.checkpoint import load_checkpoint


class _RunsCode:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(tmp_path, marker):
    torch.save({"format": "imgclf-checkpoint-1", "x": _RunsCode(marker)}, tmp_path / "a.pt")


def _raw_pickle(tmp_path, marker):
    (tmp_path / "a.pt").write_bytes(pickle.dumps(_RunsCode(marker)))


def _empty(tmp_path, marker):
    (tmp_path / "a.pt").write_bytes(b"")


def _truncated(tmp_path, marker):
    torch.save({"format": "imgclf-checkpoint-1"}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "a.pt").write_bytes(data[: len(data) // 2])


def _text(tmp_path, marker):
    # Read by torch's legacy (non-zip) reader, whose weights-only unpickler raised a bare
    # KeyError on these bytes: a traceback from `train --init notes.txt`.
    (tmp_path / "a.pt").write_text("hello")


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_crafted, "system"),
        (_raw_pickle, "Unsupported operand"),
        (_empty, "empty or truncated"),
        (_truncated, "zip archive"),
        (_text, "not a PyTorch file"),
    ],
)
def test_unreadable_checkpoint_is_one_line_without_the_unsafe_hint(tmp_path, make, needle):
    marker = tmp_path / "pwned"
    make(tmp_path, marker)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "a.pt")
    msg = str(err.value)
    assert "\n" not in msg and "weights_only" not in msg and "will likely succeed" not in msg
    assert msg.startswith(f"{tmp_path / 'a.pt'}: unreadable checkpoint (") and needle in msg
    assert not marker.exists()
