"""Read CIFAR-10 / CIFAR-100 python batches (as torchvision stores them) without running code.

The batches are pickles, and a pickle can name any function to call. :func:`safe_unpickle`
admits only the few numpy and codec names a real batch (or a re-pickled copy) asks for, so
a crafted batch is refused with a one-line error instead of running code. A batch's shape,
dtype and labels are checked before any sample is made from it.
"""

from __future__ import annotations

import io
import pickle

import numpy as np

from imgclf.data.sources import Sample, Skipped, Tree
from imgclf.errors import DataError

# Files that together say "a CIFAR batch folder", by kind (torchvision's layout).
CIFAR_MARKERS = {
    "cifar10": ("batches.meta", "data_batch_1"),
    "cifar100": ("meta", "train"),
}


# Everything a real CIFAR-10/100 python batch (Python 2 cPickle) or a re-pickled copy
# (numpy's protocol 2/4/5 reducers; ``_codecs.encode`` is how Python 3 writes bytes at
# protocol 2) asks the unpickler to look up. Dicts, lists, bytes, str and ints need no
# lookup at all. Anything else (``os.system``, ``builtins.eval``…) would be code to run.
_PICKLE_ALLOWED = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class _CifarUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that admits only the names in ``_PICKLE_ALLOWED``."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_ALLOWED:
            raise _ForbiddenPickle(f"{module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")  # numpy 2's name
        return super().find_class(module, name)


class _ForbiddenPickle(pickle.UnpicklingError):
    pass


def safe_unpickle(data: bytes, where: str) -> object:
    """Load a foreign pickle (CIFAR batch) without running code; DataError naming ``where``."""
    try:
        return _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _ForbiddenPickle as exc:
        raise DataError(
            f"{where}: refused to load: the pickle asks for {exc}, which no CIFAR batch "
            "contains (only numpy arrays, dicts, lists, bytes, str and numbers are allowed)"
        ) from None
    except Exception as exc:  # corrupt batch files raise many kinds of errors
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{where}: not a readable CIFAR batch ({msg})") from exc


def _unpickle(tree: Tree, rel: str) -> dict:
    batch = safe_unpickle(tree.read(rel), tree.describe(rel))
    if not isinstance(batch, dict):
        raise DataError(f"{tree.describe(rel)}: not a CIFAR batch (holds {type(batch).__name__})")
    return batch


def _cifar_classes(tree: Tree, rel: str, key: bytes) -> list[str]:
    where = tree.describe(rel)
    names = _unpickle(tree, rel).get(key)
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise DataError(f"{where}: no {key.decode()} list of names; not a CIFAR meta file")
    classes = [n if isinstance(n, str) else n.decode("utf-8", "backslashreplace") for n in names]
    if len(set(classes)) != len(classes):
        raise DataError(f"{where}: a class name is listed twice in {key.decode()}")
    return classes


def _cifar_batch(tree: Tree, rel: str, label_key: bytes, n_classes: int):
    """(N×32×32×3 uint8 images, N labels) of one batch, or a DataError saying what is off."""
    where = tree.describe(rel)
    batch = _unpickle(tree, rel)
    data, labels = batch.get(b"data"), batch.get(label_key)
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        labels = labels.tolist()  # a re-pickled copy may hold labels as an array
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{where}: no N×3072 uint8 'data' array; not a CIFAR batch")
    if data.shape[1] != 3072 or not isinstance(labels, list) or len(labels) != len(data):
        what = label_key.decode()
        raise DataError(f"{where}: 'data' is {data.shape} but {what} is not one label per row")
    if not all(isinstance(v, int) and 0 <= v < n_classes for v in labels):
        raise DataError(f"{where}: a label outside 0..{n_classes - 1}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def scan_cifar(tree: Tree, kind: str) -> tuple[list[str], list[Sample], list[Skipped]]:
    """Classes, samples (decoded 32×32×3 arrays) and stray files of a CIFAR batch folder."""
    if kind == "cifar10":
        classes = _cifar_classes(tree, "batches.meta", b"label_names")
        parts = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]
        label_key = b"labels"
    else:
        classes = _cifar_classes(tree, "meta", b"fine_label_names")
        parts = [("train", "train"), ("test", "test")]
        label_key = b"fine_labels"
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    used = {"batches.meta", "meta", "readme.html"}
    for rel, split in parts:
        if rel not in tree.files:
            raise DataError(f"{tree.describe(rel)}: missing CIFAR batch; re-download the archive")
        used.add(rel)
        images, labels = _cifar_batch(tree, rel, label_key, len(classes))
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            samples.append(
                Sample(source=f"{tree.describe(rel)}#{i}", split=split, label=int(label), array=img)
            )
    for rel in tree.files:
        if rel not in used:
            skipped.append(Skipped(tree.describe(rel), "not a CIFAR batch file"))
    return classes, samples, skipped
