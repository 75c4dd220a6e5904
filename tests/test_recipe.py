"""Recipes, ``--set`` overrides, ``--epochs`` sharing, schedules and optimizer groups.

No training here: every test runs in milliseconds.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from imgclf.errors import RecipeError
from imgclf.models import create, model_spec
from imgclf.train.ensemble_recipe import is_ensemble_recipe
from imgclf.train.optim import build_optimizer, build_scheduler, lr_factor
from imgclf.train.recipe import (
    EmaConfig,
    Recipe,
    SchedulerConfig,
    list_recipes,
    load_recipe,
    recipe_yaml,
    validate,
)
from imgclf.train.stages import resolve_groups, set_trainable

# Single recipes; the ensemble recipes (a list of these, e.g. study-vote) are
# tests/test_ensemble_train.py's.
BUNDLED = sorted(name for name in list_recipes() if not is_ensemble_recipe(name))


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


# ---------------------------------------------------------------- bundled recipes


def test_the_study_recipes_and_fast_are_bundled() -> None:
    assert {"fast", "scratch-simple", "scratch-medium", "scratch-complex"} <= set(BUNDLED)
    assert all(list_recipes()[name] for name in BUNDLED), "every recipe has a description"


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipe_validates_and_fits_its_model(name: str) -> None:
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe) and recipe.name == name
    spec = model_spec(recipe.model)  # a registered model
    model = create(recipe.model, num_classes=3, input_size=recipe.input_size or spec.input_size)
    for stage in recipe.stages:  # every stage names groups the model has
        resolve_groups(model, stage.groups())
    assert recipe.total_epochs >= 1
    # Printing and reading back gives the same recipe.
    assert validate(yaml.safe_load(recipe_yaml(recipe))) == recipe


# ---------------------------------------------------------------- --set overrides


def test_set_nested_values_with_yaml_typing() -> None:
    recipe = load_recipe(
        "scratch-simple",
        [
            "optimizer.lr=0.05",
            "stages.0.epochs=3",
            "augment.flip=false",
            "optimizer.name=adamw",
            "batch_size=64",
            "grad_clip=1.5",
            "stages.0.train=[block2, head]",
            "optimizer.betas=[0.8, 0.99]",
            "optimizer.weight_decay=1e-4",  # YAML 1.1 reads 1e-4 as a string: still a float
        ],
    )
    assert recipe.optimizer.lr == 0.05 and isinstance(recipe.optimizer.lr, float)
    assert recipe.stages[0].epochs == 3 and recipe.total_epochs == 3
    assert recipe.augment.flip is False
    assert recipe.augment.crop_padding == 4  # untouched siblings keep their values
    assert recipe.optimizer.name == "adamw"
    assert recipe.batch_size == 64 and recipe.grad_clip == 1.5
    assert recipe.stages[0].groups() == ["block2", "head"]
    assert recipe.optimizer.betas == (0.8, 0.99)
    assert recipe.optimizer.weight_decay == pytest.approx(1e-4)


def test_set_can_add_a_stage_field_and_clear_an_optional() -> None:
    recipe = load_recipe("scratch-simple", ["stages.0.lr=0.3", "grad_clip="])
    assert recipe.stages[0].lr == 0.3
    assert recipe.grad_clip is None


def test_overrides_do_not_touch_the_callers_dict() -> None:
    data = {"model": "simple", "optimizer": {"lr": 0.1}, "stages": [{"epochs": 2}]}
    recipe = load_recipe(data, ["optimizer.lr=0.5", "stages.0.epochs=4"])
    assert recipe.optimizer.lr == 0.5 and recipe.stages[0].epochs == 4
    assert data == {"model": "simple", "optimizer": {"lr": 0.1}, "stages": [{"epochs": 2}]}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimzer.lr=0.1", ["unknown key 'optimzer'", "optimizer", "scheduler", "stages"]),
        ("optimizer.lrr=0.1", ["unknown key 'optimizer.lrr'", "lr", "momentum", "nesterov"]),
        ("stages.0.epoch=3", ["unknown key 'stages.0.epoch'", "epochs", "train", "bn_update"]),
        ("augment.mixup=0.2", ["unknown key 'augment.mixup'", "crop_padding", "flip"]),
        ("optimizer.name=adam", ["optimizer.name", "'sgd'", "'adamw'"]),
        ("scheduler.name=poly", ["scheduler.name", "'step'", "'cosine'", "'onecycle'"]),
        ("precision=fp8", ["precision", "'fp32'", "'bf16'"]),
        ("stages.0.epochs=0", ["stages.0.epochs", "greater than or equal to 1"]),
        ("optimizer.lr=-1", ["optimizer.lr", "greater than 0"]),
        ("batch_size=lots", ["batch_size", "integer"]),
        ("augment.flip=sometimes", ["augment.flip", "bool"]),
        ("stages.3.epochs=2", ["stages.3.epochs", "not an index below 1"]),
        ("optimizer.lr.max=2", ["'optimizer.lr' is not a mapping"]),
        ("optimizer.lr", ["expected key=value"]),
        ("stages.0.train=[]", ["at least one parameter group"]),
        ("ema.dcay=0.99", ["unknown key 'ema.dcay'", "decay", "warmup"]),
        ("ema.decay=1", ["ema.decay", "less than 1"]),
        ("ema.decay=-0.5", ["ema.decay", "greater than or equal to 0"]),
        ("ema.decay=false", ["ema.decay", "a number from 0 up to (not including) 1"]),
        ("ema.decay=lots", ["ema.decay", "number"]),
        ("ema.warmup=maybe", ["ema.warmup", "bool"]),
        ("ema=0.999", ["ema: a mapping such as {decay: 0.999", "a decay is ema.decay=0.999"]),
        ("ema=[0.9]", ["ema: a mapping such as", "true/false, not [0.9]"]),
        ("stages.0.ema={decay: 0.9}", ["stages.0.ema", "the recipe's `ema` block"]),
        ("stages.0.ema=0.9", ["stages.0.ema: true or false, not 0.9", "ema.decay=0.9"]),
        ("stages.0.ema=sometimes", ["stages.0.ema: true or false, not 'sometimes'"]),
    ],
)
def test_bad_override_is_a_one_line_error_naming_the_choices(override, expected) -> None:
    with pytest.raises(RecipeError) as excinfo:
        load_recipe("scratch-simple", [override])
    text = one_line_error(excinfo)
    for part in expected:
        assert part in text, text


def test_ema_is_off_unless_asked_and_a_stage_may_turn_it_on_or_off() -> None:
    """``ema`` settings with timm's names; ``true`` the defaults, ``false``/null none; a
    stage's ``ema: true/false`` overrides the recipe's on/off, never its settings."""
    assert load_recipe("scratch-simple").ema is None
    on = load_recipe("scratch-simple", ["ema=true"])
    assert on.ema == EmaConfig(decay=0.999, warmup=True)
    assert load_recipe("scratch-simple", ["ema.decay=0.9"]).ema == EmaConfig(decay=0.9)
    assert load_recipe("scratch-simple", ["ema=false"]).ema is None
    assert load_recipe("scratch-simple", ["ema={decay: 0, warmup: off}"]).ema.decay == 0.0
    stages = "stages=[{train: head}, {train: all, ema: true}, {ema: false}, {}]"
    plain = load_recipe("scratch-simple", [stages])
    assert [plain.ema_for(s) for s in plain.stages] == [None, EmaConfig(), None, None]
    tuned = load_recipe("scratch-simple", [stages, "ema.decay=0.99"])
    d99 = EmaConfig(decay=0.99)
    assert [tuned.ema_for(s) for s in tuned.stages] == [d99, d99, None, d99]
    # The resolved recipe (config.yaml, a checkpoint's) reads back the same.
    assert validate(yaml.safe_load(recipe_yaml(tuned))) == tuned
    assert tuned.with_epochs(8).stages[1].ema is True


def test_several_problems_are_counted_on_the_one_line() -> None:
    with pytest.raises(RecipeError) as excinfo:
        load_recipe("scratch-simple", ["batch_size=0", "optimizer.lr=0", "seed=x"])
    assert "(and 2 more problems)" in one_line_error(excinfo)


# ---------------------------------------------------------------- recipe files and names


def test_recipe_from_a_path(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("model: simple\nstages:\n  - {epochs: 2, train: [head]}\n  - {epochs: 1}\n")
    recipe = load_recipe(path, epochs=6)
    assert recipe.name == "mine"
    assert [s.epochs for s in recipe.stages] == [4, 2]
    assert load_recipe(str(path)).stages[0].groups() == ["head"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: simple\nbatch: 3\n", "unknown key 'batch'"),
        ("- just\n- a list\n", "a recipe is a YAML mapping"),
        ("model: [simple\n", "not valid YAML"),
        ("batch_size: 8\n", "model"),  # model is required
    ],
)
def test_bad_recipe_file_is_one_line(tmp_path, text, expected) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    message = one_line_error(excinfo)
    assert expected in message and str(path) in message


def test_missing_recipe_file(tmp_path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_unknown_recipe_name_suggests_a_close_one() -> None:
    with pytest.raises(RecipeError) as excinfo:
        load_recipe("scratch-simpel")
    text = one_line_error(excinfo)
    assert "did you mean 'scratch-simple'?" in text
    for name in BUNDLED:
        assert name in text


# ---------------------------------------------------------------- --epochs


def stages(*epochs: int) -> Recipe:
    return validate({"model": "simple", "stages": [{"epochs": e} for e in epochs]})


@pytest.mark.parametrize(
    "old, total, new",
    [
        ([10], 3, [3]),
        ([30, 30], 10, [5, 5]),
        ([1, 9], 4, [1, 3]),
        ([2, 1], 6, [4, 2]),
        ([12, 11, 11], 17, [6, 6, 5]),  # the longest stage never gets fewer epochs
        ([1, 1, 1, 1, 96], 5, [1, 1, 1, 1, 1]),
        ([5, 5], 2, [1, 1]),
    ],
)
def test_with_epochs_examples(old, total, new) -> None:
    assert [s.epochs for s in stages(*old).with_epochs(total).stages] == new


def test_with_epochs_is_proportional_exact_and_at_least_one() -> None:
    rng = random.Random(0)
    for _ in range(500):
        old = [rng.randint(1, 30) for _ in range(rng.randint(1, 6))]
        total = rng.randint(len(old), 100)
        new = [s.epochs for s in stages(*old).with_epochs(total).stages]
        share = [total * e / sum(old) for e in old]
        case = f"{old} → {total}: {new}"
        assert sum(new) == total, case
        assert min(new) >= 1, case
        for i in range(len(old)):
            assert new[i] < max(share[i], 1) + 1, case  # never a whole epoch over its share
            for j in range(len(old)):
                if old[i] > old[j]:
                    assert new[i] >= new[j], case
        if all(x >= 1 for x in share):
            assert all(abs(n - x) < 1 for n, x in zip(new, share, strict=True)), case
        if total == sum(old):
            assert new == old, case


def test_with_epochs_keeps_everything_else() -> None:
    recipe = load_recipe("scratch-simple", ["stages.0.lr=0.01"], epochs=3)
    assert recipe.total_epochs == 3
    assert recipe.stages[0].lr == 0.01 and recipe.optimizer.lr == 0.05


def test_fewer_epochs_than_stages_is_an_error() -> None:
    with pytest.raises(RecipeError) as excinfo:
        stages(1, 1, 1).with_epochs(2)
    assert "3 stages" in one_line_error(excinfo)


# ---------------------------------------------------------------- schedules


def sched(**kwargs) -> SchedulerConfig:
    return SchedulerConfig(**kwargs)


def test_step_is_torch_steplr_7_01_in_epochs() -> None:
    cfg = sched(name="step", step_size=7, gamma=0.1)
    spe = 10  # optimizer steps per epoch
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    for epoch in range(22):
        for k in (0, spe // 2, spe - 1):  # constant within an epoch
            assert lr_factor(cfg, epoch * spe + k, spe, 22 * spe) == pytest.approx(
                reference.get_last_lr()[0]
            )
        opt.step()
        reference.step()
    assert lr_factor(cfg, 6 * spe + 9, spe, 220) == 1.0  # the 7th epoch: still full lr
    assert lr_factor(cfg, 7 * spe, spe, 220) == pytest.approx(0.1)  # the 8th
    assert lr_factor(cfg, 14 * spe, spe, 220) == pytest.approx(0.01)


def test_multistep_matches_torch_multisteplr() -> None:
    cfg = sched(name="multistep", milestones=[2, 5], gamma=0.5)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 5], gamma=0.5)
    expected = [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
    for epoch, value in enumerate(expected):
        assert reference.get_last_lr()[0] == pytest.approx(value)
        assert lr_factor(cfg, epoch * 4 + 3, 4, 28) == pytest.approx(value)
        opt.step()
        reference.step()


def test_cosine_by_hand() -> None:
    cfg = sched(name="cosine")
    assert lr_factor(cfg, 0, 10, 100) == 1.0
    assert lr_factor(cfg, 25, 10, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(cfg, 50, 10, 100) == pytest.approx(0.5)
    assert lr_factor(cfg, 100, 10, 100) == pytest.approx(0.0)
    floored = sched(name="cosine", min_lr_factor=0.1)
    assert lr_factor(floored, 50, 10, 100) == pytest.approx(0.55)
    assert lr_factor(floored, 100, 10, 100) == pytest.approx(0.1)


def test_linear_by_hand() -> None:
    assert lr_factor(sched(name="linear"), 30, 10, 100) == pytest.approx(0.7)
    assert lr_factor(sched(name="linear", min_lr_factor=0.2), 50, 10, 100) == pytest.approx(0.6)


def test_onecycle_triangle_by_hand() -> None:
    # airbench94: from min_lr_factor up to 1 over pct_start of the steps, then down to 0.
    cfg = sched(name="onecycle", pct_start=0.25, min_lr_factor=0.2)
    assert lr_factor(cfg, 0, 10, 100) == pytest.approx(0.2)
    assert lr_factor(cfg, 10, 10, 100) == pytest.approx(0.2 + 0.8 * 0.4)
    assert lr_factor(cfg, 25, 10, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 50, 10, 100) == pytest.approx(0.5 / 0.75)
    assert lr_factor(cfg, 100, 10, 100) == pytest.approx(0.0)


def test_warmup_then_schedule_by_hand() -> None:
    cfg = sched(name="cosine", warmup_epochs=2)
    spe, total = 5, 110  # warmup: 10 steps, then cosine over the other 100
    assert [lr_factor(cfg, s, spe, total) for s in range(10)] == pytest.approx(
        [(s + 1) / 10 for s in range(10)]
    )
    assert lr_factor(cfg, 10, spe, total) == pytest.approx(1.0)
    assert lr_factor(cfg, 60, spe, total) == pytest.approx(0.5)
    warm_step = sched(name="step", step_size=3, gamma=0.1, warmup_epochs=1)
    assert lr_factor(warm_step, 0, 4, 40) == pytest.approx(0.25)
    assert lr_factor(warm_step, 4, 4, 40) == 1.0  # epoch 1: warm, not yet decayed
    assert lr_factor(warm_step, 12, 4, 40) == pytest.approx(0.1)  # epoch 3: first decay


def test_constant_is_one() -> None:
    assert {lr_factor(sched(), s, 7, 70) for s in range(70)} == {1.0}


def test_scheduler_drives_the_optimizer_lr() -> None:
    recipe = validate(
        {"model": "simple", "optimizer": {"lr": 0.2}, "scheduler": {"name": "linear"}}
    )
    model = create("simple", num_classes=3, input_size=16)
    set_trainable(model, None)
    opt = build_optimizer(model, recipe, recipe.stages[0])
    scheduler = build_scheduler(opt, recipe.scheduler, steps_per_epoch=5, epochs=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert lrs == pytest.approx([0.2 * (1 - s / 10) for s in range(10)])


# ---------------------------------------------------------------- optimizers


def test_sgd_with_momentum_nesterov_decay_and_lower_lr_groups() -> None:
    recipe = validate(
        {
            "model": "simple",
            "optimizer": {
                "name": "sgd",
                "lr": 0.1,
                "momentum": 0.8,
                "nesterov": True,
                "weight_decay": 5e-4,
                "bias_lr_mult": 2.0,
                "no_decay_1d": True,
            },
            "stages": [{"train": ["block2", "head"], "lower_lr_mult": 0.1}],
        }
    )
    model = create("simple", num_classes=3, input_size=16)
    set_trainable(model, recipe.stages[0].groups())
    opt = build_optimizer(model, recipe, recipe.stages[0])
    assert isinstance(opt, torch.optim.SGD)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for group in opt.param_groups:
        assert group["momentum"] == 0.8 and group["nesterov"] is True
        for p in group["params"]:
            seen[names[id(p)]] = (group["lr"], group["weight_decay"])
    assert seen == {
        "block2.0.weight": (pytest.approx(0.01), 5e-4),  # lower group: lr × 0.1
        # bias_lr_mult is for normalization layers: a conv's bias keeps its group's rate
        "block2.0.bias": (pytest.approx(0.01), 0.0),  # × 0.1, no decay (1-D)
        "head.weight": (pytest.approx(0.1), 5e-4),
        "head.bias": (pytest.approx(0.1), 0.0),
    }


def rates_by_name(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Each trained parameter's (lr, weight_decay) in ``opt``, by name."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]
    }


@pytest.mark.parametrize("scales_decay", [True, False])
@pytest.mark.parametrize("bias_lr_groups", [[], ["stem"]])
def test_bias_lr_mult_speeds_up_norm_layers_and_may_keep_the_decay_per_step(
    scales_decay: bool, bias_lr_groups: list[str]
) -> None:
    recipe = validate(
        {
            "model": "fast",
            "optimizer": {
                "lr": 1.5,
                "weight_decay": 1e-3,
                "bias_lr_mult": 64.0,
                "bias_lr_mult_decay": scales_decay,
                "bias_lr_groups": bias_lr_groups,
            },
        }
    )
    model = create("fast", num_classes=10)
    seen = rates_by_name(model, build_optimizer(model, recipe, recipe.stages[0]))
    assert seen["block1.conv1.weight"] == (pytest.approx(1.5), 1e-3)
    assert seen["head.weight"] == (pytest.approx(1.5), 1e-3)  # 2-D: never a bias
    lr, wd = seen["block2.norm1.bias"]
    assert lr == pytest.approx(96.0)
    # airbench: the multiplier raises the rate "but not weight decay" (lr × wd per step)
    assert lr * wd == pytest.approx(96.0 * 1e-3 if scales_decay else 1.5 * 1e-3)
    # The stem's conv bias is no norm parameter: the bias rate only when its group is
    # listed (airbench94_muon trains its whitening bias at the BatchNorm biases' rate).
    stem = seen["stem.conv.bias"]
    assert stem == (seen["block2.norm1.bias"] if bias_lr_groups else (pytest.approx(1.5), 1e-3))


def test_a_frozen_group_with_freeze_anneal_runs_the_schedule_before_its_freeze() -> None:
    recipe = validate(
        {
            "model": "fast",
            "optimizer": {
                "name": "muon",
                "lr": 1.0,
                "bias_lr_mult": 4.0,
                "bias_lr_groups": ["stem"],
            },
            "scheduler": {"name": "linear"},
            "stages": [{"epochs": 10, "freeze_after": {"stem": 0.3}, "freeze_anneal": True}],
        }
    )
    model = create("fast", num_classes=10)
    opt = build_optimizer(model, recipe, recipe.stages[0])
    scheduler = build_scheduler(opt, recipe.scheduler, steps_per_epoch=5, epochs=10)
    bias = model.stem.conv.bias
    stem = next(g for g in opt.param_groups if any(p is bias for p in g["params"]))
    assert stem["until"] == 0.3 and len(stem["params"]) == 1
    assert opt.param_groups[0]["lr"] == 1.0  # metrics.csv's lr is still the base group's
    stem_lrs, base_lrs = [], []
    for _ in range(50):
        stem_lrs.append(stem["lr"])
        base_lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: nothing moves, the schedule advances
        scheduler.step()
    # 15 of 50 steps: linear from 4.0 to 0 over the stem's own steps, 0 after.
    assert stem_lrs[:15] == pytest.approx([4.0 * (1 - s / 15) for s in range(15)])
    assert stem_lrs[15:] == [0.0] * 35
    assert base_lrs == pytest.approx([1.0 * (1 - s / 50) for s in range(50)])
    # Under a budget's plan (37 steps) the stem's curve ends at ceil(0.3 × 37) = 12.
    at = next(i for i, g in enumerate(opt.param_groups) if g is stem)
    factor = build_scheduler(opt, recipe.scheduler, 5, 10, total_steps=37).lr_lambdas[at]
    assert factor(11) == pytest.approx(1 / 12) and factor(12) == 0.0
    # Without freeze_anneal the stem follows the stage's curve until it freezes.
    recipe.stages[0].freeze_anneal = False
    opt = build_optimizer(model, recipe, recipe.stages[0])
    assert {g["until"] for g in opt.param_groups} == {1.0}


def test_adamw_with_betas_and_stage_lr() -> None:
    recipe = validate(
        {
            "model": "simple",
            "optimizer": {"name": "adamw", "lr": 0.1, "betas": [0.8, 0.95], "weight_decay": 0.01},
            "stages": [{"lr": 0.003}],
        }
    )
    model = create("simple", num_classes=3, input_size=16)
    set_trainable(model, None)
    opt = build_optimizer(model, recipe, recipe.stages[0])
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["lr"] for g in opt.param_groups} == {0.003}
    assert {g["betas"] for g in opt.param_groups} == {(0.8, 0.95)}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.01}


@pytest.mark.parametrize(("given", "expected"), [("off", "off"), ("on", "on"), ("auto", "auto")])
def test_channels_last_on_off_survive_yaml_booleans(given: str, expected: str) -> None:
    # YAML 1.1 turns a bare on/off into True/False; the recipe still means on/off.
    assert load_recipe("fast", [f"channels_last={given}"]).channels_last == expected


@pytest.mark.parametrize("value", ["true", "auto", "max-autotune"])
def test_retired_compile_key_off_is_dropped_and_on_is_an_error(tmp_path, capsys, value) -> None:
    """`compile` was accepted and never read (issue #29), and torch.compile measured no
    faster on a CPU (issue #32, item 6): a checkpoint's saved recipe with `compile: false`
    still validates (resume), a recipe asking for it is told it was removed and why, in
    one line from the CLI, and the key is no longer in what a run writes."""
    from imgclf.cli import main

    saved = load_recipe("fast").model_dump(mode="json") | {"compile": False}
    assert validate(saved, "last.pt").name == "fast"
    with pytest.raises(RecipeError) as excinfo:
        load_recipe("fast", [f"compile={value}"])
    assert "compile: was removed: torch.compile was not faster" in one_line_error(excinfo)
    assert "compile" not in load_recipe("fast").model_dump()
    recipe = tmp_path / "compiled.yaml"
    recipe.write_text(f"model: fast\ninput_size: 32\ncompile: {value}\n")
    assert main(["train", str(recipe), "--data", "nothing", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {recipe}: compile: was removed: torch.compile was not")
    assert "docs/benchmarks.md" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_a_binary_file_as_the_recipe_is_one_line(tmp_path, capsys) -> None:
    """Issue #31: a PNG given as the recipe ended in a UnicodeDecodeError traceback."""
    from imgclf.cli import main

    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 4)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(png)
    message = one_line_error(excinfo)
    assert "not a text file" in message and str(png) in message
    assert main(["train", str(png), "--data", "nothing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {png}: not a text file") and "Traceback" not in err


@pytest.mark.parametrize(
    ("seed", "says"),
    [("99999999999999999999999", "less than or equal to 4294967295"), ("-1", "greater than")],
)
def test_a_seed_out_of_range_is_one_line(seed, says) -> None:
    """Issue #31: --set seed=99999999999999999999999 ended in torch's ValueError traceback."""
    with pytest.raises(RecipeError) as excinfo:
        load_recipe("fast", overrides=[f"seed={seed}"])
    message = one_line_error(excinfo)
    assert "seed: " in message and says in message
    assert load_recipe("fast", overrides=["seed=4294967295"]).seed == 2**32 - 1


def _laughs(levels: int) -> str:
    """A recipe whose ``head`` holds the "billion laughs": each level is nine aliases of
    the one before, 9**levels values from a few hundred bytes."""
    lines = ["model: simple", "head:", "  l0: &l0 [ha, ha, ha, ha, ha, ha, ha, ha, ha]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_load(tmp_path) -> None:
    """Issue #31, item 7: the bomb under ``head:`` validated (a dict of anything) and then
    hung while config.yaml was written (9**9 values). Aliases are refused where read."""
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs(9))
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}: not valid YAML (alias *l0 is not allowed in a recipe")


def test_a_small_alias_bomb_through_the_cli_is_one_line(tmp_path, capsys) -> None:
    """Three levels (729 values) trained before, and wrote them all to config.yaml."""
    from helpers_train import import_tiny
    from imgclf.cli import main

    import_tiny(tmp_path)
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs(3))
    out = tmp_path / "run"
    argv = ["train", str(path), "--data", "tiny", "--out", str(out), "--epochs", "1", "--quiet"]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {path}: not valid YAML (alias *l0 is not allowed")
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        # 2 MiB in one string: read in full before, and written to every run's config.yaml.
        ("model: simple\ndescription: '" + "x" * (2 << 20) + "'\n", "larger than 1024 KiB"),
        # 50,000 nested lists: PyYAML's recursive composer ended in a RecursionError.
        ("model: simple\nmodel_args: {x: " + "[" * 50_000 + "]" * 50_000 + "}\n", "nested"),
    ],
)
def test_an_oversized_or_overnested_recipe_is_one_line(tmp_path, text, says) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}: ") and says in message


