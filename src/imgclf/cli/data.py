"""`imgclf data import|info|check|list`, `imgclf models` and `imgclf recipes`."""

from __future__ import annotations

import argparse
import json

from imgclf.cli.options import (
    MOST,
    add_hardware_options,
    command,
    fraction,
    pick,
    positive_int,
    whole_number,
)


def _data_import(args: argparse.Namespace) -> int:
    """decode a dataset once into the cache

    Import SRC into the cache ($IMGCLF_HOME/datasets/NAME, default ~/.cache/imgclf).
    SRC: an image folder <class>/* or {train,val,test}/<class>/*, a flat folder with a
    labels CSV (id,label), CIFAR python batches, a .tar/.tar.gz/.tgz/.zip holding one of
    these, or the word cifar10/cifar100 (downloaded through torchvision).
    """
    from imgclf.data import import_dataset, import_named

    common = pick(args, "image_size", "val_fraction", "seed")
    if args.src.lower() in ("cifar10", "cifar100") and not _exists(args.src):
        ds = import_named(args.src, name_as=args.name, **common)
    else:
        ds = import_dataset(
            args.src, args.name, labels_csv=args.labels, dedupe=args.dedupe, **common
        )
    print(describe_short(ds))
    return 0


def _exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).exists()


def describe_short(ds) -> str:
    h, w = ds.image_size
    counts = ", ".join(f"{s} {int((ds.splits == i).sum())}" for i, s in enumerate(ds.split_names))
    skipped = ds.meta["skipped"]
    deduped = ds.meta.get("deduplicated")
    left_out = f" (of them {deduped} duplicates, --dedupe)" if deduped else ""
    return (
        f"imported {ds.name!r}: {len(ds.labels)} images {h}×{w}, {len(ds.classes)} classes "
        f"({counts}); {skipped} skipped{left_out}; {ds.meta['import_seconds']} s → {ds.root}"
    )


def _data_info(args: argparse.Namespace) -> int:
    """classes, counts, size, source, skipped files, class balance warnings"""
    from imgclf.data import dataset_info, load_dataset

    info = dataset_info(load_dataset(args.name))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"dataset {info['name']} ({info['root']})")
    print(f"source: {info['source']} [{info['source_shape']}]")
    h, w = info["image_size"]
    print(f"images: {info['num_samples']} at {h}×{w}, resized {info['resized']}")
    splits = list(info["counts"])
    width = max(len(c) for c in ["class", "total", *info["classes"]])
    print(f"{'class':<{width}}  " + "  ".join(f"{s:>7}" for s in splits))
    for c in info["classes"]:
        print(f"{c:<{width}}  " + "  ".join(f"{info['counts'][s][c]:>7}" for s in splits))
    totals = [sum(info["counts"][s].values()) for s in splits]
    print(f"{'total':<{width}}  " + "  ".join(f"{t:>7}" for t in totals))
    print(f"validation split: {info['val_split']}")
    print(f"skipped files: {len(info['skipped'])}")
    for row in info["skipped"][:20]:
        print(f"  {row['path']}: {row['reason']}")
    if len(info["skipped"]) > 20:
        print(f"  … see {info['root']}/import-report.csv")
    if info["duplicates"] is None:
        print(f"duplicates: not looked for yet; run `imgclf data check {info['name']}`")
    else:
        print(*describe_duplicates(info["duplicates"]), sep="\n")
    for line in info["warnings"]:
        print(f"warning: {line}")
    if not info["warnings"]:
        print("class balance and splits: no problems found")
    return 0


def describe_duplicates(counts: dict) -> list[str]:
    """Two lines: exact and near-duplicate groups within each split and across splits."""
    lines = []
    embedding = counts.get("embedding")
    near = f"≤{counts['near_bits']} bits"
    if embedding:
        near += f", or embedding cosine ≥ {embedding['cosine']}"
    for kind, what in (("exact", "exact copies"), ("near", f"near duplicates ({near})")):
        c = counts[kind]
        within = ", ".join(f"{s} {n}" for s, n in c["within"].items())
        across = ", ".join(f"{k.replace('-', '↔')} {n}" for k, n in c["across"].items())
        lines.append(
            f"{what}: {c['groups']} groups; within {within}"
            + (f"; across {across}" if across else "")
        )
    return lines


