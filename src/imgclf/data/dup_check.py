"""``imgclf data check``'s duplicate part: duplicates.csv, the closest cross-split pairs as
a picture, and a summary kept with the data set for ``data info`` and ``imgclf report``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imgclf.csv_safe import write_csv
from imgclf.data.cache import Dataset
from imgclf.data.duplicates import Duplicates, duplicate_counts, find_duplicates
from imgclf.data.embed_pairs import dataset_duplicates
from imgclf.data.fingerprints import ensure_fingerprints, has_fingerprints
from imgclf.io_utils import atomic_path, atomic_write_text, make_folder

DUPLICATES_CSV = "duplicates.csv"
PAIRS_PNG = "duplicates.png"
SUMMARY_JSON = "duplicates.json"  # in the data set folder: what the report shows
PAIRS_SHOWN = 8  # rows of the picture: enough to judge at a glance, small enough to read
_TILE = 128  # px per image in the picture; CIFAR's 32 px are scaled up 4×


def default_check_dir(ds: Dataset) -> Path:
    """``./NAME-check/``: where ``data check`` writes without ``--out``."""
    return Path(f"{ds.name}-check")


def dataset_fingerprints(ds: Dataset) -> np.ndarray:
    """The data set's fingerprints; one imported before they existed gets them now, from
    its images.npy in chunks, with a progress bar on a terminal (stored for next time)."""
    root = ds.version_root or ds.root
    if has_fingerprints(root, ds.meta):
        return ensure_fingerprints(root, ds.images, ds.meta)
    from tqdm import tqdm

    with tqdm(total=len(ds.labels), unit="img", desc="fingerprints", disable=None) as bar:
        return ensure_fingerprints(root, ds.images, ds.meta, progress=bar.update)


def check_duplicates(
    ds: Dataset,
    out_dir: str | Path,
    extra: np.ndarray | None = None,
    embedding: dict | None = None,
) -> dict:
    """Find exact and near duplicates in ``ds`` and write ``out_dir/duplicates.csv``
    (``group,split,file,distance``: one row per image in a group of two or more, ``file``
    as in files.csv, ``distance`` in hash bits to the group's first image) and
    ``duplicates.png`` (the closest cross-split pairs side by side, also in the data set's
    folder). ``extra``: pairs found by an embedding (Q×2 indices), grouped with the
    hash's; ``embedding``: that search's record, kept in the summary. Returns the
    summary: :func:`~imgclf.data.duplicates.duplicate_counts` plus the files written and
    the closest cross-split pairs."""
    out = Path(out_dir)
    make_folder(out, "--out")
    dups = find_duplicates(dataset_fingerprints(ds), extra=extra)
    files = relative_files(ds)
    names = ds.split_names
    write_csv(out / DUPLICATES_CSV, _csv_rows(dups, ds.splits, names, files), end="\r\n")
    pairs = closest_cross_pairs(dups, ds.splits)
    summary = duplicate_counts(dups, ds.splits, names, embedding)
    summary["cross_pairs"] = [
        {
            "files": [files[i], files[j]],
            "splits": [names[ds.splits[i]], names[ds.splits[j]]],
            "distance": int(d),
            "found_by": "embedding" if by_embedding else "hash",
        }
        for i, j, d, by_embedding in pairs
    ]
    summary["csv"] = str(out / DUPLICATES_CSV)
    summary["png"] = None
    if len(pairs):
        draw_pairs(ds, pairs, out / PAIRS_PNG)
        summary["png"] = str(out / PAIRS_PNG)
    _keep_with_dataset(ds, out, summary)
    return summary


def relative_files(ds: Dataset) -> list[str]:
    """files.csv's source paths, relative to the imported folder or archive (as the issue
    asks of duplicates.csv: what a person finds in their folder); others as they are."""
    top = str(ds.meta.get("source", "")).rstrip("/") + "/"
    return [f[len(top) :] if f.startswith(top) else f for f in ds.files()]


def _csv_rows(dups: Duplicates, splits: np.ndarray, names: list[str], files: list[str]):
    yield ["group", "split", "file", "distance"]
    members = np.flatnonzero(dups.group)
    for i in members[np.argsort(dups.group[members], kind="stable")]:
        yield [int(dups.group[i]), names[splits[i]], files[i], int(dups.distance[i])]


def closest_cross_pairs(dups: Duplicates, splits: np.ndarray, k: int = PAIRS_SHOWN) -> np.ndarray:
    """Up to ``k`` pairs (i, j, bits, found by the embedding alone: 0/1) from different
    splits, closest in bits first. Up to half of them are the embedding's own where it
    found any (they are many bits apart, so closest-first would never show them, and
    they are the pairs a person should judge: the embedding's mistakes would be there)."""
    p = np.concatenate([dups.pairs, dups.embedded[:, None].astype(np.int64)], axis=1)
    cross = p[splits[p[:, 0]] != splits[p[:, 1]]]
    cross = cross[np.lexsort((cross[:, 1], cross[:, 0], cross[:, 2]))]
    by_hash, by_embedding = cross[cross[:, 3] == 0], cross[cross[:, 3] == 1]
    shown = min(len(by_embedding), max(k // 2, k - len(by_hash)))
    return np.concatenate([by_hash[: k - shown], by_embedding[:shown]])


def draw_pairs(ds: Dataset, pairs: np.ndarray, path: Path) -> None:
    """Each pair on a row, with its splits, files and distance under the images (and
    whether the embedding found it)."""
    caption = 30
    row_h = _TILE + caption
    sheet = Image.new("RGB", (2 * _TILE + 24, row_h * len(pairs) + 8), "white")
    pen = ImageDraw.Draw(sheet)
    files, names = relative_files(ds), ds.split_names
    for r, (i, j, d, by_embedding) in enumerate(pairs):
        y = 4 + r * row_h
        for c, idx in enumerate((i, j)):
            x = 8 + c * (_TILE + 8)
            img = Image.fromarray(np.asarray(ds.images[idx])).resize((_TILE, _TILE))
            sheet.paste(img, (x, y))
            label = f"{names[ds.splits[idx]]}: {_tail(files[idx])}"
            pen.text((x, y + _TILE + 2), label, fill="black")
        how = " (found by the embedding)" if by_embedding else ""
        pen.text((8, y + _TILE + 15), f"{d} bits apart{how}", fill="firebrick")
    with atomic_path(path) as tmp:
        sheet.save(tmp, "PNG")


def _tail(name: str, keep: int = 20) -> str:
    return name if len(name) <= keep else "…" + name[-keep + 1 :]


def _keep_with_dataset(ds: Dataset, out: Path, summary: dict) -> None:
    """The summary and picture beside the data set, for ``imgclf report``; a data set folder
    that cannot be written (a read-only cache) keeps nothing, the check's own files stand."""
    root = ds.version_root or ds.root
    try:
        atomic_write_text(root / SUMMARY_JSON, json.dumps(summary, indent=2))
        if summary["png"] and (root / PAIRS_PNG).resolve() != (out / PAIRS_PNG).resolve():
            with atomic_path(root / PAIRS_PNG) as tmp:
                tmp.write_bytes((out / PAIRS_PNG).read_bytes())
        elif not summary["png"]:
            (root / PAIRS_PNG).unlink(missing_ok=True)
    except OSError:
        return


def stored_summary(ds: Dataset) -> dict | None:
    """The last check's summary kept with the data set, or None."""
    path = (ds.version_root or ds.root) / SUMMARY_JSON
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_duplicates(ds: Dataset, split: str) -> np.ndarray | None:
    """For each image of ``split`` (in ``ds.indices(split)`` order), whether it has an
    exact or near duplicate in train (by the hash, or by the embedding pairs the last
    ``data check`` stored): what makes its score partly a training score. None where
    that cannot be said: no fingerprints (an old data set before its first ``data
    check``), no train split, or ``split`` is train or all."""
    if split in ("train", "all") or "train" not in ds.split_names:
        return None
    found = dataset_duplicates(ds)  # with the last check's embedding pairs, if any
    if found is None:
        return None
    pairs = found[0].pairs
    code, train = ds.split_names.index(split), ds.split_names.index("train")
    a, b = ds.splits[pairs[:, 0]], ds.splits[pairs[:, 1]]
    hit = np.zeros(len(ds.labels), dtype=bool)
    hit[pairs[(a == code) & (b == train), 0]] = True
    hit[pairs[(b == code) & (a == train), 1]] = True
    return hit[ds.indices(split)]