def test_anchors_and_aliases_in_a_set_value_are_not_expanded() -> None:
    """A --set value is YAML too: an alias there is not expanded but kept as the text."""
    recipe = load_recipe("scratch-simple", ["description=[&a [1, 2], *a, *a]"])
    assert recipe.description == "[&a [1, 2], *a, *a]"


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("head.foo=1", "unknown key 'head.foo'; valid keys here: type, dropout, hidden"),
        ("head.type=transformer", "head.type: Input should be 'linear' or 'mlp'"),
        ("head.hidden=8", "head: hidden is the mlp head's width; type linear has none"),
        ("head.hidden=0", "head.hidden: Input should be greater than or equal to 1"),
        (
            "head.dropout=true",
            "head.dropout: a probability from 0 up to (not including) 1, not True",
        ),
        ("head.dropout=1.0", "head.dropout: Input should be less than 1"),
        ("head=[mlp]", "head: Input should be a valid dictionary or instance of HeadConfig"),
        (
            "model_args.widths={a: 1}",
            "model_args: widths: a number, string, true/false or a list of them, not dict",
        ),
        (
            "model_args.widths=[[1]]",
            "model_args: widths: a number, string, true/false or a list of them, not a list "
            "of lists or mappings",
        ),
    ],
)
def test_head_and_model_args_are_typed(override, says) -> None:
    """Issue #31, item 8: ``head`` was a dict of anything, so a misspelt key, or any key on
    a model trained from scratch, was silently ignored; model_args held any nesting."""
    with pytest.raises(RecipeError) as excinfo:
        load_recipe("scratch-simple", [override])
    assert one_line_error(excinfo).endswith(says)


