"""``imgclf data import``: any source → one cached dataset, each image decoded once.

Decoding runs in a thread pool, in chunks (the decoders release the GIL); results are
written straight into a memory-mapped ``images.npy`` inside a temporary folder that is
renamed into place only when everything succeeded.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from imgclf.csv_safe import write_rows
from imgclf.data.cache import FORMAT_VERSION, Dataset, load_dataset, publish
from imgclf.data.decode import Size, cover_crop, decode_chunk, default_workers, probe
from imgclf.data.dedupe import dedupe as remove_duplicates
from imgclf.data.fingerprints import FINGERPRINTS_FILE, fingerprint_chunk, fingerprint_meta
from imgclf.data.scan import ScannedSource, scan_source
from imgclf.data.sources import IMAGE_EXTENSIONS, Sample, Skipped
from imgclf.data.splits import stratified_split
from imgclf.errors import DataError, UserError
from imgclf.io_utils import make_folder
from imgclf.paths import dataset_dir, datasets_dir

CHUNK = 256
# Largest side a guessed (no --image-size) cache gets: photos are stored as 224×224 centre
# crops, the input size of the bundled photo recipes, so training and evaluation need no
# resize at all. 3,000 photos then take 450 MB. Small square data (CIFAR 32, STL 96)
# keeps its size.
DEFAULT_MAX_SIDE = 224

Warn = Callable[[str], None]


def _stderr_warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _thread_map(fn, jobs: list, workers: int) -> Iterator:
    """``map`` in order over a thread pool: simplejpeg, Pillow and file reads release the GIL."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(fn, jobs)


def _target_size(sizes: list[Size], image_size: int | None) -> Size:
    """The cache's square size: ``--image-size``, else the shorter side of the most common
    size (ties go to the larger image, so little detail is lost) or, when no size is shared
    by half the images, the median shorter side; at most DEFAULT_MAX_SIDE.

    Always square: models take square inputs, and a non-square cache would be squashed to
    them on every batch while a file given to ``predict`` is centre-cropped, so the two
    paths would see different pictures (imgclf.data.preprocess).
    """
    if image_size is not None:
        return (image_size, image_size)
    counts = Counter(sizes)
    h, w = max(counts, key=lambda s: (counts[s], s[0] * s[1]))
    side = min(h, w)
    if counts[(h, w)] * 2 < len(sizes):
        # No size dominates (photos of every size): the median shorter side, so one odd
        # image does not decide how much detail all the others keep.
        side = int(np.median([min(s) for s in sizes]))
    side = min(side, DEFAULT_MAX_SIDE)
    return (side, side)


def import_dataset(
    src: str | Path,
    name: str | None = None,
    *,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    labels_csv: str | Path | None = None,
    workers: int | None = None,
    warn: Warn = _stderr_warn,
    dest: Path | None = None,
    dedupe: bool = False,
) -> Dataset:
    """Decode an image source once into the cache (``imgclf data import``).

    Args:
        src: a folder of class folders (``photos/<class>/*.jpg``) or of ``train``/``val``/
            ``test`` splits of them, a flat folder with ``labels_csv`` (``id,label``),
            CIFAR-10/100 batches, or a ``.tar``/``.tar.gz``/``.tgz``/``.zip`` of these.
        name: the dataset's name in the cache (default: the source's file name).
        image_size: the cache's square side, each image scaled to cover it and
            centre-cropped (default: the images' common shorter side, at most 224 px).
        val_fraction: the share of each class held out as ``val`` when the source has no
            validation split (by ``seed``). ``workers``: decoding threads.
        warn: called with each warning line (default: stderr). ``dest``: the dataset's
            folder (default: ``$IMGCLF_HOME/datasets/<name>``).
        dedupe: keep one image per duplicate group (:mod:`imgclf.data.dedupe`).

    Returns:
        The ``Dataset``: classes, memory-mapped uint8 images, labels, splits. Files that
        cannot be read are skipped, with the reason; a bad source is one ``DataError`` line.

    Example::

        ds = imgclf.import_dataset("photos/", name="photos", val_fraction=0.2)
    """
    src = Path(src).expanduser()
    if image_size is not None and not 1 <= image_size <= 4096:
        raise DataError(f"--image-size {image_size}: must be between 1 and 4096 pixels")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction}: must be at least 0 and below 1")
    name = name or _default_name(src)
    if name.startswith(".") or "/" in name or os.sep in name:
        # A path would escape the cache; a leading dot is how temporary folders are named.
        raise DataError(
            f"{name!r}: not a usable dataset name (no '/', no leading '.'); pass --name"
        )
    labels = Path(labels_csv).expanduser() if labels_csv else None
    return _build_cache(
        lambda: scan_source(src, labels),
        dest or dataset_dir(name),
        name=name,
        source=str(src.resolve()),
        image_size=image_size,
        val_fraction=val_fraction,
        seed=seed,
        workers=workers or default_workers(),
        warn=warn,
        dedupe=dedupe,
    )


