"""The near-copy pairs ``data check`` found by a backbone embedding, kept with the data set.

Finding them needs a model (imgclf.evaluate.near_copies), which this layer may not
import; what it found is data: the pairs of image indices and their cosine similarity,
in the data set's version folder as ``embedding_pairs.npy`` beside a JSON record (the
model, the threshold, the image count). ``data info``, ``eval``'s duplicate-free subset
and ``data check``'s own files read them with the hash's pairs
(:func:`dataset_duplicates`): cheap, no network runs. A check that does not embed removes
them, so every reader agrees with the last check; a new import is a new version folder.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from imgclf.data.cache import Dataset
from imgclf.data.duplicates import Duplicates, find_duplicates
from imgclf.data.fingerprints import FINGERPRINTS_FILE, has_fingerprints
from imgclf.io_utils import atomic_path, atomic_write_text

EMBED_PAIRS_FILE = "embedding_pairs.npy"
EMBED_PAIRS_RECORD = "embedding_pairs.json"
# Bumped when the pairs' meaning changes (another threshold rule): older ones are ignored.
EMBED_PAIRS_VERSION = 1
PAIR_DTYPE = np.dtype([("i", "<i8"), ("j", "<i8"), ("cosine", "<f4")])


def save_embedding_pairs(root: Path, pairs: np.ndarray, record: dict) -> None:
    """``pairs`` (:data:`PAIR_DTYPE`) and ``record`` (what found them; ``images``: the
    data set's image count) into the version folder ``root``, the array first: a record
    always describes the pairs beside it."""
    with atomic_path(root / EMBED_PAIRS_FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, pairs.astype(PAIR_DTYPE))
    full = {"version": EMBED_PAIRS_VERSION, **record, "pairs": len(pairs)}
    atomic_write_text(root / EMBED_PAIRS_RECORD, json.dumps(full, indent=2))


def forget_embedding_pairs(root: Path) -> None:
    """Remove stored pairs (record first: pairs without one are never read)."""
    for name in (EMBED_PAIRS_RECORD, EMBED_PAIRS_FILE):
        # A read-only cache: nothing there was written by a check either.
        with contextlib.suppress(OSError):
            (root / name).unlink(missing_ok=True)


def stored_embedding_pairs(root: Path, images: int) -> tuple[np.ndarray, dict] | None:
    """The stored pairs and their record, or None: none stored, another version, or
    made for another image count (never mixed with other images' indices)."""
    try:
        record = json.loads((root / EMBED_PAIRS_RECORD).read_text())
        pairs = np.load(root / EMBED_PAIRS_FILE)
    except (OSError, ValueError):
        return None
    if (
        record.get("version") != EMBED_PAIRS_VERSION
        or record.get("images") != images
        or pairs.dtype != PAIR_DTYPE
        or len(pairs) != record.get("pairs")
        or (len(pairs) and not (pairs["i"].min() >= 0 and pairs["j"].max() < images))
    ):
        return None
    return pairs, record


def as_index_pairs(pairs: np.ndarray) -> np.ndarray:
    """Q×2 int64 image indices of :data:`PAIR_DTYPE` rows."""
    return np.stack([pairs["i"], pairs["j"]], axis=1).astype(np.int64)


def dataset_duplicates(ds: Dataset) -> tuple[Duplicates, dict | None] | None:
    """The groups of the stored fingerprints and the last check's embedding pairs, and
    that search's record (None: the hash alone); None without fingerprints (a data set
    imported before they existed, until its first check)."""
    root = ds.version_root or ds.root
    if not has_fingerprints(root, ds.meta):
        return None
    fps = np.load(root / FINGERPRINTS_FILE)
    stored = stored_embedding_pairs(root, len(fps))
    extra, record = (as_index_pairs(stored[0]), stored[1]) if stored else (None, None)
    return find_duplicates(fps, extra=extra), record