def _data_check(args: argparse.Namespace) -> int:
    """find duplicate images and, with --labels, suspect training labels

    Writes DIR/duplicates.csv (group,split,file,distance: one row per image with a
    duplicate; distance: bits between its perceptual hash and its group's first image's,
    0-63, whatever found the pair) and DIR/duplicates.png (the closest cross-split pairs
    side by side, also kept in the data set folder for `imgclf report`). DIR: --out,
    default ./NAME-check/.

    Near duplicates: hashes at most 4 bits apart (re-saves, resizes, mirrors, brightness)
    and, on photo sets (stored images of 64 px or more), pretrained Lite0 embeddings at
    cosine similarity 0.93 or more (crops and small rotations, which the hash misses:
    such pairs are often 10-30 bits apart). The embedding's features (one pass of Lite0,
    10-30 ms an image on 2 CPU cores) are kept in the data set's folder: a second check and
    --labels read them back. --no-embed: the hash alone; --embed: the embedding on
    sets of more than 20,000 images too.

    --labels: also rank the training images whose given label a pretrained backbone's
    out-of-fold predictions find improbable (confident learning), into
    DIR/label_issues.csv (file,given,suggested,score; most suspect first) and a gallery
    DIR/label_issues.png, copied into the data set's folder for `imgclf report`.
    """
    from imgclf.data import load_dataset
    from imgclf.data.dup_check import default_check_dir
    from imgclf.evaluate.near_copies import check_data_duplicates

    ds = load_dataset(args.name)
    out = args.out or default_check_dir(ds)
    if args.labels:
        # Before the duplicates are written: a set too small for the folds is one line
        # and leaves nothing behind.
        from imgclf.evaluate.label_issues import describe, find_label_issues

        options = pick(args, "folds", "seed", "rank_by", "model", "device")
        check = find_label_issues(ds, out, recipe=args.recipe, **options)
    embed = False if args.no_embed else (True if args.embed else None)
    summary = check_data_duplicates(ds, out, use_embedding=embed, device=args.device)
    print(summary["embedding_note"])
    print(*describe_duplicates(summary), sep="\n")
    print(f"wrote {summary['csv']}" + (f" and {summary['png']}" if summary["png"] else ""))
    if args.labels:
        print("\n".join(describe(check)))
    return 0


# imgclf.evaluate.confident.RANK_BY, spelt out: importing it would import torch at --help.
RANK_BY = ("self_confidence", "normalized_margin")


def add_data_check(dsub: argparse._SubParsersAction) -> None:
    check = command(dsub, "check", _data_check)
    check.add_argument("name", help="dataset name or cache folder")
    check.add_argument("--out", metavar="DIR", help="output folder (default ./NAME-check/)")
    check.add_argument("--labels", action="store_true", help="rank suspect training labels")
    embedding = check.add_mutually_exclusive_group()
    embedding.add_argument(
        "--no-embed",
        action="store_true",
        help="near duplicates by the perceptual hash alone, without the backbone embedding "
        "that photo sets (64 px or more, up to 20,000 images) get by default for crops",
    )
    embedding.add_argument(
        "--embed",
        action="store_true",
        help="the backbone embedding on a photo set of more than 20,000 images too (its "
        "feature pass: 10-30 ms an image on 2 CPU cores)",
    )
    check.add_argument("--folds", type=_folds, default=5, metavar="K", help="folds (5)")
    check.add_argument(
        "--recipe", default="lite0-photo", help="whose pretrained backbone (lite0-photo)"
    )
    check.add_argument("--model", help="another pretrained model instead of the recipe's")
    check.add_argument(
        "--rank-by",
        choices=RANK_BY,
        default="self_confidence",
        help="the score: the out-of-fold probability of the given label (default), or its "
        "margin over the likeliest other class",
    )
    check.add_argument("--seed", type=int, default=0, help="seed of the folds (0)")
    add_hardware_options(check)


