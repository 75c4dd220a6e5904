"""Shared fixtures: a private IMGCLF_HOME per test, and tiny generated data sources.

Every image here is generated (PIL/numpy) into ``tmp_path``: solid colours where a test
checks pixel values, 8×8 by default so the whole data test set runs in seconds.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# fp32 on every CPU, set at import so module-scoped fixtures and subprocesses see it too:
# the suite's equalities (two processes against one, ONNX against torch, saved against
# recomputed scores) are fp32 ones; bf16 autocast on an AVX512-BF16 CPU moved them by 1e-4
# (imgclf.runtime.device).
os.environ["IMGCLF_CPU_BF16"] = "0"
# The process's own IMGCLF_HOME, under the per-test one below: a test's
# monkeypatch.undo() (which also undoes that fixture's setenv) then falls back to this
# session's folder, never to the user's ~/.cache/imgclf (kept ONNX graphs and engine
# timings were found written there by such tests).
SESSION_HOME = Path(tempfile.mkdtemp(prefix="imgclf-test-home-"))
os.environ["IMGCLF_HOME"] = str(SESSION_HOME)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(SESSION_HOME, ignore_errors=True)


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
# Distinct solid colours per class, so a class mix-up shows in the pixels.
CLASS_COLOURS = {"cat": RED, "dog": GREEN, "bird": BLUE}


@pytest.fixture(autouse=True)
def imgclf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache: nothing touches ~/.cache/imgclf."""
    home = tmp_path / "imgclf-home"
    monkeypatch.setenv("IMGCLF_HOME", str(home))
    return home


def datasets_root(home: Path) -> Path:
    return home / "datasets"


def cache_entries(home: Path) -> list[str]:
    """Everything in the datasets folder, hidden temporary folders included."""
    root = datasets_root(home)
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def save_image(
    path: Path,
    colour=RED,
    size: tuple[int, int] = (8, 8),
    *,
    mode: str = "RGB",
    fmt: str | None = None,
    **save_kwargs,
) -> Path:
    """A solid image of ``size`` (height, width); format from the suffix unless ``fmt``."""
    h, w = size
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (w, h), colour).save(path, fmt, **save_kwargs)
    return path


def save_array(path: Path, arr: np.ndarray, fmt: str | None = None, **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, fmt, **save_kwargs)
    return path


def make_class_tree(
    root: Path, counts: dict[str, int], size=(8, 8), ext: str = ".png"
) -> dict[str, list[Path]]:
    """``root/<class>/<i>.png``, each image solid in its class colour."""
    out = {}
    for cls, n in counts.items():
        colour = CLASS_COLOURS.get(cls, (17 * len(cls) % 256, 99, 7))
        out[cls] = [save_image(root / cls / f"{i:03d}{ext}", colour, size) for i in range(n)]
    return out


def all_files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- CIFAR batches


def cifar_images(n: int, start: int) -> np.ndarray:
    """N×32×32×3 uint8 images, each filled with a pattern unique to its global index."""
    rng = np.random.default_rng(start)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _to_rows(images: np.ndarray) -> np.ndarray:
    # torchvision's layout: each row is the R plane, then G, then B (N×3072).
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def write_cifar10(root: Path, per_batch: int = 4, num_classes: int = 3) -> dict:
    """A fake ``cifar-10-batches-py`` with ``per_batch`` images per batch; returns the truth."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"class{i}" for i in range(num_classes)]
    (root / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    )
    truth = {"classes": names, "train": ([], []), "test": ([], [])}
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, fname in enumerate(files):
        images = cifar_images(per_batch, start=k)
        labels = [(k + i) % num_classes for i in range(per_batch)]
        batch = {b"batch_label": fname.encode(), b"labels": labels, b"data": _to_rows(images)}
        (root / fname).write_bytes(pickle.dumps(batch))
        split = "test" if fname == "test_batch" else "train"
        truth[split][0].append(images)
        truth[split][1].extend(labels)
    (root / "readme.html").write_text("<html></html>")
    for split in ("train", "test"):
        truth[split] = (np.concatenate(truth[split][0]), np.array(truth[split][1]))
    return truth


def write_cifar100(root: Path, n_train: int = 10, n_test: int = 4, num_classes: int = 4) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    names = [f"fine{i}" for i in range(num_classes)]
    meta = {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"c"]}
    (root / "meta").write_bytes(pickle.dumps(meta))
    truth = {"classes": names}
    for k, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        images = cifar_images(n, start=100 + k)
        fine = [(i * 3 + k) % num_classes for i in range(n)]
        batch = {b"fine_labels": fine, b"coarse_labels": [0] * n, b"data": _to_rows(images)}
        (root / split).write_bytes(pickle.dumps(batch))
        truth[split] = (images, np.array(fine))
    return truth


# ---------------------------------------------------------------- archives

ARCHIVE_FORMATS = [".tar", ".tar.gz", ".tgz", ".zip"]


def make_archive(src: Path, dest: Path, arcroot: str = "") -> Path:
    """Pack the contents of ``src`` into ``dest`` (format from its suffix), under ``arcroot``."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    names = [(p, f"{arcroot}/{p.relative_to(src).as_posix()}".lstrip("/")) for p in files]
    if dest.name.endswith(".zip"):
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
            for p, name in names:
                zf.write(p, name)
    else:
        mode = "w:gz" if dest.name.endswith((".tar.gz", ".tgz")) else "w"
        with tarfile.open(dest, mode) as tf:
            for p, name in names:
                tf.add(p, name)
    return dest


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# Headless Chromium as the report and serve tests run it: no GPU, no network of its own,
# no first-run pages, /dev/shm-safe in containers.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
)