def _build_cache(
    scan: Callable[[], ScannedSource],
    final: Path,
    *,
    name: str,
    source: str,
    image_size: int | None,
    val_fraction: float,
    seed: int,
    workers: int,
    warn: Warn,
    dedupe: bool = False,
) -> Dataset:
    """Scan, decode and write a dataset in a temporary folder, then rename it into place."""
    tmp = _make_tmp(final)
    try:
        started = time.perf_counter()
        scanned = scan()
        for msg in scanned.warnings:
            warn(msg)
        info = _decode_all(scanned, tmp, image_size, workers, warn)
        if dedupe:
            info["deduplicated"] = remove_duplicates(scanned, tmp, warn)
        meta = _finish(scanned, info, tmp, name, source, val_fraction, seed, warn)
        meta["import_seconds"] = round(time.perf_counter() - started, 3)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        publish(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(
                f"{final.parent}: disk full while writing dataset {name!r} ({exc.strerror}); "
                "free some space or set IMGCLF_HOME to a folder on another disk"
            ) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_dataset(final)


def _default_name(src: Path) -> str:
    stem = src.name
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem or "dataset"


def _make_tmp(final: Path) -> Path:
    """``.NAME.tmp-PID-XXXX`` beside ``final``; the pid lets a later import see it is stale."""
    parent = final.parent
    try:  # a broken link or a file in the way: one line naming it
        make_folder(parent, "IMGCLF_HOME")
    except UserError as exc:
        raise DataError(str(exc)) from None
    try:
        _remove_stale_tmp(parent)
        return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise DataError(
            f"{parent}: cannot write the dataset cache ({exc.strerror}); "
            f"set IMGCLF_HOME to a writable folder (now {datasets_dir().parent})"
        ) from exc


# A temporary folder without a pid (written before pids were recorded) counts as stale
# once no import could still be running in it.
_UNTAGGED_STALE_SECONDS = 24 * 3600
_TMP_NAME = re.compile(r"\..+\.tmp-(?:(\d+)-)?[^/]*")


def _remove_stale_tmp(parent: Path) -> None:
    """Remove ``.NAME.tmp-PID-*`` folders whose import died (kill -9, power cut, full disk):
    without this they hold their disk space forever, invisible to ``data list``."""
    for entry in parent.iterdir():
        match = _TMP_NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir():
            continue
        pid = match.group(1)
        if pid is not None:
            stale = not _pid_alive(int(pid))
        else:
            stale = time.time() - entry.stat().st_mtime > _UNTAGGED_STALE_SECONDS
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a pid this platform cannot hold)
    return True


def _decode_all(
    scanned: ScannedSource, tmp: Path, image_size: int | None, workers: int, warn: Warn
) -> dict:
    """Decode every sample into ``tmp/images.npy``; failed files join ``scanned.skipped``.

    Without ``--image-size`` the target comes from the most common size. It is guessed from the
    headers of the first chunk and checked at the end; only a wrong guess (a data set whose
    first images are unlike the rest) costs a second pass.
    """
    if not scanned.samples:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"{scanned.origin}: no image files found ({exts}); check the folder")
    if image_size is not None:
        target = (image_size, image_size)
    else:
        guesses = [_header_size(s) for s in scanned.samples[:CHUNK]]
        target = _target_size([g for g in guesses if g is not None] or [(32, 32)], None)
    images = tmp / "images.npy"
    kept, natives, reasons, fps = _decode_into(scanned.samples, images, target, workers)
    if image_size is None:
        best = _target_size([n for n in natives if n is not None] or [target], None)
        if best != target:
            target = best
            kept, natives, reasons, fps = _decode_into(scanned.samples, images, target, workers)
    for s, reason in zip(scanned.samples, reasons, strict=True):
        if reason is not None:
            _skip(scanned, s, reason, warn)
    if not kept:
        n = len(scanned.samples)
        raise DataError(f"{scanned.origin}: no readable images ({n} files skipped)")
    scanned.samples = kept
    for s in kept:  # the compressed bytes are no longer needed
        s.data = s.array = None
    np.save(tmp / FINGERPRINTS_FILE, fps)
    resized = sum(1 for n in natives if n is not None and n != target)
    return {"image_size": list(target), "resized": resized}


