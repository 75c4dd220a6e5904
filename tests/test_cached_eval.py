"""The final evaluation from the last stage's cached validation activations (issue #30,
small sets): taken where they are the network's own (eager fp32 at the validation
loader's batches, the prefix's weights unchanged in best.pt), with the full forward's
logits bit for bit; refused otherwise."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import imgclf
from helpers_train import import_tiny, tiny_recipe, write_recipe
from imgclf.cli import main
from imgclf.evaluate.metrics import infer
from imgclf.runtime.device import Hardware
from imgclf.train import finish
from imgclf.train.cached_eval import CachedVal, final_network
from imgclf.train.recipe import validate
from imgclf.train.trainer import Trainer

# The last (only) stage trains block3 and the head at 12 px on cached activations of
# block1-2, and validates at the model's 16 px (FixRes): eager fp32 activations.
FIXRES = [{"epochs": 2, "train": ["block3", "head"], "input_size": 12}]


def _recipe(**changes) -> dict:
    recipe = tiny_recipe(
        model="complex",
        augment={"crop_padding": 0, "flip": True},
        stages=FIXRES,
        eval_batch_size=7,  # batches that do not divide the split: the last one is short
    )
    recipe.update(changes)
    return recipe


def _spy(monkeypatch) -> list[torch.nn.Module]:
    """The networks the end of a run evaluates, in order."""
    nets: list[torch.nn.Module] = []

    def spying(net, batches, **kwargs):
        nets.append(net)
        return infer(net, batches, **kwargs)

    monkeypatch.setattr(finish, "infer", spying)
    return nets


def test_a_run_evaluates_from_the_cached_activations_with_the_full_forwards_scores(
    tmp_path, monkeypatch
):
    ds = import_tiny(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", _recipe())
    nets = _spy(monkeypatch)
    out = tmp_path / "run"
    argv = ["train", str(recipe), "--data", "tiny", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert len(nets) == 1 and nets[0].__class__.__name__ == "Sequential"  # the suffix only
    summary = json.loads((out / "summary.json").read_text())
    # The whole network, from the images, on best.pt: the scores the run wrote.
    full = imgclf.evaluate(imgclf.train.Run(out, summary), ds, split="val")
    assert summary["val_accuracy"] == round(full.accuracy, 6)
    assert summary["val_loss"] == round(full.loss, 6)
    assert summary["val_ece"] == round(full.calibration.ece, 6)


def test_the_cached_logits_are_the_full_forwards_bit_for_bit(tmp_path):
    ds = import_tiny(tmp_path)
    trainer = Trainer(validate(_recipe()), ds, tmp_path / "run", threads=1, progress=False)
    trainer.run()  # best.pt loaded by the end of the run
    cached = trainer.cached_val
    assert cached is not None and cached.features.dtype == torch.float32
    val = trainer.val_loader
    got, got_labels = infer(cached.suffix, cached.batches(val.batch_size))
    want, want_labels = infer(trainer.model, val)
    assert torch.equal(got, want) and torch.equal(got_labels, want_labels)
    assert len(got) == val.num_samples and val.num_samples % val.batch_size  # a short batch


def test_the_cached_activations_are_refused_where_they_are_not_provably_the_networks(tmp_path):
    ds = import_tiny(tmp_path)
    trainer = Trainer(validate(_recipe()), ds, tmp_path / "run", threads=1, progress=False)
    trainer.run()
    cached, model, hw = trainer.cached_val, trainer.model, trainer.hw
    recipe = trainer.recipe
    assert cached is not None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert final_network(cached, model, state, recipe, hw) is cached
    assert final_network(cached, model, None, recipe, hw) is cached  # no best.pt: these
    # best.pt's prefix differs from the one the activations came from (a weight by one
    # ulp, or a BatchNorm statistic): the whole network runs.
    for name in ("block1.0.weight", "block2.2.running_mean"):
        changed = dict(state)
        changed[name] = torch.nextafter(state[name], torch.tensor(float("inf")))
        assert final_network(cached, model, changed, recipe, hw) is None, name
    changed = dict(state)
    changed["head.weight"] = state["head.weight"] + 1  # the suffix may differ: it runs
    assert final_network(cached, model, changed, recipe, hw) is cached
    tta = recipe.model_copy(update={"tta": True})
    assert final_network(cached, model, state, tta, hw) is None
    bf16 = dataclasses.replace(hw, autocast_dtype=torch.bfloat16)
    assert final_network(cached, model, state, recipe, bf16) is None
    half = dataclasses.replace(cached, features=cached.features.half())
    assert final_network(half, model, state, recipe, hw) is None
    gpu = Hardware(torch.device("cuda"), None, False, True)
    assert final_network(cached, model, state, recipe, gpu) is None


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"stages": [{"epochs": 2, "train": ["block3", "head"]}]}, "no FixRes: engine's batch"),
        ({"feature_cache_dtype": "fp16"}, "kept in fp16"),
        ({"stages": [{"epochs": 2, "train": "all", "input_size": 12}]}, "no cache"),
    ],
)
def test_a_cache_whose_validation_pass_is_not_the_loaders_is_not_used(
    tmp_path, monkeypatch, changes, why
):
    """Activations computed at another batch size than the validation loader's, or kept
    in fp16, or none at all: the end of the run evaluates the whole network."""
    ds = import_tiny(tmp_path)
    recipe = _recipe(**changes)
    nets = _spy(monkeypatch)
    trainer = Trainer(validate(recipe), ds, tmp_path / "run", threads=1, progress=False)
    trainer.run()
    assert trainer.cached_val is None, why
    assert nets == [trainer.model], why


def test_cached_val_batches_follow_the_loaders_order_and_sizes():
    features = torch.arange(10.0).view(10, 1)
    cached = CachedVal(torch.nn.Identity(), torch.nn.Identity(), features, torch.arange(10))
    sizes = [(len(x), y.tolist()) for x, y in cached.batches(4)]
    assert sizes == [(4, [0, 1, 2, 3]), (4, [4, 5, 6, 7]), (2, [8, 9])]
