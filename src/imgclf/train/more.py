"""Train more: ``imgclf train --resume RUN --epochs N`` on a finished run.

The run gets one more stage, ``more-<k>``, appended to its recipe: N epochs of what its
last stage trained (its groups, less those that stage froze on the way with
``freeze_after``; its augmentation, input size and EMA), from the weights, EMA and random
state of its last checkpoint. By default the stage runs at the learning rate the last
step used, constant (fastai's ``fit`` after ``fit_one_cycle`` continues the same way:
train on where the schedule left off); ``--set optimizer.lr=X`` instead runs a cosine
decay from X to 0 over the N epochs, a short second annealing (SGDR, Loshchilov & Hutter
2017, arXiv 1608.03983, restarts a cosine from a higher rate in the same way).

Muon's filters (recipe `fast`) take the step optim.muon_step gives a stage of the
added length, as in any stage: a short continuation may take a larger one, and the
trainer says so in its `muon:` line.

Everything else is the resume the trainer already does (imgclf.train.trainer): the
stage is in the checkpoint's recipe from its first save, so a continuation that is
killed goes on with a plain ``imgclf train --resume RUN`` (or the same command again)
and ends identical to an uninterrupted one. metrics.csv, the curves and summary.json go
on from the run's rows; best.pt stays the best epoch of all (Progress.record_epoch), and
config.yaml records the added stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from imgclf.errors import RecipeError
from imgclf.train.budget import Plan
from imgclf.train.optim import lr_factor
from imgclf.train.recipe import OptimizerConfig, Recipe, StageConfig, validate
from imgclf.train.state import Position

if TYPE_CHECKING:
    from imgclf.train.trainer import Trainer

PREFIX = "more-"
# What --set may change in a continuation: the rate its cosine decay starts from.
LR_KEYS = ("optimizer.lr", "lr")


@dataclass(frozen=True)
class More:
    """A continuation asked for: ``epochs`` more, from ``lr`` (a cosine decay) or, None,
    at the last step's rate (constant)."""

    epochs: int
    lr: float | None = None


def is_finished(state: dict[str, Any], recipe: Recipe) -> bool:
    """Whether the checkpoint ``state`` is where its run ended: its last stage done (a
    stage's end saves no optimizer), or stopped early (early stopping's count reached)."""
    pos = state["position"]
    ended = (
        pos["stage"] == len(recipe.stages) - 1
        and pos["epoch"] > 0
        and pos["batch"] == 0
        and state.get("optimizer_state") is None
    )
    patience = recipe.early_stopping.patience
    stopped = patience > 0 and state["progress"].get("epochs_since_best", 0) >= patience
    return ended or (stopped and pos["batch"] == 0)


def is_this_continuation(state: dict[str, Any], recipe: Recipe, more: More) -> bool:
    """Whether the unfinished checkpoint ``state`` stopped inside a continuation that
    ``more`` asks for again (the same command after a kill): then it is resumed."""
    stage = recipe.stages[state["position"]["stage"]]
    same_lr = more.lr is None or stage.lr == more.lr
    return stage.name.startswith(PREFIX) and stage.epochs == more.epochs and same_lr


def request(epochs: int, overrides: tuple[str, ...] | list[str]) -> More:
    """The continuation ``--epochs``/``--set`` ask for; --set may only give the rate."""
    lr = None
    for item in overrides:
        key, _, raw = item.partition("=")
        if key.strip() not in LR_KEYS:
            raise RecipeError(
                f"--set {item}: --resume with --epochs continues the saved recipe and takes "
                "only --set optimizer.lr=X (a cosine decay from X over the added epochs)"
            )
        try:
            lr = OptimizerConfig(lr=yaml.safe_load(raw)).lr
        except (ValidationError, yaml.YAMLError) as exc:
            why = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else "not a number"
            raise RecipeError(f"--set {item}: {why}") from None
    return More(epochs, lr)


