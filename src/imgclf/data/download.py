"""Named datasets fetched through torchvision when online (``imgclf data import cifar10``).

Offline, the error says in one line which archive to fetch and how to import it.
"""

from __future__ import annotations

from pathlib import Path

from imgclf.data.cache import Dataset
from imgclf.data.importer import import_dataset
from imgclf.errors import DataError
from imgclf.paths import imgclf_home

# torchvision's dataset class, the folder it unpacks, and the archive a user can fetch.
NAMED = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", "cifar-100-python", "cifar-100-python.tar.gz"),
}
URL_BASE = "https://www.cs.toronto.edu/~kriz/"


def downloads_dir() -> Path:
    return imgclf_home() / "downloads"


def fetch_named(name: str) -> Path:
    """Folder of the named dataset's batches, downloading it with torchvision if needed."""
    cls_name, folder, archive = NAMED[name]
    root = downloads_dir()
    if (root / folder).is_dir():
        return root / folder
    import torchvision.datasets as tvd

    try:
        getattr(tvd, cls_name)(root=str(root), train=True, download=True)
    except Exception as exc:  # URLError, socket errors, HTTP errors: all mean "no download"
        raise DataError(
            f"cannot download {name} ({type(exc).__name__}: offline?); fetch "
            f"{URL_BASE}{archive} and run `imgclf data import PATH/{archive} --name {name}`"
        ) from exc
    return root / folder


def import_named(
    name: str, *, name_as: str | None = None, val_fraction: float = 0.1, seed: int = 0, **kw
) -> Dataset:
    key = name.lower()
    if key not in NAMED:
        raise DataError(f"unknown named dataset {name!r}; choose one of: {', '.join(NAMED)}")
    folder = fetch_named(key)
    return import_dataset(folder, name_as or key, val_fraction=val_fraction, seed=seed, **kw)
