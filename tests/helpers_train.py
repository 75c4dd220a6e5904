"""Shared helpers for the trainer tests: a tiny learnable image folder, small recipes, and
ways to compare two runs.

The images are class colours plus noise, so the `simple` net learns them in an epoch or
two; 16×16 keeps a step to milliseconds on 2 CPU cores.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

if TYPE_CHECKING:
    from imgclf.train.trainer import Trainer

CLASSES = ("a", "b", "c")
COLOURS = {"a": (200, 40, 40), "b": (40, 200, 40), "c": (40, 40, 200)}
# Columns that measure the machine, not the training: never equal between two runs.
TIMING_COLUMNS = ("seconds", "images_per_second")


def make_image_folder(
    root: Path,
    per_class: int = 20,
    size: int = 16,
    classes: tuple[str, ...] = CLASSES,
    seed: int = 0,
) -> Path:
    """``root/<class>/<i>.png``: each image its class colour plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        colour = np.array(COLOURS.get(cls, (120, 120, 40)), dtype=np.float64)
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noisy = colour + rng.normal(0, 40, (size, size, 3))
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / cls / f"{i}.png")
    return root


def import_tiny(tmp_path: Path, name: str = "tiny", **kwargs: Any):
    """Generate and import a tiny dataset into the test's IMGCLF_HOME; returns the Dataset."""
    from imgclf.data.importer import import_dataset

    folder = make_image_folder(tmp_path / f"{name}-src", **kwargs)
    return import_dataset(folder, name, warn=lambda msg: None)


def finished_tiny_run(root: Path):
    """A finished one-epoch run of the tiny recipe under ``root``: its folder, its data
    set's folder and one class's image folder (as attributes ``run``, ``data``, ``images``)."""
    from types import SimpleNamespace

    import imgclf

    src = make_image_folder(root / "src", per_class=8)
    ds = imgclf.import_dataset(src, "tiny", dest=root / "tiny", warn=lambda msg: None)
    run = imgclf.train(tiny_recipe(epochs=1), ds, out=root / "run", threads=1, progress=False)
    return SimpleNamespace(run=run.path, data=ds.root, images=src / "a")


def tiny_recipe(epochs: int = 2, **changes: Any) -> dict[str, Any]:
    """A small `simple` recipe with augmentation on (so resumes must replay its random
    numbers) and a per-step schedule (so resumes must restore the scheduler)."""
    recipe: dict[str, Any] = {
        "name": "tiny",
        "model": "simple",
        "input_size": 16,
        "batch_size": 8,
        "eval_batch_size": 64,
        "augment": {"crop_padding": 2, "flip": True},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
        "scheduler": {"name": "cosine", "warmup_epochs": 0.5},
        "label_smoothing": 0.1,
        "stages": [{"epochs": epochs, "train": "all"}],
        "seed": 0,
    }
    recipe.update(changes)
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv rows as strings, without the timing columns."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [
            {k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)
        ]


def load_pt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    sa, sb = load_pt(a)["model_state"], load_pt(b)["model_state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        if atol:
            torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=0, msg=key)
        else:
            assert torch.equal(sa[key], sb[key]), f"{key} differs"


def cli_process(*args: str, **kwargs: Any) -> subprocess.Popen:
    """``python -m imgclf ARGS`` in a child whose SIGINT is the default (a child started
    from a background shell would inherit SIG_IGN and never see Ctrl-C)."""
    import signal

    def default_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen(
        [sys.executable, "-m", "imgclf", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=default_sigint,
        **kwargs,
    )


def assert_same_run(run: Path, reference: Path) -> None:
    assert metric_rows(run) == metric_rows(reference)
    assert_same_weights(run / "last.pt", reference / "last.pt")
    assert_same_weights(run / "best.pt", reference / "best.pt")
    assert load_pt(run / "best.pt")["position"] == load_pt(reference / "best.pt")["position"]


def interrupt_at(trainer: Trainer, epoch: int, batch: int | None) -> None:
    """Request Ctrl-C while global ``epoch`` yields ``batch`` (None: during its validation)."""
    loader, validate = trainer.train_loader, trainer._validate

    def iter_from(start: int, original=loader.iter_from):
        for i, item in enumerate(original(start), start):
            if loader.epoch == epoch and i == batch:
                trainer.ctrl_c.requested = True
            yield item

    def validate_then_interrupt():
        if loader.epoch == epoch and batch is None:
            trainer.ctrl_c.requested = True
        return validate()

    loader.iter_from = iter_from
    trainer._validate = validate_then_interrupt


def interrupt_cache_at(monkeypatch, trainer: Trainer, epoch: int, batch: int) -> None:
    """Request Ctrl-C at (``epoch``, ``batch``) of a stage that trains on a feature cache
    (:func:`interrupt_at` covers stages that read images)."""
    from imgclf.train.feature_cache import FeatureCache

    original = FeatureCache.iter_from

    def iter_from(self, start):
        for i, item in enumerate(original(self, start), start):
            if self.epoch == epoch and i == batch:
                trainer.ctrl_c.requested = True
            yield item

    monkeypatch.setattr(FeatureCache, "iter_from", iter_from)


def interrupt_then_resume(recipe: Any, data: Path, out: Path, epoch: int = 2, batch: int = 2):
    """Train ``recipe`` in ``out``, press Ctrl-C at (``epoch``, ``batch``), then resume to the
    end. Returns the checkpoint as it was at the interrupt, for the caller's checks."""
    from imgclf.runtime.checkpoint import load_checkpoint
    from imgclf.train.api import train
    from imgclf.train.trainer import Trainer

    trainer = Trainer(recipe, data, out, threads=1, progress=False)
    interrupt_at(trainer, epoch, batch)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    state = load_checkpoint(out / "last.pt")
    train(None, resume=out, threads=1, progress=False)
    return state
