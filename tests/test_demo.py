"""``imgclf demo``: where its data comes from, and the offline digits fallback end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_archive, make_class_tree
from imgclf.cli import main
from imgclf.data import list_datasets, load_dataset
from imgclf.data.importer import import_arrays
from imgclf.demo import demo_dataset
from imgclf.errors import DataError

FALLBACK = "training on scikit-learn's 8×8 digits instead"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torchvision download fails as it does without a network."""

    def fail(name: str) -> Path:
        raise DataError(f"cannot download {name} (URLError: offline?); fetch it by hand")

    monkeypatch.setattr("imgclf.data.download.fetch_named", fail)


def test_demo_offline_falls_back_to_digits(offline, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    # The `simple` net at batch 256 keeps one epoch to seconds on a CPU (`fast`: ~100 img/s).
    args = ["demo", "--epochs", "1", "--out", str(out), "--quiet"]
    # (`simple` has no whitening stem for the recipe's freeze_after and bias_lr_groups.)
    simple = ["--set", "model=simple", "--set", "stages.0.freeze_after={}"]
    simple += ["--set", "optimizer.bias_lr_groups=[]"]
    code = main([*args, *simple, "--set", "batch_size=256"])
    assert code == 0
    stdout = capsys.readouterr().out
    said = [line for line in stdout.splitlines() if FALLBACK in line]
    assert len(said) == 1, stdout
    assert said[0].startswith("cannot download cifar10")

    ds = load_dataset("digits")
    assert len(ds.labels) == 1797
    assert ds.classes == [str(d) for d in range(10)]
    assert ds.image_size == (8, 8)
    assert ds.images.dtype == np.uint8 and int(ds.images.max()) == 255
    assert ds.meta["source"] == "sklearn.datasets.load_digits"
    assert set(ds.split_names) == {"train", "val"}

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "digits"
    assert summary["input_size"] == 32  # the recipe's size: 8×8 digits resized on the fly
    # A share of the validation images, and the one the printout reports.
    correct = summary["val_accuracy"] * summary["val_count"]
    assert correct == pytest.approx(round(correct), abs=1e-3)
    assert f"val accuracy {summary['val_accuracy']:.4f}" in stdout
    assert f"run folder:       {out}" in stdout
    assert str(out / "confusion_matrix.png") in stdout
    assert (out / "curves.png").is_file() and (out / "confusion_matrix.png").is_file()


def test_demo_prefers_cached_cifar10_then_archive(offline, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_class_tree(tree, {"cat": 3, "dog": 3})
    archive = make_archive(tree, tmp_path / "tiny.tar.gz", arcroot="cifar10/train")
    said: list[str] = []

    ds = demo_dataset(archive, said.append)
    assert ds.name == "cifar10" and ds.classes == ["cat", "dog"]
    assert said == [f"importing {archive} as dataset 'cifar10' (once; later runs use the cache)"]

    said.clear()
    again = demo_dataset(None, said.append)  # cached: no archive, no download, no message
    assert again.root == ds.root and said == []
    assert list_datasets() == ["cifar10"]


def test_import_arrays_splits_and_checks() -> None:
    images = np.arange(20 * 4 * 4 * 3, dtype=np.uint8).reshape(20, 4, 4, 3)
    labels = np.array([0, 1] * 10)
    ds = import_arrays(images, labels, ["a", "b"], "pairs", val_fraction=0.2, source="test")
    assert ds.counts() == {"train": {"a": 8, "b": 8}, "val": {"a": 2, "b": 2}}
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.meta["source"] == "test" and ds.meta["source_shape"] == "arrays"

    with pytest.raises(DataError, match="N×H×W×3 uint8"):
        import_arrays(images[..., 0], labels, ["a", "b"], "bad")
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.1"):
        import_arrays(images, labels + 1, ["a", "b"], "bad")
    assert list_datasets() == ["pairs"]
