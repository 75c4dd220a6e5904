"""Data-pipeline numbers: import, cached load, batch serving, and a PIL decode baseline.

    .venv/bin/python benchmarks/bench_data.py [--quick] [--archive PATH]

(a) ``import_dataset`` of the shared CIFAR-10 archive (50,000 JPEGs) into a temporary
IMGCLF_HOME; (b) ``load_dataset`` of the result (memory-mapped open, then reading every
image); (c) ``BatchLoader`` images/s with the CIFAR augmentation (crop_padding 4, flip) at
batch 512, channels_last on and off, at 32 px and resized to 64 and 224; (d) the baseline
the importer replaces: the same archive members decoded one by one with Pillow in one
thread; (e) what cutout adds to a batch, side by side: 32-px images at batch 512 (cutout 8)
and 224-px stored photos at batch 64 (cutout 56, random pixels). Without the archive, (a),
(b) and (d) are skipped and (c) uses random images. Results are recorded in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def machine() -> list[tuple[str, str]]:
    import torch

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("cpu", model),
        ("cores", f"{usable} usable ({os.cpu_count()} logical)"),
        ("torch", f"{torch.__version__}, {torch.get_num_threads()} threads"),
        ("python", platform.python_version()),
        ("load average", f"{load} (1, 5, 15 min) at start"),
    ]


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


# ---------------------------------------------------------------- (a), (b): import and load


def bench_import(archive: Path, home: Path) -> tuple[list[tuple[str, str, str]], object]:
    os.environ["IMGCLF_HOME"] = str(home)
    from imgclf.data import import_dataset, load_dataset

    seconds, ds = timed(import_dataset, archive, "cifar10", warn=lambda msg: None)
    n = len(ds.labels)
    rows = [("import archive (threaded)", f"{seconds:.2f} s", f"{n / seconds:,.0f} images/s")]
    seconds, ds = timed(load_dataset, "cifar10")
    rows.append(("load_dataset (mmap open)", f"{seconds * 1000:.1f} ms", f"{n:,} images"))
    seconds, images = timed(np.array, ds.images)  # every page read once
    mb = images.nbytes / 1e6
    rows.append(("read all cached images", f"{seconds * 1000:.0f} ms", f"{mb / seconds:,.0f} MB/s"))
    return rows, ds


# ---------------------------------------------------------------- (c): batches


def bench_loader(images: np.ndarray, labels: np.ndarray, quick: bool) -> list[tuple[str, ...]]:
    from imgclf.data.loader import Augment, BatchLoader

    rows = []
    budget = 0.5 if quick else 2.0  # seconds of batches per configuration
    for size in (32, 64, 224):
        for channels_last in (True, False):
            loader = BatchLoader(
                images,
                labels,
                batch_size=512,
                shuffle=True,
                augment=Augment(crop_padding=4, flip=True),
                size=size,
                channels_last=channels_last,
            )
            ips, batches = images_per_second(loader, budget)
            what = f"BatchLoader 32→{size} px, channels_last {'on' if channels_last else 'off'}"
            rows.append((what, f"{ips:,.0f} images/s", f"median of {batches} batches of 512"))
    return rows


def bench_cutout(images: np.ndarray, labels: np.ndarray, quick: bool) -> list[tuple[str, ...]]:
    from imgclf.data.loader import Augment, BatchLoader

    budget = 0.5 if quick else 2.0
    photos = np.random.default_rng(0).integers(0, 256, (1_000, 224, 224, 3), dtype=np.uint8)
    rows = []
    for what, imgs, labs, batch, crop, cut in (
        ("32 px, batch 512, crop 4 + flip", images, labels, 512, 4, 8),
        ("224 px stored, batch 64, crop 16 + flip", photos, np.zeros(len(photos)), 64, 16, 56),
    ):
        for cutout in (0, cut):
            aug = Augment(crop_padding=crop, flip=True, cutout=cutout)
            loader = BatchLoader(imgs, labs, batch_size=batch, shuffle=True, augment=aug)
            ips, batches = images_per_second(loader, budget)
            rows.append((f"{what}, cutout {cutout}", f"{ips:,.0f} images/s", f"{batches} batches"))
    return rows


def images_per_second(loader, budget: float) -> tuple[float, int]:
    """Batch size over the median batch time: robust to other processes on a shared CPU."""
    next(iter(loader))  # warm-up: allocator, thread pool
    times: list[float] = []
    epoch, started = 0, time.perf_counter()
    while True:
        epoch += 1
        loader.set_epoch(epoch)
        last = time.perf_counter()
        for x, _ in loader:
            now = time.perf_counter()
            times.append(now - last)
            last = now
            if now - started >= budget and len(times) >= 3:
                return len(x) / float(np.median(times)), len(times)


# ---------------------------------------------------------------- (d): PIL baseline


def read_members(archive: Path, limit: int | None) -> tuple[float, list[bytes]]:
    started = time.perf_counter()
    blobs = []
    with tarfile.open(archive, "r|*") as tf:
        for member in tf:
            if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                blobs.append(tf.extractfile(member).read())
                if limit and len(blobs) >= limit:
                    break
    return time.perf_counter() - started, blobs


def bench_pil(archive: Path, limit: int | None) -> list[tuple[str, str, str]]:
    from PIL import Image

    read_s, blobs = read_members(archive, limit)

    def decode_all() -> None:
        for data in blobs:
            with Image.open(io.BytesIO(data)) as im:
                np.asarray(im.convert("RGB"))

    decode_s, _ = timed(decode_all)
    n = len(blobs)
    return [
        ("read tar.gz members (1 thread)", f"{read_s:.2f} s", f"{n:,} files"),
        ("PIL decode (1 thread)", f"{decode_s:.2f} s", f"{n / decode_s:,.0f} images/s"),
        (
            "baseline total: read + PIL decode",
            f"{read_s + decode_s:.2f} s",
            f"{n / (read_s + decode_s):,.0f} images/s",
        ),
    ]


# ---------------------------------------------------------------- main


def print_table(title: str, rows: list[tuple[str, ...]]) -> None:
    print(f"\n{title}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short timings, 5,000-image baseline")
    parser.add_argument("--archive", type=Path, default=ARCHIVE, help=f"(default {ARCHIVE})")
    args = parser.parse_args(argv)

    print_table("machine", machine())
    with tempfile.TemporaryDirectory(prefix="bench-data-") as home:
        if args.archive.is_file():
            rows, ds = bench_import(args.archive, Path(home))
            print_table(f"(a, b) import and load: {args.archive.name}", rows)
            idx = ds.indices("train")
            images, labels = np.asarray(ds.images[idx]), ds.labels[idx]
        else:
            print(f"\n(a, b, d) skipped: {args.archive} not found; (c) uses random images")
            rng = np.random.default_rng(0)
            images = rng.integers(0, 256, (45_000, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, 10, 45_000)
        print_table(
            f"(c) batches: {len(labels):,} images 32×32, crop_padding 4 + flip, batch 512",
            bench_loader(images, labels, args.quick),
        )
        print_table("(e) cutout, side by side", bench_cutout(images, labels, args.quick))
    if args.archive.is_file():
        limit = 5000 if args.quick else None
        print_table("(d) baseline: Pillow, one image at a time", bench_pil(args.archive, limit))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average at end: {load}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
