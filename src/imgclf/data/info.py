"""A dataset's description, as ``imgclf data info`` prints it."""

from __future__ import annotations

import numpy as np

from imgclf.data.cache import Dataset
from imgclf.data.duplicates import duplicate_counts, find_duplicates
from imgclf.data.fingerprints import FINGERPRINTS_FILE, has_fingerprints
from imgclf.data.sanity import balance_warnings


def dataset_info(ds: Dataset) -> dict:
    """What ``imgclf data info`` shows, as a dict: classes, counts per split, size,
    source, validation split, skipped files, the class balance and split warnings
    (:func:`imgclf.data.sanity.balance_warnings`), and the duplicate groups within and
    across splits (:func:`imgclf.data.duplicates.duplicate_counts`; None for a data set
    imported before fingerprints, until ``imgclf data check`` makes them)."""
    counts = ds.counts()
    return {
        "name": ds.name,
        "root": str(ds.root),
        "source": ds.meta["source"],
        "source_shape": ds.meta["source_shape"],
        "classes": ds.classes,
        "num_samples": len(ds.labels),
        "image_size": list(ds.image_size),
        "resize_policy": ds.meta["resize_policy"],
        "resized": ds.meta["resized"],
        "counts": counts,
        "val_split": ds.meta["val_split"],
        "skipped": ds.skipped(),
        "warnings": balance_warnings(counts, ds.meta["val_split"]),
        "duplicates": _duplicates(ds),
    }


def _duplicates(ds: Dataset) -> dict | None:
    root = ds.version_root or ds.root
    if not has_fingerprints(root, ds.meta):
        return None
    dups = find_duplicates(np.load(root / FINGERPRINTS_FILE))
    return duplicate_counts(dups, ds.splits, ds.split_names)
