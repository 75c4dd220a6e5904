"""Muon (imgclf.train.muon): the orthogonalized step for filter banks, PyTorch's SGD step
for the rest, and how a recipe's ``optimizer: {name: muon}`` splits a model."""

from __future__ import annotations

import copy as copy_module
import math

import pytest
import torch

from helpers_train import (
    assert_same_run,
    assert_same_weights,
    interrupt_then_resume,
    make_image_folder,
    tiny_recipe,
)
from imgclf.data.importer import import_dataset
from imgclf.errors import RecipeError
from imgclf.models import create
from imgclf.train.api import train
from imgclf.train.muon import Muon, orthogonalize
from imgclf.train.optim import build_optimizer, muon_step
from imgclf.train.recipe import load_recipe, validate


@pytest.mark.parametrize("shape", [(64, 24, 3, 3), (256, 64, 3, 3), (300, 20), (20, 300)])
def test_orthogonalize_brings_every_singular_value_near_one(shape) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g[0] *= 100  # one dominant direction: plain momentum SGD would move mostly along it
    out = orthogonalize(g, steps=5)
    assert out.shape == g.shape and out.dtype == g.dtype
    singular = torch.linalg.svdvals(out.reshape(len(out), -1))
    assert singular.min() > 0.6 and singular.max() < 1.25
    assert torch.linalg.svdvals(g.reshape(len(g), -1)).max() > 50  # the input was not


def _tensors(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 4, 3, 3, generator=gen), torch.randn(8, generator=gen)]


def test_sgd_groups_take_exactly_torch_sgds_step() -> None:
    ours = [p.clone().requires_grad_() for p in _tensors(0)]
    ref = [p.clone().requires_grad_() for p in _tensors(0)]
    kwargs = dict(lr=0.3, momentum=0.85, nesterov=True, weight_decay=0.01)
    opt = Muon([{"params": ours}], **kwargs)
    torch_opt = torch.optim.SGD([{"params": ref}], **kwargs)
    for step in range(4):
        grads = _tensors(100 + step)
        for params, o in ((ours, opt), (ref, torch_opt)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            o.step()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_muon_group_pins_the_norm_then_steps_along_the_orthogonalized_momentum() -> None:
    w0 = _tensors(0)[0] * 3
    w = w0.clone().requires_grad_()
    opt = Muon([{"params": [w], "muon": True}], lr=0.2, momentum=0.6, ns_steps=3)
    grads = [_tensors(1)[0], _tensors(2)[0]]
    w.grad = grads[0].clone()
    opt.step()
    pinned = w0 * math.sqrt(8) / w0.norm()
    expected = pinned - 0.2 * orthogonalize(grads[0] * 1.6, 3)  # nesterov: g + 0.6·buf, buf = g
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-5)
    w.grad = grads[1].clone()
    opt.step()
    buf = 0.6 * grads[0] + grads[1]
    pinned = expected * math.sqrt(8) / expected.norm()
    expected = pinned - 0.2 * orthogonalize(grads[1] + 0.6 * buf, 3)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-5)
    # The update's scale does not follow the gradient's: a 1000× gradient, the same step.
    v = w0.clone().requires_grad_()
    big = Muon([{"params": [v], "muon": True}], lr=0.2, momentum=0.6, ns_steps=3)
    v.grad = grads[0] * 1000
    big.step()
    pinned = w0 * math.sqrt(8) / w0.norm()
    torch.testing.assert_close(v.detach(), pinned - 0.2 * orthogonalize(grads[0] * 1.6, 3))


def test_muon_state_round_trips_through_a_state_dict() -> None:
    def make():
        w = _tensors(0)[0].requires_grad_()
        b = _tensors(0)[1].requires_grad_()
        opt = Muon([{"params": [w], "muon": True}, {"params": [b]}], lr=0.1, momentum=0.8)
        return [w, b], opt

    (params, opt) = make()
    for step in range(2):
        for p, g in zip(params, _tensors(10 + step), strict=True):
            p.grad = g
        opt.step()
    (copy, opt2) = make()
    with torch.no_grad():
        for c, p in zip(copy, params, strict=True):
            c.copy_(p)
    opt2.load_state_dict(copy_module.deepcopy(opt.state_dict()))  # as through torch.save
    for o, ps in ((opt, params), (opt2, copy)):
        for p, g in zip(ps, _tensors(20), strict=True):
            p.grad = g.clone()
        o.step()
    for a, b in zip(params, copy, strict=True):
        assert torch.equal(a, b)


def test_a_muon_recipe_sends_filter_banks_to_muon_and_the_rest_to_sgd() -> None:
    recipe = validate(
        {
            "model": "fast",
            "optimizer": {
                "name": "muon",
                "lr": 1.6,
                "momentum": 0.85,
                "nesterov": True,
                "weight_decay": 2e-3,
                "bias_lr_mult": 64.0,
                "bias_lr_mult_decay": False,
                "muon_lr": 0.24,
                "muon_momentum": 0.6,
            },
            "stages": [{"train": "all"}],
        }
    )
    model = create("fast", num_classes=10)
    # The small-data rule scales SGD rates (×0.5 here) but not Muon's normalized step.
    opt = build_optimizer(model, recipe, recipe.stages[0], lr_scale=0.5)
    assert isinstance(opt, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    where = {names[id(p)]: g for g in opt.param_groups for p in g["params"]}
    convs = {n for n, p in model.named_parameters() if p.ndim == 4 and p.requires_grad}
    assert len(convs) == 6 and "stem.conv.weight" not in where  # frozen whitening weight
    for name, group in where.items():
        if name in convs:
            assert group["muon"] and group["lr"] == pytest.approx(0.24)
            assert group["momentum"] == 0.6 and group["weight_decay"] == 0
        else:
            assert not group["muon"] and group["momentum"] == 0.85
    assert where["head.weight"]["lr"] == pytest.approx(0.8)
    assert where["head.weight"]["weight_decay"] == pytest.approx(2e-3)
    assert where["block1.norm1.bias"]["lr"] == pytest.approx(0.8 * 64)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8)  # metrics.csv logs group 0


