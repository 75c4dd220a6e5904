"""Experiment trackers: ``imgclf train --log mlflow`` as a callback (imgclf.train.callbacks).

:class:`MlflowLogger` sends one MLflow run per training process: the resolved recipe as
params (flattened: ``optimizer.lr``, ``stages.0.epochs``), each epoch's metrics row as
metrics with ``step`` = the global epoch, and, once the run has finished, the files of its
run folder as artefacts. The store is ``MLFLOW_TRACKING_URI`` when set, else ``./mlruns``;
the experiment ``MLFLOW_EXPERIMENT_NAME`` when set, else MLflow's ``Default``.

MLflow is an optional extra (``pip install 'imgclf[mlflow]'``): it is imported here, and
this module only when ``--log`` (or a caller) asks for a tracker, so neither ``import
imgclf`` nor a run without ``--log`` loads it. Where it is missing, asking for it is one
``error:`` line naming the extra, before anything is trained.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imgclf.errors import UserError, one_line
from imgclf.train.callbacks import Callback, TrainState

TRACKERS = ("mlflow",)
# The run's end as MLflow names it (mlflow.entities.RunStatus).
MLFLOW_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}


def tracker(name: str) -> Callback:
    """The callback ``--log NAME`` adds; a one-line :class:`UserError` where the tracker
    is unknown or its package is not installed."""
    if name == "mlflow":
        return MlflowLogger()
    raise UserError(f"--log {name}: unknown tracker; choose one of: {', '.join(TRACKERS)}")


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else ``./mlruns`` as a file store. MLflow 3 defaults to
    ``sqlite:///mlflow.db``, which needs SQLAlchemy, and mlflow-skinny (the extra) leaves
    SQLAlchemy out: the file store is the local store it can write."""
    return os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(dotted key, text)`` of every leaf of a recipe's dump: MLflow params are flat
    strings. Lists are indexed (``stages.0.epochs``); an empty one is its JSON text."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list | tuple) and value:
        for i, v in enumerate(value):
            yield from flatten(v, f"{prefix}.{i}")
    else:
        yield prefix, "[]" if value == [] else "{}" if value == {} else str(value)


class MlflowLogger(Callback):
    """Log a training run to MLflow (see the module's docstring). ``tracking_uri`` and
    ``experiment`` override the environment's."""

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise UserError("--log mlflow needs MLflow: pip install 'imgclf[mlflow]'") from None
        uri = tracking_uri or default_tracking_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 (3.18 here) refuses a file store unless MLFLOW_ALLOW_FILE_STORE is
            # set (mlflow/store/tracking/file_store.py, FileStore.__init__); a file store is
            # what was asked for, or the one local store skinny can write. Only that store
            # reads it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(name)
            self.experiment_id = (
                found.experiment_id if found else self.client.create_experiment(name)
            )
        except Exception as exc:  # MlflowException, or the store's own (a bad URI, no server)
            raise UserError(f"--log mlflow: tracking store {uri}: {one_line(str(exc))}") from None
        self.uri, self.run_id = uri, None
        self.warned = False

    def on_train_start(self, state: TrainState) -> None:
        from mlflow.entities import Param, RunTag

        tags = {"imgclf.run_dir": str(state.run_dir.resolve()), "mlflow.source.name": "imgclf"}
        if state.epoch:  # a resumed run: a new MLflow run, its steps go on from here
            tags["imgclf.resumed_after_epoch"] = str(state.epoch)
        run = self.client.create_run(self.experiment_id, run_name=state.run_dir.name)
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flatten(state.recipe.model_dump(mode="json"))]
        self.client.log_batch(
            self.run_id, params=params, tags=[RunTag(k, v) for k, v in tags.items()]
        )
        print(f"mlflow: run {self.run_id} in {self.uri}", file=sys.stderr)

    def on_epoch_end(self, state: TrainState) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, state.epoch)
            for k, v in state.metrics.items()
            if k != "epoch" and math.isfinite(float(v))  # no validation split: NaN, left out
        ]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as exc:
            # Hours of training are not lost to a tracking server's hiccup: metrics.csv has
            # the same numbers. Said once.
            if not self.warned:
                print(
                    f"warning: --log mlflow: {one_line(str(exc))}; training goes on",
                    file=sys.stderr,
                )
                self.warned = True

    def on_train_end(self, state: TrainState) -> None:
        if self.run_id is None:
            return
        if state.status == "finished":
            for path in sorted(state.run_dir.rglob("*")):
                rel = path.relative_to(state.run_dir)
                # Not the lock and launch marker (hidden files): they say nothing of the run.
                if path.is_file() and not any(p.startswith(".") for p in rel.parts):
                    folder = rel.parent.as_posix()
                    self.client.log_artifact(
                        self.run_id, str(path), None if folder == "." else folder
                    )
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[state.status])
        self.run_id = None
