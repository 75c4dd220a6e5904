"""Transfer recipes that hold on new data, and the guard rails that say when a run does
not (issue #9): zero-initialised heads, BatchNorm kept on its statistics when fine-tuning,
small-data batches, class balance, the chance and stage-regression warnings, and the
recipe chosen from the data."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers_train import make_image_folder
from imgclf.data.importer import import_dataset
from imgclf.models import create
from imgclf.train import train
from imgclf.train.adapt import (
    adapt,
    class_weights,
    sample_weights,
    small_data_batch,
)
from imgclf.train.choose import choose_recipe
from imgclf.train.recipe import load_recipe

BACKBONES = ["efficientnet_lite0", "resnet18", "mobilenet_v2", "efficientnet_b0"]


def _quiet(msg: str) -> None:
    pass


def _rows(run_path) -> list[dict[str, str]]:
    with open(run_path / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ heads


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("head", [{"type": "linear"}, {"type": "mlp", "hidden": 32}])
@pytest.mark.parametrize("classes", [2, 7])
def test_new_head_first_loss_is_ln_classes(name, head, classes):
    torch.manual_seed(0)
    model = create(name, num_classes=classes, input_size=64, pretrained=False, head=head)
    model.train()
    x = torch.randn(6, 3, 64, 64) * 3
    loss = F.cross_entropy(model(x), torch.arange(6) % classes)
    assert loss.item() == pytest.approx(math.log(classes), abs=1e-5)
    # ...and it learns: the head's gradient is not zero.
    loss.backward()
    head_grads = [p.grad for n, p in model.named_parameters() if n in model.param_groups()["head"]]
    assert any(g is not None and g.abs().sum() > 0 for g in head_grads)


# ------------------------------------------------------------------ BatchNorm


@pytest.fixture(scope="module")
def tiny_photos(tmp_path_factory):
    base = tmp_path_factory.mktemp("bn")
    src = make_image_folder(base / "src", per_class=16, size=32)
    return import_dataset(src, "bn", dest=base / "cache", val_fraction=0.25, warn=_quiet)


def _two_stage(batchnorm: str) -> dict:
    """Lite0 with the shipped ImageNet weights: a head stage, then everything at a learning
    rate too small to move any weight."""
    return {
        "name": f"bn-{batchnorm}",
        "model": "efficientnet_lite0",
        "input_size": 32,
        "batch_size": 8,
        "batchnorm": batchnorm,
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "stages": [
            {"epochs": 2, "train": "head"},
            {"epochs": 1, "train": "all", "lr": 1e-12},
        ],
    }


@pytest.mark.parametrize("batchnorm", ["frozen", "auto"])
def test_switching_stages_at_a_tiny_rate_keeps_the_accuracy(tiny_photos, tmp_path, batchnorm):
    run = train(_two_stage(batchnorm), data=tiny_photos, out=tmp_path / "run", progress=False)
    head_end, all_end = _rows(run.path)[1], _rows(run.path)[2]
    assert float(all_end["val_acc"]) == float(head_end["val_acc"])
    assert float(all_end["val_loss"]) == pytest.approx(float(head_end["val_loss"]), abs=1e-4)


def test_batch_statistics_change_the_network_at_the_same_weights(tiny_photos, tmp_path):
    """The contrast: with `batchnorm: train` the same near-zero rate moves validation loss,
    because the running statistics are re-estimated from the small batches."""
    run = train(_two_stage("train"), data=tiny_photos, out=tmp_path / "run", progress=False)
    head_end, all_end = _rows(run.path)[1], _rows(run.path)[2]
    assert abs(float(all_end["val_loss"]) - float(head_end["val_loss"])) > 1e-3


def test_batchnorm_auto_keeps_pretrained_statistics_at_any_data_size():
    """Large sets too: on CIFAR-10's 45,000 images batch statistics undid the head stage
    (76.4% → 73.3%) where kept statistics reached 86.6% (imgclf.train.adapt)."""
    photo = load_recipe("lite0-photo")
    assert adapt(photo, True, 500).freeze_bn
    assert adapt(photo, True, 45_000).freeze_bn
    assert "batchnorm: frozen" in adapt(load_recipe("lite0-cpu"), True, 45_000).notes[0]
    assert not adapt(photo, False, 500).freeze_bn  # from scratch: BatchNorm must learn
    fixed = photo.model_copy(update={"batchnorm": "train"})
    assert not adapt(fixed, True, 500).freeze_bn


# ------------------------------------------------------------------ small data


def test_small_data_sets_get_enough_steps_per_epoch():
    assert small_data_batch(128, 250, 0) == (128, 1.0)  # off: the recipe's batch
    assert small_data_batch(128, 10_000, 20) == (128, 1.0)  # enough steps already
    batch, scale = small_data_batch(64, 250, 20)
    assert batch == 16 and 250 // batch >= 15 and scale == pytest.approx(16 / 64)
    assert small_data_batch(64, 2000, 20) == (64, 1.0)
    batch, scale = small_data_batch(128, 1000, 20)
    assert batch == 50 and scale == pytest.approx(50 / 128)


def test_the_small_data_batch_is_what_the_trainer_uses(tiny_photos, tmp_path):
    recipe = {
        "name": "few",
        "model": "simple",
        "input_size": 16,
        "batch_size": 64,
        "min_steps_per_epoch": 50,
        "optimizer": {"name": "sgd", "lr": 0.64, "momentum": 0.9},
        "stages": [{"epochs": 1}],
    }
    run = train(recipe, data=tiny_photos, out=tmp_path / "run", progress=False)
    config = (run.path / "config.yaml").read_text()
    assert "batch_size: 16" in config and "lr_scale: 0.25" in config
    assert float(_rows(run.path)[0]["lr"]) == pytest.approx(0.64 * 0.25, rel=1e-3)


# ------------------------------------------------------------------ class balance


def test_class_weights_are_inverse_frequency():
    labels = np.array([0] * 6 + [1] * 2 + [2] * 4)
    w = class_weights(labels, 4)
    assert w.tolist() == pytest.approx([12 / 18, 12 / 6, 12 / 12, 0.0])
    # Weighted by them, every present class carries the same total weight.
    totals = [w[c].item() * (labels == c).sum() for c in range(3)]
    assert totals == pytest.approx([4.0, 4.0, 4.0])


def test_sampler_draws_classes_evenly():
    from imgclf.data.loader import epoch_order

    labels = np.array([0] * 900 + [1] * 100)
    weights = sample_weights(labels, 2)
    drawn = torch.cat(
        [epoch_order(1000, epoch=e, seed=0, shuffle=True, weights=weights) for e in range(5)]
    )
    share = (torch.from_numpy(labels)[drawn] == 1).float().mean().item()
    assert 0.45 < share < 0.55  # a permutation would give 0.10


@pytest.mark.parametrize("mode", ["loss", "sampler"])
def test_class_balance_changes_training_as_declared(tmp_path, mode):
    src = make_image_folder(tmp_path / "src", per_class=4, size=16)
    for i in range(4, 28):  # class "a" gets 7x the images
        Image.open(src / "a" / "0.png").save(src / "a" / f"{i}.png")
    ds = import_dataset(src, "unbal", dest=tmp_path / "cache", val_fraction=0.2, warn=_quiet)
    base = {
        "name": "cb",
        "model": "simple",
        "input_size": 16,
        "batch_size": 8,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "stages": [{"epochs": 1}],
    }
    from imgclf.train.recipe import validate
    from imgclf.train.trainer import Trainer

    plain = Trainer(validate(base), ds, tmp_path / "a", progress=False)
    balanced = Trainer(
        validate({**base, "class_balance": mode}), ds, tmp_path / "b", progress=False
    )
    assert plain.loss_weights is None and plain.train_loader.sample_weights is None
    train_labels = ds.labels[ds.indices("train")]
    if mode == "loss":
        assert balanced.train_loader.sample_weights is None
        want = class_weights(train_labels, 3)
        assert torch.equal(balanced.loss_weights, want) and want[0] < want[1]
    else:
        assert balanced.loss_weights is None
        order = torch.cat(
            [torch.cat([y for _, y in _epoch(balanced.train_loader, e)]) for e in range(20)]
        )
        share_a = (order == 0).float().mean().item()
        assert share_a < 0.5  # ~1/3 balanced, against 0.78 of the training images


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


# ------------------------------------------------------------------ guard rails


def _constant_folder(root, classes=("a", "b", "c"), per_class=10):
    """Every image identical whatever its label: labels carry no information."""
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(root / c / f"{i}.png")
    return root


def _simple(epochs=2, lr=0.05) -> dict:
    return {
        "name": "g",
        "model": "simple",
        "input_size": 16,
        "batch_size": 8,
        "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9},
        "stages": [{"epochs": epochs}],
    }


def test_chance_warning_fires_when_nothing_can_be_learned(tmp_path, capsys):
    src = _constant_folder(tmp_path / "src")
    ds = import_dataset(src, "const", dest=tmp_path / "cache", val_fraction=0.3, warn=_quiet)
    run = train(_simple(), data=ds, out=tmp_path / "run", progress=False)
    warnings = run.summary["warnings"]
    assert len(warnings) == 1 and "most common class" in warnings[0]
    assert "warning:" in capsys.readouterr().err
    assert json.loads((run.path / "summary.json").read_text())["warnings"] == warnings


def test_no_chance_warning_on_learnable_data(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src", per_class=20, size=16)
    ds = import_dataset(src, "ok", dest=tmp_path / "cache", val_fraction=0.3, warn=_quiet)
    run = train(_simple(epochs=3), data=ds, out=tmp_path / "run", progress=False)
    assert run.summary["val_accuracy"] > 0.9
    assert run.summary["warnings"] == []
    assert "warning:" not in capsys.readouterr().err


def test_a_stage_ending_below_the_previous_one_warns(tmp_path, capsys):
    from imgclf.train.recipe import validate
    from imgclf.train.trainer import Trainer

    src = make_image_folder(tmp_path / "src", per_class=50, size=16)
    ds = import_dataset(src, "ok", dest=tmp_path / "cache", val_fraction=0.4, warn=_quiet)
    recipe = {**_simple(), "stages": [{"epochs": 1}, {"epochs": 1}, {"epochs": 1}]}
    trainer = Trainer(validate(recipe), ds, tmp_path / "run", progress=False)
    assert trainer.val_loader.num_samples == 60  # two standard errors at 80%: 10.3 points
    trainer._check_stage_end(0, 0.80)
    trainer._check_stage_end(1, 0.72)  # within the noise of 60 images: no warning
    assert trainer.progress.warnings == []
    trainer._check_stage_end(1, 0.80)
    trainer._check_stage_end(2, 0.65)
    (warning,) = trainer.progress.warnings
    assert "stage 3 ended at val accuracy 0.6500, below stage 2's 0.8000" in warning
    assert "batchnorm=frozen" in warning and "best.pt" in warning
    assert capsys.readouterr().err.count("warning:") == 1
    # A resumed stage replaces its own entry instead of appending a second one.
    trainer._check_stage_end(2, 0.85)
    assert trainer.progress.stage_end_acc == [0.80, 0.80, 0.85]


# ------------------------------------------------------------------ recipe picker


def test_recipe_chosen_for_small_images_and_for_photos(tmp_path):
    small = make_image_folder(tmp_path / "small", per_class=3, size=32)
    ds = import_dataset(small, "small", dest=tmp_path / "c1", val_fraction=0, warn=_quiet)
    name, why = choose_recipe(ds)
    assert name == "fast" and "32×32" in why
    photos = tmp_path / "photos"
    for c in ("x", "y"):
        (photos / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (150, 200), (40 * i, 90, 9)).save(photos / c / f"{i}.jpg")
    ds = import_dataset(photos, "photos", dest=tmp_path / "c2", val_fraction=0, warn=_quiet)
    name, why = choose_recipe(ds)
    assert name == "lite0-photo" and "photos" in why
    assert load_recipe(name).input_size == 224


def test_train_without_a_recipe_says_what_it_chose(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src", per_class=6, size=16)
    ds = import_dataset(src, "digits", dest=tmp_path / "cache", val_fraction=0.3, warn=_quiet)
    run = train(data=ds, out=tmp_path / "run", epochs=1, progress=False)
    err = capsys.readouterr().err
    assert "recipe: fast, chosen because" in err and "16×16" in err
    assert run.summary["recipe"] == "fast"
