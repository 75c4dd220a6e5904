"""Time budgets: ``imgclf train RECIPE --time 10m`` fits the recipe to the wall clock.

CPUs that run imgclf differ six-fold in speed, so a recipe fixed in epochs takes ten
minutes on one machine and an hour on another. With a budget the trainer first measures
what one training step of each stage costs on this machine (a short probe on a copy of the
model, real batches, nothing of the run touched), then scales every stage's length by one
factor so that training, per-epoch validation, the feature caches and the final
evaluation fit. Stages keep their proportions, a stage may end mid-epoch, and each stage's
schedule is stretched or squeezed to the planned number of steps, so it anneals fully
whatever the length. One exception: a stage whose whole recipe length costs almost nothing
(a head trained on cached features, once the cache is built) keeps that length when the
others shrink, since cutting it saves nothing (CHEAP_STAGE_SHARE).

After every epoch, and within one every 5% of the budget (REPLAN_EVERY_SHARE), the run
compares the time spent with the probe's estimate and shrinks what is left when it is
behind, or grows it early in the run when the probe was pessimistic (:class:`Replanner`
keeps that clock; in a data-parallel job rank 0's decides for every rank).

The plan (steps per stage) is saved in every checkpoint: a resumed run keeps it.
"""

from __future__ import annotations

import copy
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from imgclf.data.loader import BatchLoader
from imgclf.errors import RecipeError
from imgclf.runtime.device import Hardware
from imgclf.runtime.distributed import Dist
from imgclf.train import precision, prefix_pass, shared_cache
from imgclf.train.feature_cache import views_for
from imgclf.train.recipe import Recipe
from imgclf.train.stages import set_trainable, split_at_first_trained, stage_size

# Share of the budget planned for: the rest absorbs the probe's error and machine noise,
# so the run ends within the budget + 5% (issue #11) on a noisy machine.
PLAN_SHARE = 0.95
# Share of the budget a re-plan after an epoch aims at: measured costs leave less to
# guess than the probe's.
REPLAN_SHARE = 0.985
# Most a re-plan may lengthen the remaining steps (a pessimistic probe), early in a run.
MAX_GROWTH = 1.25
# Within an epoch, a re-plan every this share of the budget (at the probe's step time), and
# never on fewer steps than REPLAN_MIN_STEPS: a stage shorter than an epoch was otherwise
# never re-planned (docs/benchmarks.md §8, "Notes moved from the code").
REPLAN_EVERY_SHARE = 0.05
REPLAN_MIN_STEPS = 20
# A re-plan projects with the lower median of the stage's latest 3 window rates: re-plans
# shrink without limit but grow only early, so each slow window alone ratcheted the plan
# down for good. With two windows so far the faster one counts: growth is bounded by
# MAX_GROWTH, a shrink is never undone (docs/benchmarks.md §8).
RATE_WINDOWS = 3
# Seconds set aside for the plots and files written at the end.
FINISH_OVERHEAD_S = 3.0
# Per-epoch bookkeeping besides the checkpoint writes (metrics row, TensorBoard, fsync).
EPOCH_OVERHEAD_S = 0.05
# Timed steps per stage in the probe, after one untimed warm-up step: one is enough, since
# the re-plan after each epoch corrects the estimate, and every probe step is time the
# budget does not train (docs/benchmarks.md §8).
PROBE_STEPS = 1
# A stage whose recipe length costs at most this share of the budget runs in full when a
# budget shrinks the others: a cached head stage's steps cost microseconds once its feature
# cache is paid for, so scaling it in proportion only under-trains the head the next stage
# builds on (docs/results.md, "A quarter-hour"; docs/benchmarks.md §8).
CHEAP_STAGE_SHARE = 0.02
# Timed forward passes (the median is used) behind the estimates of a feature cache's build
# and of validation; timed once per plan, not per stage (the network is the same): one
# pass is a sample of the machine's noise (docs/benchmarks.md §8).
FORWARD_REPEATS = 3

_UNITS = {"s": 1, "m": 60, "h": 3600}
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """``90s``, ``90``, ``10m``, ``1h``, ``1h30m``, ``1.5h`` → seconds (> 0)."""
    raw = str(text).strip().lower().replace(" ", "")
    m = _DURATION.match(raw)
    if not raw or m is None or not any(m.groups()):
        raise RecipeError(f"--time {text!r}: not a duration; write e.g. 90s, 10m, 1h or 1h30m")
    h, mins, s = (float(g) if g else 0.0 for g in m.groups())
    seconds = h * 3600 + mins * 60 + s
    if seconds <= 0:
        raise RecipeError(f"--time {text!r}: the budget must be more than zero")
    return seconds


