"""The trainer on a tiny generated dataset: stages, run folder, checkpoints, determinism,
early stopping and the library entry points.

Every run is the `simple` (or, for BatchNorm, `complex`) net on 3 classes × 20 images of
16×16 for 1-3 epochs: about a second each on 2 CPU cores.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import imgclf
from helpers_train import (
    CLASSES,
    assert_same_weights,
    import_tiny,
    load_pt,
    make_image_folder,
    metric_rows,
    tiny_recipe,
)
from imgclf.data.importer import import_dataset
from imgclf.data.loader import BatchLoader
from imgclf.errors import RecipeError
from imgclf.evaluate.metrics import Metrics, compute_metrics, infer
from imgclf.evaluate.mistakes import top_mistakes
from imgclf.models import build_model_from_checkpoint, create
from imgclf.runtime.checkpoint import load_checkpoint
from imgclf.train.api import train
from imgclf.train.recipe import load_recipe
from imgclf.train.rundir import METRIC_COLUMNS
from imgclf.train.stages import set_trainable
from imgclf.train.state import Run
from imgclf.train.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory):
    """The tiny dataset in a module-wide folder (passed by path or object, not by name)."""
    root = tmp_path_factory.mktemp("tiny")
    folder = make_image_folder(root / "src")
    return import_dataset(folder, "tiny", dest=root / "tiny", warn=lambda msg: None)


@pytest.fixture(scope="module")
def trained(tiny_ds, tmp_path_factory):
    """One finished 2-epoch run, with the Trainer kept (its model holds the best weights)."""
    out = tmp_path_factory.mktemp("run") / "run"
    trainer = Trainer(load_recipe(tiny_recipe(epochs=2)), tiny_ds, out, threads=1, progress=False)
    run = trainer.run()
    return trainer, run


# ---------------------------------------------------------------- stages


def trainable_by_group(model) -> dict[str, int]:
    params = dict(model.named_parameters())
    return {
        group: sum(params[n].numel() for n in names if params[n].requires_grad)
        for group, names in model.param_groups().items()
    }


def group_sizes(model) -> dict[str, int]:
    params = dict(model.named_parameters())
    return {g: sum(params[n].numel() for n in names) for g, names in model.param_groups().items()}


@pytest.mark.parametrize(
    "groups", [["head"], ["block2", "head"], ["block1"], ["block1", "head"], None]
)
def test_set_trainable_trains_exactly_the_named_groups(groups) -> None:
    model = create("simple", num_classes=3, input_size=16)
    n = set_trainable(model, groups)
    sizes = group_sizes(model)
    chosen = groups or list(sizes)
    assert trainable_by_group(model) == {g: sizes[g] if g in chosen else 0 for g in sizes}
    assert n == sum(sizes[g] for g in chosen)
    # and back: a later stage unfreezes what an earlier one froze
    set_trainable(model, None)
    assert trainable_by_group(model) == sizes


def test_frozen_parameters_stay_frozen_whatever_the_stage_unfreezes() -> None:
    model = create("fast", num_classes=3, input_size=16)
    frozen = model.frozen_parameter_names()
    assert "stem.conv.weight" in frozen and len(frozen) > 1  # BatchNorm scales too
    for groups in (None, ["stem", "head"], ["block1"]):
        set_trainable(model, groups)
        for name, p in model.named_parameters():
            if name in frozen:
                assert not p.requires_grad, (groups, name)
    set_trainable(model, None)
    assert model.stem.conv.bias.requires_grad  # the stem's bias is a normal parameter


def test_frozen_batchnorm_goes_to_eval_mode_unless_bn_update() -> None:
    model = create("complex", num_classes=3, input_size=16)
    set_trainable(model, ["block3", "head"])
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {n: m.training for n, m in bns.items()} == {
        "block1.2": False,
        "block2.2": False,
        "block3.2": True,
    }
    set_trainable(model, ["head"], bn_update=True)
    assert all(m.training for m in bns.values())


def test_unknown_group_lists_the_models_groups() -> None:
    model = create("simple", num_classes=3, input_size=16)
    with pytest.raises(RecipeError) as excinfo:
        set_trainable(model, ["layer4"])
    text = str(excinfo.value)
    assert "layer4" in text and "block1, block2, head" in text and "\n" not in text


def bn_state(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if "running_" in k or "num_batches" in k}


def complex_recipe(stages: list[dict]) -> dict:
    return tiny_recipe(
        model="complex", stages=stages, optimizer={"name": "sgd", "lr": 0.02, "momentum": 0.9}
    )


def test_head_only_stage_keeps_frozen_weights_and_batchnorm_statistics(tiny_ds, tmp_path):
    torch.manual_seed(0)  # the trainer seeds the same way before building the model
    initial = create("complex", num_classes=3, input_size=16).state_dict()
    recipe = complex_recipe([{"epochs": 1, "train": ["head"]}])
    train(recipe, tiny_ds, out=tmp_path / "frozen", threads=1, progress=False)
    after = load_pt(tmp_path / "frozen" / "last.pt")["model_state"]
    for key, value in initial.items():
        if key.startswith("head."):
            assert not torch.equal(after[key], value), f"{key} did not train"
        else:  # conv and BatchNorm weights *and* running statistics untouched
            assert torch.equal(after[key], value), f"{key} changed while frozen"

    recipe = complex_recipe([{"epochs": 1, "train": ["head"], "bn_update": True}])
    train(recipe, tiny_ds, out=tmp_path / "bn_update", threads=1, progress=False)
    after = load_pt(tmp_path / "bn_update" / "last.pt")["model_state"]
    for key, value in bn_state(initial).items():
        assert not torch.equal(after[key], value), f"{key} should update with bn_update"
    assert torch.equal(after["block1.0.weight"], initial["block1.0.weight"])


def test_two_stage_recipe_end_to_end(tiny_ds, tmp_path):
    recipe = complex_recipe(
        [{"epochs": 1, "train": ["head"]}, {"epochs": 2, "train": "all", "lr": 0.01}]
    )
    recipe["scheduler"] = {"name": "constant"}
    run = train(recipe, tiny_ds, out=tmp_path / "run", threads=1, progress=False)
    rows = metric_rows(run.path)
    assert [(r["stage"], r["epoch"], r["stage_epoch"]) for r in rows] == [
        ("1", "1", "1"),
        ("2", "2", "1"),
        ("2", "3", "2"),
    ]
    # Stage 1 ran at the optimizer's lr, stage 2 at its own.
    assert [float(r["lr"]) for r in rows] == [0.02, 0.01, 0.01]
    # Stage 2 trained everything: BatchNorm statistics moved this time.
    state = load_pt(run.last)["model_state"]
    assert state["block1.2.num_batches_tracked"].item() > 0
    assert state["block1.2.running_mean"].abs().sum() > 0
    assert load_pt(run.last)["position"] == {"stage": 1, "epoch": 2, "batch": 0}
    assert run.summary["epochs"] == 3


# ---------------------------------------------------------------- the run folder


def test_config_yaml_is_the_resolved_recipe_and_loads_back(trained):
    trainer, run = trained
    config = yaml.safe_load((run.path / "config.yaml").read_text())
    assert config["dataset"]["classes"] == list(CLASSES)
    assert config["hardware"]["device"] == "cpu" and config["hardware"]["threads"] == 1
    assert load_recipe(run.path / "config.yaml") == trainer.recipe
    assert load_recipe(load_pt(run.last)["recipe"]) == trainer.recipe


def test_metrics_csv_has_one_row_per_epoch(trained):
    _, run = trained
    with open(run.path / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == METRIC_COLUMNS
    assert [(r["stage"], r["epoch"], r["stage_epoch"]) for r in rows] == [
        ("1", "1", "1"),
        ("1", "2", "2"),
    ]
    for r in rows:
        values = {k: float(v) for k, v in r.items()}
        assert all(math.isfinite(v) for v in values.values()), r
        assert 0 <= values["train_acc"] <= 1 and 0 <= values["val_acc"] <= 1
        assert values["seconds"] > 0 and values["images_per_second"] > 0
    assert float(rows[-1]["val_acc"]) == 1.0  # colours are easy: it learned
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_logged_lr_is_the_one_the_epoch_used(tiny_ds, tmp_path):
    # StepLR(1, 0.5): each epoch trains at half the last one's lr; the row says so (the
    # optimizer already holds the next epoch's lr when the row is written).
    recipe = tiny_recipe(epochs=3, scheduler={"name": "step", "step_size": 1, "gamma": 0.5})
    run = train(recipe, tiny_ds, out=tmp_path / "run", threads=1, progress=False)
    assert [float(r["lr"]) for r in metric_rows(run.path)] == [0.05, 0.025, 0.0125]


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_checkpoint_holds_what_rebuilds_and_resumes(trained, name):
    trainer, run = trained
    state = torch.load(run.path / name, map_location="cpu", weights_only=True)
    assert state["format"] == "imgclf-checkpoint-1"
    assert state["model_name"] == "simple"
    assert state["model_args"] == {"num_classes": 3, "input_size": 16}
    assert state["class_names"] == list(CLASSES)
    assert state["input_size"] == 16
    assert state["mean"] == pytest.approx(list(trainer.model.mean))
    assert state["std"] == pytest.approx(list(trainer.model.std))
    assert state["recipe"]["model"] == "simple" and state["recipe"]["name"] == "tiny"
    epoch = 2 if name == "last.pt" else run.summary["best_epoch"]
    assert state["position"] == {"stage": 0, "epoch": epoch, "batch": 0}
    assert state["progress"]["best_epoch"] == run.summary["best_epoch"]
    assert isinstance(state["torch_rng"], torch.Tensor)
    assert {"optimizer_state", "scheduler_state"} <= state.keys()
    assert state["model_state"].keys() == trainer.model.state_dict().keys()


def test_mid_stage_checkpoint_holds_optimizer_and_scheduler_state(tiny_ds, tmp_path):
    # Stop after the first of three epochs: that checkpoint must carry the momentum and
    # the schedule's position for a resume.
    recipe = tiny_recipe(epochs=3, early_stopping={"patience": 1})
    recipe["optimizer"]["lr"] = 1e-9  # no progress, so patience 1 stops after epoch 2
    train(recipe, tiny_ds, out=tmp_path / "run", threads=1, progress=False)
    state = load_pt(tmp_path / "run" / "last.pt")
    assert state["position"] == {"stage": 0, "epoch": 2, "batch": 0}
    opt = state["optimizer_state"]
    assert opt["state"] and all("momentum_buffer" in s for s in opt["state"].values())
    assert state["scheduler_state"]["last_epoch"] == 2 * 6  # 54 train images, batch 8


def test_plots_tables_summary_and_tensorboard(trained, tiny_ds):
    _, run = trained
    png = b"\x89PNG\r\n\x1a\n"
    for name in ("curves.png", "confusion_matrix.png"):
        assert (run.path / name).read_bytes()[:8] == png, name
    val = tiny_ds.indices("val")
    with open(run.path / "confusion.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["true\\pred", *CLASSES]
    assert [row[0] for row in table[1:]] == list(CLASSES)
    assert sum(int(n) for row in table[1:] for n in row[1:]) == len(val)
    with open(run.path / "per_class.csv", newline="") as f:
        per_class = list(csv.DictReader(f))
    assert [r["class"] for r in per_class[:3]] == list(CLASSES)
    assert list(per_class[0]) == ["class", "precision", "recall", "f1", "support"]
    assert sum(int(r["support"]) for r in per_class[:3]) == len(val)

    summary = json.loads((run.path / "summary.json").read_text())
    assert summary == run.summary
    assert summary["classes"] == list(CLASSES) and summary["epochs"] == 2
    assert summary["val_count"] == len(val)
    metrics = imgclf.evaluate(run, tiny_ds, split="val")
    assert summary["val_accuracy"] == pytest.approx(metrics.accuracy, abs=1e-6)
    assert summary["val_loss"] == pytest.approx(metrics.loss, abs=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run.path / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run.path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/train")] == [1, 2]
    assert [e.step for e in acc.Scalars("accuracy/val")] == [1, 2]


def test_mistakes_and_balanced_scores_with_class_names_like_mathtext_and_html(tmp_path):
    """Classes named like mathtext and HTML: the run finishes (a class named $\\foo$ used
    to crash it after the epochs, drawing the confusion matrix), and its folder lists every
    wrong validation prediction, most confident first, with the file it came from."""
    # the first two share a colour (helpers_train knows only a, b, c): sure mistakes
    classes = ("$\\foo$", "<i>x", "c")
    folder = make_image_folder(tmp_path / "src", per_class=12, classes=classes)
    ds = import_dataset(folder, "odd", val_fraction=0.25, dest=tmp_path / "odd", warn=print)
    recipe = tiny_recipe(epochs=2)
    trainer = Trainer(load_recipe(recipe), ds, tmp_path / "run", threads=1, progress=False)
    run = trainer.run()

    logits, labels = infer(trainer.model, trainer.val_loader)  # the best weights
    expected = compute_metrics(logits, labels, ds.classes)
    wrong = top_mistakes(torch.softmax(logits, 1).numpy(), labels.numpy(), k=None)
    assert 0 < len(wrong) < len(labels)
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["val_balanced_accuracy"] == pytest.approx(expected.balanced_accuracy, abs=1e-6)
    assert summary["val_macro_f1"] == pytest.approx(expected.macro_f1, abs=1e-6)
    assert summary["val_accuracy"] == pytest.approx(1 - len(wrong) / len(labels), abs=1e-6)

    with open(run.path / "mistakes.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "rank", "val_index", "dataset_index", "file", "true", "predicted", "confidence"
    ]  # fmt: skip
    assert [int(r["val_index"]) for r in rows] == [m.index for m in wrong]
    assert [float(r["confidence"]) for r in rows] == pytest.approx(
        [m.confidence for m in wrong], abs=1e-5
    )
    val, files = ds.indices("val"), ds.files()
    for row, m in zip(rows, wrong, strict=True):
        index = int(row["dataset_index"])
        assert index == val[m.index] and row["file"] == files[index]
        assert row["file"].startswith(str(folder / row["true"]))  # the photo's class folder
        assert (row["true"], row["predicted"]) == (ds.classes[m.true], ds.classes[m.predicted])
        assert ds.labels[index] == m.true != m.predicted
    columns = min(4, len(wrong))  # the grid: 4 thumbnails a row, 240 px each
    with Image.open(run.path / "mistakes.png") as im:
        assert im.format == "PNG" and im.width == 240 * columns


def test_checkpoint_alone_predicts_like_the_trained_model(trained, tiny_ds):
    trainer, run = trained
    state = load_checkpoint(run.best)
    rebuilt = build_model_from_checkpoint(state)
    assert not rebuilt.training
    idx = tiny_ds.indices("all")
    loader = BatchLoader(
        tiny_ds.images[idx],
        tiny_ds.labels[idx],
        batch_size=32,
        size=state["input_size"],
        mean=state["mean"],
        std=state["std"],
    )
    logits, labels = infer(rebuilt, loader)
    # The same weights give the same logits (up to the memory format's summation order).
    torch.testing.assert_close(logits, infer(trainer.model, loader)[0], rtol=1e-5, atol=1e-5)
    assert compute_metrics(logits, labels, state["class_names"]).accuracy > 0.9


# ---------------------------------------------------------------- determinism


def test_same_recipe_and_seed_give_the_same_numbers_and_weights(trained, tiny_ds, tmp_path):
    _, first = trained
    second = train(
        tiny_recipe(epochs=2), tiny_ds, out=tmp_path / "again", threads=1, progress=False
    )
    assert metric_rows(second.path) == metric_rows(first.path)
    assert_same_weights(first.best, second.best)
    assert_same_weights(first.last, second.last)


def test_another_seed_gives_other_weights(trained, tiny_ds, tmp_path):
    _, first = trained
    other = train(
        tiny_recipe(epochs=2, seed=1), tiny_ds, out=tmp_path / "s1", threads=1, progress=False
    )
    a, b = load_pt(first.last)["model_state"], load_pt(other.last)["model_state"]
    assert not torch.equal(a["head.weight"], b["head.weight"])


# ---------------------------------------------------------------- early stopping, divergence


def test_early_stopping_after_patience_epochs_without_gain(tiny_ds, tmp_path):
    recipe = tiny_recipe(epochs=6, early_stopping={"patience": 2})
    recipe["optimizer"]["lr"] = 1e-9  # predictions never change: no gain after epoch 1
    run = train(recipe, tiny_ds, out=tmp_path / "run", threads=1, progress=False)
    rows = metric_rows(run.path)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert run.summary["best_epoch"] == 1
    assert load_pt(run.best)["position"]["epoch"] == 1


# ---------------------------------------------------------------- library


def test_library_train_and_evaluate_by_dataset_name(tmp_path):
    import_tiny(tmp_path, per_class=10)
    for i in range(2):  # `imgclf.train` stays callable after its package is imported
        run = imgclf.train("scratch-simple", data="tiny", epochs=1, out=tmp_path / f"run{i}")
    assert isinstance(run, Run) and isinstance(run, imgclf.Run)
    assert run.path == tmp_path / "run1" and run.best.is_file()
    assert run.summary["recipe"] == "scratch-simple" and run.summary["epochs"] == 1
    assert f"val_accuracy={run.summary['val_accuracy']}" in repr(run)
    for _ in range(2):
        metrics = imgclf.evaluate(run, data="tiny")
    assert isinstance(metrics, Metrics)
    assert metrics.class_names == list(CLASSES)
    assert metrics.accuracy == pytest.approx(run.summary["val_accuracy"], abs=1e-6)


def test_bad_model_arguments_are_recipe_errors_before_any_folder(tiny_ds, tmp_path):
    for override in ("input_size=30", "model_args.depth=3"):
        with pytest.raises(RecipeError) as excinfo:
            train(tiny_recipe(), tiny_ds, overrides=[override], runs_dir=tmp_path / "runs")
        assert "model 'simple'" in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_no_val_split_still_finishes(tmp_path):
    folder = make_image_folder(tmp_path / "src", per_class=6)
    ds = import_dataset(folder, "noval", val_fraction=0.0, warn=lambda msg: None)
    run = train(tiny_recipe(epochs=1), ds, out=tmp_path / "run", progress=False)
    rows = metric_rows(run.path)
    assert len(rows) == 1 and rows[0]["val_acc"] == ""
    assert run.best.is_file() and "val_accuracy" not in run.summary
    assert np.isfinite(float(rows[0]["train_loss"]))


# ---------------------------------------------------------------- test-time augmentation


def test_tta_averages_the_probabilities_of_its_views() -> None:
    from imgclf.evaluate.tta import TTA

    torch.manual_seed(0)
    model = create("simple", num_classes=3, input_size=16).eval()
    x = torch.randn(4, 3, 16, 16)
    tta = TTA(model)
    views = tta.views(x)
    assert len(views) == 6  # small images: mirror, and both shifted by one pixel
    assert torch.equal(views[1], x.flip(-1))
    assert torch.equal(views[2][..., :-1, :-1], x[..., 1:, 1:])  # moved up-left by one
    assert len(TTA(model).views(torch.randn(1, 3, 96, 96))) == 2
    with torch.no_grad():
        mean = torch.stack([torch.softmax(model(v), 1) for v in views]).mean(0)
        torch.testing.assert_close(torch.softmax(tta(x), 1), mean, rtol=1e-5, atol=1e-6)


def test_eval_with_tta_scores_every_image(trained, tiny_ds):
    _, run = trained
    plain = imgclf.evaluate(run, tiny_ds, split="all")
    tta = imgclf.evaluate(run, tiny_ds, split="all", tta=True)
    assert tta.count == plain.count == 60
    assert tta.accuracy > 0.9