def test_muon_settings_are_validated() -> None:
    with pytest.raises(RecipeError, match="muon_momentum"):
        load_recipe("fast", ["optimizer.name=muon", "optimizer.muon_momentum=1.5"])
    with pytest.raises(RecipeError, match=r"optimizer\.name"):
        load_recipe("fast", ["optimizer.name=lion"])
    with pytest.raises(ValueError, match="2 or more dimensions"):
        Muon([{"params": [torch.zeros(3, requires_grad=True)], "muon": True}], lr=0.1)


def test_fast_keeps_airbench94_muons_rates_per_example_at_its_own_batch() -> None:
    # fast.yaml runs another batch than airbench94_muon (2,000): its SGD rates follow the
    # batch linearly (head 1.65 per 2,000 images, decay 2e-6 of a weight per example), and
    # Muon's normalized step its square root (docs/results.md, "Batch size on a CPU").
    r = load_recipe("fast")
    opt = r.optimizer
    assert opt.name == "muon"
    assert opt.lr / r.batch_size == pytest.approx(1.65 / 2000, rel=0.01)
    assert opt.lr * opt.weight_decay / r.batch_size == pytest.approx(2e-6, rel=0.01)
    assert opt.bias_lr_mult == 64 and not opt.bias_lr_mult_decay
    assert opt.muon_lr == pytest.approx(0.24 * math.sqrt(r.batch_size / 2000), rel=0.01)
    assert (opt.muon_momentum, opt.muon_ns_steps) == (0.6, 3)


def test_muons_step_grows_as_the_square_root_of_a_shorter_run_up_to_its_cap() -> None:
    opt = load_recipe("fast").optimizer
    assert (opt.muon_lr, opt.muon_lr_steps, opt.muon_lr_max) == (0.12, 360, 0.24)
    # 4 epochs of 45,000 images at 500 and anything longer (fast's 10 epochs: 900): as tuned
    assert muon_step(opt, 360) == muon_step(opt, 900) == muon_step(opt, None) == 0.12
    assert muon_step(opt, 180) == pytest.approx(0.12 * math.sqrt(2))  # 2 epochs
    assert muon_step(opt, 200) == pytest.approx(0.12 * math.sqrt(1.8))  # clothing, 10 epochs
    # the clothing photos at 4 epochs (80 steps) and shorter: airbench94_muon's 0.24
    assert muon_step(opt, 80) == muon_step(opt, 1) == 0.24
    uncapped = opt.model_copy(update={"muon_lr_max": None})
    assert muon_step(uncapped, 40) == pytest.approx(0.36)
    fixed = opt.model_copy(update={"muon_lr_steps": None})
    assert muon_step(fixed, 10) == 0.12


def test_a_short_stage_gives_its_filter_banks_the_raised_step_and_the_rest_their_own() -> None:
    recipe = load_recipe("fast")
    model = create("fast", num_classes=10)
    rates = {}
    for steps in (80, 900):
        opt = build_optimizer(model, recipe, recipe.stages[0], lr_scale=0.5, steps=steps)
        rates[steps] = {(g["muon"], g["lr"]) for g in opt.param_groups}
    assert {lr for muon, lr in rates[80] if muon} == {0.24}
    assert {lr for muon, lr in rates[900] if muon} == {0.12}
    # the SGD groups follow the batch rule only, whatever the length
    assert {x for x in rates[80] if not x[0]} == {x for x in rates[900] if not x[0]}


def test_a_cap_below_muons_step_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match=r"muon_lr_max \(0.05\) is below muon_lr \(0.12\)"):
        load_recipe("fast", ["optimizer.muon_lr_max=0.05"])
    with pytest.raises(RecipeError, match="muon_lr_steps"):
        load_recipe("fast", ["optimizer.muon_lr_steps=0"])


def test_a_muon_run_trains_and_resumes_exactly_after_an_interrupt(tmp_path) -> None:
    folder = make_image_folder(tmp_path / "src")
    ds = import_dataset(folder, "tiny", dest=tmp_path / "tiny", warn=lambda msg: None)
    # A few dozen steps against the 1,000 muon_lr is for: the short-run rule raises the
    # step to its cap, and a resumed stage must keep it.
    optimizer = {"name": "muon", "lr": 0.05, "momentum": 0.9, "nesterov": True,
                 "muon_lr": 0.05, "muon_ns_steps": 3, "muon_lr_steps": 1000,
                 "muon_lr_max": 0.2}  # fmt: skip
    recipe = load_recipe(tiny_recipe(epochs=3, optimizer=optimizer))
    reference = train(recipe, ds, out=tmp_path / "ref", threads=1, progress=False)
    sgd = train(tiny_recipe(epochs=3), ds, out=tmp_path / "sgd", threads=1, progress=False)
    with pytest.raises(AssertionError):
        assert_same_weights(reference.path / "last.pt", sgd.path / "last.pt")
    state = interrupt_then_resume(recipe, ds, tmp_path / "run")
    groups = state["optimizer_state"]["param_groups"]
    assert any(g["muon"] for g in groups) and not all(g["muon"] for g in groups)
    assert {g["initial_lr"] for g in groups if g["muon"]} == {0.2}
    assert_same_run(tmp_path / "run", reference.path)
