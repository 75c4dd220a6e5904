"""Exact and near duplicates among a data set's images, from their fingerprints.

Two images are near duplicates when their 63-bit perceptual hashes (or one's and the
other's mirror hash) differ in at most :data:`NEAR_BITS` bits
(:mod:`imgclf.data.fingerprints`); exact duplicates have the same stored pixels. Groups
are the connected components of the near-duplicate pairs, so a chain of re-encodes is
one group.

The search is multi-index hashing (Norouzi, Punjani & Fleet, "Fast Search in Hamming
Space with Multi-Index Hashing", CVPR 2012): split the 64 bits into NEAR_BITS + 1
substrings; two hashes at most NEAR_BITS apart agree exactly on at least one of them
(pigeonhole), so only pairs sharing a substring value are compared, each with one XOR
and popcount. Exact, no pair within the threshold is missed, and memory is the 24-byte
fingerprints plus the candidate block being checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# At most 4 of 63 bits (about 6%). Tuned on the clothing photos with planted copies
# (benchmarks/bench_duplicates.py, docs/results.md "Duplicates"): JPEG re-saves at
# quality 60-95, resizes to 50-150%, brightness ±15% and mirror images are all at 0-4
# bits, while 6 bits already paired 1.3% of the unrelated photos (product shots on one
# plain background) and 8 bits 5%, over the ≤1% the issue allows. Every hash has
# exactly 31 bits set (median split of 63 coefficients), so distances are even: 4 and 5
# are the same threshold.
NEAR_BITS = 4
# Bit widths of the substrings, summing to 64 (bit 63 is always 0, so one is 12 wide).
_CHUNKS = (13, 13, 13, 13, 12)
# Candidate pairs checked per block: 4M pairs take ~100 MB of index arrays at a time.
_BLOCK = 1 << 22


@dataclass
class Duplicates:
    """Groups of a data set's duplicates: every array has one entry per image."""

    group: np.ndarray  # group number (1, 2, …) or 0 for an image without duplicates
    distance: np.ndarray  # bits from the group's first image (its lowest index); 0 alone
    exact_group: np.ndarray  # the same for exact copies only (same stored pixels)
    pairs: np.ndarray  # P×3 int64: i < j and their distance, every pair within threshold


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def hash_distance(fps: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Bits between images i and j: the closer of j as it is and j mirrored."""
    a = fps["phash"][i]
    return np.minimum(popcount(a ^ fps["phash"][j]), popcount(a ^ fps["flip"][j])).astype(np.int64)


def _substrings(hashes: np.ndarray) -> Iterator[np.ndarray]:
    shift = 0
    for width in _CHUNKS:
        yield ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
        shift += width


def _bucket_pairs(keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair of positions (a < b) with equal ``keys``, in blocks of about _BLOCK."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    # Each sorted position pairs with the later positions of its run of equal keys.
    ends = np.searchsorted(sorted_keys, sorted_keys, side="right")
    later = ends - np.arange(len(keys)) - 1
    total = np.cumsum(later)
    start = 0
    while start < len(keys):
        stop = int(np.searchsorted(total, (total[start - 1] if start else 0) + _BLOCK, "right"))
        stop = max(stop, start + 1)
        counts = later[start:stop]
        a = np.repeat(np.arange(start, stop), counts)
        offsets = np.arange(len(a)) - np.repeat(np.cumsum(counts) - counts, counts)
        yield order[a], order[a + 1 + offsets]
        start = stop


def near_pairs(fps: np.ndarray, max_bits: int = NEAR_BITS) -> np.ndarray:
    """P×3 int64 (i, j, bits), i < j, of every pair of images whose hashes (one of them
    mirrored or not) are at most ``max_bits`` apart. Exact: multi-index hashing."""
    if max_bits >= len(_CHUNKS):
        raise ValueError(f"max_bits {max_bits}: this index finds at most {len(_CHUNKS) - 1}")
    n = len(fps)
    # Index both hashes of every image; a pair of mirror hashes says what the pair of
    # plain hashes says, so only pairs with a plain hash on one side are checked.
    hashes = np.concatenate([fps["phash"], fps["flip"]])
    found = []
    for keys in _substrings(hashes):
        for a, b in _bucket_pairs(keys):
            keep = ((a < n) | (b < n)) & (a % n != b % n)
            a, b = a[keep], b[keep]
            i, j = np.minimum(a % n, b % n), np.maximum(a % n, b % n)
            d = hash_distance(fps, i, j)
            close = d <= max_bits
            found.append(np.stack([i[close], j[close], d[close]], axis=1))
    if not found:
        return np.zeros((0, 3), dtype=np.int64)
    pairs = np.concatenate(found)
    _, first = np.unique(pairs[:, 0] * n + pairs[:, 1], return_index=True)
    return pairs[first]


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Each node's component as its lowest member (label propagation with pointer jumping:
    Shiloach-Vishkin's hooking, vectorised)."""
    root = np.arange(n)
    while True:
        ri, rj = root[i], root[j]
        lo, hi = np.minimum(ri, rj), np.maximum(ri, rj)
        moved = lo != hi
        if not moved.any():
            return root
        np.minimum.at(root, hi[moved], lo[moved])
        while True:  # every node points straight at its root
            jumped = root[root]
            if np.array_equal(jumped, root):
                break
            root = jumped


def _numbered(root: np.ndarray) -> np.ndarray:
    """Components of two or more → 1, 2, … in order of their lowest member; 0 otherwise."""
    sizes = np.bincount(root, minlength=len(root))
    grouped = sizes[root] > 1
    out = np.zeros(len(root), dtype=np.int64)
    firsts = np.unique(root[grouped])
    out[grouped] = np.searchsorted(firsts, root[grouped]) + 1
    return out


def find_duplicates(fps: np.ndarray, max_bits: int = NEAR_BITS) -> Duplicates:
    """Exact and near-duplicate groups of the fingerprints ``fps`` (one per image)."""
    n = len(fps)
    pairs = near_pairs(fps, max_bits)
    root = components(n, pairs[:, 0], pairs[:, 1])
    distance = hash_distance(fps, root, np.arange(n))
    _, exact_root = np.unique(fps["exact"], return_inverse=True)
    # The lowest index of each exact value, so exact groups number like the near ones.
    lowest = np.full(exact_root.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(lowest, exact_root, np.arange(n))
    return Duplicates(_numbered(root), distance, _numbered(lowest[exact_root]), pairs)


def split_counts(group: np.ndarray, splits: np.ndarray, split_names: list[str]) -> dict:
    """Groups with two or more images in one split (``within``) and groups with images in
    both of two splits (``across``, keys like ``train-val``)."""
    s = len(split_names)
    grouped = group > 0
    if not grouped.any():
        per = np.zeros((0, s), dtype=np.int64)
    else:
        g = group[grouped] - 1
        per = np.bincount(g * s + splits[grouped], minlength=(g.max() + 1) * s).reshape(-1, s)
    within = {name: int((per[:, k] >= 2).sum()) for k, name in enumerate(split_names)}
    across = {
        f"{a}-{b}": int(((per[:, x] > 0) & (per[:, y] > 0)).sum())
        for x, a in enumerate(split_names)
        for y, b in enumerate(split_names)
        if x < y
    }
    groups = int((per.sum(axis=1) > 0).sum())  # numbers left out (exact-only) are empty
    return {"groups": groups, "within": within, "across": across}


def duplicate_counts(dups: Duplicates, splits: np.ndarray, split_names: list[str]) -> dict:
    """What ``data info`` shows: exact-copy groups, and near-duplicate groups that are
    more than exact copies, within each split and across each pair of splits."""
    exact_only = _all_exact(dups)
    near = np.where(np.isin(dups.group, exact_only), 0, dups.group)
    return {
        "exact": split_counts(dups.exact_group, splits, split_names),
        "near": split_counts(near, splits, split_names),
        "near_bits": NEAR_BITS,
        "images_in_groups": int((dups.group > 0).sum()),
    }


def _all_exact(dups: Duplicates) -> np.ndarray:
    """Near-duplicate groups whose members are all one exact copy group."""
    grouped = dups.group > 0
    g, e = dups.group[grouped], dups.exact_group[grouped]
    if not len(g):
        return np.zeros(0, dtype=np.int64)
    lo = np.full(g.max() + 1, np.iinfo(np.int64).max)
    hi = np.zeros(g.max() + 1, dtype=np.int64)
    np.minimum.at(lo, g, e)
    np.maximum.at(hi, g, e)
    return np.flatnonzero((lo == hi) & (lo > 0))