def describe_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


@dataclass
class StageCost:
    """Measured costs of one stage, in seconds."""

    step: float  # one training step (a batch), augmentation and optimizer included
    validation: float  # one pass over the validation split
    setup: float  # once per stage: building its feature cache
    epoch: float  # per epoch besides steps and validation: checkpoints, logs
    full_validation: float  # the whole network over the validation split (final evaluation)


@dataclass
class Plan:
    """Steps per stage for a budget, and the probe's costs the run is checked against."""

    budget_seconds: float
    stage_steps: list[int]
    stage_epochs: list[float]  # as planned at the start (stage_steps may shrink later)
    text: str
    step_seconds: list[float]  # per stage: one step, its share of validation and saving
    setup_seconds: list[float]  # per stage: feature cache
    reserve_seconds: float  # final evaluation and files
    spent_before: float  # setup and probing before the first step
    # Per stage: kept at its recipe length (CHEAP_STAGE_SHARE), so re-plans leave it alone.
    kept: list[bool] = field(default_factory=list)
    # Per stage, the two parts of ``step_seconds``: one training step alone, and what an
    # epoch costs besides its steps (validation, checkpoints). A re-plan within an epoch
    # measures steps alone. Plans saved before these existed lack them (see _train_step).
    train_step_seconds: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    # [stage, ratio] of the latest measured windows (RATE_WINDOWS), for the median.
    window_ratios: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        # ``kept`` is newer than the first budgeted checkpoints: absent, no stage was kept.
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def is_kept(self, i: int) -> bool:
        return i < len(self.kept) and self.kept[i]

    def _train_step(self, i: int) -> float:
        return self.train_step_seconds[i] if self.train_step_seconds else self.step_seconds[i]

    def _epoch_cost(self, i: int) -> float:
        return self.epoch_seconds[i] if self.epoch_seconds else 0.0

    def replan_every(self, si: int) -> int:
        """Steps of stage ``si`` between re-plans within an epoch: those the probe priced
        at REPLAN_EVERY_SHARE of the budget, and at least REPLAN_MIN_STEPS so that one
        window's rate is not one step's noise. Step counts, not seconds, so that every
        rank of a data-parallel job re-plans at the same step."""
        per_step = max(self._train_step(si), 1e-9)
        return max(REPLAN_MIN_STEPS, math.ceil(REPLAN_EVERY_SHARE * self.budget_seconds / per_step))

    def _steady_ratio(self, si: int, ratio: float) -> float:
        """The lower median of this stage's latest RATE_WINDOWS window rates, this one
        included: one slow window (a hiccup of the machine) moves nothing, two do."""
        self.window_ratios = [r for r in self.window_ratios if r[0] == si][1 - RATE_WINDOWS :]
        self.window_ratios.append([si, ratio])
        ratios = sorted(r[1] for r in self.window_ratios)
        return ratios[(len(ratios) - 1) // 2]

    def keep_to_budget(
        self,
        si: int,
        done_in_stage: int,
        elapsed: float,
        window: tuple[float, int] | None = None,
        epoch_ends: int = 1,
    ) -> str | None:
        """After an epoch, or every ``replan_every`` steps within one: compare the time
        spent with the probe's estimate for the same work and, when the rest would overrun
        the budget, shrink the remaining steps (of this stage and the later ones) by one
        factor; early in the run (under half the planned steps of the stages not kept
        done) also grow them into the time left: by at most MAX_GROWTH beyond what the
        probe's own step time allows, when the steps ran faster than the probe said.
        Schedules follow: they read ``stage_steps``.

        ``window``: (seconds, steps) since the previous re-plan of this stage (or its
        start), with ``epoch_ends`` validations and checkpoints in it (0 within an epoch):
        its rate against the probe's is what the rest is projected with (the run's start
        holds one-time costs that would make it look slower)."""
        n = len(self.stage_steps)
        done = [
            self.stage_steps[i] if i < si else done_in_stage if i == si else 0 for i in range(n)
        ]
        planned_so_far = self.spent_before + sum(
            self.setup_seconds[i] + done[i] * self.step_seconds[i] for i in range(si + 1)
        )
        ratio = elapsed / planned_so_far if planned_so_far > 0 else 1.0
        if window is not None and window[1] > 0:
            probed = window[1] * self._train_step(si) + epoch_ends * self._epoch_cost(si)
            ratio = self._steady_ratio(si, window[0] / probed)
        f = self._factor(si, done, elapsed, ratio)
        if f is None:
            return None
        for i in range(si, n):
            if self.is_kept(i):
                continue
            left = self.stage_steps[i] - done[i]
            keep = math.floor(left * f)
            if i > si and left > 0:
                keep = max(keep, 1)  # a later stage still runs, however briefly
            self.stage_steps[i] = done[i] + keep
        return self._note(f, elapsed, planned_so_far, ratio, window, epoch_ends)

    def _note(
        self,
        f: float,
        elapsed: float,
        planned_so_far: float,
        ratio: float,
        window: tuple[float, int] | None,
        epoch_ends: int,
    ) -> str:
        """What a re-plan that scaled the remaining steps by ``f`` prints."""
        # Both figures are printed because either can drive the change: the time already
        # spent (one-time costs, a slow first epoch) and the rate the rest is projected
        # with. A rate under 1× beside "behind" is then explained by the first figure.
        # Neither behind in time nor in rate, a shrink undoes part of an earlier growth:
        # "over the budget" (docs/benchmarks.md §8).
        behind = elapsed > planned_so_far or ratio > 1
        how = "time to spare" if f >= 1 else "behind the plan" if behind else "over the budget"
        basis = (
            "run's"
            if window is None or window[1] <= 0
            else "latest epoch's"
            if epoch_ends
            else f"latest {window[1]}"
        )
        return (
            f"{how}: {elapsed:.0f} s spent where the plan had {planned_so_far:.0f} s, "
            f"the {basis} steps at {ratio:.2f}× the probe's time; the remaining steps "
            f"{'shrink' if f < 1 else 'grow'} to {f:.0%} to fit "
            f"{describe_duration(self.budget_seconds)}"
        )

    def _factor(self, si: int, done: list[int], elapsed: float, ratio: float) -> float | None:
        """The factor the remaining steps of the stages not kept are scaled by, ``done``
        steps of each stage done and this stage's steps at ``ratio`` × the probe's time;
        None: they fit (and it is not early enough to grow them), or nothing scales."""
        n = len(self.stage_steps)
        # The measured rate applies to this stage only: a cached head stage's epochs are all
        # bookkeeping and a full stage's all compute, so one stage's error says little
        # about the next, which is re-planned when its own epochs are measured.
        rest = {
            i: (self.stage_steps[i] - done[i]) * self.step_seconds[i] * (ratio if i == si else 1)
            for i in range(si, n)
        }
        # A kept stage (a cached head at its recipe length) runs as planned: its time is
        # counted, but only the other stages shrink or grow ("early" counts steps, and its
        # steps cost next to nothing: docs/benchmarks.md §8).
        kept = sum(t for i, t in rest.items() if self.is_kept(i))
        scalable = sum(t for i, t in rest.items() if not self.is_kept(i))
        later_setup = sum(self.setup_seconds[si + 1 :])
        available = self.budget_seconds * REPLAN_SHARE - elapsed - self.reserve_seconds
        projected = kept + scalable + later_setup
        # Early = under half of the scalable stages' steps done (a kept stage's steps are
        # many and cheap: counted, they made a short stage after them "late" from its
        # first step, and it never grew: docs/benchmarks.md §8).
        early = 2 * sum(d for i, d in enumerate(done) if not self.is_kept(i)) < sum(
            s for i, s in enumerate(self.stage_steps) if not self.is_kept(i)
        )
        if scalable <= 0:
            return None
        if projected <= available and not (early and projected < 0.9 * available):
            return None
        free = max(0.0, available - later_setup - kept)
        # Growth: the rate measured so far is trusted to MAX_GROWTH per re-plan (one window
        # may be luck), but time the probe over-priced and is now spent for less (a
        # feature cache) is certain, so steps at the probe's own rate may take all of it
        # (docs/benchmarks.md §8).
        at_probe_rate = sum(
            (self.stage_steps[i] - done[i]) * self.step_seconds[i]
            for i in range(si, n)
            if not self.is_kept(i)
        )
        f = free / scalable
        if f > 1 and at_probe_rate > 0:
            f = min(f, max(MAX_GROWTH, free / at_probe_rate))
        return f

    def epochs_done(self, steps_per_epoch: int) -> float:
        return sum(self.stage_steps) / steps_per_epoch


class Replanner:
    """The budget's clock in one stage (index ``si``): when to re-plan within an epoch
    (:meth:`due`), and the re-plan itself (:meth:`replan`, also at every epoch's end),
    measured from the stage's start or its latest re-plan. ``done``: the stage's steps
    done when its clock starts (after its feature cache). Without a plan nothing is due.

    In a data-parallel job rank 0's clock decides and broadcasts the plan: every rank must
    run the same steps. ``elapsed`` gives the run's wall time so far (resumes included),
    ``say`` prints a re-plan's note."""

    def __init__(
        self,
        plan: Plan | None,
        si: int,
        done: int,
        *,
        dist: Dist,
        elapsed: Callable[[], float],
        say: Callable[[str], None],
    ) -> None:
        self.plan, self.si, self.dist = plan, si, dist
        self.elapsed, self.say = elapsed, say
        self.mark = (time.perf_counter(), done)  # (when, steps done) of the latest re-plan

    def stage_steps(self) -> int:
        """The stage's planned steps now (a re-plan moves them)."""
        return self.plan.stage_steps[self.si]

    def due(self, done: int, epoch_end: int) -> bool:
        """A re-plan within the epoch, ``done`` steps into the stage: every
        ``replan_every`` steps since the last one, unless this epoch's end (step
        ``epoch_end``, which re-plans anyway) is nearer than that."""
        if self.plan is None or self.plan.is_kept(self.si):
            return False
        every = self.plan.replan_every(self.si)
        return done - self.mark[1] >= every and epoch_end - done >= every // 2

    def replan(self, done: int, epoch_ends: int = 1) -> None:
        """Fit the rest of the plan to the time measured since the last re-plan
        (Plan.keep_to_budget), ``done`` steps into the stage, with ``epoch_ends``
        validations and checkpoints in that window (0 within an epoch)."""
        note = None
        now = time.perf_counter()
        if self.dist.is_main:  # one clock decides: every rank must run the same steps
            window = (now - self.mark[0], done - self.mark[1])
            note = self.plan.keep_to_budget(self.si, done, self.elapsed(), window, epoch_ends)
        self.mark = (now, done)  # every rank: due() counts steps from here
        if self.dist.enabled:
            steps, note = self.dist.broadcast((self.plan.stage_steps, note))
            self.plan.stage_steps = list(steps)
        if note:
            self.say(note)


@dataclass
class PlanInputs:
    """What a plan is made for (:func:`make_plan`): the model (probed on copies, never
    trained), its loaders (the training one at the adapted batch), the recipe, the
    hardware and whether BatchNorm is frozen (the adapted mode)."""

    model: nn.Module
    recipe: Recipe
    train_loader: BatchLoader
    val_loader: BatchLoader | None
    hw: Hardware
    freeze_bn: bool
    distributed: bool = False  # no cache shared between stages (imgclf.train.shared_cache)


def make_plan(job: PlanInputs, budget_seconds: float, started: float) -> Plan:
    """Probe each stage and scale the recipe's epochs to fit ``budget_seconds`` counted
    from ``started`` (a ``time.perf_counter()`` value: setup before the plan counts too)."""
    r = job.recipe
    per_image = _forward_per_image(job)  # the same network in every stage: timed once
    # A head stage's cache derived from the next stage's costs its middle blocks' pass.
    costs = shared_cache.priced(job, [_probe_stage(job, s, per_image) for s in r.stages])
    spe = len(job.train_loader)
    # The final evaluation runs the whole network on the validation split, once per
    # test-time view (imgclf.evaluate.tta: 2, or 6 for inputs up to 64 px).
    views = (6 if job.model.input_size <= 64 else 2) if r.tta else 1
    final_eval = costs[-1].full_validation * views
    spent = time.perf_counter() - started
    fixed = spent + sum(c.setup for c in costs) + final_eval + FINISH_OVERHEAD_S
    # Cost of each stage at its recipe length: epochs × (steps + a validation).
    full = [
        s.epochs * (spe * c.step + c.validation + c.epoch)
        for s, c in zip(r.stages, costs, strict=True)
    ]
    per_unit = sum(full)
    available = budget_seconds * PLAN_SHARE - fixed
    scales = stage_scales(full, available, budget_seconds)
    steps = [round(f * s.epochs * spe) for f, s in zip(scales, r.stages, strict=True)]
    if available <= 0 or min(steps) < 1:
        need = fixed + per_unit * max(1 / (s.epochs * spe) for s in r.stages)
        raise RecipeError(
            f"--time {describe_duration(budget_seconds)}: too short for {r.name!r} on this "
            f"machine; one step of every stage plus setup and evaluation needs about "
            f"{describe_duration(need / PLAN_SHARE)} (a step of stage 1 takes "
            f"{costs[0].step:.2f} s)"
        )
    epochs = [n / spe for n in steps]
    images_per_s = [job.train_loader.batch_size / c.step for c in costs]
    parts = [
        f"{e:.1f} of them in stage {i + 1} ({s.name or _groups(s)}, {ips:,.0f} images/s)"
        for i, (e, s, ips) in enumerate(zip(epochs, r.stages, images_per_s, strict=True))
    ]
    text = (
        f"{describe_duration(budget_seconds)} budget → {sum(epochs):.1f} epochs of {r.name}"
        + (f" at {images_per_s[0]:,.0f} images/s" if len(parts) == 1 else ": " + ", ".join(parts))
        + f" (recipe: {r.total_epochs} epochs)"
    )
    return Plan(
        budget_seconds=budget_seconds,
        stage_steps=steps,
        stage_epochs=epochs,
        text=text,
        step_seconds=[c.step + (c.validation + c.epoch) / spe for c in costs],
        setup_seconds=[c.setup for c in costs],
        reserve_seconds=final_eval + FINISH_OVERHEAD_S,
        spent_before=spent,
        kept=[f > min(scales) for f in scales],  # the cheap stages stage_scales kept
        train_step_seconds=[c.step for c in costs],
        epoch_seconds=[c.validation + c.epoch for c in costs],
    )


def agreed_plan(job: PlanInputs, budget_seconds: float, started: float, dist: Dist) -> Plan:
    """:func:`make_plan`, made once for every rank of a data-parallel job: rank 0 probes
    and plans, the rest follow, since every rank must run the same steps (a budget too
    short is the same one-line error on every rank)."""
    if not dist.enabled:
        return make_plan(job, budget_seconds, started)
    outcome: tuple[str, Any] | None = None
    if dist.is_main:
        try:
            outcome = ("plan", make_plan(job, budget_seconds, started).to_dict())
        except RecipeError as exc:
            outcome = ("error", str(exc))
    kind, value = dist.broadcast(outcome)
    if kind == "error":
        raise RecipeError(value)
    return Plan.from_dict(value)


def stage_scales(full: list[float], available: float, budget_seconds: float) -> list[float]:
    """The factor each stage's recipe length is scaled by so that the stages, costing
    ``full`` seconds each at their recipe length, fill ``available`` seconds: one factor for
    all, except that when it shrinks them a stage costing at most CHEAP_STAGE_SHARE of the
    budget keeps its full length and the others share what is left."""
    total = sum(full)
    scale = available / total if total > 0 else 0.0
    cheap = [0 < f <= CHEAP_STAGE_SHARE * budget_seconds for f in full]
    if scale >= 1 or all(cheap) or not any(cheap):
        return [scale] * len(full)
    rest = sum(f for f, c in zip(full, cheap, strict=True) if not c)
    left = available - sum(f for f, c in zip(full, cheap, strict=True) if c)
    shrunk = max(0.0, left) / rest
    return [1.0 if c else shrunk for c in cheap]


def _groups(stage) -> str:
    groups = stage.groups()
    return "all" if groups is None else "+".join(groups)


def _forward_per_image(job: PlanInputs) -> float:
    """Seconds per image to read, resize and run the whole network in eval mode (no
    gradients, BatchNorm's statistics untouched): what a feature cache and a validation
    cost."""
    rng = torch.get_rng_state()
    try:
        loader = job.train_loader
        idx = torch.arange(min(loader.batch_size, loader.num_samples))
        return _time_forward(job.model, lambda: loader.batch(idx), job.hw) / len(idx)
    finally:
        torch.set_rng_state(rng)


def _probe_stage(job: PlanInputs, stage, forward: float) -> StageCost:
    """Time a few training steps of ``stage`` on a copy of the model; ``forward`` (seconds
    per image of the whole network) prices its feature cache and validation."""
    rng, loader = torch.get_rng_state(), job.train_loader
    size, loader.size = loader.size, stage_size(stage, job.model)
    try:
        model = copy.deepcopy(job.model)
        set_trainable(model, stage.groups(), bn_update=stage.bn_update, freeze_bn=job.freeze_bn)
        n_train = loader.num_samples
        n_val = job.val_loader.num_samples if job.val_loader is not None else 0
        cached = (
            job.recipe.feature_cache
            and views_for(job.recipe, stage) is not None
            and not stage.bn_update
            and split_at_first_trained(model, stage.groups()) is not None
        )
        batch = loader.batch(torch.arange(min(loader.batch_size, n_train)))
        if cached:
            prefix, suffix = split_at_first_trained(model, stage.groups())
            with torch.inference_mode():
                features = prefix.eval()(batch)
            step = _time_steps(suffix, features.clone(), job, _step_dtype(suffix, features, job))
            passes = (views_for(job.recipe, stage) or 1) * n_train + n_val
            # Priced on the engine the cache will choose (prefix_pass: eager or ORT).
            engine = prefix_pass.choose(
                prefix, batch, passes, job.hw.autocast_dtype, prefix_pass.silent
            )
            setup = engine.seconds_per_image * passes
            validation = 0.0  # on cached features: negligible
        else:
            step = _time_steps(model, batch, job, _step_dtype(model, batch, job))
            setup = 0.0
            validation = forward * n_val
        return StageCost(
            step=step,
            validation=validation,
            setup=setup,
            epoch=_time_checkpoint(job.model),
            full_validation=forward * n_val,
        )
    finally:
        loader.size = size
        torch.set_rng_state(rng)


def _autocast(hw: Hardware):
    return torch.autocast(
        hw.device.type, dtype=hw.autocast_dtype, enabled=hw.autocast_dtype is not None
    )


def _time_forward(
    model: torch.nn.Module, make_batch: Callable[[], torch.Tensor], hw: Hardware
) -> float:
    """Seconds to make one batch (read, resize) and run it through ``model`` in eval mode,
    as building a feature cache and validating do: the median of FORWARD_REPEATS passes
    after a warm-up."""
    was = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(hw):
            batch = make_batch()
            model(batch)  # warm-up: allocations, kernel selection
            _sync(batch)
            times = []
            for _ in range(FORWARD_REPEATS):
                t = time.perf_counter()
                batch = make_batch()
                model(batch)
                _sync(batch)
                times.append(time.perf_counter() - t)
            return sorted(times)[len(times) // 2]
    finally:
        model.train(was)


def _step_dtype(net: nn.Module, x: torch.Tensor, job: PlanInputs) -> torch.dtype | None:
    """The precision the stage will train in: timed as the trainer will time it."""
    if not precision.measured(job.recipe.precision, job.hw):
        return job.hw.autocast_dtype
    return precision.NAMES[precision.choose(net, x, job.hw)[0]]


def _time_steps(
    net: torch.nn.Module, x: torch.Tensor, job: PlanInputs, dtype: torch.dtype | None
) -> float:
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)
    y = torch.zeros(len(x), dtype=torch.int64, device=x.device)
    loader = job.train_loader
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(len(x))
    times = []
    for i in range(PROBE_STEPS + 1):
        t = time.perf_counter()
        if i and x.ndim == 4 and x.shape[1] == 3 and loader.augment.enabled:
            x = loader.batch(idx, gen)  # the augmentation is part of a step's cost
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(x)
        times.append(time.perf_counter() - t)
    return sum(times[1:]) / PROBE_STEPS


def _time_checkpoint(model: nn.Module) -> float:
    """An epoch ends with two checkpoint writes (last.pt, often best.pt: weights and the
    optimizer's momentum, written and synced to disk), a metrics row and TensorBoard
    events: negligible for real data sets, most of an epoch of a cached head stage."""
    state = {"model": model.state_dict(), "momentum": model.state_dict()}
    with tempfile.NamedTemporaryFile(dir=tempfile.gettempdir()) as f:
        t = time.perf_counter()
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
        return 2 * (time.perf_counter() - t) + EPOCH_OVERHEAD_S


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
