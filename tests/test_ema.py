"""The weight EMA (issue #30 item 5): timm's ModelEmaV3 arithmetic, what validation and
best.pt use, predict on an EMA run, stages, the feature cache and old checkpoints.

Resume equality with EMA on is in tests/test_faults.py, two processes in
tests/test_distributed.py, the recipe's errors in tests/test_recipe.py. The runs here are
the tiny data set's (3 classes × 20 images of 16×16): about a second each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers_predictions import assert_same_prediction_csv
from helpers_train import (
    assert_same_run,
    interrupt_at,
    load_pt,
    make_image_folder,
    metric_rows,
    tiny_recipe,
)
from imgclf.data.importer import import_dataset
from imgclf.models import create
from imgclf.runtime.checkpoint import load_checkpoint, save_checkpoint
from imgclf.train.api import train
from imgclf.train.ema import WeightEma
from imgclf.train.recipe import EmaConfig, load_recipe
from imgclf.train.stages import set_trainable
from imgclf.train.trainer import Trainer

ModelEmaV3 = pytest.importorskip("timm.utils.model_ema").ModelEmaV3


@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    folder = make_image_folder(root / "src")
    return import_dataset(folder, "tiny", dest=root / "tiny", warn=lambda msg: None)


def equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the arithmetic


def _sgd_steps(model: torch.nn.Module, n: int, seed: int):
    """``n`` SGD steps on random data, yielding after each (BatchNorm layers in train
    mode update their statistics)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(n):
        x = torch.randn(8, 3, 16, 16, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        yield


@pytest.mark.parametrize("warmup", [True, False])
def test_update_is_timm_model_ema_v3_bit_for_bit(warmup: bool) -> None:
    """Against timm's class, which lerps every entry at every step: a stage training
    everything (BatchNorm statistics moving), then a head-only stage, where ours pairs
    only what can still differ and must still end equal, entry for entry."""
    torch.manual_seed(0)
    model = create("complex", num_classes=3, input_size=16)
    cfg = EmaConfig(decay=0.9, warmup=warmup)
    ours, timm = WeightEma(model, cfg), ModelEmaV3(model, decay=0.9, use_warmup=warmup)
    step = 0
    for groups in (None, ["head"]):
        set_trainable(model, groups)
        ours.track(model, cfg, groups, cached=False)
        for _ in _sgd_steps(model, 6, seed=step):
            step += 1
            ours.update()
            timm.update(model, step=step)
            assert ours.decay() == timm.get_decay(step)
            assert equal_states(ours.module.state_dict(), timm.module.state_dict()), step
    assert 0.0 < ours.decay() < 0.9 if warmup else ours.decay() == 0.9


def test_a_fresh_average_of_a_head_stage_pairs_only_the_head() -> None:
    """What keeps a cached head stage fast: the frozen backbone, and its BatchNorm
    statistics (eval mode), are not lerped; training everything pairs everything."""
    model = create("complex", num_classes=3, input_size=16)
    set_trainable(model, ["head"])
    ema = WeightEma(model, EmaConfig())
    ema.track(model, EmaConfig(), ["head"], cached=False)
    heads = [p for n, p in model.named_parameters() if n.startswith("head.")]
    assert {t.data_ptr() for t in ema._lerp[1]} == {t.data_ptr() for t in heads}
    assert ema._copy == ([], [])
    set_trainable(model, None)
    ema.track(model, EmaConfig(), None, cached=False)
    floats = [v for v in model.state_dict().values() if v.is_floating_point()]
    assert {t.data_ptr() for t in ema._lerp[1]} == {t.data_ptr() for t in floats}
    assert len(ema._copy[1]) == 3  # num_batches_tracked of the three BatchNorm layers


# ---------------------------------------------------------------- runs


def test_decay_zero_is_the_plain_run(tiny_ds, tmp_path) -> None:
    """An average with decay 0 is the weights: the same metrics (its validation), the
    same best.pt, and last.pt's ema_state equal to its model_state."""
    plain = train(tiny_recipe(epochs=2), tiny_ds, out=tmp_path / "plain", threads=1, progress=False)
    recipe = tiny_recipe(epochs=2, ema={"decay": 0.0, "warmup": False})
    ema = train(recipe, tiny_ds, out=tmp_path / "ema", threads=1, progress=False)
    assert metric_rows(ema.path) == metric_rows(plain.path)
    assert equal_states(load_pt(ema.best)["model_state"], load_pt(plain.best)["model_state"])
    last = load_pt(ema.last)
    assert equal_states(last["ema_state"]["weights"], last["model_state"])
    assert last["ema_state"]["updates"] == 2 * 6 and load_pt(plain.last)["ema_state"] is None
    assert ema.summary["ema"]["best_pt"] == "ema" and plain.summary["ema"] is None


def _capturing(monkeypatch) -> dict[int, tuple[dict, dict]]:
    """Global epoch → (EMA weights, trained weights) as each epoch's end saved them."""
    seen: dict[int, tuple[dict, dict]] = {}
    original = Trainer._save

    def save(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.position.batch == 0:  # an epoch's end, not a mid-epoch checkpoint
            epoch = self._global_epoch(self.position.stage, self.position.epoch)
            clone = lambda m: {k: v.clone() for k, v in m.state_dict().items()}  # noqa: E731
            ema = clone(self.ema.module) if self.ema is not None else None
            seen[epoch] = (ema, clone(self.model))

    monkeypatch.setattr(Trainer, "_save", save)
    return seen


def test_best_pt_is_the_ema_of_its_best_epoch_and_predict_uses_it(
    tiny_ds, tmp_path, monkeypatch, capsys
) -> None:
    seen = _capturing(monkeypatch)
    recipe = tiny_recipe(epochs=3, ema={"decay": 0.95, "warmup": True})
    run = train(recipe, tiny_ds, out=tmp_path / "run", threads=1, progress=True)
    best, epoch = load_pt(run.best), run.summary["best_epoch"]
    ema_at_best, trained_at_best = seen[epoch]
    assert equal_states(best["model_state"], ema_at_best)
    assert not equal_states(ema_at_best, trained_at_best)
    assert run.summary["ema"] == {"decay": 0.95, "warmup": True, "stages": [1], "best_pt": "ema"}
    assert best["progress"]["best_weights"] == "ema"
    # The epoch's validation was the average's: the end of the run scores best.pt alike.
    row = metric_rows(run.path)[epoch - 1]
    assert float(row["val_loss"]) == pytest.approx(run.summary["val_loss"], abs=1e-5)
    assert capsys.readouterr().err.count("val (ema) loss") == 3

    # predict reads best.pt: the average's answer, not the trained weights'.
    from imgclf.predict import predict

    files = make_image_folder(tmp_path / "new", per_class=4, seed=7)
    assert predict([run.path], files, tmp_path / "ema.csv").rows == 12
    for name, weights in (("same", ema_at_best), ("trained", trained_at_best)):
        twin = tmp_path / name
        shutil.copytree(run.path, twin)
        save_checkpoint({**load_checkpoint(run.best), "model_state": weights}, twin / "best.pt")
        predict([twin], files, tmp_path / f"{name}.csv")
    got = (tmp_path / "ema.csv").read_text()
    assert_same_prediction_csv(got, (tmp_path / "same.csv").read_text(), atol=0.0)
    assert got != (tmp_path / "trained.csv").read_text()


def test_ema_in_the_fine_tuning_stage_only(tiny_ds, tmp_path, capsys) -> None:
    stages = [{"epochs": 1, "train": ["head"]}, {"epochs": 2, "train": "all", "ema": True}]
    recipe = tiny_recipe(stages=stages)
    run = train(recipe, tiny_ds, out=tmp_path / "run", threads=1, progress=True)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("epoch ")]
    assert ["(ema)" in x for x in lines] == [False, True, True]
    # Begun at the stage's start: one update per stage-2 step.
    assert load_pt(run.last)["ema_state"]["updates"] == 2 * 6
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["ema"]["stages"] == [2] and summary["ema"]["decay"] == 0.999
    assert summary["ema"]["best_pt"] == ("ema" if summary["best_epoch"] > 1 else "trained")


# ---------------------------------------------------------------- the feature cache


def _cached_run(ds, out: Path, stages: list[dict], cache: bool):
    recipe = tiny_recipe(
        model="complex",
        # No random flips: the cached path draws its views from another generator.
        augment={"crop_padding": 0, "flip": False},
        stages=stages,
        feature_cache=cache,
        ema={"decay": 0.9},
    )
    trainer = Trainer(load_recipe(recipe), ds, out, threads=1, progress=False)
    trainer.run()
    return trainer


@pytest.mark.parametrize(
    "stages, same_prefix",
    [
        ([{"epochs": 2, "train": ["block3", "head"]}], True),
        # The first stage averages the whole net: in the cached one the average's prefix
        # still differs from the frozen one, so it validates on the images.
        ([{"epochs": 1, "train": "all"}, {"epochs": 2, "train": ["block3", "head"]}], False),
    ],
)
def test_ema_over_a_cached_stage_tracks_the_whole_model(tiny_ds, tmp_path, stages, same_prefix):
    cached = _cached_run(tiny_ds, tmp_path / "cached", stages, cache=True)
    plain = _cached_run(tiny_ds, tmp_path / "plain", stages, cache=False)
    assert cached.stage is None and (cached.ema.suffix is not None) == same_prefix
    a, b = cached.ema.module.state_dict(), plain.ema.module.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4, msg=key)
    live = load_pt(cached.out / "last.pt")["model_state"]  # the model ends on best.pt's
    for key in a:
        if key.startswith(("block1.", "block2.")) and same_prefix:
            assert torch.equal(a[key], live[key]), f"{key}: the frozen prefix is the model's"
        elif key.startswith("head.") and key.endswith("weight"):
            assert not torch.equal(a[key], live[key]), f"{key}: the head is averaged"
    rows_a, rows_b = metric_rows(cached.out), metric_rows(plain.out)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for col in ("val_loss", "val_acc"):
            assert float(ra[col]) == pytest.approx(float(rb[col]), abs=1e-4), (ra["epoch"], col)


