"""Exact and near duplicates among a data set's images, from their fingerprints.

Two images are near duplicates when their 63-bit perceptual hashes (or one's and the
other's mirror hash) differ in at most :data:`NEAR_BITS` bits
(:mod:`imgclf.data.fingerprints`); exact duplicates have the same stored pixels. Groups
are the connected components of the near-duplicate pairs, so a chain of re-encodes is
one group. Pairs found another way (the backbone embedding of ``data check``,
imgclf.evaluate.near_copies: crops the hash misses) join the same groups
(:func:`find_duplicates`'s ``extra``); every pair and every ``distance`` is still measured
in hash bits, so the number keeps one meaning whatever found the pair.

The search is multi-index hashing (Norouzi, Punjani & Fleet, "Fast Search in Hamming
Space with Multi-Index Hashing", CVPR 2012) with pairs of substrings as keys: the 64
bits are cut into 6 substrings of 10-11 bits; two hashes at most NEAR_BITS (4) apart
differ in at most 4 of them, so they agree exactly on at least 2 (pigeonhole), and so on
both substrings of one of the 15 pairs. Only hashes sharing a 21-22-bit key are compared
(one XOR and popcount each). Exact: no pair within the threshold is missed. One 13-bit
substring of 5 as key (plain MIH) compared 6.9M candidates at 50k CIFAR images and 122M
at 200k (quadratic: N²/2^13 per key); 22-bit keys make that N²/2^22 per key, so the 15
sorts of 2N keys dominate and the time grows near-linearly (docs/results.md,
"Duplicates"). Memory: the 24-byte fingerprints plus one block of candidates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations

import numpy as np

# At most 4 of 63 bits (about 6%). Tuned on the clothing photos with planted copies
# (benchmarks/bench_duplicates.py, docs/results.md "Duplicates"): JPEG re-saves at
# quality 60-95, resizes to 50-150%, brightness ±15% and mirror images are all at 0-4
# bits, while 6 bits already paired 1.3% of the unrelated photos (product shots on one
# plain background) and 8 bits 5%, over the ≤1% the issue allows. Every hash has
# exactly 31 bits set (median split of 63 coefficients), so distances are even: 4 and 5
# are the same threshold.
NEAR_BITS = 4
# Bit widths of the substrings, summing to 64 (bit 63 is always 0). NEAR_BITS + 2 of
# them: pigeonhole leaves two equal for any pair within the threshold.
_CHUNKS = (11, 11, 11, 11, 10, 10)
# Candidate pairs checked per block: 4M pairs take ~100 MB of index arrays at a time.
_BLOCK = 1 << 22


@dataclass
class Duplicates:
    """Groups of a data set's duplicates: every array has one entry per image."""

    group: np.ndarray  # group number (1, 2, …) or 0 for an image without duplicates
    distance: np.ndarray  # bits from the group's first image (its lowest index); 0 alone
    exact_group: np.ndarray  # the same for exact copies only (same stored pixels)
    pairs: np.ndarray  # P×3 int64: i < j and their hash bits, every pair found
    embedded: np.ndarray  # P bool: found by the embedding alone (hash bits over threshold)


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def hash_distance(fps: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Bits between images i and j: the closer of j as it is and j mirrored."""
    a = fps["phash"][i]
    return np.minimum(popcount(a ^ fps["phash"][j]), popcount(a ^ fps["flip"][j])).astype(np.int64)


def _keys(hashes: np.ndarray) -> Iterator[np.ndarray]:
    """For each pair of substrings, both side by side as one integer per hash."""
    parts, shift = [], 0
    for width in _CHUNKS:
        parts.append(((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64))
        shift += width
    for a, b in combinations(range(len(_CHUNKS)), 2):
        yield ((parts[a] << _CHUNKS[b]) | parts[b]).astype(np.int32)  # 22 bits: sorts faster


def _bucket_pairs(keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair of positions (a < b) with equal ``keys``, in blocks of about _BLOCK."""
    order = np.argsort(keys)  # the order within a run of equal keys does not matter
    sorted_keys = keys[order]
    # Each sorted position pairs with the later positions of its run of equal keys.
    run_ends = np.r_[np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1, len(keys)]
    ends = np.repeat(run_ends, np.diff(run_ends, prepend=0))
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
    if max_bits > len(_CHUNKS) - 2:
        raise ValueError(f"max_bits {max_bits}: this index finds at most {len(_CHUNKS) - 2}")
    n = len(fps)
    # Index both hashes of every image; a pair of mirror hashes says what the pair of
    # plain hashes says, so only pairs with a plain hash on one side are checked.
    hashes = np.concatenate([fps["phash"], fps["flip"]])
    found = []
    for keys in _keys(hashes):
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


def with_extra_pairs(
    fps: np.ndarray, pairs: np.ndarray, extra: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The hash's ``pairs`` (P×3) and the ``extra`` ones (Q×2 image indices, either order)
    not among them, with their hash bits; and which rows came from ``extra`` alone."""
    embedded = np.zeros(len(pairs), dtype=bool)
    if extra is None or not len(extra):
        return pairs, embedded
    extra = np.asarray(extra, dtype=np.int64)
    i, j = extra.min(axis=1), extra.max(axis=1)
    keep = i != j
    i, j = i[keep], j[keep]
    both = np.concatenate([pairs, np.stack([i, j, hash_distance(fps, i, j)], axis=1)])
    flags = np.r_[embedded, np.ones(len(i), dtype=bool)]
    # return_index gives each pair's first row: the hash's where both found it.
    _, first = np.unique(both[:, 0] * len(fps) + both[:, 1], return_index=True)
    return both[first], flags[first]


def find_duplicates(
    fps: np.ndarray, max_bits: int = NEAR_BITS, extra: np.ndarray | None = None
) -> Duplicates:
    """Exact and near-duplicate groups of the fingerprints ``fps`` (one per image);
    ``extra``: more pairs of near duplicates (Q×2 indices) to group with the hash's."""
    n = len(fps)
    pairs, embedded = with_extra_pairs(fps, near_pairs(fps, max_bits), extra)
    root = components(n, pairs[:, 0], pairs[:, 1])
    distance = hash_distance(fps, root, np.arange(n))
    _, exact_root = np.unique(fps["exact"], return_inverse=True)
    # The lowest index of each exact value, so exact groups number like the near ones.
    lowest = np.full(exact_root.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(lowest, exact_root, np.arange(n))
    return Duplicates(_numbered(root), distance, _numbered(lowest[exact_root]), pairs, embedded)


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


def duplicate_counts(
    dups: Duplicates, splits: np.ndarray, split_names: list[str], embedding: dict | None = None
) -> dict:
    """What ``data info`` shows: exact-copy groups, and near-duplicate groups that are
    more than exact copies, within each split and across each pair of splits;
    ``embedding``: the record of the embedding search whose pairs ``dups`` holds too
    (None: the hash alone)."""
    exact_only = _all_exact(dups)
    near = np.where(np.isin(dups.group, exact_only), 0, dups.group)
    return {
        "exact": split_counts(dups.exact_group, splits, split_names),
        "near": split_counts(near, splits, split_names),
        "near_bits": NEAR_BITS,
        "embedding": embedding,
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
