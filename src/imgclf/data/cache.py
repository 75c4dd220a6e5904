"""The cached form of a dataset, and loading it back memory-mapped.

A dataset folder (``$IMGCLF_HOME/datasets/NAME``) holds:

``images.npy``        N×H×W×3 uint8, every image decoded once
``labels.npy``        N int64 class indices
``splits.npy``        N int8 split codes (index into ``meta.json``'s ``split_names``)
``files.csv``         index, split, label, source path of every sample
``import-report.csv`` every file that did not become a sample, with the reason
``meta.json``         classes, counts, image size, source, split policy
``fingerprints.npy``  24 bytes an image: exact and perceptual hashes (data/fingerprints.py)

Loads read the arrays with ``mmap_mode="r"``: opening a 50,000-image set costs
milliseconds, and pages come in as batches touch them.

Each import writes a new version folder ``.NAME.v-XXXX`` and publishes it by swapping the
symbolic link ``NAME`` → ``.NAME.v-XXXX`` with one ``os.replace``. A load resolves the link
once and reads every file from that one folder, so a dataset read while it is imported
again never mixes the ``meta.json`` of one version with the ``labels.npy`` of another.
Publishes hold a lock on the datasets folder: two imports of one name at once both
succeed, the later one wins.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.csv_safe import read_dicts
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
    # The version folder these arrays were read from; ``root`` (a name in the cache)
    # points at whatever was imported last.
    version_root: Path | None = None

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
        with self._open("files.csv") as f:
            return [row["source"] for row in read_dicts(f)]

    def _open(self, name: str):
        """A text file of the same version as the arrays (never of a later import)."""
        try:
            return open((self.version_root or self.root) / name, newline="", encoding="utf-8")
        except FileNotFoundError:
            raise DataError(
                f"{self.root}: dataset {self.name!r} was imported again since it was loaded; "
                "load it again"
            ) from None

    def counts(self) -> dict[str, dict[str, int]]:
        """Samples per split and class."""
        out = {}
        for code, split in enumerate(self.split_names):
            per_class = np.bincount(self.labels[self.splits == code], minlength=len(self.classes))
            out[split] = {c: int(n) for c, n in zip(self.classes, per_class, strict=True)}
        return out

    def skipped(self) -> list[dict[str, str]]:
        with self._open("import-report.csv") as f:
            return read_dicts(f)


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
    """Open an imported data set by name or cache folder, its arrays memory-mapped."""
    root = resolve_dataset_dir(name_or_path)
    for _ in range(_LOAD_TRIES):
        version = root.resolve()  # one version folder for every file read below
        try:
            return _load_version(root, version)
        except FileNotFoundError:
            if root.resolve() == version:
                raise DataError(
                    f"{root}: damaged dataset cache (a file is missing); import it again"
                ) from None
            # Imported again between resolving and opening: read the new version.
    raise DataError(f"{root}: the dataset is being imported again and again; retry later")


# A load races at most one publish per try; three tries outlast any sane re-import loop.
_LOAD_TRIES = 3


def _load_version(root: Path, version: Path) -> Dataset:
    try:
        meta = json.loads((version / "meta.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{root}: cache format {meta.get('format_version')} is not {FORMAT_VERSION}; "
                "import the dataset again"
            )
        images = np.load(version / "images.npy", mmap_mode="r")
        labels = np.load(version / "labels.npy")
        splits = np.load(version / "splits.npy")
        ds = Dataset(meta["name"], root, list(meta["classes"]), images, labels, splits, meta)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{root}: damaged dataset cache ({exc}); import it again") from exc
    ds.version_root = version
    return ds


def list_datasets() -> list[str]:
    """Names of the imported data sets in the cache, sorted."""
    base = datasets_dir()
    for folder in (base.parent, base):
        if folder.exists() and not folder.is_dir():
            raise DataError(
                f"{folder}: a file, not a folder; point IMGCLF_HOME at a folder "
                "(it holds datasets/)"
            )
    if not base.is_dir():
        return []
    # Hidden names are temporary (.NAME.tmp-*) or replaced (.NAME.old) folders.
    return sorted(
        p.name for p in base.iterdir() if not p.name.startswith(".") and (p / "meta.json").is_file()
    )


def publish(tmp: Path, final: Path) -> None:
    """Make the finished folder ``tmp`` the dataset ``final``: one atomic link swap."""
    with _publish_lock(final.parent):
        version = final.with_name(f".{final.name}.v-{secrets.token_hex(6)}")
        tmp.rename(version)
        link = final.with_name(f".{final.name}.link-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.symlink(version.name, link)  # relative: the cache folder may be moved
        except (OSError, NotImplementedError):  # no symlinks here: rename into place
            _publish_by_rename(version, final)
            return
        if final.is_dir() and not final.is_symlink():
            # A dataset published before versions existed: a real folder, renamed aside
            # once (os.replace cannot put a link over a folder).
            final.rename(final.with_name(f".{final.name}.v-legacy-{secrets.token_hex(4)}"))
        os.replace(link, final)
        _remove_other_versions(final, keep=version.name)


def _remove_other_versions(final: Path, keep: str) -> None:
    """Earlier versions, folders of dead publishes (.old, .v-, .link-): under the lock, no
    publish of this name is half done, so only ``keep`` is live. A reader that already
    holds the old arrays keeps them (memory maps survive the unlink)."""
    prefixes = (f".{final.name}.v-", f".{final.name}.link-")
    for entry in final.parent.iterdir():
        if entry.name == keep:
            continue
        if entry.name.startswith(prefixes) or entry.name == f".{final.name}.old":
            if entry.is_symlink() or not entry.is_dir():
                entry.unlink(missing_ok=True)
            else:
                shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def _publish_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the datasets folder while a publish swaps names (Unix flock)."""
    try:
        import fcntl
    except ImportError:  # not on Unix: publishes are not serialized
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _publish_by_rename(tmp: Path, final: Path) -> None:
    """Where links are unavailable: move the old folder aside, the new one in."""
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
