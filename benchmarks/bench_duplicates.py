"""Duplicate finding (issue #33, item 1): import time against check time, and recall on
planted copies.

    IMGCLF_HOME=/tmp/dup-home .venv/bin/python benchmarks/bench_duplicates.py cifar
    IMGCLF_HOME=/tmp/dup-home .venv/bin/python benchmarks/bench_duplicates.py synthetic [N]
    IMGCLF_HOME=/tmp/dup-home .venv/bin/python benchmarks/bench_duplicates.py planted

``cifar``: ``import_dataset`` of the shared CIFAR-10 train archive (50,000 JPEGs; its
fingerprints are made in that pass) and ``check_duplicates`` of the result (search,
duplicates.csv, picture), timed in the same process; the groups found. ``synthetic``:
N (default 200,000) images made from that import's images (mirrored, rolled by 1-3 px,
brightened by up to ±12%, each a new picture to the exact hash), imported with
``import_arrays`` and checked, for the scaling from 50k. ``planted``: the clothing
photos (/tmp/clothing/clothing-small) with 100 training photos copied into validation
once per transformation (JPEG re-save q60-95, resize 50-150%, crop 80-95%, brightness
±15%, mirror, rotation ±5°), imported at 224 px and checked: recall of the planted pairs
per transformation (a copy in the same group as its original) for the hash, Lite0's
embedding and both, and the share of the other photos that were paired (false pairs);
then the same at other bit and cosine thresholds. Results are in docs/results.md,
"Duplicates".
"""

from __future__ import annotations

import io
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"
CLOTHING = Path("/tmp/clothing/clothing-small")
TRANSFORMS = ("reencode", "resize", "crop", "brightness", "mirror", "rotate")


def _timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def _check(ds, label: str, embed: bool = True) -> dict:
    """``data check``'s duplicate part as the CLI runs it (on a photo set with ``embed``
    the embedding too; a 32-px set keeps the hash alone either way), and the hash's
    search alone, timed."""
    from imgclf.data.duplicates import find_duplicates
    from imgclf.data.fingerprints import FINGERPRINTS_FILE
    from imgclf.evaluate.near_copies import check_data_duplicates

    fps = np.load(ds.version_root / FINGERPRINTS_FILE)
    _, search = _timed(lambda: find_duplicates(fps))
    with tempfile.TemporaryDirectory() as out:
        summary, check = _timed(lambda: check_data_duplicates(ds, out, use_embedding=embed))
    print(f"{label}: search {search:.2f} s, check (search + csv + png) {check:.2f} s")
    print(f"  {summary['embedding_note']}")
    for kind in ("exact", "near"):
        c = summary[kind]
        print(f"  {kind}: {c['groups']} groups, within {c['within']}, across {c['across']}")
    print(f"  images in groups: {summary['images_in_groups']}")
    return {"check": check, "search": search}


def bench_cifar() -> None:
    from imgclf.data.importer import import_dataset

    ds, wall = _timed(lambda: import_dataset(ARCHIVE, "bench-cifar"))
    t = _check(ds, "cifar 50k")
    print(f"  import {wall:.2f} s; check / import = {t['check'] / wall:.1%}")


def bench_synthetic(n: int) -> None:
    from imgclf.data.cache import load_dataset
    from imgclf.data.importer import import_arrays

    base = np.asarray(load_dataset("bench-cifar").images)
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(base), n)
    images = base[pick].copy()
    for start in range(0, n, 8192):  # each a new picture: mirrored, rolled, brightened
        part = images[start : start + 8192]
        flip = rng.random(len(part)) < 0.5
        part[flip] = part[flip, :, ::-1]
        part[:] = np.roll(part, int(rng.integers(1, 4)), axis=2)
        gain = rng.uniform(0.88, 1.12, (len(part), 1, 1, 1))
        part[:] = np.clip(part * gain, 0, 255).astype(np.uint8)
    labels = load_dataset("bench-cifar").labels[pick]
    classes = load_dataset("bench-cifar").classes
    ds, wall = _timed(lambda: import_arrays(images, labels, classes, "bench-synthetic"))
    t = _check(ds, f"synthetic {n}")
    print(f"  import {wall:.2f} s; check / import = {t['check'] / wall:.1%}")


