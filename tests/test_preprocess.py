"""One preprocessing path: a file gives the same model input through the import + batch
loader (training, validation, ``eval`` on a dataset), through ``eval`` on a folder and
through ``predict`` — for upscaled, downscaled and non-square photos (issue #9)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.data.importer import import_dataset
from imgclf.data.loader import BatchLoader
from imgclf.data.preprocess import Preprocess, batch_to_input

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _photo(rng: np.random.Generator, h: int, w: int, base) -> np.ndarray:
    """Smooth gradients plus texture: what a resize treats differently from a flat colour."""
    yy, xx = np.mgrid[0:h, 0:w]
    grad = np.stack([yy * 255 / h, xx * 255 / w, (yy + xx) * 127 / (h + w)], -1)
    pix = 0.5 * grad + 0.5 * np.array(base) + rng.normal(0, 25, (h, w, 3))
    return np.clip(pix, 0, 255).astype(np.uint8)


def photo_folder(root: Path, sizes: list[tuple[int, int]], per_class: int = 3) -> Path:
    """Two classes of JPEG and PNG 'photos' at the given (height, width) sizes."""
    rng = np.random.default_rng(0)
    for c, base in (("cat", (200, 60, 60)), ("dog", (60, 200, 60))):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            im = Image.fromarray(_photo(rng, h, w, base))
            if i % 2:
                im.save(root / c / f"{i}.png")
            else:
                im.save(root / c / f"{i}.jpg", quality=90)
    return root


CASES = {
    # (source photo sizes, import size, model input)
    "upscaled 32 -> 96": ([(32, 32)], 32, 96),
    "downscaled 224 -> 96": ([(300, 300), (224, 224)], 224, 96),
    "non-square portrait": ([(120, 90), (90, 160)], 64, 48),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_and_file_paths_give_equal_tensors(tmp_path, case):
    sizes, source, size = CASES[case]
    src = photo_folder(tmp_path / "src", sizes)
    ds = import_dataset(src, "p", image_size=source, val_fraction=0, warn=lambda m: None)
    loader = BatchLoader(ds.images, ds.labels, batch_size=64, size=size, mean=MEAN, std=STD)
    via_cache = loader.batch(torch.arange(len(ds.labels)))
    pre = Preprocess(source_size=(source, source), input_size=size, mean=MEAN, std=STD)
    via_files = torch.cat([pre(path=f) for f in ds.files()])
    assert via_cache.shape == (len(ds.labels), 3, size, size)
    assert torch.equal(via_cache, via_files)


def test_batch_shrink_is_antialiased():
    """A 1-pixel checkerboard shrunk 4× is flat grey when antialiased (aliasing would keep
    a pattern of full-contrast pixels)."""
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    pixels = torch.from_numpy(np.repeat(board[None, :, :, None], 3, axis=3))
    x = batch_to_input(pixels, 16, (0.0,) * 3, (1 / 255,) * 3, channels_last=False)
    assert x.shape == (1, 3, 16, 16)
    assert (x - 127.5).abs().max() < 5


def test_preprocess_from_an_old_checkpoint_crops_to_the_input_size():
    pre = Preprocess.from_state({"input_size": 32, "mean": MEAN, "std": STD})
    assert pre.source_size == (32, 32)
    new = Preprocess.from_state(
        {"input_size": 32, "mean": MEAN, "std": STD, "source_size": [64, 64]}
    )
    assert new.source_size == (64, 64) and new.to_dict()["source_size"] == [64, 64]


@pytest.fixture(scope="module")
def portrait_run(tmp_path_factory):
    """A tiny run trained on portrait photos imported at 40 px, with a 32-px input, and a
    validation folder of portrait photos (a size the import would not guess)."""
    from imgclf.train import train

    base = tmp_path_factory.mktemp("portrait")
    train_src = photo_folder(base / "train", [(80, 60), (100, 70)], per_class=8)
    val_src = photo_folder(base / "val", [(96, 72), (70, 100), (64, 64)], per_class=6)
    ds = import_dataset(train_src, "portrait", image_size=40, dest=base / "cache", val_fraction=0)
    recipe = {
        "name": "p",
        "model": "simple",
        "input_size": 32,
        "batch_size": 8,
        "stages": [{"epochs": 1}],
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    }
    run = train(recipe, data=ds, out=base / "run", progress=False)
    return run.path, val_src, base


def test_eval_on_folder_imports_at_the_runs_source_size(portrait_run):
    from imgclf.evaluate.runs import open_data_for
    from imgclf.inference.runs import load_run

    run, val_src, _ = portrait_run
    lr = load_run(run)
    assert lr.state["source_size"] == [40, 40]
    (ds,) = open_data_for(val_src, [lr])
    assert ds.image_size == (40, 40)


def test_eval_on_a_cache_eval_on_a_folder_and_predict_agree(portrait_run):
    """The same files scored three ways give the same probabilities, not just accuracy."""
    from imgclf.evaluate.runs import evaluate
    from imgclf.inference.engine import run_logits
    from imgclf.inference.runs import load_run
    from imgclf.predict import predict

    run, val_src, base = portrait_run
    cached = import_dataset(val_src, "val40", image_size=40, dest=base / "v40", val_fraction=0)
    on_cache = evaluate(run, cached, split="all")
    on_folder = evaluate(run, val_src, split="all")
    assert on_cache.accuracy == on_folder.accuracy
    assert np.array_equal(on_cache.confusion, on_folder.confusion)

    out = base / "pred.csv"
    predict([run], val_src, out)
    with open(out, newline="") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    logits, _ = run_logits(load_run(run), cached, "all")
    probs = torch.softmax(logits, 1)
    classes = load_run(run).classes
    for i, file in enumerate(cached.files()):
        row = rows[str(Path(file).relative_to(val_src))]
        assert row["label"] == classes[int(probs[i].argmax())]
        assert float(row["confidence"]) == pytest.approx(float(probs[i].max()), abs=1e-5)
