"""Class balance and split sanity (issue #33, item 3): ``balance_warnings`` on hand-made
counts, and the lines ``imgclf data info`` prints for an unbalanced imported set."""

from __future__ import annotations

import json

from conftest import make_class_tree
from imgclf.cli import main
from imgclf.data.sanity import IMBALANCE_RATIO, MIN_TRAIN_IMAGES, balance_warnings

FROM_TRAIN = {"from": "train", "fraction": 0.1, "seed": 0, "stratified": True}
FROM_SOURCE = {"from": "source"}


def test_clean_set_has_no_warnings():
    counts = {"train": {"cat": 40, "dog": 30}, "val": {"cat": 4, "dog": 3}}
    assert balance_warnings(counts, FROM_TRAIN) == []


def test_few_training_images():
    n = MIN_TRAIN_IMAGES - 1
    counts = {"train": {"cat": 40, "dog": n}, "val": {"cat": 4, "dog": 1}}
    assert balance_warnings(counts, FROM_TRAIN) == [
        f"class 'dog': {n} training images (fewer than {MIN_TRAIN_IMAGES}): too few to learn "
        "or validate; add images, or merge it into a related class or drop it"
    ]
    counts["train"]["dog"] = MIN_TRAIN_IMAGES
    assert balance_warnings(counts, FROM_TRAIN) == []


def test_imbalanced_class():
    big = 30 * IMBALANCE_RATIO
    counts = {"train": {"cat": big, "dog": 29, "fox": 30}, "val": {"cat": 60, "dog": 3, "fox": 3}}
    (line,) = balance_warnings(counts, FROM_TRAIN)
    assert line.startswith(
        f"class 'dog': 29 training images, under 1/{IMBALANCE_RATIO} of 'cat' ({big}): "
        "imbalanced; add images of it, or train with --set class_balance=loss"
    )
    assert "--set class_balance=sampler" in line and "balanced accuracy" in line


def test_class_missing_from_val_cut_from_train():
    counts = {"train": {"cat": 40, "dog": 12}, "val": {"cat": 4, "dog": 0}}
    assert balance_warnings(counts, FROM_TRAIN) == [
        "class 'dog': no val images: its val accuracy cannot be measured; add images of it "
        "and re-import (a class's only image stays in train)"
    ]


def test_class_missing_from_source_val_and_test():
    counts = {
        "train": {"cat": 40, "dog": 12},
        "test": {"cat": 5, "dog": 0},
        "val": {"cat": 4, "dog": 0},
    }
    assert balance_warnings(counts, FROM_SOURCE) == [
        "class 'dog': no val images: its val accuracy cannot be measured; add some of its "
        "images to the source's val folder, or re-import without that folder and split "
        "train with --val-fraction F",
        "class 'dog': no test images: its test accuracy cannot be measured; add some of its "
        "images to the source's test folder",
    ]


def test_no_val_split_is_not_a_missing_class():
    # --val-fraction 0: there is no validation split to miss a class from.
    assert balance_warnings({"train": {"cat": 40, "dog": 12}}, FROM_TRAIN) == []


def test_class_without_training_images():
    counts = {"train": {"cat": 40, "dog": 0}, "val": {"cat": 4, "dog": 3}}
    assert balance_warnings(counts, FROM_SOURCE) == [
        "class 'dog' has no training images (only in val): the model cannot learn it; "
        "add training images or drop the class"
    ]


def test_data_info_prints_the_warnings(tmp_path, capsys):
    # 60 cats, 2 dogs, 12 foxes: the stratified 10% split holds out 6 cats, 1 dog, 1 fox,
    # leaving 54 / 1 / 11 in train; dog is both too few and under 1/20 of cat.
    make_class_tree(tmp_path / "src", {"cat": 60, "dog": 2, "fox": 12})
    assert main(["data", "import", str(tmp_path / "src"), "--name", "zoo"]) == 0
    capsys.readouterr()
    assert main(["data", "info", "zoo"]) == 0
    out = capsys.readouterr().out.splitlines()
    warnings = [line for line in out if line.startswith("warning: ")]
    assert warnings == [
        "warning: class 'dog': 1 training images (fewer than 10): too few to learn or "
        "validate; add images, or merge it into a related class or drop it",
        "warning: class 'dog': 1 training images, under 1/20 of 'cat' (54): imbalanced; "
        "add images of it, or train with --set class_balance=loss (inverse-frequency "
        "weights) or --set class_balance=sampler (balanced draws), and judge it by "
        "balanced accuracy",
    ]
    assert out[-2:] == warnings  # after everything `data info` printed before
    assert "no problems found" not in "\n".join(out)
    assert main(["data", "info", "zoo", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert ["warning: " + w for w in info["warnings"]] == warnings


def test_data_info_on_a_sound_set_says_so(tmp_path, capsys):
    make_class_tree(tmp_path / "src", {"cat": 20, "dog": 20})
    assert main(["data", "import", str(tmp_path / "src"), "--name", "pets"]) == 0
    capsys.readouterr()
    assert main(["data", "info", "pets"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "class balance and splits: no problems found"
    assert not any(line.startswith("warning: ") for line in out)
    assert main(["data", "info", "pets", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []
