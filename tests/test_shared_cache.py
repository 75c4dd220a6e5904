"""A head stage's feature cache derived from the next stage's: the shared frozen blocks
run once, and training is the same as with two separate caches (issue #30)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers_train import (
    assert_same_run,
    import_tiny,
    interrupt_at,
    interrupt_cache_at,
    tiny_recipe,
)
from imgclf.runtime.checkpoint import load_checkpoint
from imgclf.train import shared_cache, train
from imgclf.train.feature_cache import FeatureCache
from imgclf.train.recipe import validate as validate_recipe
from imgclf.train.rundir import read_metrics


def _recipe(**changes) -> dict:
    """The default photo recipe's shape on the tiny `complex` net: a head stage on the
    image and its mirror, then the last block and the head on 3 cached crop views."""
    recipe = tiny_recipe(
        model="complex",
        augment={"crop_padding": 2, "flip": True, "cache_views": 3},
        stages=[
            {"epochs": 2, "train": "head", "augment": {"crop_padding": 0, "flip": True}},
            {"epochs": 5, "train": ["block3", "head"], "lr": 0.01},
        ],
    )
    recipe.update(changes)
    return recipe


def _built_stages(monkeypatch) -> list[str]:
    """Records the trained groups of every stage whose cache runs its own prefix pass."""
    built: list[str] = []
    original = FeatureCache.build.__func__

    def build(cls, model, recipe, stage, *args, **kwargs):
        cache = original(cls, model, recipe, stage, *args, **kwargs)
        if cache is not None:
            built.append("+".join(stage.groups()))
        return cache

    monkeypatch.setattr(FeatureCache, "build", classmethod(build))
    return built


def test_the_head_stage_is_trained_on_the_next_stages_cache(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    ds = import_tiny(tmp_path)
    built = _built_stages(monkeypatch)
    shared = train(_recipe(), ds, out=tmp_path / "shared", threads=1, progress=True)
    said = "".join(capsys.readouterr())
    assert built == ["block3+head"]  # one prefix pass, the fine-tuning stage's
    assert "2 view(s) of" in said and "from the next stage's cache, through block3 to head" in said
    built.clear()
    monkeypatch.setattr(shared_cache, "source_stage", lambda *a, **k: None)
    separate = train(_recipe(), ds, out=tmp_path / "separate", threads=1, progress=False)
    assert built == ["head", "block3+head"]  # two passes
    rows = [read_metrics(r.path / "metrics.csv") for r in (shared, separate)]
    assert len(rows[0]) == 7
    for ra, rb in zip(*rows, strict=True):
        for col in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert ra[col] == pytest.approx(rb[col], abs=1e-4), (ra["epoch"], col)
    a, b = (load_checkpoint(r.last)["model_state"] for r in (shared, separate))
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("epoch", "batch"), [(2, 1), (4, 2)], ids=["in-head", "in-blocks"])
def test_ctrl_c_in_either_stage_then_resume_is_exact(
    tmp_path: Path, monkeypatch, epoch: int, batch: int
) -> None:
    from imgclf.train.trainer import Trainer

    ds = import_tiny(tmp_path)
    recipe = validate_recipe(_recipe())
    reference = train(recipe, ds, out=tmp_path / "reference", threads=1, progress=False)
    out = tmp_path / "run"
    trainer = Trainer(recipe, ds, out, threads=1, progress=False)
    interrupt_at(trainer, epoch, batch)
    interrupt_cache_at(monkeypatch, trainer, epoch, batch)  # the cached stages
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    stopped = load_checkpoint(out / "last.pt")
    assert stopped["position"]["stage"] == (0 if epoch <= 2 else 1)
    assert stopped["progress"]["stage_cached"] == {"0": True, "1": True}
    train(None, resume=out, threads=1, progress=False)
    assert_same_run(out, reference.path)


def test_which_stages_share(tmp_path: Path) -> None:
    from imgclf.models import create

    model = create("complex", num_classes=3, input_size=16)

    def source(distributed: bool = False, **changes) -> int | None:
        recipe = validate_recipe(_recipe(**changes))
        return shared_cache.source_stage(model, recipe, 0, distributed)

    head = {"epochs": 2, "train": "head", "augment": {"crop_padding": 0, "flip": True}}
    blocks = {"epochs": 5, "train": ["block3", "head"]}
    assert source() == 1
    assert source(distributed=True) is None  # each rank would repeat the middle pass
    assert source(feature_cache=False) is None
    assert source(stages=[head]) is None  # no next stage
    assert source(stages=[head, {**blocks, "input_size": 12}]) is None  # another size
    assert source(stages=[blocks, head]) is None  # the next prefix is longer
    assert source(stages=[head, {**blocks, "train": "all"}]) is None  # nothing cached
    crops = {**head, "augment": {"crop_padding": 2, "flip": True, "cache_views": 2}}
    assert source(stages=[crops, blocks]) is None  # its crops are not the next stage's
    no_flip = {**blocks, "augment": {"crop_padding": 2, "flip": False, "cache_views": 3}}
    assert source(stages=[head, no_flip]) is None  # the next stage holds no mirror
    plain = {**head, "augment": {"crop_padding": 0, "flip": False}}
    assert source(stages=[plain, no_flip]) == 1  # one view: the image itself


def test_a_time_budget_prices_the_derived_cache_as_its_middle_pass(
    tmp_path: Path, monkeypatch
) -> None:
    from imgclf.data.loader import BatchLoader
    from imgclf.models import create
    from imgclf.runtime.device import resolve_hardware
    from imgclf.train import budget, prefix_pass

    ds = import_tiny(tmp_path)
    recipe = validate_recipe(_recipe())
    model = create("complex", num_classes=3, input_size=16)
    tr, va = ds.indices("train"), ds.indices("val")
    loaders = [BatchLoader(ds.images[i], ds.labels[i], batch_size=8, size=16) for i in (tr, va)]
    chosen: list[tuple[int, int]] = []

    def choose(prefix, sample, passes, dtype, say):
        chosen.append((sample.shape[1], passes))  # channels in: images 3, block3's more
        return prefix_pass.PrefixPass(lambda x: x, 8, "ONNX Runtime", 0.25)

    monkeypatch.setattr(prefix_pass, "choose", choose)
    hw = resolve_hardware("cpu", "fp32", "off")
    costs = [budget.StageCost(1.0, 0.0, 99.0, 0.0, 0.0) for _ in recipe.stages]
    job = budget.PlanInputs(model, recipe, *loaders, hw, False)
    priced = shared_cache.priced(job, costs)
    passes = 2 * len(tr) + len(va)  # the image and its mirror, the validation images
    assert chosen == [
        (model.split_at("block3")[0](loaders[0].batch(torch.arange(1))).shape[1], passes)
    ]
    assert chosen[0][0] != 3 and priced[0].setup == pytest.approx(0.25 * passes)
    assert priced[1] == costs[1]  # the next stage's own pass stays priced as it was
    distributed = budget.PlanInputs(model, recipe, *loaders, hw, False, distributed=True)
    assert shared_cache.priced(distributed, costs) == costs
