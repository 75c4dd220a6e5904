"""Where a feature cache's activations live: in memory, or memory-mapped from a file on
disk when they are larger than the memory limit (issue #30).

A memory-mapped cache is a file of raw activations under ``$IMGCLF_FEATURE_CACHE_DIR``
(default ``$IMGCLF_HOME/feature-cache``), unlinked as soon as it is mapped: the mapping
keeps the data, the operating system's page cache keeps the recently read part in memory,
and no file is left behind when the run ends, fails or is killed. Both limits are read
from the environment on each call, so tests and users can change them at run time.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from imgclf.paths import imgclf_home

# Largest cache kept in memory, by default, and never more than half of the memory free
# when the cache is planned.
DEFAULT_LIMIT_GB = 4.0
# Largest memory-mapped cache, by default, and never more than half of the disk free.
DEFAULT_DISK_GB = 64.0


def memory_limit_bytes() -> float:
    limit = float(os.environ.get("IMGCLF_FEATURE_CACHE_GB", DEFAULT_LIMIT_GB)) * 2**30
    return min(limit, free_memory() / 2)


def free_memory() -> float:
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not on this OS: the limit alone
        return float("inf")


def disk_dir() -> Path:
    env = os.environ.get("IMGCLF_FEATURE_CACHE_DIR")
    return Path(env).expanduser() if env else imgclf_home() / "feature-cache"


def disk_limit_bytes() -> float:
    limit = float(os.environ.get("IMGCLF_FEATURE_CACHE_DISK_GB", DEFAULT_DISK_GB)) * 2**30
    return min(limit, free_disk(disk_dir()) / 2)


def free_disk(path: Path) -> float:
    # The folder may not exist yet: its nearest existing parent has the same file system.
    for p in (path, *path.parents):
        if p.exists():
            try:
                return float(shutil.disk_usage(p).free)
            except OSError:
                return 0.0
    return 0.0


@dataclass(frozen=True)
class Placement:
    """A cache's storage dtype, its size, and the folder of its memory-mapped files (None:
    in memory)."""

    dtype: torch.dtype
    nbytes: float
    directory: Path | None = None

    @property
    def where(self) -> str:
        return "in memory" if self.directory is None else f"memory-mapped in {self.directory}"

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised tensor of ``shape``, in memory or backed by an unlinked file."""
        if self.directory is None:
            return torch.empty(shape, dtype=self.dtype)
        self.directory.mkdir(parents=True, exist_ok=True)
        numel = math.prod(shape)
        fd, name = tempfile.mkstemp(prefix="activations-", suffix=".bin", dir=self.directory)
        try:
            # Sparse until written: the space is taken as the pass fills it.
            os.ftruncate(fd, max(numel, 1) * self.dtype.itemsize)
            mapped = torch.from_file(name, shared=True, size=numel, dtype=self.dtype)
        finally:
            os.close(fd)
            os.unlink(name)  # the mapping outlives the name
        return mapped.view(shape)


def place(dtype: torch.dtype, nbytes: float, unmappable: str | None = None) -> Placement | str:
    """Where a cache of ``nbytes`` goes, or why it cannot have one (a line to print);
    ``unmappable``: why this cache cannot be memory-mapped, if it cannot."""
    if nbytes <= memory_limit_bytes():
        return Placement(dtype, nbytes)
    over = (
        f"it needs {nbytes / 2**30:.1f} GB, over the limit of "
        f"{memory_limit_bytes() / 2**30:.1f} GB in memory (half the free memory at most; "
        "IMGCLF_FEATURE_CACHE_GB sets it)"
    )
    if unmappable:
        return f"{over}, and {unmappable}"
    if nbytes <= disk_limit_bytes():
        return Placement(dtype, nbytes, disk_dir())
    return (
        f"{over} and over the limit of {disk_limit_bytes() / 2**30:.1f} GB on disk in "
        f"{disk_dir()} (half the free disk at most; IMGCLF_FEATURE_CACHE_DISK_GB and "
        "IMGCLF_FEATURE_CACHE_DIR set it)"
    )