def extend(trainer: Trainer, more: More) -> str:
    """Append the continuation's stage to ``trainer``'s recipe (and a budget's plan) and
    put its position at that stage's start; returns the line that says what it trains."""
    r, pos = trainer.recipe, trainer.position
    si, per_epoch = pos.stage, len(trainer.train_loader)
    last = r.stages[si]
    planned = trainer.plan.stage_steps[si] if trainer.plan else last.epochs * per_epoch
    done = min(pos.epoch * per_epoch, planned)  # fewer than planned: stopped early
    stages = [s.model_dump(mode="json") for s in r.stages[: si + 1]]  # none after a stop
    if trainer.plan is None:
        stages[si]["epochs"] = pos.epoch
    else:
        extend_plan(trainer.plan, si, done, more.epochs * per_epoch, more.epochs)
    stage, line = _stage(trainer, last, done, planned, more)
    trainer.recipe = validate({**r.model_dump(mode="json"), "stages": [*stages, stage]}, "--epochs")
    trainer.position = Position(si + 1, 0, 0)
    # A new stage builds its optimizer, schedule and Lookahead; from the checkpoint it
    # takes the weights' EMA and the random state (restore_stage).
    trainer.resume_state = {
        **trainer.resume_state,
        "optimizer_state": None,
        "scheduler_state": None,
        "lookahead_state": None,
    }
    p = trainer.progress
    p.epochs_since_best, p.partial = 0, {}  # patience counts from the continuation's start
    p.stage_cached.pop(str(si + 1), None)
    if str(si) in p.stage_precision:  # the same training in the same precision, unprobed
        p.stage_precision[str(si + 1)] = p.stage_precision[str(si)]
    return line


def _stage(
    trainer: Trainer, last: StageConfig, done: int, planned: int, more: More
) -> tuple[dict[str, Any], str]:
    """The added stage, as recipe data, and the line that says what it does."""
    r = trainer.recipe
    scale = trainer.adapted.lr_scale  # applies to a stage's lr as to the recipe's
    if more.lr is None:
        # The rate of the last stage's last step, as metrics.csv logged it (optim.
        # lr_of_last_step; its schedule ran over `planned` steps, build_scheduler).
        cfg = last.scheduler or r.scheduler
        factor = lr_factor(cfg, max(done - 1, 0), planned / last.epochs, planned)
        lr = (last.lr if last.lr is not None else r.optimizer.lr) * factor
        if not lr > 0:
            raise RecipeError(
                "--epochs: the run's last stage ended at learning rate 0; give the rate to "
                "decay from with --set optimizer.lr=X"
            )
        schedule, how = (
            "constant",
            (
                f"at the last learning rate, {lr * scale:.4g}, constant (--set optimizer.lr=X: "
                "a cosine decay from X instead)"
            ),
        )
    else:
        lr, schedule = more.lr, "cosine"
        how = f"a cosine decay from --set optimizer.lr={more.lr:g} to 0"
        if scale != 1:
            how += f" (times {scale:g}, the small-data batch rule)"
    groups = _trained_groups(trainer.model, last)
    name = f"{PREFIX}{1 + sum(s.name.startswith(PREFIX) for s in r.stages)}"
    stage = {
        **last.model_dump(mode="json"),
        "epochs": more.epochs,
        "train": groups,
        "lr": lr,
        "scheduler": {"name": schedule},
        "freeze_after": {},
        "freeze_anneal": False,
        "name": name,
    }
    trains = "all" if groups == "all" else ", ".join(groups)
    epochs = f"{more.epochs} more epoch{'s' * (more.epochs > 1)}"
    return stage, f"{name}: {epochs} training {trains}, {how}"


def _trained_groups(model: Any, stage: StageConfig) -> str | list[str]:
    """The groups ``stage`` trained at its end: its own, less those it froze part-way
    (freeze_after, e.g. `fast`'s whitening bias); 'all' when that is every group."""
    every = list(model.param_groups())
    chosen = stage.groups() or every
    frozen = {g for g, share in stage.freeze_after.items() if share < 1}
    kept = [g for g in chosen if g not in frozen] or chosen
    return "all" if kept == every else kept


def extend_plan(plan: Plan, si: int, done: int, steps: int, epochs: int) -> None:
    """A budgeted run's plan with the continuation as one more stage of ``steps``, kept
    at its length (the budget was for the run as it was: no re-plan moves these steps).
    Stage ``si`` ends at the ``done`` steps it ran; stages after it (never run: an early
    stop) go. Its probed costs stand for the added stage's, which trains the same."""
    n = si + 1
    for name in ("stage_steps", "stage_epochs", "step_seconds", "setup_seconds", "kept"):
        del getattr(plan, name)[n:]
    plan.stage_steps[si] = done
    plan.kept += [False] * (n - len(plan.kept))
    for name, value in (
        ("stage_steps", steps),
        ("stage_epochs", float(epochs)),
        ("step_seconds", plan.step_seconds[si]),
        ("setup_seconds", 0.0),
        ("kept", True),
    ):
        getattr(plan, name).append(value)
    for name in ("train_step_seconds", "epoch_seconds"):  # absent in older plans
        costs = getattr(plan, name)
        if costs:
            del costs[n:]
            costs.append(costs[si])
