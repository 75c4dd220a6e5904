"""What a prediction reads: a folder, an archive, a text list or one image → the files
(:class:`~imgclf.inference.decode.Item`), one per image, in natural filename order.

``predict`` writes one row per item and the Python predictor (:mod:`imgclf.predictor`)
one result per item, so both list a folder here, by one rule: every image file (by
extension) is an item, hidden files and OS metadata (``data import``'s rule,
:func:`imgclf.data.sources.is_hidden`) are left out, and an image the walk could not turn
into a file (a broken link, an archive member over the size cap) keeps its place, with the
reason.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.data.sources import (
    HIDDEN_REASON,
    IMAGE_EXTENSIONS,
    is_archive,
    is_hidden,
    is_image_name,
    natural_key,
    open_tree,
)
from imgclf.errors import DataError
from imgclf.inference.decode import Item


@dataclass
class Inputs:
    items: list[Item]
    ignored: Counter = field(default_factory=Counter)  # reason → files


def list_inputs(src: str | os.PathLike[str]) -> Inputs:
    """Every image under a folder or in an archive, or every file a list names, sorted."""
    src = Path(src).expanduser()
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if src.is_dir() or is_archive(src):
        inputs = _tree_inputs(src)
    elif is_image_name(src.name):
        inputs = Inputs([Item(src.name, path=str(src))])
    else:
        inputs = _list_file_inputs(src)
    if not inputs.items:
        ignored = sum(inputs.ignored.values())
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"{src}: no image files ({exts}); {ignored} other files ignored")
    inputs.items.sort(key=lambda item: natural_key(item.file))
    return inputs


def _tree_inputs(src: Path) -> Inputs:
    tree = open_tree(src)  # a folder walk, or an archive read once into memory
    folder = src.is_dir()
    inputs = Inputs([])
    for rel in tree.files:
        if is_hidden(rel):  # what `data import` leaves out as not data, predict leaves too
            inputs.ignored[HIDDEN_REASON] += 1
        elif not is_image_name(rel):
            inputs.ignored["not an image file"] += 1
        elif folder:
            inputs.items.append(Item(rel, path=str(src / rel)))
        else:
            inputs.items.append(Item(rel, data=tree.read(rel)))
    # Entries the walk could not turn into files (a broken link, an archive member over
    # the size cap, an unsafe or duplicate member): an image among them keeps its row,
    # with the reason, so no input is ever left out; anything else is counted. A hidden
    # one is left out as its readable twin would be.
    for skipped in tree.skipped:
        rel = _relative(skipped.path, src)
        if is_hidden(rel):
            inputs.ignored[HIDDEN_REASON] += 1
        elif is_image_name(rel):
            inputs.items.append(Item(rel, error=skipped.reason))
        else:
            inputs.ignored[skipped.reason] += 1
    return inputs


def _relative(described: str, src: Path) -> str:
    root = str(src).rstrip("/") + "/"
    return described[len(root) :] if described.startswith(root) else described


def _list_file_inputs(src: Path) -> Inputs:
    try:
        lines = src.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{src}: not a folder, an archive or a text list of image paths") from None
    inputs, seen = Inputs([]), set()
    for line in lines:
        name = line.strip()
        if not name:
            continue
        full = os.path.normpath(src.parent / name)
        if full in seen:
            inputs.ignored["listed twice"] += 1
            continue
        seen.add(full)
        inputs.items.append(Item(name, path=full))
    return inputs
