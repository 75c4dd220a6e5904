"""``imgclf data import --dedupe``: one image kept of each duplicate group, before the
validation split is cut, so no copy of a held-out image stays in train."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imgclf.data.duplicates import find_duplicates, hash_distance
from imgclf.data.fingerprints import FINGERPRINTS_FILE
from imgclf.data.scan import ScannedSource
from imgclf.data.sources import Skipped

# Which copy a group keeps: a held-out split's first (its score is what leaks), then
# train's; within a split the first file.
_KEEP_ORDER = {"test": 0, "val": 1, "train": 2}
_ROWS = 1024  # images copied at a time when the arrays are rewritten without the removed


def dedupe(scanned: ScannedSource, folder: Path, warn: Callable[[str], None]) -> int:
    """Leave out of ``scanned.samples`` and of ``folder``'s images.npy and fingerprints.npy
    every image but one of each duplicate group (``find_duplicates``); each removed file
    becomes an import-report row naming the file it duplicates. A copy filed under
    another class than the one kept is a label conflict, which no rule here can settle:
    its row and a ``warn`` line say so (the clothing photos hold one: the same skirt
    filed under skirt and under shorts). Returns how many were left out."""
    fps = np.load(folder / FINGERPRINTS_FILE)
    dups = find_duplicates(fps)
    samples = scanned.samples
    grouped = np.flatnonzero(dups.group)
    if not len(grouped):
        return 0
    rank = np.array([_KEEP_ORDER.get(samples[i].split, 3) for i in grouped])
    order = grouped[np.lexsort((grouped, rank, dups.group[grouped]))]
    g = dups.group[order]
    first = np.r_[True, g[1:] != g[:-1]]
    keeper = order[first][np.cumsum(first) - 1]  # each member's group's kept image
    removed = order[~first]
    kept_for = keeper[~first]
    distances = hash_distance(fps, removed, kept_for)
    for i, k, bits in zip(removed, kept_for, distances, strict=True):
        how = "an exact copy" if fps["exact"][i] == fps["exact"][k] else f"{bits} bits apart"
        reason = f"duplicate of {samples[k].source} ({how})"
        if samples[i].label != samples[k].label:
            mine, theirs = (scanned.classes[samples[x].label] for x in (i, k))
            reason += f", filed under {mine!r} here and {theirs!r} there: one label is wrong"
            warn(f"{samples[i].source}: {reason}; --dedupe keeps the {theirs!r} copy")
        scanned.skipped.append(Skipped(samples[i].source, f"{reason}; left out by --dedupe"))
    keep = np.setdiff1d(np.arange(len(samples)), removed)
    scanned.samples = [samples[i] for i in keep]
    np.save(folder / FINGERPRINTS_FILE, fps[keep])
    _keep_rows(folder / "images.npy", keep)
    return len(removed)


def _keep_rows(path: Path, keep: np.ndarray) -> None:
    """Rewrite the .npy at ``path`` with only the rows ``keep``, a chunk at a time."""
    old = np.load(path, mmap_mode="r")
    tmp = path.with_name(f".{path.name}.dedupe")
    new = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=old.dtype, shape=(len(keep), *old.shape[1:])
    )
    for start in range(0, len(keep), _ROWS):
        new[start : start + _ROWS] = old[keep[start : start + _ROWS]]
    new.flush()
    del new, old
    os.replace(tmp, path)