def test_a_head_reads_back_and_old_empty_heads_still_validate() -> None:
    mlp = load_recipe("mobilenet_v2-64")
    assert mlp.head.model_dump() == {"type": "mlp", "dropout": 0.3, "hidden": 512}
    assert validate(yaml.safe_load(recipe_yaml(mlp))) == mlp
    plain = load_recipe("scratch-simple")
    assert plain.head is None and validate(yaml.safe_load(recipe_yaml(plain))) == plain
    # Checkpoints and config.yaml files from before held `head: {}`.
    assert validate(plain.model_dump(mode="json") | {"head": {}}).head is None
    # A dumped recipe's `head: null` takes --set head.* like an absent one.
    assert load_recipe(plain, ["head.type=mlp"]).head.type == "mlp"
    assert load_recipe("fast", ["model_args.widths=[8, 16, 16]"]).model_args == {
        "widths": [8, 16, 16]
    }


def test_a_head_for_a_model_trained_from_scratch_is_one_line(tmp_path, capsys) -> None:
    """It built the model's own head and trained, the setting unused."""
    from helpers_train import import_tiny
    from imgclf.cli import main

    import_tiny(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "scratch-simple", "--data", "tiny", "--out", str(out), "--quiet"]
    assert main([*argv, "--epochs", "1", "--set", "head.type=mlp"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: head: model 'simple' is trained from scratch and takes no new head; a "
        "pretrained one does (imgclf models)"
    ]
    assert not out.exists()


def test_a_data_parallel_runs_config_reads_back_as_its_recipe(tmp_path: Path) -> None:
    """config.yaml of a torchrun run holds a `distributed:` block beside the other facts
    about the run; read back as a recipe it was an unknown key."""
    recipe = load_recipe("scratch-simple")
    facts = {
        "dataset": {"name": "tiny"},
        "distributed": {"world_size": 2, "backend": "gloo", "batch_per_process": 32},
        "imgclf_version": "0.1.0",
    }
    path = tmp_path / "config.yaml"
    path.write_text(recipe_yaml(recipe) + yaml.safe_dump(facts, sort_keys=False))
    again = load_recipe(str(path))
    assert again.model_dump(exclude={"name"}) == recipe.model_dump(exclude={"name"})