def _folds(text: str) -> int:
    return whole_number(text, 2, MOST)  # each fold is held out once: two at least


def _data_list(args: argparse.Namespace) -> int:
    """list cached datasets"""
    from imgclf.data import list_datasets, load_dataset
    from imgclf.paths import datasets_dir

    names = list_datasets()
    if not names:
        print(f"no datasets in {datasets_dir()}; run `imgclf data import SRC`")
    for name in names:
        ds = load_dataset(name)
        h, w = ds.image_size
        print(f"{name}\t{len(ds.labels)} images\t{h}×{w}\t{len(ds.classes)} classes")
    return 0


def add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="import, inspect and list datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    imp = command(dsub, "import", _data_import)
    imp.add_argument("src", help="folder, archive, or cifar10/cifar100")
    imp.add_argument("--name", help="dataset name (default: the source's file name)")
    imp.add_argument(
        "--image-size",
        type=positive_int,
        metavar="N",
        help="resize every image to N×N (default: the most common size)",
    )
    imp.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.1,
        metavar="F",
        help="stratified validation share of train when the source has no val split (0.1)",
    )
    imp.add_argument("--seed", type=int, default=0, help="seed of the validation split (0)")
    imp.add_argument("--labels", metavar="CSV", help="labels CSV for a flat image folder")
    imp.add_argument(
        "--dedupe",
        action="store_true",
        help="keep one image of each exact or near-duplicate group (a val/test copy over "
        "a train one); each left out is listed in import-report.csv, no file is touched. "
        "By the perceptual hash only (no model runs at import): crops need `data check`",
    )
    info = command(dsub, "info", _data_info)
    info.add_argument("name", help="dataset name or cache folder")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    add_data_check(dsub)
    command(dsub, "list", _data_list)


def _models(args: argparse.Namespace) -> int:
    """list the models, and whether each one's weights are on this machine

    Lists the registered models (the weights column: on disk, to download, or none needed:
    trained from scratch), then the names built beyond them: torchvision's and timm's
    models, whose weights download on first use or come from `imgclf train --weights FILE`.
    No model is built.
    """
    from imgclf.models import list_models, other_models

    for spec in list_models():
        print(
            f"{spec.name:<18} {spec.kind:<10} {spec.input_size:>4}px  {_weights(spec):<8}  ", end=""
        )
        print(spec.description)
    print("weights: on disk = used offline; download = fetched on first use, or --weights FILE")
    for line in other_models():
        print(f"also {line} (weights: download, or --weights FILE)")
    return 0


def _weights(spec) -> str:
    if spec.kind != "pretrained":
        return "none"
    local = spec.local_weights() if spec.local_weights else None
    return "on disk" if local is not None else "download"


def add_models(sub: argparse._SubParsersAction) -> None:
    command(sub, "models", _models)


def _recipes(args: argparse.Namespace) -> int:
    """list bundled recipes, or print one resolved

    Ensemble recipes (a list of member recipes and their vote, e.g. study-vote) are listed
    with the others; `imgclf train NAME --data D` trains one as an ensemble.
    """
    from imgclf.train.ensemble_recipe import ensemble_recipe_yaml, is_ensemble_recipe
    from imgclf.train.recipe import list_recipes, load_recipe, recipe_yaml

    if args.name and is_ensemble_recipe(args.name):
        print(ensemble_recipe_yaml(args.name), end="")
        return 0
    if args.name:
        print(recipe_yaml(load_recipe(args.name)), end="")
        return 0
    for name, description in list_recipes().items():
        print(f"{name:<24} {description}")
    return 0


def add_recipes(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "recipes", _recipes)
    p.add_argument("name", nargs="?", help="a recipe to print in full")
