"""A dataset's description, as ``imgclf data info`` prints it."""

from __future__ import annotations

from imgclf.data.cache import Dataset
from imgclf.data.duplicates import duplicate_counts
from imgclf.data.embed_pairs import dataset_duplicates
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
    """The hash's groups, joined by the embedding pairs the last ``data check`` stored
    where it found any: read, never computed here (no network runs for ``data info``)."""
    found = dataset_duplicates(ds)
    if found is None:
        return None
    dups, embedding = found
    return duplicate_counts(dups, ds.splits, ds.split_names, embedding)
