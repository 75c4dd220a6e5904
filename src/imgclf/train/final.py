"""The final fit: ``imgclf train RECIPE --data D --final [--from RUN]``.

Once validation has chosen a recipe, the last step of a competition or a production model
is to train it again on every labelled image it may use: the train and validation splits
together, the test split still out (issue #34; about +0.3-0.5 point on CIFAR-10 at 45,000
→ 50,000 images, per the learning curves in docs/results.md). The recipe's schedule is
unchanged: the same epochs and the same schedule per epoch, each epoch longer by the
validation images (a ``--time`` budget prices the larger set, as it prices any data set);
the batch, its learning-rate scale and the BatchNorm mode stay those the validation run
had (:func:`imgclf.train.adapt.adapt` is given the train split's size, not the larger
one), so the settings validated are the settings trained.

With no validation images left, nothing may be chosen by validation. Every switch that
would, and what a final fit does with it:

- ``early_stopping`` (patience > 0): refused (:func:`refuse_selection`): it would stop
  on nothing (no validation accuracy), so a recipe that relies on it would train longer
  than the validation run did; its stopping epoch is given as ``--epochs`` instead.
- best-epoch selection (``best.pt`` = the best validation epoch): runs without selection:
  with no validation score every epoch counts as the best
  (:meth:`imgclf.train.state.Progress.record_epoch`), so ``best.pt`` is the last epoch's
  weights (the weight EMA's where the recipe keeps one).
- learning-rate schedules: all of imgclf's are functions of the step
  (``constant``/``step``/``multistep``/``cosine``/``onecycle``/``linear``,
  :mod:`imgclf.train.optim`); none reads a validation score (there is no on-plateau
  schedule), so nothing is refused.
- ``--time``: the planner prices steps, validation passes and the final evaluation by
  timing probes (:mod:`imgclf.train.budget`), never by a score; it runs, with no
  validation pass to price.
- a recipe's stages (``lite0-photo``'s head stage, then its last blocks): fixed lengths,
  no stage is chosen by validation; the guard rails that read validation (chance level, a
  stage ending below the previous one: :mod:`imgclf.train.guards`) only warn, and stay
  silent without it. The precision probe chooses bf16 or fp32 by time, and a recipe
  chosen for ``--data`` alone (:mod:`imgclf.train.choose`) by the images' size.

``--from RUN`` names the validation run that chose the settings: its folder and validation
accuracy go into the checkpoint and ``summary.json``; a run of another model, recipe,
data set or settings is refused (:func:`read_source`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from imgclf.data.cache import Dataset
from imgclf.errors import RecipeError, UserError
from imgclf.runtime.checkpoint import folder_key
from imgclf.runtime.final_fit import FINAL_SPLITS, final_record
from imgclf.runtime.schema import read_summary
from imgclf.train.recipe import Recipe, load_recipe

# Recipe keys that may differ between the validation run and its final fit: they do not
# change which model is trained (``seed``: the members of an ensemble differ by it, issue
# #34 item 2) or only how it is computed and evaluated; ``early_stopping``: a final fit has
# none (refuse_selection).
SAME_MODEL_ANYWAY = (
    "name",
    "description",
    "seed",
    "eval_batch_size",
    "tta",
    "precision",
    "channels_last",
    "feature_cache",
    "feature_cache_dtype",
    "early_stopping",
)
SHOWN_DIFFERENCES = 3  # settings named in the error, the rest counted


@dataclass(frozen=True)
class FinalFit:
    """A final fit, and the validation run that chose its settings (``--from``; None:
    not named)."""

    source: str | None = None
    source_val_accuracy: float | None = None

    def record(self) -> dict[str, Any]:
        """The checkpoint's record (:mod:`imgclf.runtime.final_fit`)."""
        return {"from": self.source, "from_val_accuracy": self.source_val_accuracy}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FinalFit | None:
        """The final fit a checkpoint records; None: a normal run."""
        record = final_record(state)
        if record is None:
            return None
        return cls(record["from"], record["from_val_accuracy"])

    def describe(self, ds: Dataset, images: int) -> str:
        """The line a final fit starts with: what it trains on and what chose it."""
        source = "no validation run named (--from RUN records one)"
        if self.source is not None:
            source = f"settings validated by {self.source} (val accuracy "
            source += f"{self.source_val_accuracy:.4f})"
        out = "; test stays out" if ds.has_split("test") else ""
        return (
            f"final fit: training on {' + '.join(final_splits(ds))} of {ds.name!r} ({images:,} "
            f"images{out}), no validation, best.pt = the last epoch; {source}"
        )

    def summary(self, ds: Dataset, images: int) -> dict[str, Any]:
        """``summary.json``'s fields of a final fit that trained on ``images`` images."""
        source = None
        if self.source is not None:
            source = {"run": self.source, "val_accuracy": self.source_val_accuracy}
        trained = final_splits(ds)
        held_out = [s for s in ds.split_names if s not in trained]  # test, where there is one
        return {
            "final_from": source,
            "final_splits": trained,
            "final_held_out": held_out,
            "final_images": images,
        }


