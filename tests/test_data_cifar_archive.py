"""Import the real CIFAR-10 train archive from ../shared (skipped where it is absent)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.data import import_dataset

ARCHIVE = Path(__file__).parents[1].parent / "shared/data/cifar10-train-jpg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

pytestmark = pytest.mark.skipif(
    not ARCHIVE.is_file(),
    reason=f"{ARCHIVE} not found: the CIFAR-10 train archive ships beside the repo, not in it",
)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    home = tmp_path_factory.mktemp("cifar-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLF_HOME", str(home))
        yield import_dataset(ARCHIVE, "cifar10-train", seed=0)


def test_counts_classes_and_split(cifar):
    assert cifar.classes == CLASSES
    assert cifar.images.shape == (50_000, 32, 32, 3)
    assert cifar.image_size == (32, 32)
    assert cifar.meta["source_shape"] == "split-tree"
    assert cifar.meta["skipped"] == 0 and cifar.meta["resized"] == 0
    assert cifar.counts() == {
        "train": dict.fromkeys(CLASSES, 4_500),
        "val": dict.fromkeys(CLASSES, 500),
    }
    assert cifar.meta["val_split"] == {
        "from": "train",
        "fraction": 0.1,
        "seed": 0,
        "stratified": True,
    }
    assert isinstance(cifar.images, np.memmap)


def test_decoded_images_equal_pillows_decode(cifar):
    files = cifar.files()
    picks = [0, 4_999, 20_000]  # early members: the check scans the archive only so far
    wanted = {files[i].removeprefix(f"{ARCHIVE}/"): i for i in picks}
    found = {}
    with tarfile.open(ARCHIVE) as tf:
        for member in tf:
            if member.name in wanted:
                found[member.name] = tf.extractfile(member).read()
                if len(found) == len(wanted):
                    break
    assert set(found) == set(wanted)
    for name, i in wanted.items():
        ref = np.asarray(Image.open(io.BytesIO(found[name])).convert("RGB"))
        np.testing.assert_array_equal(cifar.images[i], ref)
        assert name.split("/")[-2] == cifar.classes[cifar.labels[i]]
