"""``imgclf data check``'s duplicates: the hash's, and on photo sets a backbone embedding's.

The 63-bit DCT hash (imgclf.data.fingerprints) finds re-encodes, resizes, mirrors and
brightness changes, but an 80-95% crop moves ~20 of its bits and a ±5° rotation often
more than its 4-bit threshold: on the clothing photos with planted copies it found 1% of
the crops and 53% of the rotations (docs/results.md, "Duplicates"). A pretrained
backbone's pooled features describe what is in the picture rather than where its light
and dark lie, so a crop of a photo stays close to it; the issue names this ("an embedding
from the pretrained backbone for 'same shot, different crop'").

The features are Lite0's, from the one pass imgclf.train.backbone_features runs and keeps
in the data set's version folder, the pass ``--labels`` reads too: whichever check comes
first computes it, every later check reads it back. Pairs are the images whose embeddings
have a cosine similarity of at least :data:`EMBED_COSINE`, found exactly by blockwise
matrix products (:func:`cosine_pairs`: memory bounded by one block, time N²·D/2
multiply-adds: docs/results.md gives the seconds and the limit). They join the hash's
pairs in the same groups (imgclf.data.duplicates.find_duplicates), so duplicates.csv,
the picture, ``data info``, ``eval``'s duplicate-free subset and the report all see them:
stored with the data set (imgclf.data.embed_pairs), read by those without a network.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.data.cache import Dataset
from imgclf.data.dup_check import check_duplicates
from imgclf.data.embed_pairs import (
    PAIR_DTYPE,
    as_index_pairs,
    forget_embedding_pairs,
    save_embedding_pairs,
)
from imgclf.io_utils import check_output_dir

# Photo sets, the rule: stored images at least 64 px on their shorter side. Below that
# (CIFAR's 32 px) the embedding would cost 100× the import or more (Lite0 at 224 px:
# 10-30 ms an image on a 2-core CPU, against 4.8 s for CIFAR-10's 50,000: docs/results.md),
# while the issue holds the check to ≤ 25% of the import; such sets keep the hash alone.
PHOTO_MIN_SIDE = 64
EMBED_RECIPE = "lite0-photo"  # its backbone: Lite0 with ImageNet weights, at 224 px
# Cosine similarity of the embeddings (signed square roots of the pooled features,
# L2-normalised). Tuned on the clothing photos with 600 planted copies
# (benchmarks/bench_duplicates.py planted, docs/results.md "Duplicates"): at 0.93, with
# the hash, 93.2% of all planted copies are found (crops 64%, the rest 100%) and 0.51% of
# the other photos are paired; 0.92 pairs 1.33% of them, over the 1%; 0.94 pairs
# 0.18% but finds 90.2% (crops 47%). 0.93 leaves about half of each target's slack.
EMBED_COSINE = 0.93
# Images up to which a photo set gets the embedding without asking: its feature pass then
# takes minutes (10-30 ms an image on 2 cores: 3-10 min at 20,000) and the N² search
# seconds. Past it, an hour and more; the check says so and `--embed` asks for it anyway.
EMBED_AUTO_MAX = 20_000
# Rows × columns of one block of the similarity matrix: 1024 × 8192 fp32 is 32 MB.
_ROWS, _COLS = 1024, 8192


def is_photo_set(ds: Dataset) -> bool:
    return min(ds.image_size) >= PHOTO_MIN_SIDE


def embed(features: np.ndarray) -> np.ndarray:
    """Rows of backbone features → unit-length fp32 embeddings of their signed square
    roots. The square root (the Hellinger kernel of RootSIFT: Arandjelović & Zisserman,
    "Three things everyone should know to improve object retrieval", CVPR 2012) damps
    the few channels that dominate pooled CNN features: at cosine 0.93 on the clothing
    photos it found 93.2% of the planted copies with 0.51% of the others paired, against
    91.7% with 0.54% without it (docs/results.md, "Duplicates")."""
    x = np.asarray(features, dtype=np.float32)
    x = np.sign(x) * np.sqrt(np.abs(x))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_pairs(features: np.ndarray, threshold: float = EMBED_COSINE) -> np.ndarray:
    """Every pair i < j of rows of ``features`` (N×D, any float dtype, memory-mapped or
    not) whose embeddings (:func:`embed`) have a cosine similarity ≥ ``threshold``, as
    :data:`~imgclf.data.embed_pairs.PAIR_DTYPE` rows. Exact (every pair is compared),
    one block of the N×N similarity matrix at a time."""
    n = len(features)
    found = [np.zeros(0, dtype=PAIR_DTYPE)]
    for a in range(0, n, _ROWS):
        rows = embed(features[a : a + _ROWS])
        for b in range(a, n, _COLS):
            sim = rows @ embed(features[b : b + _COLS]).T
            i, j = np.nonzero(sim >= threshold)
            keep = b + j > a + i  # each pair once, never an image with itself
            out = np.zeros(int(keep.sum()), dtype=PAIR_DTYPE)
            out["i"], out["j"] = a + i[keep], b + j[keep]
            out["cosine"] = sim[i[keep], j[keep]]
            found.append(out)
    return np.concatenate(found)


@dataclass(frozen=True)
class EmbeddingSearch:
    """The pairs found, the record stored with them, and how the features came."""

    pairs: np.ndarray  # PAIR_DTYPE
    record: dict
    features: Path | None  # where they are kept (None: could not be written)
    reused: bool
    feature_seconds: float
    search_seconds: float


def embedding_pairs(
    ds: Dataset, device: str | None = None, say: Callable[[str], None] = print
) -> EmbeddingSearch:
    """The near-copy pairs of ``ds`` by Lite0's embedding (features read from the data
    set's folder or computed and kept there), stored with the data set."""
    from imgclf.train.backbone_features import dataset_features
    from imgclf.train.recipe import load_recipe

    stored = dataset_features(ds, load_recipe(EMBED_RECIPE), device, say)
    started = time.perf_counter()
    pairs = cosine_pairs(stored.features)
    search = time.perf_counter() - started
    ident = stored.identity
    record = {
        "model": ident["model"],
        "input_size": ident["input_size"],
        "cosine": EMBED_COSINE,
        "images": len(ds.labels),
    }
    # A read-only cache keeps nothing; this check's own files still show the pairs.
    with contextlib.suppress(OSError):
        save_embedding_pairs(ds.version_root or ds.root, pairs, record)
    return EmbeddingSearch(pairs, record, stored.path, stored.reused, stored.seconds, search)


