"""A dataset source read as a tree of files, and the rules for which files are data.

A source is a folder or an archive (``.tar``, ``.tar.gz``, ``.tgz``, ``.zip``);
:func:`open_tree` reads either as a :class:`Tree` of relative POSIX paths: a folder walked
once (symbolic links followed once), an archive read in one sequential pass, in place
(nothing is unpacked to disk). Entries that never became files (a broken link, an unsafe
archive member) are kept as :class:`Skipped` rows with the reason, never dropped.
:func:`is_image_name` and :func:`is_hidden` are the one rule each for "an image file" and
"a hidden file or OS metadata", shared by ``data import`` and ``predict``. Which shape a
tree holds is decided in :mod:`imgclf.data.scan`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from imgclf.data.archives import IMAGE_EXTENSIONS, ArchiveMembers, read_archive
from imgclf.errors import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
# macOS zips carry a metadata tree beside the data; Finder's "._x.jpg" AppleDouble files
# are caught by the leading dot.
MACOS_METADATA_DIR = "__MACOSX"
HIDDEN_REASON = "hidden file or OS metadata"


@dataclass
class Sample:
    """One image to decode: where its bytes come from, its split and label index."""

    source: str  # path shown to the user and stored in the cache
    split: str
    label: int
    data: bytes | None = None  # archive members are read up front
    path: str | None = None  # folder files are read by the decoding worker
    array: np.ndarray | None = None  # CIFAR batches arrive decoded (32×32×3 uint8)


@dataclass
class Skipped:
    """A file or entry left out of the data, and why (a row of the import report)."""

    path: str
    reason: str


def is_image_name(rel: str) -> bool:
    """Whether a file's name says it is an image (by extension, any case)."""
    return PurePosixPath(rel).suffix.lower() in IMAGE_EXTENSIONS


def is_hidden(rel: str) -> bool:
    """Whether a relative path is a hidden file or OS metadata, never data: any part starting
    with "." (``.DS_Store``, AppleDouble ``._x.jpg``, ``.hidden.jpg``, a ``.git/`` folder)
    or named ``__MACOSX``."""
    return any(p.startswith(".") or p == MACOS_METADATA_DIR for p in rel.split("/"))


class Tree:
    """Files of a folder or archive as relative POSIX paths (the root is '').

    ``dirs`` lists the folders too, so an empty class folder is still seen (and reported).
    """

    def __init__(
        self, origin: str, files: list[str], prefix: str = "", dirs: list[str] | None = None
    ) -> None:
        self.origin = origin
        self.files = files
        self.prefix = prefix
        self.dirs = dirs or []
        self.skipped: list[Skipped] = []  # entries that never became files, with the reason
        self.warnings: list[str] = []

    def describe(self, rel: str) -> str:
        return f"{self.origin}/{self.prefix}{rel}" if self.prefix or rel else self.origin

    def where(self) -> str:
        """This tree's root as the user would name it (inside a descended folder too)."""
        return self.describe("").rstrip("/") or self.origin

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def sample(self, rel: str, split: str, label: int) -> Sample:
        return Sample(source=self.describe(rel), split=split, label=label, data=self.read(rel))

    def subtree(self, name: str) -> Tree:
        """The same tree seen from inside folder ``name``."""
        start = name + "/"
        sub = self.__class__.__new__(self.__class__)
        sub.__dict__.update(self.__dict__)
        sub.files = [f[len(start) :] for f in self.files if f.startswith(start)]
        sub.dirs = [d[len(start) :] for d in self.dirs if d.startswith(start)]
        sub.prefix = self.prefix + start
        return sub

    def top_level(self) -> tuple[set[str], list[str]]:
        dirs = {f.split("/", 1)[0] for f in self.files if "/" in f}
        dirs |= {d.split("/", 1)[0] for d in self.dirs}
        files = [f for f in self.files if "/" not in f]
        return dirs, files


