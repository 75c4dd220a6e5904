"""Read a dataset source into a list of labelled samples, without decoding any image.

A source is a folder or an archive (``.tar``, ``.tar.gz``, ``.tgz``, ``.zip``) that holds
one of these shapes, found by :func:`scan_source`:

* a class tree ``<class>/*.jpg`` (images may sit deeper inside a class folder);
* a split tree ``{train,val,test}/<class>/...``; each split keeps its name;
* a flat folder of images plus a labels CSV (Kaggle's ``trainLabels.csv``: ``id,label``
  where ids are file stems; ``filename,label`` works too);
* CIFAR-10 / CIFAR-100 python batches as torchvision stores them.

A root whose only entry is one folder is read through it (``cifar10/train/<class>/...``).
Archives are read in one sequential pass, in place: nothing is unpacked to disk.
Every file under the source ends up either as a sample or as a row of the import report.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from imgclf.data.archives import IMAGE_EXTENSIONS, ArchiveMembers, read_archive
from imgclf.errors import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
# Folder names read as splits; "valid"/"validation" are common spellings of "val".
SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
CIFAR_MARKERS = {
    "cifar10": ("batches.meta", "data_batch_1"),
    "cifar100": ("meta", "train"),
}


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
    path: str
    reason: str


@dataclass
class ScannedSource:
    """Everything found in a source, before decoding."""

    shape: str  # "class-tree" | "split-tree" | "csv" | "cifar10" | "cifar100"
    classes: list[str]
    samples: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)
    origin: str = ""
    class_dirs: dict[str, str] = field(default_factory=dict)  # class → its folder, for errors
    warnings: list[str] = field(default_factory=list)  # shown once by the importer


class _Tree:
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

    def subtree(self, name: str) -> _Tree:
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


class _FolderTree(_Tree):
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


class _MemoryTree(_Tree):
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


def open_tree(src: Path) -> _Tree:
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if is_archive(src):
        return _MemoryTree(str(src), read_archive(src))
    if src.is_dir():
        return _FolderTree(src)
    raise DataError(
        f"{src}: not a folder or a .tar/.tar.gz/.tgz/.zip archive; "
        "give an image folder, an archive or CIFAR batches"
    )


def _is_image(rel: str) -> bool:
    return PurePosixPath(rel).suffix.lower() in IMAGE_EXTENSIONS


def _descend(tree: _Tree) -> _Tree:
    """Read through a root whose only entry is one folder."""
    while True:
        dirs, files = tree.top_level()
        if files or len(dirs) != 1:
            return tree
        (only,) = dirs
        inner = tree.subtree(only)
        inner_dirs, _ = inner.top_level()
        # Stop at a folder of only images (a lone class: its name is the class) and at a
        # split folder of class folders (its name is the split). A lone folder holding
        # images plus a labels CSV, or CIFAR batches, is the data set itself.
        if not inner_dirs and all(_is_image(f) for f in inner.files):
            return tree
        if inner_dirs and only.lower() in SPLIT_ALIASES:
            return tree
        tree = inner


def scan_source(src: Path, labels_csv: Path | None = None) -> ScannedSource:
    tree = open_tree(src)
    hidden = _drop_hidden(tree)
    tree = _descend(tree)
    scanned = _scan(tree, src, labels_csv)
    scanned.skipped[:0] = tree.skipped + hidden
    scanned.warnings[:0] = tree.warnings
    _decode_folder_names(scanned)
    return scanned


def _decode_folder_names(scanned: ScannedSource) -> None:
    """Give names that are not UTF-8 a readable, distinct spelling for classes and reports.

    ``os.walk`` keeps undecodable bytes as surrogates: distinct, but they cannot be written
    to files.csv or printed. A sample keeps its raw ``path`` for reading; its class and the
    names shown are decoded as UTF-8, else cp1252; if that made two class names one, every
    name is read as latin-1 (one character per byte, so nothing can merge).
    """
    names = [*scanned.classes, *(s.source for s in scanned.samples)]
    names += [k.path for k in scanned.skipped]
    if not any(_has_surrogates(n) for n in names):
        return

    def per_name(name: str) -> str:
        raw = os.fsencode(name)
        for encoding in ("utf-8", "cp1252", "latin-1"):
            try:
                return raw.decode(encoding)
            except UnicodeDecodeError:
                continue
        raise AssertionError("latin-1 decodes any bytes")

    def latin1(name: str) -> str:
        return os.fsencode(name).decode("latin-1")

    decode, how = per_name, "cp1252"
    if len({per_name(c) for c in scanned.classes}) < len(scanned.classes):
        decode, how = latin1, "latin-1"
    scanned.classes = [decode(c) for c in scanned.classes]
    scanned.class_dirs = {decode(c): decode(d) for c, d in scanned.class_dirs.items()}
    for sample in scanned.samples:
        sample.source = decode(sample.source)
    for skipped in scanned.skipped:
        skipped.path = decode(skipped.path)
    scanned.origin = decode(scanned.origin)
    scanned.warnings.append(f"{scanned.origin}: some file names are not UTF-8; shown as {how}")


def _has_surrogates(name: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in name)


def _drop_hidden(tree: _Tree) -> list[Skipped]:
    """Hidden files and macOS archive metadata (``__MACOSX/``, ``._x.jpg``) are not data."""

    def hidden(rel: str) -> bool:
        return any(p.startswith(".") or p == "__MACOSX" for p in rel.split("/"))

    why = "hidden file or OS metadata"
    dropped = [Skipped(tree.describe(f), why) for f in tree.files if hidden(f)]
    tree.files = [f for f in tree.files if not hidden(f)]
    tree.dirs = [d for d in tree.dirs if not hidden(d)]
    return dropped


def _scan(tree: _Tree, src: Path, labels_csv: Path | None) -> ScannedSource:
    if labels_csv is not None:
        return _scan_csv(tree, labels_csv)
    dirs, files = tree.top_level()
    for name in ("cifar-10-batches-py", "cifar-100-python"):
        if name in dirs:
            tree = tree.subtree(name)
            dirs, files = tree.top_level()
            break
    for kind, markers in CIFAR_MARKERS.items():
        if all(m in files for m in markers):
            return _scan_cifar(tree, kind)
    splits = {d for d in dirs if d.lower() in SPLIT_ALIASES}
    # A split folder holds class folders; one with its images directly inside is a class
    # that happens to be called "test" (or "train", "val"…) in a class tree.
    if splits and all(tree.subtree(d).top_level()[0] for d in splits):
        return _scan_split_tree(tree, sorted(splits))
    image_files = [f for f in files if _is_image(f)]
    csvs = [f for f in files if f.lower().endswith(".csv")]
    if image_files and not _class_dirs(tree, dirs):
        if len(csvs) == 1:
            return _scan_csv(tree, csvs[0])
        hint = "several CSV files" if csvs else "no labels CSV"
        raise DataError(
            f"{src}: flat folder of images with {hint}; pass --labels FILE.csv "
            "(columns id,label) or put images in <class>/ folders"
        )
    if dirs:
        return _scan_class_tree(tree, split="train")
    raise DataError(
        f"{src}: unknown source shape; expected <class>/ image folders, "
        "train|val|test/<class>/ folders, images plus a labels CSV, or CIFAR batches"
    )


def _class_dirs(tree: _Tree, dirs: set[str]) -> list[str]:
    with_images = {f.split("/", 1)[0] for f in tree.files if "/" in f and _is_image(f)}
    return sorted(d for d in dirs if d in with_images)


def _scan_class_tree(tree: _Tree, split: str, classes: list[str] | None = None) -> ScannedSource:
    dirs, root_files = tree.top_level()
    classes = classes if classes is not None else sorted(dirs)
    index = {c: i for i, c in enumerate(classes)}
    out = ScannedSource("class-tree", classes, [], origin=tree.where())
    out.class_dirs = {c: tree.describe(c) for c in sorted(dirs)}
    for rel in root_files:
        out.skipped.append(Skipped(tree.describe(rel), "not inside a class folder"))
    for rel in tree.files:
        if "/" not in rel:
            continue
        cls = rel.split("/", 1)[0]
        if not _is_image(rel):
            out.skipped.append(Skipped(tree.describe(rel), "not an image file extension"))
        elif cls not in index:
            out.skipped.append(Skipped(tree.describe(rel), f"class {cls!r} not in train classes"))
        else:
            out.samples.append(tree.sample(rel, split, index[cls]))
    return out


def _scan_split_tree(tree: _Tree, split_dirs: list[str]) -> ScannedSource:
    dirs, root_files = tree.top_level()
    # Classes come from every split so a class missing from one split is still known.
    classes = sorted({d for s in split_dirs for d in tree.subtree(s).top_level()[0]})
    out = ScannedSource("split-tree", classes, [], origin=tree.where())
    seen: set[str] = set()
    for s in split_dirs:
        name = SPLIT_ALIASES[s.lower()]
        if name in seen:
            raise DataError(f"{tree.describe(s)}: split {name!r} given twice; keep one folder")
        seen.add(name)
        part = _scan_class_tree(tree.subtree(s), name, classes)
        out.samples += part.samples
        out.skipped += part.skipped
        for cls, folder in part.class_dirs.items():
            out.class_dirs.setdefault(cls, folder)
    for rel in root_files:
        out.skipped.append(Skipped(tree.describe(rel), "not inside a split folder"))
    for d in sorted(dirs - set(split_dirs)):
        for rel in tree.subtree(d).files:
            out.skipped.append(Skipped(tree.describe(f"{d}/{rel}"), "not inside a split folder"))
    return out


_ID_COLUMNS = ("id", "filename", "file", "image", "image_id", "path", "name")
_LABEL_COLUMNS = ("label", "class", "category", "target")


def decode_text(data: bytes) -> tuple[str, str]:
    """Text of a file and the encoding used: UTF-8 (a BOM allowed), else cp1252 (what
    Excel on Windows writes), else latin-1, which maps every byte to its own character.
    Each is one-to-one, so distinct labels stay distinct whichever applies."""
    for encoding in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            return data.decode(encoding), encoding.removesuffix("-sig")
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")


def _read_labels_csv(text: str, where: str) -> list[tuple[str, str]]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise DataError(f"{where}: empty CSV; expected a header like id,label")
    lowered = [h.strip().lower() for h in header]
    id_col = next((lowered.index(c) for c in _ID_COLUMNS if c in lowered), None)
    label_col = next((lowered.index(c) for c in _LABEL_COLUMNS if c in lowered), None)
    if id_col is None or label_col is None:
        raise DataError(
            f"{where}: CSV columns {header} lack an id column ({'/'.join(_ID_COLUMNS)}) "
            f"and a label column ({'/'.join(_LABEL_COLUMNS)})"
        )
    rows = []
    for line_no, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(id_col, label_col):
            raise DataError(f"{where}:{line_no}: too few columns in row {row}")
        rows.append((row[id_col].strip(), row[label_col].strip()))
    if not rows:
        raise DataError(f"{where}: no rows under the header")
    return rows


def _scan_csv(tree: _Tree, labels_csv: str | Path) -> ScannedSource:
    if isinstance(labels_csv, Path):
        where = str(labels_csv)
        try:
            raw = labels_csv.read_bytes()
        except OSError as exc:
            raise DataError(f"{labels_csv}: cannot read labels CSV ({exc.strerror})") from exc
        csv_rel = _relative_in(tree, labels_csv)  # a --labels CSV inside SRC is no stray file
    else:
        where = tree.describe(labels_csv)
        raw = tree.read(labels_csv)
        csv_rel = labels_csv
    text, encoding = decode_text(raw)
    rows = _read_labels_csv(text, where)
    by_key = _index_images(tree)
    classes = sorted({label for _, label in rows})
    index = {c: i for i, c in enumerate(classes)}
    out = ScannedSource("csv", classes, [], origin=tree.where())
    if encoding != "utf-8":
        out.warnings.append(f"{where}: not UTF-8; read as {encoding}")
    missing, used = [], set()
    for key, label in rows:
        rel = by_key.get(key)
        if rel is None:
            missing.append(key)
            continue
        if rel in used:
            raise DataError(f"{where}: {key!r} listed twice; keep one label per file")
        used.add(rel)
        out.samples.append(tree.sample(rel, "train", index[label]))
    if missing:
        shown = ", ".join(missing[:3])
        raise DataError(
            f"{where}: {len(missing)} listed files not found in {tree.where()} (e.g. {shown}); "
            "fix the CSV or the image folder"
        )
    for rel in tree.files:
        if rel in used or rel == csv_rel:
            continue
        reason = "not listed in the labels CSV" if _is_image(rel) else "not an image file extension"
        out.skipped.append(Skipped(tree.describe(rel), reason))
    return out


def _relative_in(tree: _Tree, path: Path) -> str | None:
    """``path`` as a file of a folder ``tree``, or None when it lies outside."""
    if not isinstance(tree, _FolderTree):
        return None
    try:
        rel = path.resolve().relative_to((tree.root / tree.prefix).resolve()).as_posix()
    except ValueError:
        return None
    return rel if rel in tree.files else None


def _index_images(tree: _Tree) -> dict[str, str]:
    """Map path, file name and stem to each image's path; ambiguous names map to None."""
    keys: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for rel in tree.files:
        if not _is_image(rel):
            continue
        p = PurePosixPath(rel)
        for key in {rel, p.name, p.stem}:
            counts[key] += 1
            keys[key] = rel
    return {k: v for k, v in keys.items() if counts[k] == 1 or k == v}


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


