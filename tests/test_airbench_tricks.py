"""The training tricks of the `fast` recipe (airbench94, arXiv 2404.00498): alternating
flips, Lookahead, freezing a group part-way through a stage, the schedule's end value."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from helpers_train import (
    assert_same_run,
    assert_same_weights,
    interrupt_then_resume,
    make_image_folder,
    tiny_recipe,
)
from imgclf.data.importer import import_dataset
from imgclf.data.loader import Augment, BatchLoader, alternate_flips
from imgclf.errors import RecipeError
from imgclf.train.api import train
from imgclf.train.lookahead import Lookahead
from imgclf.train.optim import lr_factor
from imgclf.train.recipe import LookaheadConfig, load_recipe, validate
from imgclf.train.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    folder = make_image_folder(root / "src")
    return import_dataset(folder, "tiny", dest=root / "tiny", warn=lambda msg: None)


# ---------------------------------------------------------------- alternating flips


def flipped_per_sample(loader: BatchLoader, epoch: int, images: np.ndarray) -> dict[int, bool]:
    """Sample id (its label) → whether the epoch showed it mirrored."""
    loader.set_epoch(epoch)
    seen = {}
    for x, y in loader:
        for img, label in zip(x, y.tolist(), strict=True):
            raw = (img.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255
            original = images[label].astype(np.float32)
            if np.allclose(raw, original, atol=0.5):
                seen[label] = False
            else:
                assert np.allclose(raw, original[:, ::-1], atol=0.5)
                seen[label] = True
    return seen


def test_alternate_flips_show_every_image_both_ways_in_two_epochs() -> None:
    n = 64
    images = np.random.default_rng(0).integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
    loader = BatchLoader(
        images, np.arange(n), batch_size=10, shuffle=True, augment=Augment(flip="alternate"), seed=3
    )
    epochs = [flipped_per_sample(loader, e, images) for e in (1, 2, 3)]
    assert all(len(e) == n for e in epochs)
    for a, b in itertools.pairwise(epochs):
        assert all(a[i] != b[i] for i in range(n))  # mirrored in exactly one of two epochs
    assert 0.3 < sum(epochs[0].values()) / n < 0.7  # a random half, not all or none
    # Fixed by the seed: the same half again two epochs later, another half for another seed.
    assert epochs[0] == epochs[2]
    assert not torch.equal(alternate_flips(n, 3, 1), alternate_flips(n, 4, 1))


def test_alternate_flips_replay_on_resume_from_mid_epoch() -> None:
    n = 40
    images = np.random.default_rng(1).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    loader = BatchLoader(
        images,
        np.arange(n),
        batch_size=8,
        shuffle=True,
        augment=Augment(crop_padding=2, flip="alternate"),
        seed=0,
    )
    loader.set_epoch(2)
    full = [x for x, _ in loader]
    later = [x for x, _ in loader.iter_from(3)]
    assert all(torch.equal(a, b) for a, b in zip(full[3:], later, strict=True))


def test_recipe_accepts_alternate_and_rejects_other_words() -> None:
    assert validate({"model": "fast", "augment": {"flip": "alternate"}}).augment.flip == "alternate"
    assert validate({"model": "fast", "augment": {"flip": True}}).augment.flip is True
    with pytest.raises(Exception, match="flip"):
        validate({"model": "fast", "augment": {"flip": "sometimes"}})


# ---------------------------------------------------------------- Lookahead


def test_lookahead_blends_every_k_steps_and_ends_on_the_slow_weights() -> None:
    net = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(net.weight)
    la = Lookahead(net, LookaheadConfig(every=2, decay=0.5, power=1.0))
    assert la.decay_at(0, 10) == 0.0 and la.decay_at(10, 10) == pytest.approx(0.25)
    with torch.no_grad():
        net.weight.fill_(4.0)
    la.after_step(net, 1, 10)  # not a multiple of `every`: nothing happens
    assert net.weight.eq(4.0).all()
    la.after_step(net, 4, 10)  # decay 0.25 × 0.4 = 0.1: slow = 0 + 0.9 × (4 − 0)
    assert net.weight.detach().allclose(torch.tensor(3.6))
    assert la.slow["weight"].allclose(torch.tensor(3.6))
    with torch.no_grad():
        net.weight.fill_(10.0)
    la.finish(net)  # back to the slow weights
    assert net.weight.detach().allclose(torch.tensor(3.6))


def test_lookahead_averages_batchnorm_statistics_but_not_counters() -> None:
    net = nn.BatchNorm1d(3)
    la = Lookahead(net, LookaheadConfig())
    assert "running_mean" in la.slow and "num_batches_tracked" not in la.slow


def lookahead_recipe(epochs: int = 3) -> dict:
    return tiny_recipe(epochs=epochs, lookahead={"every": 2, "decay": 0.9, "power": 1.0})


def test_lookahead_changes_training_and_resumes_exactly(tiny_ds, tmp_path) -> None:
    recipe = load_recipe(lookahead_recipe())
    reference = train(recipe, tiny_ds, out=tmp_path / "ref", threads=1, progress=False)
    plain = train(tiny_recipe(epochs=3), tiny_ds, out=tmp_path / "plain", threads=1, progress=False)
    with pytest.raises(AssertionError):
        assert_same_weights(reference.path / "last.pt", plain.path / "last.pt")
    # Interrupted mid-epoch: the checkpoint carries the slow weights, the resume matches.
    state = interrupt_then_resume(recipe, tiny_ds, tmp_path / "run")
    assert state["lookahead_state"] and state["position"]["batch"] == 3
    assert_same_run(tmp_path / "run", reference.path)


# ---------------------------------------------------------------- freezing part-way


def test_freeze_after_stops_a_group_at_its_share_of_the_stage(tiny_ds, tmp_path) -> None:
    recipe = load_recipe(
        tiny_recipe(
            model="fast",
            input_size=16,
            batch_size=9,
            optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
            stages=[{"epochs": 3, "train": "all", "freeze_after": {"stem": 0.5}}],
        )
    )
    trainer = Trainer(recipe, tiny_ds, tmp_path / "run", threads=1, progress=False)
    snapshots = []
    validate = trainer._validate

    def snapshot():
        m = trainer.model
        snapshots.append((m.stem.conv.bias.detach().clone(), m.head.weight.detach().clone()))
        return validate()

    trainer._validate = snapshot
    start = trainer.model.stem.conv.bias.detach().clone()
    trainer.run()
    (b1, _), (b2, h2), (b3, h3) = snapshots
    # Checked at epoch starts: 0 and 1/3 of the steps are before the share, 2/3 after.
    assert not torch.equal(b1, start)
    assert not torch.equal(b2, b1)
    assert torch.equal(b3, b2)  # frozen from epoch 3 on, weight decay included
    assert not torch.equal(h3, h2)  # the rest still trains


def test_freeze_after_names_real_groups_and_shares() -> None:
    with pytest.raises(Exception, match="freeze_after"):
        validate({"model": "fast", "stages": [{"freeze_after": {"stem": 3}}]})


def test_bias_lr_groups_must_name_the_models_groups(tiny_ds, tmp_path) -> None:
    recipe = load_recipe(
        tiny_recipe(model="fast", input_size=16, optimizer={"bias_lr_groups": ["stme"]})
    )
    with pytest.raises(RecipeError, match="bias_lr_groups names unknown group") as excinfo:
        Trainer(recipe, tiny_ds, tmp_path / "run", threads=1, progress=False)
    assert "['stme']" in str(excinfo.value) and "stem, block1" in str(excinfo.value)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- schedule


def test_onecycle_ends_at_its_end_factor() -> None:
    cfg = validate(
        {
            "model": "fast",
            "scheduler": {
                "name": "onecycle",
                "pct_start": 0.23,
                "min_lr_factor": 0.2,
                "end_lr_factor": 0.07,
            },
        }
    ).scheduler
    assert lr_factor(cfg, 0, 10, 100) == pytest.approx(0.2)
    assert lr_factor(cfg, 23, 10, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 100, 10, 100) == pytest.approx(0.07)
