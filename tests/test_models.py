"""Model registry and from-scratch models: shapes, groups, rebuilds, whitening.

Small batches and sizes throughout: the whole file runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imgclf.errors import UnknownModel
from imgclf.models import Classifier, create, list_models, model_spec, register

NAMES = [spec.name for spec in list_models()]
NUM_CLASSES = 7  # odd, and not 10, so nothing can be hard-coded for CIFAR-10
# 48 px: a multiple of every scratch net's pooling factor (4, 8, 16) that is not a power of
# two, so a flatten size hard-coded for 32 or 64 px would fail.
OTHER_SIZE = 48


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _batch(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


def test_builtin_models_registered() -> None:
    assert {"simple", "complex", "medium", "fast"} <= set(NAMES)
    assert sorted(NAMES) == NAMES
    assert model_spec("medium").input_size == 64
    assert {model_spec(n).kind for n in ("simple", "complex", "medium", "fast")} == {"scratch"}


@pytest.mark.parametrize("name", NAMES)
def test_interface(name: str) -> None:
    spec = model_spec(name)
    model = create(name, NUM_CLASSES)
    assert isinstance(model, Classifier)
    assert model.name == name
    assert model.num_classes == NUM_CLASSES
    assert model.input_size == spec.input_size
    assert model.model_args["num_classes"] == NUM_CLASSES
    assert model.model_args["input_size"] == spec.input_size
    assert model.head_group in model.param_groups()
    for stats in (model.mean, model.std):
        assert len(stats) == 3
        assert all(0 < v < 1 for v in stats)


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_at_two_sizes(name: str) -> None:
    for size in (model_spec(name).input_size, OTHER_SIZE):
        model = create(name, NUM_CLASSES, input_size=size).eval()
        with torch.no_grad():
            assert model(_batch(size)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_cover_every_parameter_once(name: str) -> None:
    model = create(name, NUM_CLASSES)
    groups = model.param_groups()
    grouped = [p for names in groups.values() for p in names]
    all_names = [n for n, _ in model.named_parameters()]
    assert sorted(grouped) == sorted(all_names)
    assert len(grouped) == len(set(grouped))
    assert all(groups.values()), "empty group"
    assert list(groups)[-1] == model.head_group
    assert grouped == all_names, "groups not in network order"


@pytest.mark.parametrize("name", NAMES)
def test_rebuild_from_model_args_loads_strict(name: str) -> None:
    model = create(name, NUM_CLASSES, input_size=OTHER_SIZE)
    rebuilt = create(name, **model.model_args)
    assert rebuilt.model_args == model.model_args
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = _batch(OTHER_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_size_raises(name: str) -> None:
    with pytest.raises(ValueError, match="input_size"):
        create(name, NUM_CLASSES, input_size=model_spec(name).input_size + 1)


@pytest.mark.parametrize("name", NAMES)
def test_train_step_channels_last(name: str) -> None:
    size = model_spec(name).input_size
    model = create(name, NUM_CLASSES).to(memory_format=torch.channels_last).train()
    x = _batch(size, n=4).contiguous(memory_format=torch.channels_last)
    loss = F.cross_entropy(model(x), torch.arange(4) % NUM_CLASSES)
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n


def test_medium_has_the_study_layer_sizes() -> None:
    model = create("medium", 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 64, (3, 3), (1, 1)),
        (64, 128, (3, 3), (1, 1)),
        (128, 256, (3, 3), (1, 1)),
        (256, 512, (3, 3), (1, 1)),
    ]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in linears] == [
        (8192, 1024),
        (1024, 512),
        (512, 10),
    ]
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.5, 0.5]
    assert create("medium", 10, input_size=96).fc[0].in_features == 512 * 6 * 6


def test_medium_rejects_other_input_resolution() -> None:
    with pytest.raises(ValueError, match="built for 64"):
        create("medium", 3).eval()(_batch(32))


def test_input_size_not_multiple_of_pooling_factor() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        create("medium", 3, input_size=40)  # a multiple of 8, not of 16
    with pytest.raises(ValueError, match="at least 16"):
        create("fast", 3, input_size=8)


def test_unknown_model_suggests_close_name() -> None:
    with pytest.raises(UnknownModel, match=r"did you mean 'simple'\? choose one of: .*medium"):
        create("simpel", 3)
    with pytest.raises(UnknownModel, match="did you mean 'medium'"):
        model_spec("Medium")
    with pytest.raises(UnknownModel) as info:
        create("resnet9000", 3)
    assert "did you mean" not in str(info.value)


def test_registering_a_name_twice_fails() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register("simple", description="dup", input_size=32)(lambda **kw: None)
    assert model_spec("simple").description != "dup"


def test_bad_num_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create("simple", 0)


def test_fast_frozen_parameters() -> None:
    model = create("fast", NUM_CLASSES)
    frozen = model.frozen_parameter_names()
    assert "stem.conv.weight" in frozen
    assert "block1.norm1.weight" in frozen
    params = dict(model.named_parameters())
    assert frozen <= params.keys()
    assert {n for n, p in params.items() if not p.requires_grad} == frozen
    assert params["stem.conv.bias"].requires_grad
    trainable_bn = create("fast", NUM_CLASSES, bn_weight_trainable=True)
    assert trainable_bn.frozen_parameter_names() == {"stem.conv.weight"}
    wide = create("fast", NUM_CLASSES, widths=[32, 64, 128])
    assert wide.model_args["widths"] == (32, 64, 128)
    assert wide.head.in_features == 128


def _correlated_images(n: int = 64, size: int = 16) -> torch.Tensor:
    """Smooth, channel-correlated images: neighbouring pixels and channels of a 2×2 patch
    are strongly correlated, like natural images, plus a little independent noise."""
    base = F.avg_pool2d(torch.randn(n, 1, size + 2, size + 2), 3, stride=1)
    colour = torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)
    return base * colour + 0.1 * torch.randn(n, 3, size, size)


def _stem_covariance(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.stem.conv(images)[:, :12]  # the +v half; the other 12 are its negation
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    return torch.cov(flat.T)


def test_fast_init_whitening_decorrelates_stem_output() -> None:
    model = create("fast", NUM_CLASSES)
    images = _correlated_images()
    eye = torch.eye(12, dtype=torch.float64)
    # The test only means something if the random stem is far from whitening this data:
    # its outputs are strongly correlated (not just badly scaled).
    before = _stem_covariance(model, images)
    std = before.diag().sqrt()
    assert (before / std[:, None] / std[None, :] - eye).abs().max() > 0.5
    model.init_whitening(images)
    covariance = _stem_covariance(model, images)
    # Identity up to the eps floor: variance λ/(λ+eps) ≥ 0.9 for this data's smallest λ.
    torch.testing.assert_close(covariance, eye, atol=0.1, rtol=0)
    weight = model.stem.conv.weight
    torch.testing.assert_close(weight[12:], -weight[:12])
    assert not weight.requires_grad
    with torch.no_grad():
        assert model.eval()(images).shape == (64, NUM_CLASSES)
