"""Time budgets (issue #11): parsing and its errors, the plan's proportions, the schedule
reaching its end at the planned last step, a budgeted run ending within its budget, and
resume keeping the plan."""

from __future__ import annotations

import csv
import math
import time

import pytest
import torch

from helpers_train import make_image_folder
from imgclf.cli import main
from imgclf.data.importer import import_dataset
from imgclf.errors import RecipeError
from imgclf.runtime.checkpoint import load_checkpoint
from imgclf.train import train
from imgclf.train.budget import REPLAN_SHARE, parse_duration
from imgclf.train.optim import build_scheduler
from imgclf.train.recipe import SchedulerConfig


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90s", 90),
        ("90", 90),
        ("10m", 600),
        ("10min", 600),
        ("1h", 3600),
        ("1h30m", 5400),
        ("1.5h", 5400),
        (" 2m30s ", 150),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0s", "5x", "", "m", "-1m", "1d", "10 minutes"])
def test_bad_durations(text):
    with pytest.raises(RecipeError, match="--time"):
        parse_duration(text)


@pytest.fixture
def tiny(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=12, size=16)
    return import_dataset(src, "tiny", val_fraction=0.25, warn=lambda m: None)


def _recipe(stages=((2, "all"),)) -> dict:
    return {
        "name": "b",
        "model": "simple",
        "input_size": 16,
        "batch_size": 8,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "scheduler": {"name": "cosine", "warmup_epochs": 0.5},
        "stages": [{"epochs": e, "train": t} for e, t in stages],
    }


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--time", "0"], "must be more than zero"),
        (["--time", "5x"], "not a duration"),
        (["--time", "1m", "--epochs", "2"], "give one of them"),
        (["--time", "1s"], "too short"),
    ],
)
def test_bad_budgets_are_one_error_line(tiny, tmp_path, capsys, args, expected):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe()))
    out = tmp_path / "run"
    code = main(["train", str(recipe), "--data", "tiny", "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], err
    assert not out.exists()  # nothing is made for a budget that cannot work


def test_resume_keeps_the_plan_and_refuses_a_new_budget(tiny, tmp_path):
    run = train(_recipe(), data=tiny, out=tmp_path / "run", time_budget=6, progress=False)
    plan = load_checkpoint(run.path / "last.pt")["plan"]
    assert plan["budget_seconds"] == 6 and plan["stage_steps"][0] >= 1
    with pytest.raises(RecipeError, match="keeps the plan"):
        train(resume=run.path, time_budget="1m", progress=False)
    from imgclf.train.recipe import validate
    from imgclf.train.trainer import Trainer

    state = load_checkpoint(run.path / "last.pt")
    again = Trainer(validate(state["recipe"]), tiny, run.path, progress=False, state=state)
    assert again.plan is not None and again.plan.to_dict() == plan


def test_plan_keeps_stage_proportions(tiny, tmp_path):
    from imgclf.train.recipe import validate
    from imgclf.train.trainer import Trainer

    recipe = validate(_recipe(stages=((3, "all"), (1, "all"))))
    trainer = Trainer(recipe, tiny, tmp_path / "r", progress=False, budget_seconds=20)
    trainer.ensure_plan()
    steps = trainer.plan.stage_steps
    assert steps[0] > steps[1] >= 1
    assert abs(steps[0] / 3 - steps[1]) <= 1  # each stage within a step of its share
    assert "budget" in trainer.plan.text and "epochs of b" in trainer.plan.text


def test_a_stage_that_costs_almost_nothing_keeps_its_length():
    from imgclf.train.budget import stage_scales

    # A cached head stage (3 s for its recipe length) before a fine-tuning stage (3,000 s),
    # 600 s available of a 900-s budget: the head runs in full, fine-tuning takes the rest.
    head, tune = stage_scales([3.0, 3000.0], 600.0, 900.0)
    assert head == 1.0 and tune == pytest.approx(597 / 3000)
    # One factor when nothing is cheap, when everything is, and when the budget is long.
    assert stage_scales([300.0, 900.0], 600.0, 900.0) == [0.5, 0.5]
    assert stage_scales([3.0, 6.0], 4.5, 900.0) == [0.5, 0.5]
    assert stage_scales([3.0, 300.0], 606.0, 900.0) == [2.0, 2.0]
    # No room left once the cheap stage is paid: the others get nothing (a too-short error).
    assert stage_scales([3.0, 3000.0], 2.0, 900.0) == [1.0, 0.0]


def test_plan_gives_a_cheap_cached_stage_its_recipe_length(tiny, tmp_path, monkeypatch):
    from imgclf.train import budget
    from imgclf.train.recipe import validate
    from imgclf.train.trainer import Trainer

    # Probe results as measured for lite0-cpu on a CPU: the head stage's steps nearly free
    # after a cache, the full stage's slow. Stubbed so the test does not depend on timing.
    costs = iter(
        [
            budget.StageCost(step=1e-4, validation=0.0, setup=5.0, epoch=0.01, full_validation=0.1),
            budget.StageCost(step=20.0, validation=0.5, setup=0.0, epoch=0.01, full_validation=0.1),
        ]
    )
    monkeypatch.setattr(budget, "_probe_stage", lambda trainer, stage, forward: next(costs))
    recipe = validate(_recipe(stages=((2, "head"), (6, "all"))))
    trainer = Trainer(recipe, tiny, tmp_path / "r", progress=False, budget_seconds=60)
    trainer.ensure_plan()
    spe = len(trainer.train_loader)
    steps = trainer.plan.stage_steps
    assert steps[0] == 2 * spe  # the head's two epochs, not a sixth of them
    assert 1 <= steps[1] < 6 * spe  # the expensive stage is what the budget shrinks
    assert "2.0 of them in stage 1" in trainer.plan.text
    assert trainer.plan.kept == [True, False]  # and re-plans leave it there


def test_scaled_schedule_ends_at_the_planned_last_step():
    cfg = SchedulerConfig(name="cosine", warmup_epochs=1, min_lr_factor=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    # A 10-epoch recipe of 20 steps an epoch squeezed onto 37 steps (1.85 epochs).
    sched = build_scheduler(opt, cfg, steps_per_epoch=20, epochs=10, total_steps=37)
    factor = sched.lr_lambdas[0]
    assert factor(0) == pytest.approx(1 / 4)  # warm-up: one recipe epoch = 3.7 steps → 4
    assert factor(3) == pytest.approx(1.0)
    assert factor(36) == pytest.approx(0.1, abs=0.01)  # annealed at the last planned step
    assert factor(37) == pytest.approx(0.1)
    step_cfg = SchedulerConfig(name="step", step_size=5, gamma=0.1)
    step = build_scheduler(opt, step_cfg, 20, 10, total_steps=40).lr_lambdas[0]
    assert step(19) == 1.0 and step(20) == pytest.approx(0.1)  # epoch 5 of 10 → half way


def test_budgeted_run_ends_within_its_budget(tiny, tmp_path):
    budget = 12.0
    started = time.perf_counter()
    run = train(_recipe(), data=tiny, out=tmp_path / "run", time_budget=budget, progress=False)
    elapsed = time.perf_counter() - started
    # The plan is for 93% of it; +25% of slack on top of the issue's +5% for noisy CI.
    summary = run.summary
    said = (elapsed, summary.get("plan"), summary.get("epochs"), summary.get("train_seconds"))
    assert elapsed <= budget * 1.3, said
    assert elapsed >= budget * 0.4, said  # and it used the time, not a token epoch
    assert summary["budget_seconds"] == budget
    assert summary["images_seen"] > 0 and summary["planned_epochs"] > 2
    with open(run.path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["epochs"]
    # The schedule annealed: the last epoch's rate is the cosine's end.
    assert float(rows[-1]["lr"]) < 0.05 * 0.1


def _plan(steps=(100, 50)):
    from imgclf.train.budget import Plan

    return Plan(
        budget_seconds=200.0,
        stage_steps=list(steps),
        stage_epochs=[s / 10 for s in steps],
        text="",
        step_seconds=[1.0, 1.0],
        setup_seconds=[0.0, 10.0],
        reserve_seconds=5.0,
        spent_before=10.0,
    )


def test_replan_shrinks_the_rest_when_behind():
    plan = _plan()
    # 20 steps done in 60 s where the probe said 30 s: twice as slow.
    note = plan.keep_to_budget(0, 20, elapsed=60.0)
    assert note and "behind" in note
    assert plan.stage_steps[0] < 100 and 1 <= plan.stage_steps[1] < 50
    # The rest now fits: this stage at its measured 2 s a step, the later one (setup 10 s)
    # at the probe's estimate until its own epochs are measured.
    rest = (plan.stage_steps[0] - 20) * 2.0 + plan.stage_steps[1] * 1.0 + 10.0
    assert 60.0 + rest + 5.0 <= 200.0 * REPLAN_SHARE + 1e-6


def test_replan_grows_early_when_ahead_and_leaves_a_run_on_plan_alone():
    plan = _plan()
    note = plan.keep_to_budget(0, 20, elapsed=15.0)  # the probe was pessimistic
    assert note and "time to spare" in note
    # Steps at twice the probe's speed are trusted to 1.25x; the rest of the time left
    # (197 - 15 - 5 - 10 s of setup = 167 s) fills at the probe's own 1 s a step.
    assert plan.stage_steps[0] == 20 + math.floor(80 * max(1.25, 167 / 130))
    on_plan = _plan((110, 55))
    assert on_plan.keep_to_budget(0, 20, elapsed=30.0) is None  # as planned, and it fits
    late = _plan()
    assert late.keep_to_budget(1, 10, elapsed=130.0) is None  # past half: never grows


def test_replan_leaves_a_kept_stage_at_its_length_and_reads_old_plans():
    from imgclf.train.budget import Plan

    # A cheap head stage kept at its recipe length (100 steps at 0.01 s), then 50 steps of
    # 1 s. Its epochs run far under the probe's time: only the later stage may grow.
    plan = _plan((100, 50))
    plan.step_seconds, plan.kept = [0.01, 1.0], [True, False]
    note = plan.keep_to_budget(0, 20, elapsed=10.2, window=(0.02, 10))
    assert note and "time to spare" in note
    # The later stage takes the time left at the probe's 1 s a step: 197 s less 10.2
    # spent, 5 reserved, 10 of its setup and 0.16 for the head's 80 steps at 0.002 s.
    assert plan.stage_steps == [100, math.floor(197.0 - 10.2 - 5 - 10 - 0.16)]
    for _ in range(5):  # epoch after epoch: the kept stage never compounds
        plan.keep_to_budget(0, 20, elapsed=10.2, window=(0.02, 10))
    assert plan.stage_steps == [100, 171]
    # Behind: the kept stage still runs in full, the other one shrinks.
    slow = _plan((100, 50))
    slow.step_seconds, slow.kept = [0.01, 1.0], [True, False]
    assert "behind" in slow.keep_to_budget(0, 20, elapsed=150.0)
    assert slow.stage_steps[0] == 100 and 1 <= slow.stage_steps[1] < 50
    # A checkpoint's plan from before ``kept`` existed still loads: no stage kept.
    old = plan.to_dict()
    del old["kept"]
    assert Plan.from_dict(old).kept == [] and not Plan.from_dict(old).is_kept(0)


def test_replan_projects_with_the_latest_epochs_rate():
    """A slow start (one-time costs) with a latest epoch on plan: no shrinking."""
    plan = _plan((100, 50))
    assert plan.keep_to_budget(0, 20, elapsed=45.0, window=(10.0, 10)) is None
    slow = _plan((100, 50))
    note = slow.keep_to_budget(0, 20, elapsed=30.0, window=(20.0, 10))  # now 2x slower
    assert note and "behind" in note and slow.stage_steps[0] < 100


def test_replan_note_names_the_time_spent_when_the_rate_alone_is_on_plan():
    """Time lost before the latest epoch (one-time costs) shrinks the rest although that
    epoch ran faster than the probe: the note must say so rather than read "behind" at
    a rate under 1x with nothing to explain it."""
    plan = _plan((100, 50))
    note = plan.keep_to_budget(0, 90, elapsed=180.0, window=(9.5, 10))
    assert note and note.startswith("behind the plan: 180 s spent where the plan had 100 s")
    assert "latest epoch's steps at 0.95×" in note and plan.stage_steps[0] < 100


def test_a_shrink_after_growth_does_not_read_behind():
    """Steps grown into time the probe over-priced, then run at 0.95x the probe's time:
    the rest overruns though neither the time spent nor the rate is behind the probe."""
    plan = _plan((150, 50))
    note = plan.keep_to_budget(0, 20, elapsed=20.0, window=(9.5, 10))
    assert note and note.startswith("over the budget: 20 s spent where the plan had 30 s")
    assert plan.stage_steps[0] < 150


def _split_plan(**kw):
    """_plan, with one step's 1 s split into 0.8 s of training and 20 s of validation and
    checkpoints per epoch of 100 steps (the probe's parts, as make_plan stores them)."""
    plan = _plan(**kw)
    plan.train_step_seconds, plan.epoch_seconds = [0.8, 0.8], [20.0, 20.0]
    return plan


def test_a_replan_within_an_epoch_measures_steps_alone():
    # 20 steps in 16 s, no validation in the window: exactly the probe's step time.
    plan = _split_plan()
    assert plan.keep_to_budget(0, 20, elapsed=40.0, window=(16.0, 20), epoch_ends=0) is None
    # Counted as if the window held an epoch's validation (the epoch-end rule), the same
    # 16 s read as ahead of the plan and grew the rest for nothing.
    grown = _split_plan()
    assert "time to spare" in grown.keep_to_budget(0, 20, elapsed=40.0, window=(16.0, 20))
    # Twice the probe's step time within the epoch: behind, and the note says over what.
    slow = _split_plan()
    note = slow.keep_to_budget(0, 20, elapsed=42.0, window=(32.0, 20), epoch_ends=0)
    assert note and "behind" in note and "latest 20 steps at 2.00×" in note
    assert slow.stage_steps[0] < 100


def test_replan_counts_early_over_the_stages_it_may_change():
    """A kept head stage's many cheap steps do not make a fine-tuning stage late: its
    first re-plan may still grow it (lite0-cpu: 2 head epochs, 0.3 of fine-tuning)."""
    plan = _plan((1000, 50))
    plan.step_seconds, plan.kept = [0.001, 1.0], [True, False]
    # 40 s left for 40 steps at the probe's rate, which run at twice its speed.
    note = plan.keep_to_budget(1, 10, elapsed=152.0, window=(5.0, 10), epoch_ends=0)
    assert note and "time to spare" in note
    assert plan.stage_steps == [1000, 10 + math.floor(40 * 1.25)]


def test_replan_takes_time_the_probe_over_priced_in_one_step():
    """A feature cache built in less time than the probe said: the fine-tuning stage may
    take all the time saved at the probe's step rate, not 1.25x of its first plan."""
    plan = _plan((1000, 32))
    plan.step_seconds, plan.kept = [0.001, 3.0], [True, False]
    plan.keep_to_budget(0, 1000, elapsed=30.0, window=(1.0, 1000))
    # 197 s less 30 spent, 5 reserved and 10 of the stage's setup, at 3 s a step: 50
    # steps, where a 1.25x cap gave 40.
    assert plan.stage_steps == [1000, 50]


def test_replan_every_is_a_share_of_the_budget_in_steps():
    from imgclf.train.budget import REPLAN_EVERY_SHARE, REPLAN_MIN_STEPS

    plan = _split_plan()  # 200-s budget, 0.8-s steps
    assert plan.replan_every(0) == max(REPLAN_MIN_STEPS, math.ceil(REPLAN_EVERY_SHARE * 250))
    plan.train_step_seconds = [30.0, 30.0]
    assert plan.replan_every(0) == REPLAN_MIN_STEPS  # slow steps: not one step's noise


def test_a_stage_shorter_than_an_epoch_is_replanned_within_it(tmp_path, monkeypatch, capsys):
    """The probe says a step takes 0.5 s; it takes milliseconds. The first plan fits a
    fraction of an epoch, and re-plans within that epoch grow the stage; without them it
    ends at its first plan (budgets ended at 562 s of 900)."""
    from imgclf.train import budget

    src = make_image_folder(tmp_path / "src", per_class=30, size=16)
    data = import_dataset(src, "subepoch", val_fraction=0.25, warn=lambda m: None)
    monkeypatch.setattr(
        budget,
        "_probe_stage",
        lambda trainer, stage, forward: budget.StageCost(
            step=0.5, validation=0.01, setup=0.0, epoch=0.01, full_validation=0.01
        ),
    )
    monkeypatch.setattr(budget, "REPLAN_MIN_STEPS", 3)
    monkeypatch.setattr(budget, "FINISH_OVERHEAD_S", 0.5)
    recipe = {**_recipe(), "batch_size": 2}
    run = train(recipe, data=data, out=tmp_path / "run", time_budget=8)
    notes = capsys.readouterr().err.splitlines()
    plan = load_checkpoint(run.path / "last.pt")["plan"]
    spe = math.ceil(67 / 2)
    first = round(plan["stage_epochs"][0] * spe)
    assert first < spe  # the first plan: part of one epoch
    assert plan["stage_steps"][0] > first  # grown within that epoch
    assert any("time to spare" in n and "latest 3 steps" in n for n in notes), notes


def test_one_slow_window_does_not_shrink_the_plan_two_do():
    """Re-plans shrink without limit but grow only early, so each hiccup of the machine
    ratcheted a plan down for good (a 12-s budget ended at 4 s): the rate used is the lower
    median of the stage's latest three windows."""
    plan = _plan()  # 200-s budget, steps (100, 50) at 1 s; 80 of 100 done: past half
    plan.window_ratios = [[0, 1.0], [0, 1.0]]
    assert plan.keep_to_budget(0, 80, 90.0, window=(30.0, 10)) is None  # 3x, once
    assert plan.stage_steps == [100, 50]
    note = plan.keep_to_budget(0, 85, 95.0, window=(30.0, 10))  # 3x again
    assert note is not None and "behind" in note and plan.stage_steps[0] < 100
    assert plan.window_ratios == [[0, 1.0], [0, 3.0], [0, 3.0]]
    # A new stage starts its own history; a saved plan carries it.
    plan.keep_to_budget(1, 5, 100.0, window=(5.0, 5))
    assert plan.window_ratios == [[1, 1.0]]
    from imgclf.train.budget import Plan

    assert Plan.from_dict(plan.to_dict()).window_ratios == [[1, 1.0]]


def test_a_cached_stage_is_priced_on_the_engine_its_cache_will_use(tiny, monkeypatch):
    """The feature cache's pass may run on ONNX Runtime (train/prefix_pass.py): the plan
    prices it at the chosen engine's measured seconds per image, for every view of every
    training image and each validation image, not at eager PyTorch's."""
    from imgclf.data.loader import BatchLoader
    from imgclf.models import create
    from imgclf.runtime.device import resolve_hardware
    from imgclf.train import budget, prefix_pass
    from imgclf.train.recipe import validate

    recipe = validate(_recipe(((1, "head"),)) | {"augment": {"flip": True}})
    model = create("simple", num_classes=3, input_size=16)
    tr, va = tiny.indices("train"), tiny.indices("val")
    loaders = [BatchLoader(tiny.images[i], tiny.labels[i], batch_size=8, size=16) for i in (tr, va)]
    job = budget.PlanInputs(model, recipe, *loaders, resolve_hardware("cpu", "fp32", "off"), False)
    chosen = []

    def choose(prefix, sample, passes, dtype, say):
        chosen.append(passes)
        return prefix_pass.PrefixPass(lambda x: x, 8, "ONNX Runtime", 0.25)

    monkeypatch.setattr(budget.prefix_pass, "choose", choose)
    cost = budget._probe_stage(job, recipe.stages[0], forward=100.0)
    passes = 2 * len(tr) + len(va)  # flips: two views
    assert chosen == [passes] and cost.setup == pytest.approx(0.25 * passes)
