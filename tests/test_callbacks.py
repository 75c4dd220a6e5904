"""``imgclf.train(..., callbacks=[...])``: the hooks of a tiny two-stage run in their exact
order, the read-only state they get, the built-in metrics.csv writer ahead of them, and
how a run that stops ends them."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest

import imgclf
from helpers_train import import_tiny, tiny_recipe
from imgclf.train.callbacks import Callback, TrainState


class Recorder(Callback):
    """Every hook call as a tuple, and what the run folder held at that moment."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.states: list[TrainState] = []
        self.csv_epochs_at_epoch_end: list[list[int]] = []

    def _add(self, *call) -> None:
        self.calls.append(call)

    def on_train_start(self, state: TrainState) -> None:
        assert (state.run_dir / "config.yaml").is_file()
        self._add("train_start", state.stage, state.stage_name, state.epoch, dict(state.metrics))
        self.states.append(state)

    def on_stage_start(self, state: TrainState) -> None:
        self._add("stage_start", state.stage, state.stage_name, state.epoch)

    def on_epoch_end(self, state: TrainState) -> None:
        self._add("epoch_end", state.stage, state.stage_name, state.epoch)
        self.states.append(state)
        with open(state.run_dir / "metrics.csv", newline="") as f:
            self.csv_epochs_at_epoch_end.append([int(r["epoch"]) for r in csv.DictReader(f)])

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        assert path.is_file() and path.parent == state.run_dir
        self._add("checkpoint", path.name, state.epoch)

    def on_train_end(self, state: TrainState) -> None:
        self._add("train_end", state.status, state.epoch)
        self.states.append(state)


TWO_STAGES = [{"epochs": 1, "train": "all", "name": "warm-up"}, {"epochs": 2, "train": "all"}]


def test_hooks_come_in_order_with_the_runs_state(tmp_path):
    ds = import_tiny(tmp_path)
    rec = Recorder()
    recipe = tiny_recipe(stages=TWO_STAGES)
    run = imgclf.train(recipe, ds, out=tmp_path / "run", threads=1, progress=False, callbacks=[rec])

    epoch_states = [s for s in rec.states if s.status == "running" and s.metrics]
    val_accs = [s.metrics["val_acc"] for s in epoch_states]
    best, improved = -1.0, []
    for acc in val_accs:  # the trainer's rule (Progress.record_epoch), min_delta 0
        improved.append(acc > best)
        best = max(best, acc)
    assert improved[0]

    def epoch(stage: int, name: str, n: int) -> list[tuple]:
        saves = [("checkpoint", "best.pt", n)] if improved[n - 1] else []
        return [("epoch_end", stage, name, n), *saves, ("checkpoint", "last.pt", n)]

    assert rec.calls == [
        ("train_start", 1, "warm-up", 0, {}),
        ("stage_start", 1, "warm-up", 0),
        *epoch(1, "warm-up", 1),
        ("stage_start", 2, "stage 2", 1),
        *epoch(2, "stage 2", 2),
        *epoch(2, "stage 2", 3),
        ("train_end", "finished", 3),
    ]

    # The epoch's metrics row, already in metrics.csv: the built-in writer goes first.
    assert rec.csv_epochs_at_epoch_end == [[1], [1, 2], [1, 2, 3]]
    rows = [s.metrics for s in epoch_states]
    assert [(r["stage"], r["epoch"], r["stage_epoch"]) for r in rows] == [
        (1, 1, 1),
        (2, 2, 1),
        (2, 3, 2),
    ]
    with open(run.path / "metrics.csv", newline="") as f:
        logged = list(csv.DictReader(f))
    for row, line in zip(rows, logged, strict=True):
        assert float(line["val_acc"]) == pytest.approx(row["val_acc"], abs=1e-6)
        assert float(line["train_loss"]) == pytest.approx(row["train_loss"], rel=1e-5)

    end = rec.states[-1]
    assert end.summary["val_accuracy"] == run.summary["val_accuracy"]
    assert (end.run_dir, end.total_epochs, end.recipe.name) == (run.path, 3, "tiny")


def test_the_state_is_read_only(tmp_path):
    ds = import_tiny(tmp_path, per_class=6)
    rec = Recorder()
    imgclf.train(tiny_recipe(epochs=1), ds, out=tmp_path / "run", progress=False, callbacks=[rec])
    state = rec.states[1]  # on_epoch_end's
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.epoch = 7  # type: ignore[misc]
    with pytest.raises(TypeError):
        state.metrics["val_acc"] = 1.0  # type: ignore[index]
    state.recipe.seed = 99  # a copy: the run's own recipe is not changed
    assert rec.states[2].recipe.seed == 0


class StopAt(Recorder):
    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def on_epoch_end(self, state: TrainState) -> None:
        super().on_epoch_end(state)
        raise self.error


@pytest.mark.parametrize(
    "error, status",
    [(KeyboardInterrupt(), "interrupted"), (RuntimeError("callback bug"), "failed")],
)
def test_a_stopped_run_ends_the_callbacks_with_its_status(tmp_path, error, status):
    ds = import_tiny(tmp_path, per_class=6)
    rec = StopAt(error)
    with pytest.raises(type(error)):
        imgclf.train(
            tiny_recipe(epochs=2), ds, out=tmp_path / "run", progress=False, callbacks=[rec]
        )
    assert rec.calls == [
        ("train_start", 1, "stage 1", 0, {}),
        ("stage_start", 1, "stage 1", 0),
        ("epoch_end", 1, "stage 1", 1),
        ("train_end", status, 0),  # the epoch's checkpoint was never written
    ]


def test_a_callback_must_be_a_callback(tmp_path):
    ds = import_tiny(tmp_path, per_class=6)

    class NotOne:
        def on_epoch_end(self, state):
            pass

    with pytest.raises(TypeError, match=r"is not an imgclf\.train\.callbacks\.Callback"):
        imgclf.train(tiny_recipe(epochs=1), ds, out=tmp_path / "run", callbacks=[NotOne()])