class FolderTree(Tree):
    """A folder walked once. Symbolic links are followed once: a link to a folder already
    read (a loop, or a second link to it) and a broken link are reported, never dropped."""

    def __init__(self, root: Path) -> None:
        files, dirs, skipped = [], [], []
        seen = {_inode(root)}
        walk = os.walk(root, onerror=_raise_walk_error, followlinks=True)
        for dirpath, dirnames, filenames in walk:
            rel_dir = os.path.relpath(dirpath, root)
            if rel_dir != ".":
                dirs.append(rel_dir.replace(os.sep, "/"))
            dirnames[:] = _follow_once(dirpath, sorted(dirnames), seen, skipped)
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if os.path.islink(full) and not os.path.exists(full):
                    skipped.append(Skipped(full, "broken symbolic link"))
                    continue
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                files.append(rel.replace(os.sep, "/"))
        super().__init__(str(root), files, dirs=dirs)
        self.skipped = skipped
        self.root = root

    def read(self, rel: str) -> bytes:
        return (self.root / self.prefix / rel).read_bytes()

    def sample(self, rel: str, split: str, label: int) -> Sample:
        # Folder files are read by the decoding workers, in parallel.
        full = str(self.root / self.prefix / rel)
        return Sample(source=full, split=split, label=label, path=full)

    def describe(self, rel: str) -> str:
        return str(self.root / self.prefix / rel)


class MemoryTree(Tree):
    """An archive, read once front to back; the members a scan can use kept as bytes."""

    def __init__(self, origin: str, found: ArchiveMembers) -> None:
        super().__init__(origin, sorted(found.files), dirs=sorted(found.dirs - {""}))
        self.members = found.files
        self.skipped = [Skipped(path, why) for path, why in found.skipped]
        self.warnings = found.warnings

    def read(self, rel: str) -> bytes:
        data = self.members[self.prefix + rel]
        if data is None:  # only images, CSV files and CIFAR batches are kept
            raise DataError(f"{self.describe(rel)}: not read from the archive (not an image)")
        return data


def _inode(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _follow_once(
    dirpath: str, names: list[str], seen: set[tuple[int, int]], skipped: list[Skipped]
) -> list[str]:
    """The sub-folders of ``dirpath`` to walk: each real folder once, whatever links to it."""
    real = [n for n in names if not os.path.islink(os.path.join(dirpath, n))]
    for name in real:  # real folders first, so a link never hides the folder it names
        seen.add(_inode(os.path.join(dirpath, name)))
    keep = set(real)
    for name in names:
        full = os.path.join(dirpath, name)
        if name in keep:
            continue
        try:
            key = _inode(full)
        except OSError:
            skipped.append(Skipped(full, "broken symbolic link"))
            continue
        if key in seen:
            why = "symbolic link to a folder read already (a loop or a second link): not followed"
            skipped.append(Skipped(full, why))
            continue
        seen.add(key)
        keep.add(name)
    return [n for n in names if n in keep]


def _raise_walk_error(err: OSError) -> None:
    raise DataError(f"{err.filename}: cannot read folder ({err.strerror}); check permissions")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def open_tree(src: Path) -> Tree:
    """``src`` as a tree: an archive read once into memory, or a folder walked once."""
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if is_archive(src):
        return MemoryTree(str(src), read_archive(src))
    if src.is_dir():
        return FolderTree(src)
    raise DataError(
        f"{src}: not a folder or a .tar/.tar.gz/.tgz/.zip archive; "
        "give an image folder, an archive or CIFAR batches"
    )


_DIGITS = re.compile(r"(\d+)")


def natural_key(rel: str) -> tuple:
    """Sort key: digit runs compare as numbers (``2.png`` < ``10.png``), per path part,
    case-insensitively; the path itself breaks the remaining ties (``02`` vs ``2``)."""
    parts = tuple(
        tuple(int(t) if i % 2 else t.casefold() for i, t in enumerate(_DIGITS.split(part)))
        for part in rel.split("/")
    )
    return parts, rel