def _header_size(s: Sample) -> Size | None:
    return s.array.shape[:2] if s.array is not None else probe(s.data, s.path)


def _decode_into(
    samples: list[Sample], path: Path, target: Size, workers: int
) -> tuple[list[Sample], list[Size | None], list[str | None], np.ndarray]:
    """Decode all samples at ``target`` into a .npy file; returns kept samples, sizes,
    reasons, and the kept images' fingerprints (made from each decoded chunk while it is
    in memory: imgclf.data.fingerprints)."""
    shape = (len(samples), *target, 3)
    path.unlink(missing_ok=True)  # a second pass: the first pass's space is free again
    _check_space(path.parent, shape)
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    _allocate(path)
    chunks = list(_chunks(samples, CHUNK))
    kept: list[Sample] = []
    natives: list[Size | None] = []
    reasons: list[str | None] = []
    fps = []

    def work(chunk: list[Sample]):
        if all(s.array is not None for s in chunk):  # CIFAR batches: already decoded
            arrays = np.stack(
                [
                    s.array if s.array.shape[:2] == target else cover_crop(s.array, target)
                    for s in chunk
                ]
            )
            sizes, why = [s.array.shape[:2] for s in chunk], [None] * len(chunk)
        else:
            arrays, sizes, why = decode_chunk([(s.data, s.path) for s in chunk], target)
        return arrays, sizes, why, fingerprint_chunk(arrays)

    results = _thread_map(work, chunks, workers)
    for chunk, (arrays, sizes, why, fp) in zip(chunks, results, strict=True):
        images[len(kept) : len(kept) + len(arrays)] = arrays
        fps.append(fp)
        kept += [s for s, r in zip(chunk, why, strict=True) if r is None]
        natives += sizes
        reasons += why
    images.flush()
    del images
    if len(kept) < len(samples):  # some files failed: trim the unused tail
        arr = np.load(path, mmap_mode="r")[: len(kept)].copy()
        np.save(path, arr)
    return kept, natives, reasons, np.concatenate(fps)


# Besides the images: labels, split codes, files.csv, the report and the .npy header.
_SPACE_MARGIN = 16 << 20


def _check_space(folder: Path, shape: tuple[int, ...]) -> None:
    """One line when the images array cannot fit: its size is known before any decoding."""
    need = int(np.prod(shape)) + _SPACE_MARGIN
    free = shutil.disk_usage(folder).free
    if free < need:
        n, h, w, _ = shape
        raise DataError(
            f"{folder.parent}: not enough disk space for {n} images at {h}×{w} "
            f"({need / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free); "
            "free some space, pass a smaller --image-size, or set IMGCLF_HOME to another disk"
        )


def _allocate(path: Path) -> None:
    """Give the memory-mapped file real blocks now.

    A memory-mapped file is sparse: on a full disk a write into one of its pages dies with
    SIGBUS, no exception and no message. Allocating up front (posix_fallocate) turns that
    into ENOSPC here, and another writer cannot take the space during the decode.
    """
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            # EOPNOTSUPP/EINVAL: the file system cannot preallocate; the space check stands.


def _skip(scanned: ScannedSource, s: Sample, reason: str | None, warn: Warn) -> None:
    reason = reason or "unknown"
    scanned.skipped.append(Skipped(s.source, reason))
    warn(f"{s.source}: skipped: {reason}")