def refuse_selection(recipe: Recipe) -> None:
    """Refuse what would choose by validation in a final fit (see the module's list)."""
    patience = recipe.early_stopping.patience
    if patience:
        raise RecipeError(
            f"--final trains on the validation images too: early stopping "
            f"(early_stopping.patience {patience}) cannot be used; train the epochs the "
            "validation run stopped at: --epochs N --set early_stopping.patience=0"
        )


def final_splits(ds: Dataset) -> list[str]:
    """The splits of :data:`FINAL_SPLITS` that ``ds`` has (one without a val split: train)."""
    return [s for s in FINAL_SPLITS if ds.has_split(s)]


def training_indices(ds: Dataset, final: bool) -> np.ndarray:
    """The samples a run trains on, in the data set's order: its train split, or in a
    final fit every split of :data:`FINAL_SPLITS` it has (the test split stays out)."""
    if not final:
        return ds.indices("train")
    parts = [ds.indices(s) for s in final_splits(ds)]
    return np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def read_source(run: str | Path, recipe: Recipe, ds: Dataset) -> FinalFit:
    """The final fit whose settings the validation run ``run`` (``--from``) chose: its
    folder and validation accuracy, once it is checked to be a finished, validated run of
    this model, recipe, data set and settings (one line if not)."""
    path = Path(run).expanduser()
    where = f"--from {run}"
    summary = read_summary(path / "summary.json") if path.is_dir() else None
    if summary is None:
        raise UserError(
            f"{where}: not a finished run folder (no summary.json): name the validation run "
            "whose settings this final fit repeats, finished (`imgclf train --resume RUN`)"
        )
    if summary.get("final"):
        raise UserError(
            f"{where} is a final fit itself, with no held-out accuracy: name the validation "
            "run it came from"
        )
    acc = summary.get("val_accuracy")
    if acc is None or not (path / "config.yaml").is_file():
        raise UserError(
            f"{where} has no validation accuracy (no val split, or no config.yaml): name a "
            "run that validated the settings"
        )
    _check_same(where, load_recipe(path / "config.yaml"), recipe, path, ds)
    return FinalFit(str(path.resolve()), float(acc))


def _check_same(where: str, theirs: Recipe, ours: Recipe, path: Path, ds: Dataset) -> None:
    if (theirs.model, theirs.name) != (ours.model, ours.name):
        raise UserError(
            f"{where} trained model {theirs.model!r} with recipe {theirs.name!r}; this final "
            f"fit trains {ours.model!r} with {ours.name!r}: name a run of this recipe, or "
            "drop --from"
        )
    data = (_read_yaml(path / "config.yaml").get("dataset") or {}).get("path")
    if data is None or folder_key(Path(str(data))) != folder_key(ds.root):
        raise UserError(
            f"{where} validated on data set {data}, not {ds.root}: the accuracy it chose "
            "the settings by is another data set's; name a run on this one, or drop --from"
        )
    differ = _differences(theirs, ours)
    if differ:
        shown = "; ".join(f"{k}: {a} there, {b} here" for k, a, b in differ[:SHOWN_DIFFERENCES])
        more = len(differ) - SHOWN_DIFFERENCES
        shown += f" (and {more} more)" if more > 0 else ""
        raise UserError(
            f"{where} was trained with other settings ({shown}): give the same --epochs and "
            "--set as that run, or drop --from"
        )


def _differences(theirs: Recipe, ours: Recipe) -> list[tuple[str, str, str]]:
    """The settings (dotted keys) that differ, outside :data:`SAME_MODEL_ANYWAY`."""
    a, b = _flat(theirs.model_dump(mode="json")), _flat(ours.model_dump(mode="json"))
    keys = [k for k in dict.fromkeys([*a, *b]) if k.split(".")[0] not in SAME_MODEL_ANYWAY]
    return [(k, _shown(a.get(k)), _shown(b.get(k))) for k in keys if a.get(k) != b.get(k)]


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = ((str(i), v) for i, v in enumerate(value))  # stages.0.epochs
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, sub in items:
        out.update(_flat(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _shown(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return json.dumps(value) if value is not None else "unset"


def _read_yaml(path: Path) -> dict[str, Any]:
    # Read after load_recipe has read the same file, which refuses one too large or with
    # YAML aliases (imgclf.train.recipe): what is left is a plain, small mapping.
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}
