"""Find the shape of a source and list its labelled samples, without decoding any image.

:func:`scan_source` reads a tree (:mod:`imgclf.data.sources`) holding one of these shapes:

* a class tree ``<class>/*.jpg`` (images may sit deeper inside a class folder);
* a split tree ``{train,val,test}/<class>/...``; each split keeps its name;
* a flat folder of images plus a labels CSV (Kaggle's ``trainLabels.csv``: ``id,label``
  where ids are file stems; ``filename,label`` works too);
* CIFAR-10 / CIFAR-100 python batches as torchvision stores them (:mod:`imgclf.data.cifar`).

A root whose only entry is one folder is read through it (``cifar10/train/<class>/...``).
Every file under the source ends up either as a sample or as a row of the import report.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from imgclf.data.cifar import CIFAR_MARKERS, scan_cifar
from imgclf.data.sources import (
    HIDDEN_REASON,
    FolderTree,
    Sample,
    Skipped,
    Tree,
    is_hidden,
    is_image_name,
    open_tree,
)
from imgclf.errors import DataError

# Folder names read as splits; "valid"/"validation" are common spellings of "val".
SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}


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


def _descend(tree: Tree) -> Tree:
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
        if not inner_dirs and all(is_image_name(f) for f in inner.files):
            return tree
        if inner_dirs and only.lower() in SPLIT_ALIASES:
            return tree
        tree = inner


def scan_source(src: Path, labels_csv: Path | None = None) -> ScannedSource:
    """Everything in ``src``: its shape, classes, samples, and each file left out and why."""
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


def _drop_hidden(tree: Tree) -> list[Skipped]:
    """Hidden files and macOS archive metadata (``__MACOSX/``, ``._x.jpg``) are not data."""
    dropped = [Skipped(tree.describe(f), HIDDEN_REASON) for f in tree.files if is_hidden(f)]
    tree.files = [f for f in tree.files if not is_hidden(f)]
    tree.dirs = [d for d in tree.dirs if not is_hidden(d)]
    return dropped


def _scan(tree: Tree, src: Path, labels_csv: Path | None) -> ScannedSource:
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
            classes, samples, skipped = scan_cifar(tree, kind)
            return ScannedSource(kind, classes, samples, skipped, origin=tree.where())
    splits = {d for d in dirs if d.lower() in SPLIT_ALIASES}
    # A split folder holds class folders; one with its images directly inside is a class
    # that happens to be called "test" (or "train", "val"…) in a class tree.
    if splits and all(tree.subtree(d).top_level()[0] for d in splits):
        return _scan_split_tree(tree, sorted(splits))
    image_files = [f for f in files if is_image_name(f)]
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


def _class_dirs(tree: Tree, dirs: set[str]) -> list[str]:
    with_images = {f.split("/", 1)[0] for f in tree.files if "/" in f and is_image_name(f)}
    return sorted(d for d in dirs if d in with_images)


def _scan_class_tree(tree: Tree, split: str, classes: list[str] | None = None) -> ScannedSource:
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
        if not is_image_name(rel):
            out.skipped.append(Skipped(tree.describe(rel), "not an image file extension"))
        elif cls not in index:
            out.skipped.append(Skipped(tree.describe(rel), f"class {cls!r} not in train classes"))
        else:
            out.samples.append(tree.sample(rel, split, index[cls]))
    return out


def _scan_split_tree(tree: Tree, split_dirs: list[str]) -> ScannedSource:
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


def _scan_csv(tree: Tree, labels_csv: str | Path) -> ScannedSource:
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
        reason = (
            "not listed in the labels CSV" if is_image_name(rel) else "not an image file extension"
        )
        out.skipped.append(Skipped(tree.describe(rel), reason))
    return out


def _relative_in(tree: Tree, path: Path) -> str | None:
    """``path`` as a file of a folder ``tree``, or None when it lies outside."""
    if not isinstance(tree, FolderTree):
        return None
    try:
        rel = path.resolve().relative_to((tree.root / tree.prefix).resolve()).as_posix()
    except ValueError:
        return None
    return rel if rel in tree.files else None


def _index_images(tree: Tree) -> dict[str, str]:
    """Map path, file name and stem to each image's path; ambiguous names map to None."""
    keys: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for rel in tree.files:
        if not is_image_name(rel):
            continue
        p = PurePosixPath(rel)
        for key in {rel, p.name, p.stem}:
            counts[key] += 1
            keys[key] = rel
    return {k: v for k, v in keys.items() if counts[k] == 1 or k == v}
