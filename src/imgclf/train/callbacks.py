"""Callbacks: code of your own that the trainer calls at fixed points of a run.

Subclass :class:`Callback`, override the hooks you need, and pass instances to
``imgclf.train(..., callbacks=[...])``. Each hook gets a :class:`TrainState`, a frozen
snapshot of the run at that moment (a copy: changing it changes nothing in training).
For one run the hooks come in this order::

    on_train_start                         the run folder exists, config.yaml written
    on_stage_start                         each stage (a resumed one again)
      on_epoch_end                         each epoch: state.metrics is its metrics row
      on_checkpoint(path)                  best.pt (when it improved), then last.pt;
                                           also a mid-epoch save (Ctrl-C, every few minutes)
    on_train_end                           summary.json written (status "finished"),
                                           or the run stopped ("interrupted", "failed")

``on_epoch_end`` comes before the epoch's checkpoint, so that metrics.csv never lacks a row
that a checkpoint covers (a resume drops rows past its checkpoint instead). Under torchrun
only rank 0, which writes the run folder, calls the hooks. An exception in a hook stops
training like any other error.

The run folder's own ``metrics.csv`` and TensorBoard events (``tb/``) are written by the
built-in :class:`MetricsCsv` and :class:`TensorBoardLog`, through these same hooks, ahead
of yours. Trackers (``--log mlflow``) are in :mod:`imgclf.train.trackers`.

>>> class Losses(Callback):
...     def on_epoch_end(self, state):
...         print(state.epoch, state.metrics["val_loss"])
>>> imgclf.train("fast", data="c10", callbacks=[Losses()])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from imgclf.train.recipe import Recipe
from imgclf.train.rundir import MetricsLog


@dataclass(frozen=True)
class TrainState:
    """A read-only view of a run at one hook.

    ``stage`` counts from 1; ``stage_name`` is the recipe stage's ``name`` (or "stage N").
    ``epoch`` is the global epoch: in ``on_epoch_end`` the one that just ended (the metrics
    row's ``epoch``), elsewhere the epochs finished so far (at the start of a resumed run,
    those before it). ``metrics`` is the latest metrics.csv row (keys ``stage``,
    ``epoch``, ``stage_epoch``, ``lr``, ``train_loss``, ``train_acc``, ``val_loss``,
    ``val_acc``, ``seconds``, ``images_per_second``; NaN validation scores where there is
    no validation split), empty before the first. ``summary`` is summary.json's content
    in ``on_train_end`` of a finished run, else empty."""

    run_dir: Path
    recipe: Recipe
    stage: int
    stage_name: str
    epoch: int
    total_epochs: int
    metrics: Mapping[str, Any] = field(default_factory=dict)
    status: str = "running"  # on_train_end: "finished", "interrupted" or "failed"
    summary: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Read-only copies: a callback cannot change the row metrics.csv writes after it.
        for name in ("metrics", "summary"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        object.__setattr__(self, "recipe", self.recipe.model_copy(deep=True))


class Callback:
    """A no-op for every hook: override the ones you need (see the module's docstring
    for when each is called)."""

    def on_train_start(self, state: TrainState) -> None:
        pass

    def on_stage_start(self, state: TrainState) -> None:
        pass

    def on_epoch_end(self, state: TrainState) -> None:
        pass

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass


class MetricsCsv(Callback):
    """``metrics.csv``, one row an epoch (imgclf.train.rundir.MetricsLog); its ``rows``
    are what the end of the run plots and summarises."""

    def __init__(self) -> None:
        self.log: MetricsLog | None = None

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.log.rows if self.log is not None else []

    def on_train_start(self, state: TrainState) -> None:
        self.log = MetricsLog(state.run_dir / "metrics.csv")
        # A resume drops rows logged after its checkpoint (a kill between two writes).
        self.log.truncate(state.epoch)

    def on_epoch_end(self, state: TrainState) -> None:
        assert self.log is not None
        self.log.append(dict(state.metrics))


class TensorBoardLog(Callback):
    """TensorBoard scalars in ``tb/``; a no-op where tensorboard is not installed."""

    def __init__(self) -> None:
        self.writer: Any = None

    def on_train_start(self, state: TrainState) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional at run time: the CSV holds the same numbers
            return
        self.writer = SummaryWriter(log_dir=str(state.run_dir / "tb"))

    def on_epoch_end(self, state: TrainState) -> None:
        if self.writer is None:
            return
        row, step = state.metrics, state.epoch
        for key in ("train_loss", "val_loss"):
            if row.get(key) == row.get(key):  # skip NaN
                self.writer.add_scalar(f"loss/{key[:-5]}", row[key], step)
        for key in ("train_acc", "val_acc"):
            if row.get(key) == row.get(key):
                self.writer.add_scalar(f"accuracy/{key[:-4]}", row[key], step)
        self.writer.add_scalar("lr", row["lr"], step)
        self.writer.add_scalar("images_per_second", row["images_per_second"], step)
        self.writer.flush()

    def on_train_end(self, state: TrainState) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Hooks:
    """What the trainer calls, ``hooks(name, *args, **fields)``: each callback's hook
    ``name`` with the run's :class:`TrainState` now (``fields`` set the epoch's own
    numbers, the end's status and summary). The built-in writers (once :meth:`open` has
    the run folder) come ahead of the user's callbacks. Before ``on_train_start`` (a run
    that failed before its folder was opened) nothing is called."""

    def __init__(self, trainer: Any, callbacks: Sequence[Callback] = ()) -> None:
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks: {cb!r} is not an imgclf.train.callbacks.Callback")
        self.trainer = trainer  # imgclf.train.trainer.Trainer (not imported: it imports this)
        self.csv = MetricsCsv()
        self.callbacks: list[Callback] = list(callbacks)
        self.started = False

    def open(self) -> None:
        """Rank 0, its run folder made: metrics.csv and TensorBoard join in."""
        self.callbacks = [self.csv, TensorBoardLog(), *self.callbacks]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """metrics.csv's rows so far (none on ranks other than 0)."""
        return self.csv.rows

    def __call__(self, hook: str, *args: Any, **fields: Any) -> None:
        if hook == "on_train_start":
            self.started = True
        if not self.started or not self.callbacks:
            return
        if hook == "on_train_end":
            self.started = False  # once
        state = self.state(**fields)
        for cb in self.callbacks:
            getattr(cb, hook)(state, *args)

    def state(self, **fields: Any) -> TrainState:
        t = self.trainer
        pos, stages = t.position, t.recipe.stages
        fields.setdefault("metrics", self.rows[-1] if self.rows else {})
        fields.setdefault("epoch", t._global_epoch(pos.stage, pos.epoch))  # epochs finished
        name = stages[pos.stage].name or f"stage {pos.stage + 1}"
        return TrainState(
            t.out, t.recipe, pos.stage + 1, name, total_epochs=t.total_epochs, **fields
        )