def _transform(name: str, im, r: random.Random) -> bytes:
    from PIL import Image, ImageEnhance

    w, h = im.size
    quality = 90
    if name == "reencode":
        quality = r.randint(60, 95)
    elif name == "resize":
        s = r.uniform(0.5, 1.5)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    elif name == "crop":
        s = r.uniform(0.80, 0.95)
        cw, ch = round(w * s), round(h * s)
        x, y = r.randint(0, w - cw), r.randint(0, h - ch)
        im = im.crop((x, y, x + cw, y + ch))
    elif name == "brightness":
        im = ImageEnhance.Brightness(im).enhance(r.uniform(0.85, 1.15))
    elif name == "mirror":
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif name == "rotate":
        im = im.rotate(r.uniform(-5, 5), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _plant(dest: Path) -> dict[str, str]:
    """The clothing set copied to ``dest`` with the planted copies; copy → original."""
    from PIL import Image

    shutil.copytree(CLOTHING, dest)
    train = sorted(p.relative_to(dest) for p in (dest / "train").rglob("*.jpg"))
    r = random.Random(0)
    originals = r.sample(train, 100)
    planted = {}
    for name in TRANSFORMS:
        for k, rel in enumerate(originals):
            with Image.open(dest / rel) as im:
                data = _transform(name, im.convert("RGB"), r)
            copy = Path("validation") / rel.parts[1] / f"planted-{name}-{k}.jpg"
            (dest / copy).write_bytes(data)
            planted[copy.as_posix()] = rel.as_posix()
    return planted


def _recall(group: np.ndarray, copies, origs, kinds, others) -> tuple[dict, float]:
    """Per transformation, the share of copies in their original's group; and the share
    of the non-planted photos in any group (the false pairs)."""
    same = (group[copies] == group[origs]) & (group[copies] > 0)
    per = {name: float(same[kinds == name].mean()) for name in TRANSFORMS}
    per["all"] = float(same.mean())
    return per, float((group[others] > 0).mean())


def _groups(n: int, pairs: np.ndarray) -> np.ndarray:
    from imgclf.data.duplicates import components

    root = components(n, pairs[:, 0], pairs[:, 1]) if len(pairs) else np.arange(n)
    sizes = np.bincount(root, minlength=n)
    return np.where(sizes[root] > 1, root + 1, 0)


def _hash_thresholds(fps, copies, origs, kinds, others) -> None:
    """Recall and false pairs of the hash alone at other bit thresholds."""
    from imgclf.data.duplicates import hash_distance

    dist = hash_distance(fps, copies, origs)
    print("hash alone, share of planted copies within the bits (any threshold):")
    for name in TRANSFORMS:
        m = kinds == name
        by_t = " ".join(f"≤{b}:{(dist[m] <= b).mean():.0%}" for b in (2, 4, 6, 8, 12, 16))
        print(f"  {name:<10} {by_t}")
    ph, fl = fps["phash"][others], fps["flip"][others]
    nearest = np.full(len(others), 64)
    for start in range(0, len(others), 512):
        a = ph[start : start + 512, None]
        d = np.minimum(np.bitwise_count(a ^ ph[None]), np.bitwise_count(a ^ fl[None]))
        d[np.arange(len(a)), start + np.arange(len(a))] = 64
        nearest[start : start + 512] = d.min(axis=1)
    print(
        "  non-planted photos with another within: "
        + " ".join(f"≤{b}:{(nearest <= b).mean():.2%}" for b in (2, 4, 6, 8, 12))
    )


def _cosine_thresholds(features, fps, planted_idx, others) -> None:
    """Recall (embedding alone / with the hash) and false pairs at other cosines."""
    from imgclf.data.duplicates import near_pairs
    from imgclf.evaluate.near_copies import cosine_pairs

    copies, origs, kinds = planted_idx
    n, hashed = len(fps), near_pairs(fps)[:, :2]
    print("by cosine threshold: recall embedding / both (crops; rotations), false pairs both")
    for t in (0.90, 0.92, 0.93, 0.935, 0.94, 0.95, 0.96):
        found = cosine_pairs(features, t)
        emb = np.stack([found["i"], found["j"]], axis=1)
        e, _ = _recall(_groups(n, emb), copies, origs, kinds, others)
        b, false = _recall(_groups(n, np.concatenate([emb, hashed])), *planted_idx, others)
        print(
            f"  ≥{t:<6} {e['all']:.1%} / {b['all']:.1%} "
            f"(crops {e['crop']:.0%} / {b['crop']:.0%}; rotations {e['rotate']:.0%} / "
            f"{b['rotate']:.0%}); false {false:.2%}"
        )


def bench_planted() -> None:
    from imgclf.data.dup_check import relative_files
    from imgclf.data.duplicates import find_duplicates
    from imgclf.data.fingerprints import FINGERPRINTS_FILE
    from imgclf.data.importer import import_dataset
    from imgclf.evaluate.near_copies import EMBED_COSINE, embedding_pairs

    with tempfile.TemporaryDirectory() as tmp:
        planted = _plant(Path(tmp) / "clothing")
        ds, wall = _timed(lambda: import_dataset(Path(tmp) / "clothing", "bench-planted"))
    t = _check(ds, f"clothing + {len(planted)} planted (hash only)", embed=False)
    print(f"  import {wall:.2f} s; hash check / import = {t['check'] / wall:.1%}")
    found = embedding_pairs(ds)
    how = "reused" if found.reused else f"computed in {found.feature_seconds:.1f} s"
    print(f"embedding: features {how}, search {found.search_seconds:.2f} s")
    files = relative_files(ds)
    index = {f: i for i, f in enumerate(files)}
    fps = np.load(ds.version_root / FINGERPRINTS_FILE)
    copies = np.array([index[c] for c in planted])
    origs = np.array([index[o] for o in planted.values()])
    kinds = np.array([c.split("-")[1] for c in planted])
    involved = np.zeros(len(files), dtype=bool)
    involved[copies] = involved[origs] = True
    others = np.flatnonzero(~involved)
    emb = np.stack([found.pairs["i"], found.pairs["j"]], axis=1)
    methods = {
        "hash": find_duplicates(fps).group,
        f"embedding ≥{EMBED_COSINE}": _groups(len(fps), emb),
        "both": find_duplicates(fps, extra=emb).group,
    }
    print("recall of planted pairs (copy in its original's group):")
    print(f"  {'':<18}" + "".join(f"{k:>11}" for k in (*TRANSFORMS, "all")) + "  false pairs")
    for name, group in methods.items():
        per, false = _recall(group, copies, origs, kinds, others)
        cells = "".join(f"{per[k]:>11.1%}" for k in (*TRANSFORMS, "all"))
        print(f"  {name:<18}{cells}  {false:.2%} of {len(others)}")
    _hash_thresholds(fps, copies, origs, kinds, others)
    features = np.load(found.features, mmap_mode="r") if found.features else None
    if features is not None:
        _cosine_thresholds(features, fps, (copies, origs, kinds), others)


def main() -> None:
    if "IMGCLF_HOME" not in os.environ:
        sys.exit("set IMGCLF_HOME (e.g. /tmp/dup-home): the benchmark imports data sets there")
    what = sys.argv[1] if len(sys.argv) > 1 else "cifar"
    if what == "cifar":
        bench_cifar()
    elif what == "synthetic":
        bench_synthetic(int(sys.argv[2]) if len(sys.argv) > 2 else 200_000)
    elif what == "planted":
        bench_planted()
    else:
        sys.exit(f"unknown benchmark {what!r}: cifar, synthetic or planted")


if __name__ == "__main__":
    main()
