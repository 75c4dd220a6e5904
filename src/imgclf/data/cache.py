"""The cached form of a dataset, and loading it back memory-mapped.

A dataset folder (``$IMGCLF_HOME/datasets/NAME``) holds:

``images.npy``        N×H×W×3 uint8, every image decoded once
``labels.npy``        N int64 class indices
``splits.npy``        N int8 split codes (index into ``meta.json``'s ``split_names``)
``files.csv``         index, split, label, source path of every sample
``import-report.csv`` every file that did not become a sample, with the reason
``meta.json``         classes, counts, image size, source, split policy

Loads read the arrays with ``mmap_mode="r"``: opening a 50,000-image set costs
milliseconds, and pages come in as batches touch them.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.errors import DataError
from imgclf.paths import dataset_dir, datasets_dir

FORMAT_VERSION = 1


@dataclass
class Dataset:
    """An imported dataset: arrays are memory-mapped, nothing is decoded again."""

    name: str
    root: Path
    classes: list[str]
    images: np.ndarray  # N×H×W×3 uint8 (memory-mapped)
    labels: np.ndarray  # N int64
    splits: np.ndarray  # N int8
    meta: dict

    @property
    def split_names(self) -> list[str]:
        return list(self.meta["split_names"])

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.meta["image_size"]
        return int(h), int(w)

    def indices(self, split: str) -> np.ndarray:
        """Sample indices of a split; ``all`` is every sample."""
        if split == "all":
            return np.arange(len(self.labels))
        if split not in self.split_names:
            have = ", ".join([*self.split_names, "all"])
            raise DataError(f"dataset {self.name!r} has no {split!r} split; choose one of: {have}")
        return np.flatnonzero(self.splits == self.split_names.index(split))

    def has_split(self, split: str) -> bool:
        return split == "all" or split in self.split_names

    def files(self) -> list[str]:
        """Source path of every sample, in index order."""
        with open(self.root / "files.csv", newline="", encoding="utf-8") as f:
            return [row["source"] for row in csv.DictReader(f)]

    def counts(self) -> dict[str, dict[str, int]]:
        """Samples per split and class."""
        out = {}
        for code, split in enumerate(self.split_names):
            per_class = np.bincount(self.labels[self.splits == code], minlength=len(self.classes))
            out[split] = {c: int(n) for c, n in zip(self.classes, per_class, strict=True)}
        return out

    def skipped(self) -> list[dict[str, str]]:
        with open(self.root / "import-report.csv", newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))


def resolve_dataset_dir(name_or_path: str | Path) -> Path:
    """A dataset name in the cache, or a path to a dataset folder."""
    path = Path(name_or_path).expanduser()
    if (path / "meta.json").is_file():
        return path
    candidate = dataset_dir(str(name_or_path))
    if (candidate / "meta.json").is_file():
        return candidate
    known = ", ".join(list_datasets()) or "none yet"
    raise DataError(
        f"no imported dataset {str(name_or_path)!r} (cached: {known}); "
        "run `imgclf data import SRC --name NAME` first"
    )


def load_dataset(name_or_path: str | Path) -> Dataset:
    root = resolve_dataset_dir(name_or_path)
    try:
        meta = json.loads((root / "meta.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{root}: cache format {meta.get('format_version')} is not {FORMAT_VERSION}; "
                "import the dataset again"
            )
        images = np.load(root / "images.npy", mmap_mode="r")
        labels = np.load(root / "labels.npy")
        splits = np.load(root / "splits.npy")
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{root}: damaged dataset cache ({exc}); import it again") from exc
    return Dataset(meta["name"], root, list(meta["classes"]), images, labels, splits, meta)


def list_datasets() -> list[str]:
    base = datasets_dir()
    if not base.is_dir():
        return []
    # Hidden names are temporary (.NAME.tmp-*) or replaced (.NAME.old) folders.
    return sorted(
        p.name for p in base.iterdir() if not p.name.startswith(".") and (p / "meta.json").is_file()
    )


def publish(tmp: Path, final: Path) -> None:
    """Move a finished dataset folder into place; readers never see half of one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        if old is not None:
            old.rename(final)  # put the previous dataset back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
