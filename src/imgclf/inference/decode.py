"""Files → uint8 images at each run's source size, decoded ahead of the models.

Chunks of files are read and decoded in a thread pool (file reads, simplejpeg and Pillow
release the GIL) while the caller runs the models on earlier chunks. Every file goes
through :func:`imgclf.data.preprocess.file_to_uint8`, the transform the runs' training and
validation images went through, once per distinct source size among the runs (usually
once); pixels given in memory (the Python predictor's Pillow images and arrays) through
:func:`imgclf.data.preprocess.image_to_uint8`, the same transform from the decoded image
on. A file that cannot be read keeps its place, with the reason.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgclf.data.decode import Size
from imgclf.data.preprocess import file_to_uint8, image_to_uint8

# Chunks decoded ahead of the model, per decoding thread: enough to hide a slow chunk.
PREFETCH_PER_WORKER = 2


@dataclass
class Item:
    """One input file: its name in the output, and where its bytes come from."""

    file: str  # relative POSIX path (folder, archive) or the line as listed
    path: str | None = None  # read by a decoding thread
    data: bytes | None = None  # archive members, already in memory
    error: str | None = None  # known unreadable before decoding (e.g. a broken link)
    image: Any = None  # pixels in memory: a Pillow image or an H×W×3 uint8 array


@dataclass
class Decoded:
    """One chunk: the reason each file failed (None when read), and for each source size
    the good images as (positions in the chunk, N×H×W×3 uint8)."""

    reasons: list[str | None]
    groups: dict[Size, tuple[np.ndarray, np.ndarray]]


def _read(item: Item) -> tuple[bytes | None, str | None]:
    if item.error is not None:
        return None, item.error
    if item.data is not None:
        return item.data, None
    try:
        with open(item.path, "rb") as f:  # type: ignore[arg-type]
            return f.read(), None
    except OSError as exc:
        return None, f"cannot read file ({exc.strerror or exc})"


def _decode(item: Item, sizes: Sequence[Size]) -> tuple[dict[Size, np.ndarray], str | None]:
    """One item at every source size, or why it could not be read."""
    arrays: dict[Size, np.ndarray] = {}
    data, why = (None, None) if item.image is not None else _read(item)
    for size in sizes:
        if why is not None:
            break
        if item.image is not None:
            arrays[size], why = image_to_uint8(item.image, size)
        else:
            arrays[size], why = file_to_uint8(data, None, size)
    return arrays, why


def decode_items(items: Sequence[Item], sizes: Sequence[Size]) -> Decoded:
    """Decode a chunk at every source size (runs in a worker thread)."""
    reasons: list[str | None] = []
    good: dict[Size, list[tuple[int, np.ndarray]]] = {size: [] for size in sizes}
    for pos, item in enumerate(items):
        arrays, why = _decode(item, sizes)
        reasons.append(why)
        if why is None:
            for size, arr in arrays.items():
                good[size].append((pos, arr))
    groups = {
        size: (
            np.array([p for p, _ in rows], dtype=np.int64),
            np.stack([a for _, a in rows]) if rows else np.empty((0, *size, 3), np.uint8),
        )
        for size, rows in good.items()
    }
    return Decoded(reasons, groups)


def decode_ahead(
    chunks: list[list[Item]], sizes: Sequence[Size], workers: int
) -> Iterator[tuple[list[Item], Decoded]]:
    """Chunks in order, each decoded in the pool while the caller works on earlier ones.

    ``workers`` threads, ``workers * PREFETCH_PER_WORKER`` chunks in flight. Closing the
    iterator (or an error in the caller) stops the threads and drops the chunks not begun.
    """
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="imgclf-decode")
    pending: deque[tuple[list[Item], Future[Decoded]]] = deque()
    todo = iter(chunks)
    try:
        for chunk in todo:
            pending.append((chunk, pool.submit(decode_items, chunk, sizes)))
            if len(pending) >= workers * PREFETCH_PER_WORKER:
                break
        while pending:
            chunk, future = pending.popleft()
            following = next(todo, None)
            if following is not None:
                pending.append((following, pool.submit(decode_items, following, sizes)))
            yield chunk, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def merge(jobs: Sequence[tuple[Decoded, int]]) -> Decoded:
    """Several decoded chunks of ``rows`` files each as one (positions shifted past the
    earlier ones): requests that share a forward pass."""
    reasons: list[str | None] = []
    groups: dict[Size, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    offset = 0
    for decoded, rows in jobs:
        reasons += decoded.reasons
        for size, (positions, images) in decoded.groups.items():
            pos, imgs = groups.setdefault(size, ([], []))
            pos.append(positions + offset)
            imgs.append(images)
        offset += rows
    return Decoded(
        reasons,
        {size: (np.concatenate(p), np.concatenate(i)) for size, (p, i) in groups.items()},
    )