def _finish(
    scanned: ScannedSource,
    info: dict,
    tmp: Path,
    name: str,
    source: str,
    val_fraction: float,
    seed: int,
    warn: Warn,
) -> dict:
    samples = scanned.samples
    labels = np.array([s.label for s in samples], dtype=np.int64)
    split_of = [s.split for s in samples]
    _check_classes(scanned, labels)
    split_names = sorted(set(split_of), key=["train", "val", "test"].index)
    codes = np.array([split_names.index(s) for s in split_of], dtype=np.int8)
    made_val = False
    if "val" not in split_names and "train" in split_names and val_fraction > 0:
        train_idx = np.flatnonzero(codes == split_names.index("train"))
        val_idx = stratified_split(labels[train_idx], val_fraction, seed)
        split_names = [*split_names, "val"]
        codes[train_idx[val_idx]] = split_names.index("val")
        made_val = True
    np.save(tmp / "labels.npy", labels)
    np.save(tmp / "splits.npy", codes)
    _write_files_csv(tmp / "files.csv", samples, labels, codes, split_names)
    _write_report(tmp / "import-report.csv", scanned.skipped)
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "source": source,
        "source_shape": scanned.shape,
        "classes": scanned.classes,
        "num_samples": len(samples),
        "image_size": info["image_size"],
        "resize_policy": "scale to cover, bicubic antialiased, centre crop",
        "resized": info["resized"],
        "split_names": split_names,
        "val_split": (
            {"from": "train", "fraction": val_fraction, "seed": seed, "stratified": True}
            if made_val
            else {"from": "source"}
        ),
        "skipped": len(scanned.skipped),
        "deduplicated": info.get("deduplicated"),
        "fingerprints": fingerprint_meta(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _check_classes(scanned: ScannedSource, labels: np.ndarray) -> None:
    if len(scanned.classes) < 2:
        raise DataError(
            f"{scanned.origin}: found {len(scanned.classes)} class(es) {scanned.classes}; "
            "a classifier needs at least 2 class folders or labels"
        )
    counts = np.bincount(labels, minlength=len(scanned.classes))
    for cls, n in zip(scanned.classes, counts, strict=True):
        if n == 0:
            where = scanned.class_dirs.get(cls, f"{scanned.origin}: class {cls!r}")
            bad = sum(1 for s in scanned.skipped if f"/{cls}/" in s.path)
            found = f"{bad} files skipped, see the warnings above" if bad else "empty folder"
            raise DataError(
                f"{where}: no readable images ({found}); add images or remove the folder"
            )


# Source paths come from the files' names: neutralised for spreadsheets (imgclf.csv_safe),
# restored where imgclf.data.cache reads them back. \r\n as csv.writer's default wrote.
def _write_files_csv(path: Path, samples, labels, codes, split_names) -> None:
    rows = (
        [i, split_names[code], int(lab), s.source]
        for i, (s, lab, code) in enumerate(zip(samples, labels, codes, strict=True))
    )
    with open(path, "w", newline="", encoding="utf-8") as f:
        write_rows(f, [["index", "split", "label", "source"]], end="\r\n")
        write_rows(f, rows, end="\r\n")


def _write_report(path: Path, skipped: list[Skipped]) -> None:
    rows = [["path", "reason"], *([s.path, s.reason] for s in skipped)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        write_rows(f, rows, end="\r\n")


def import_arrays(
    images: np.ndarray,
    labels: np.ndarray | list[int],
    classes: list[str],
    name: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    source: str = "arrays",
    warn: Warn = _stderr_warn,
    dest: Path | None = None,
) -> Dataset:
    """Import in-memory N×H×W×3 uint8 images with label indices into ``classes`` as ``name``.

    The same path as :func:`import_dataset` (decoded samples, stratified val split, atomic
    publish); ``source`` is recorded as the dataset's origin, e.g. a function name.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{source}: images must be N×H×W×3 uint8, got {images.dtype} {images.shape}"
        )
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: need one integer label per image, got {labels.shape}")
    if len(labels) and not 0 <= labels.min() <= labels.max() < len(classes):
        raise DataError(f"{source}: labels must lie in 0..{len(classes) - 1}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction}: must be at least 0 and below 1")
    if name.startswith(".") or "/" in name or os.sep in name:
        raise DataError(f"{name!r}: not a usable dataset name (no '/', no leading '.')")
    samples = [
        Sample(f"{source}[{i}]", "train", int(lab), array=img)
        for i, (img, lab) in enumerate(zip(images, labels, strict=True))
    ]
    scanned = ScannedSource("arrays", list(classes), samples, origin=source)
    return _build_cache(
        lambda: scanned,
        dest or dataset_dir(name),
        name=name,
        source=source,
        image_size=None,
        val_fraction=val_fraction,
        seed=seed,
        workers=default_workers(),
        warn=warn,
    )