def check_data_duplicates(
    ds: Dataset,
    out_dir: str | Path,
    *,
    use_embedding: bool | None = None,
    device: str | None = None,
    say: Callable[[str], None] = print,
) -> dict:
    """``data check``'s duplicates: the hash's pairs, and on a photo set (``embed``) the
    embedding's (``use_embedding``), grouped together into ``out_dir``
    (imgclf.data.dup_check). The summary
    says under ``embedding_note`` what the embedding did or why it did not run.
    ``use_embedding``: None (default) on photo sets up to :data:`EMBED_AUTO_MAX` images."""
    check_output_dir(out_dir)  # before minutes of features, not after
    root = ds.version_root or ds.root
    why = _no_embedding(ds, use_embedding)
    if why:
        forget_embedding_pairs(root)  # readers agree with this check: the hash alone
        summary = check_duplicates(ds, out_dir)
        summary["embedding_note"] = f"near copies by embedding: {why}; the hash alone"
        return summary
    found = embedding_pairs(ds, device, say)
    summary = check_duplicates(ds, out_dir, as_index_pairs(found.pairs), found.record)
    summary["embedding_note"] = describe_search(found)
    return summary


def _no_embedding(ds: Dataset, use_embedding: bool | None) -> str | None:
    """Why this check goes by the hash alone, or None to use the embedding too."""
    h, w = ds.image_size
    if use_embedding is False:
        return "skipped (--no-embed)"
    if not is_photo_set(ds):
        return f"not used: images of {h}×{w} px are under the {PHOTO_MIN_SIDE} px of a photo set"
    if use_embedding is None and len(ds.labels) > EMBED_AUTO_MAX:
        return (
            f"not used: {len(ds.labels):,} images, over the {EMBED_AUTO_MAX:,} whose feature "
            "pass takes minutes (10-30 ms an image on 2 cores); --embed to run it anyway"
        )
    return None


def describe_search(found: EmbeddingSearch) -> str:
    """One line: the features (computed or reused, where kept) and the pairs found."""
    r = found.record
    where = f"kept in {found.features}" if found.features else "not kept (folder not writable)"
    how = (
        f"reused from {found.features} (an earlier check's)"
        if found.reused
        else f"computed in {found.feature_seconds:.1f} s, {where} for the next check and --labels"
    )
    return (
        f"near copies by embedding: {r['model']} features of {r['images']} images {how}; "
        f"{len(found.pairs)} pairs at cosine ≥ {r['cosine']} "
        f"(search {found.search_seconds:.1f} s)"
    )
