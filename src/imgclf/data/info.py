"""A dataset's description, as ``imgclf data info`` prints it."""

from __future__ import annotations

from imgclf.data.cache import Dataset
from imgclf.data.sanity import balance_warnings


def dataset_info(ds: Dataset) -> dict:
    """What ``imgclf data info`` shows, as a dict: classes, counts per split, size,
    source, validation split, skipped files, and the class balance and split warnings
    (:func:`imgclf.data.sanity.balance_warnings`)."""
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
    }
