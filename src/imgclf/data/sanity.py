"""Class balance and split sanity: the one-line warnings ``imgclf data info`` prints."""

from __future__ import annotations

# Below this many training images a class is too few to learn from and, once a share of
# it is held out (the default --val-fraction 0.1 keeps one of 10), to validate: with one
# validation image its recall can only be 0% or 100%.
MIN_TRAIN_IMAGES = 10

# A class with under 1/20 of the largest class's training images: the unweighted loss is
# then dominated by the large classes, and plain accuracy hides a rare class the model
# never predicts (He & Garcia, "Learning from Imbalanced Data", IEEE TKDE 2009). 1/20 is a
# judgement call: loud enough for a clearly skewed set, quiet on a mildly uneven one.
IMBALANCE_RATIO = 20

# imgclf.train.recipe's class_balance (off by default) and what eval reports beside accuracy.
_BALANCE_ADVICE = (
    "train with --set class_balance=loss (inverse-frequency weights) or "
    "--set class_balance=sampler (balanced draws), and judge it by balanced accuracy"
)


def balance_warnings(counts: dict[str, dict[str, int]], val_split: dict | None) -> list[str]:
    """One line per problem in a data set's per-split class counts (``Dataset.counts()``),
    each naming the class and split and saying what to do; ``[]`` when there is none.

    ``val_split`` is the import's record (``{"from": "train", ...}`` when the validation
    split was cut from train, ``{"from": "source"}`` when the source had one): it decides
    which fix to suggest for a class missing from validation.
    """
    train = counts.get("train", {})
    largest = max(train.values(), default=0)
    biggest = max(train, key=train.__getitem__, default="")
    out = []
    for cls, n in train.items():
        if n == 0:
            out.append(
                f"class {cls!r} has no training images (only in "
                f"{', '.join(s for s in counts if counts[s].get(cls))}): the model cannot "
                "learn it; add training images or drop the class"
            )
            continue
        if n < MIN_TRAIN_IMAGES:
            out.append(
                f"class {cls!r}: {n} training images (fewer than {MIN_TRAIN_IMAGES}): too few "
                "to learn or validate; add images, or merge it into a related class or drop it"
            )
        if n * IMBALANCE_RATIO < largest:
            out.append(
                f"class {cls!r}: {n} training images, under 1/{IMBALANCE_RATIO} of {biggest!r} "
                f"({largest}): imbalanced; add images of it, or {_BALANCE_ADVICE}"
            )
        for split in ("val", "test"):
            if split in counts and counts[split].get(cls, 0) == 0:
                out.append(f"class {cls!r}: {_missing(split, val_split)}")
    return out


def _missing(split: str, val_split: dict | None) -> str:
    """The sentence for a class present in train but absent from a held-out split."""
    if split == "val" and (val_split or {}).get("from") == "train":
        # splits.stratified_split holds out at least one image of every class with two or
        # more, so only a class's single image stays out of val.
        fix = "add images of it and re-import (a class's only image stays in train)"
    elif split == "val":
        fix = (
            "add some of its images to the source's val folder, or re-import without "
            "that folder and split train with --val-fraction F"
        )
    else:
        fix = "add some of its images to the source's test folder"
    return f"no {split} images: its {split} accuracy cannot be measured; {fix}"
