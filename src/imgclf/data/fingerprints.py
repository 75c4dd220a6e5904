"""Per-image fingerprints: an exact hash of the stored pixels and a perceptual hash.

Computed from the pixels the cache stores (``images.npy``), so the import computes them
on each decoded chunk, in the decode pass, and an older data set gets the very same ones
later from its ``images.npy`` (:func:`ensure_fingerprints`). 24 bytes an image:

``exact``  the first 8 bytes of BLAKE2b over the stored pixels (a collision among a
           million images has odds of about 1 in 3·10^7: N²/2^65);
``phash``  a DCT perceptual hash (Zauner, "Implementation and Benchmarking of Perceptual
           Image Hash Functions", 2010; the pHash library's and ``imagehash.phash``'s
           recipe): luma box-averaged to 32×32, its 2-D DCT-II, the 8×8 lowest frequencies
           without the DC term, one bit per coefficient above their median. Only the
           coarse layout of light and dark survives, which re-encoding, resizing and a
           brightness or contrast change keep (a gain scales every coefficient alike;
           an offset moves only the DC term, which is left out);
``flip``   the same hash of the horizontally mirrored image: mirroring negates the
           coefficients of odd horizontal frequency (DCT-II: x → W-1-x multiplies the
           u-th basis function by (-1)^u), so it costs a sign flip, not a second pass.

Bit 63 of both hashes is always 0 (63 AC coefficients).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imgclf.io_utils import atomic_path, atomic_write_text

# Bumped whenever the bits change: a data set whose fingerprints carry another version
# gets new ones on its next check, never a comparison between two recipes.
FINGERPRINT_VERSION = 1
FINGERPRINTS_FILE = "fingerprints.npy"
FP_DTYPE = np.dtype([("exact", "<u8"), ("phash", "<u8"), ("flip", "<u8")])

_SIDE = 32  # pHash's working size
_KEEP = 8  # low frequencies kept per axis
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as PIL's "L"
_WEIGHTS = (np.uint64(1) << np.arange(_KEEP * _KEEP - 1, dtype=np.uint64)).astype(np.uint64)


def _box_matrix(n: int, side: int = _SIDE) -> np.ndarray:
    """side×n: row i averages the source pixels covering [i·n/side, (i+1)·n/side), partial
    pixels weighted by their overlap (area resampling, PIL's BOX filter)."""
    edges = np.arange(side + 1) * (n / side)
    lo, hi = edges[:-1, None], edges[1:, None]
    px = np.arange(n)[None, :]
    overlap = np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _dct_matrix(side: int = _SIDE, keep: int = _KEEP) -> np.ndarray:
    """keep×side: the first ``keep`` rows of the orthonormal DCT-II matrix."""
    k, x = np.arange(keep)[:, None], np.arange(side)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * side)) * np.sqrt(2 / side)
    m[0] /= np.sqrt(2)
    return m


_PROJECTIONS: dict[int, np.ndarray] = {}


def _projection(n: int) -> np.ndarray:
    """keep×n: box-resize to 32 then the low DCT rows, as one matrix."""
    if n not in _PROJECTIONS:
        _PROJECTIONS[n] = (_dct_matrix() @ _box_matrix(n)).astype(np.float32)
    return _PROJECTIONS[n]


# Mirroring negates odd horizontal frequencies (columns of the 8×8 block).
_MIRROR = np.where(np.arange(_KEEP) % 2 == 1, -1.0, 1.0).astype(np.float32)[None, None, :]


def _bits(coeffs: np.ndarray) -> np.ndarray:
    """B×8×8 coefficients → B uint64: bit k set when AC coefficient k is above the median."""
    ac = coeffs.reshape(len(coeffs), -1)[:, 1:]
    above = ac > np.median(ac, axis=1, keepdims=True)
    return (above.astype(np.uint64) * _WEIGHTS).sum(axis=1, dtype=np.uint64)


def fingerprint_chunk(images: np.ndarray) -> np.ndarray:
    """B×H×W×3 uint8 → B fingerprints (:data:`FP_DTYPE`)."""
    out = np.zeros(len(images), dtype=FP_DTYPE)
    if not len(images):
        return out
    out["exact"] = [
        int.from_bytes(hashlib.blake2b(img.tobytes(), digest_size=8).digest(), "little")
        for img in images
    ]
    _, h, w, _ = images.shape
    gray = images.astype(np.float32) @ _LUMA  # B×H×W
    coeffs = _projection(h) @ gray @ _projection(w).T  # B×8×8 (rows: vertical frequency)
    out["phash"] = _bits(coeffs)
    out["flip"] = _bits(coeffs * _MIRROR)
    return out


# Images per chunk when fingerprints are made from a stored images.npy: at 224×224 a
# chunk is 38 MB of pixels and 150 MB of float luma, whatever the data set's size.
_CHUNK = 256


def has_fingerprints(root: Path, meta: dict) -> bool:
    """Whether the data set folder ``root`` holds fingerprints of the current version."""
    fp = meta.get("fingerprints") or {}
    return fp.get("version") == FINGERPRINT_VERSION and (root / FINGERPRINTS_FILE).is_file()


def fingerprint_meta() -> dict:
    """What ``meta.json`` records about the fingerprints beside them."""
    return {"version": FINGERPRINT_VERSION, "file": FINGERPRINTS_FILE, "bytes_per_image": 24}


def ensure_fingerprints(
    root: Path,
    images: np.ndarray,
    meta: dict,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The fingerprints of the data set in ``root`` (its version folder), made from
    ``images`` (memory-mapped) in chunks when missing or of another version: a data set
    imported before fingerprints existed gets them once. Written atomically beside the
    images, then ``meta.json`` records them; ``meta`` is updated in place.
    ``progress`` is called with each chunk's image count."""
    if has_fingerprints(root, meta):
        fps = np.load(root / FINGERPRINTS_FILE)
        if fps.dtype == FP_DTYPE and len(fps) == len(images):
            return fps
    fps = np.zeros(len(images), dtype=FP_DTYPE)
    for start in range(0, len(images), _CHUNK):
        chunk = np.asarray(images[start : start + _CHUNK])
        fps[start : start + len(chunk)] = fingerprint_chunk(chunk)
        if progress is not None:
            progress(len(chunk))
    try:
        with atomic_path(root / FINGERPRINTS_FILE) as tmp, open(tmp, "wb") as f:
            np.save(f, fps)
        meta["fingerprints"] = fingerprint_meta()
        atomic_write_text(root / "meta.json", json.dumps(meta, indent=2))
    except OSError:
        pass  # a read-only cache: used now, made again next time
    return fps