# ---------------------------------------------------------------- old checkpoints


def test_a_checkpoint_from_before_the_ema_resumes_exactly(tiny_ds, tmp_path) -> None:
    """A last.pt without ``ema_state`` (and a progress without ``best_weights``), as
    imgclf wrote them before the EMA, loads and resumes to the uninterrupted run."""
    recipe = load_recipe(tiny_recipe(epochs=2))
    reference = train(recipe, tiny_ds, out=tmp_path / "reference", threads=1, progress=False)
    out = tmp_path / "run"

    original = save_checkpoint

    def old_format(state, path):
        state = {k: v for k, v in state.items() if k != "ema_state"}
        state["progress"] = {k: v for k, v in state["progress"].items() if k != "best_weights"}
        original(state, path)

    with pytest.MonkeyPatch.context() as mp:  # the interrupted run writes the old format
        mp.setattr("imgclf.train.trainer.save_checkpoint", old_format)
        trainer = Trainer(recipe, tiny_ds, out, threads=1, progress=False)
        interrupt_at(trainer, epoch=2, batch=2)
        with pytest.raises(KeyboardInterrupt):
            trainer.run()
    interrupted = load_pt(out / "last.pt")
    assert "ema_state" not in interrupted and "best_weights" not in interrupted["progress"]
    assert interrupted["position"] == {"stage": 0, "epoch": 1, "batch": 3}
    train(None, resume=out, threads=1, progress=False)
    assert_same_run(out, reference.path)
