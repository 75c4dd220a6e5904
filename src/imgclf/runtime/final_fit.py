"""A final fit's record in its checkpoint, and which images a run trained on.

A final fit (``imgclf train RECIPE --data D --final``, :mod:`imgclf.train.final`) trains
on the train and validation splits together, so no score on its data set's validation
split is held out. Its checkpoints say so under :data:`FINAL_KEY`: the record here, read
by training (a resume trains on the same images) and by everything that scores a run
(``eval``, ``export --int8``), which lie above training and beside it, hence this module
at the bottom (imgclf.runtime).

The record: ``{"from": the validation run's folder or None, "from_val_accuracy": its
accuracy or None}``; None (or no key: checkpoints before final fits) is a normal run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgclf.errors import CheckpointError
from imgclf.runtime.checkpoint import folder_key

FINAL_KEY = "final"
_FIELDS = ("from", "from_val_accuracy")
# The splits a run trains on: a normal run holds "val" out to validate on, a final fit
# trains on it too; "test" is never trained on (importer: train, val, test are the names).
NORMAL_SPLITS = ("train",)
FINAL_SPLITS = ("train", "val")


def final_record(state: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's final-fit record (None: a normal run), checked: an edited one is
    one :class:`CheckpointError` line naming the checkpoint."""
    record = state.get(FINAL_KEY)
    if record is None:
        return None
    where = state.get("path", "checkpoint")
    source, acc = (record.get(k) if isinstance(record, dict) else None for k in _FIELDS)
    if (
        not isinstance(record, dict)
        or set(record) != set(_FIELDS)
        or not (source is None or isinstance(source, str))
        or not (acc is None or (isinstance(acc, float) and 0.0 <= acc <= 1.0))
    ):
        raise CheckpointError(
            f"{where}: {FINAL_KEY}: {record!r} is not a final fit's record (from: a run "
            "folder or null, from_val_accuracy: 0 to 1 or null); the checkpoint was edited "
            "or damaged: use an unchanged copy, or train again"
        )
    return record


def trained_splits(state: dict[str, Any]) -> tuple[str, ...]:
    """The splits of its data set a run (its checkpoint's ``state``) trained on."""
    return FINAL_SPLITS if final_record(state) is not None else NORMAL_SPLITS


def trained_on(state: dict[str, Any], root: Path, split: str) -> tuple[str, ...]:
    """The splits among ``split`` of the data set at ``root`` that the run trained on
    (empty: ``split`` is held out from it). Another data set (or a folder imported for the
    occasion) shares none as far as anyone can tell; ``all`` holds every split."""
    # Compared as a resume compares them (imgclf.runtime.checkpoint.check_same_dataset).
    saved = state.get("dataset")
    if not saved or folder_key(Path(saved)) != folder_key(Path(root)):
        return ()
    return tuple(s for s in trained_splits(state) if split in (s, "all"))