def _unpickle(tree: _Tree, rel: str) -> dict:
    batch = safe_unpickle(tree.read(rel), tree.describe(rel))
    if not isinstance(batch, dict):
        raise DataError(f"{tree.describe(rel)}: not a CIFAR batch (holds {type(batch).__name__})")
    return batch


def _cifar_classes(tree: _Tree, rel: str, key: bytes) -> list[str]:
    where = tree.describe(rel)
    names = _unpickle(tree, rel).get(key)
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise DataError(f"{where}: no {key.decode()} list of names; not a CIFAR meta file")
    classes = [n if isinstance(n, str) else n.decode("utf-8", "backslashreplace") for n in names]
    if len(set(classes)) != len(classes):
        raise DataError(f"{where}: a class name is listed twice in {key.decode()}")
    return classes


def _cifar_batch(tree: _Tree, rel: str, label_key: bytes, n_classes: int):
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


def _scan_cifar(tree: _Tree, kind: str) -> ScannedSource:
    if kind == "cifar10":
        classes = _cifar_classes(tree, "batches.meta", b"label_names")
        parts = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]
        label_key = b"labels"
    else:
        classes = _cifar_classes(tree, "meta", b"fine_label_names")
        parts = [("train", "train"), ("test", "test")]
        label_key = b"fine_labels"
    out = ScannedSource(kind, classes, [], origin=tree.where())
    used = {"batches.meta", "meta", "readme.html"}
    for rel, split in parts:
        if rel not in tree.files:
            raise DataError(f"{tree.describe(rel)}: missing CIFAR batch; re-download the archive")
        used.add(rel)
        images, labels = _cifar_batch(tree, rel, label_key, len(classes))
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            out.samples.append(
                Sample(source=f"{tree.describe(rel)}#{i}", split=split, label=int(label), array=img)
            )
    for rel in tree.files:
        if rel not in used:
            out.skipped.append(Skipped(tree.describe(rel), "not a CIFAR batch file"))
    return out
