"""``timm/<name>``: any timm model as an imgclf Classifier: groups, splits, weights files in
timm's checkpoint layouts, the offline error, and a run trained and predicted end to end.

Offline throughout: an autouse fixture makes every Hugging Face hub and URL download fail
the way it fails without a network (never touching it), so models build with
``pretrained: false`` or from a weights file this file writes itself. The models are
timm's ``test_*`` architectures (under 0.5 M parameters; lcnet_050 and regnetx_002 stand
in for MobileNetV3 and RegNet at 1.9 M and 2.7 M) at 32 px: seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import csv
import socket
from pathlib import Path

import pytest
import timm
import torch
import yaml
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn

from helpers_train import import_tiny, make_image_folder, tiny_recipe, write_recipe
from imgclf.cli import main
from imgclf.errors import CheckpointError, UnknownModel, WeightsMissing
from imgclf.models import build_model_from_checkpoint, create, model_spec, weights
from imgclf.runtime.checkpoint import load_checkpoint
from imgclf.train.stages import set_trainable, split_at_first_trained

NUM_CLASSES = 5
SIZE = 32
# What huggingface_hub raises when it can neither reach the hub nor find the file cached.
OFFLINE = (
    "An error happened while trying to locate the file on the Hub and we cannot find the "
    "requested files in the local cache. Please check your connection and try again."
)

# Families with a split (sequence()): model → its groups, in order.
STAGES4 = ["stage1", "stage2", "stage3", "stage4"]
SPLIT = {
    "test_resnet": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
    "test_efficientnet": ["stem", *(f"blocks{i}" for i in range(1, 6)), "top", "head"],
    "lcnet_050": ["stem", *(f"blocks{i}" for i in range(1, 7)), "top", "head"],
    "test_convnext": ["stem", *STAGES4, "top", "head"],
    "test_byobnet": ["stem", *STAGES4, "head"],
    "test_nfnet": ["stem", *STAGES4, "top", "head"],
    "regnetx_002": ["stem", "s1", "s2", "s3", "s4", "head"],
    "test_maxvit": ["stem", *STAGES4, "top", "head"],
}
# Families without one: groups all the same, and the feature cache is not used.
NO_SPLIT = {
    "test_vit": ["stem", *(f"blocks{i}" for i in range(1, 7)), "top", "head"],
    "test_mambaout": ["stem", *STAGES4, "top", "head"],
}


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """No network: the hub download raises what huggingface_hub raises offline, a URL
    download what urllib does; returns the socket timeouts the hub calls saw."""
    import timm.models._hub as hub

    timeouts: list[float | None] = []

    def no_hub(*args, **kwargs):
        timeouts.append(socket.getdefaulttimeout())
        raise LocalEntryNotFoundError(OFFLINE)

    def no_url(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return timeouts


_BUILT: dict[str, nn.Module] = {}


def _model(name: str) -> nn.Module:
    """A fresh copy of ``timm/<name>`` at 32 px (built once per session)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = create(f"timm/{name}", NUM_CLASSES, input_size=SIZE)
    return copy.deepcopy(_BUILT[name])


def _batch(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- groups and splits


@pytest.mark.parametrize("name", [*SPLIT, *NO_SPLIT])
def test_groups_cover_every_parameter_once_head_last(name: str) -> None:
    model = _model(name)
    groups = model.param_groups()
    assert list(groups) == {**SPLIT, **NO_SPLIT}[name]
    names = [p for params in groups.values() for p in params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    head = [n for n, _ in model.named_parameters() if n.startswith(f"net.{model.head_path}.")]
    assert groups["head"] == head
    with torch.no_grad():
        assert model.eval()(_batch()).shape == (2, NUM_CLASSES)
    assert model.model_args == {
        "num_classes": NUM_CLASSES,
        "input_size": SIZE,
        "pretrained": False,
        "weights": None,
        "head": {"type": "linear", "dropout": 0.0},
    }


@pytest.mark.parametrize("name", list(SPLIT))
def test_split_at_every_group_reproduces_forward(name: str) -> None:
    model = _model(name).eval()
    assert [g for g, _ in model.sequence() if g] == list(model.param_groups())
    x = _batch()
    with torch.no_grad():
        full = model(x)
        for group in model.param_groups():
            prefix, suffix = model.split_at(group)
            torch.testing.assert_close(suffix(prefix(x)), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(NO_SPLIT))
def test_no_split_falls_back_to_the_uncached_path(name: str) -> None:
    model = _model(name)
    with pytest.raises(NotImplementedError, match="no split"):
        model.sequence()
    assert split_at_first_trained(model, ["head"]) is None


def test_head_stage_trains_only_the_new_head() -> None:
    model = _model("test_convnext")
    set_trainable(model, ["head"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"net.head.fc.weight", "net.head.fc.bias"}  # not the head's norm
    assert not model.net.head.fc.weight.any()  # zero-initialised (backbones.build_head)


def test_mlp_head_dropout_and_mean_std_from_the_pretrained_cfg() -> None:
    model = create("timm/test_resnet", 3, input_size=SIZE, head={"type": "mlp", "hidden": 8})
    assert isinstance(model.net.fc, nn.Sequential) and model.net.fc[-1].out_features == 3
    assert (model.mean, model.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # test_resnet's cfg
    resnet10t = create("timm/resnet10t", 3, input_size=SIZE)
    assert resnet10t.mean == timm.data.IMAGENET_DEFAULT_MEAN
    dropped = create("timm/test_resnet", 3, input_size=SIZE, drop_rate=0.25)
    assert dropped.model_args["drop_rate"] == 0.25  # a create_model keyword, kept to rebuild
    head = dict(dropped.sequence())["head"]
    assert isinstance(head[0], nn.Dropout) and head[0].p == 0.25  # goes with the head


def test_spec_without_building_and_a_default_size() -> None:
    spec = model_spec("timm/test_resnet")
    assert (spec.kind, spec.input_size) == ("pretrained", 160)
    assert "timm/test_resnet.r160_in1k" in spec.description
    tagged = model_spec("timm/resnet10t.c3_in1k")
    assert tagged.input_size == 176
    assert create("timm/test_efficientnet", 3).input_size == 160


# ---------------------------------------------------------------- names


def test_unknown_timm_names_are_one_line_with_close_names() -> None:
    with pytest.raises(UnknownModel, match="did you mean 'timm/test_resnet'") as info:
        model_spec("timm/test_resnt")
    with pytest.raises(UnknownModel, match="did you mean 'timm/resnet50'"):
        create("timm/resnet5o", 3)
    with pytest.raises(UnknownModel, match=r"list_models\('\*zzqx\*'\)") as none_close:
        model_spec("timm/zzqx9")
    assert "did you mean" not in str(none_close.value)
    with pytest.raises(UnknownModel, match=r"no pretrained tag 'bogus' .* its tags: c3_in1k"):
        model_spec("timm/resnet10t.bogus")
    for error in (info, none_close):
        assert "\n" not in str(error.value)
    with pytest.raises(UnknownModel, match="or timm/<name> for any timm model"):
        model_spec("convnext_atto")  # a timm-only name needs the prefix


def test_set_model_to_an_unknown_timm_name_is_one_cli_line(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    import_tiny(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(epochs=1))
    code = main(["train", str(recipe), "--data", "tiny", "--set", "model=timm/test_resnt"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert "did you mean 'timm/test_resnet'" in err


# ---------------------------------------------------------------- weights


def _timm_state(name: str = "test_resnet") -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    net = timm.create_model(name)
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net.state_dict()


def _layouts(state: dict[str, torch.Tensor]) -> dict[str, object]:
    prefixed = {f"module.{k}": v for k, v in state.items()}
    other = {k: torch.zeros_like(v) for k, v in state.items()}
    return {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {}},
        "module-prefixed": prefixed,
        # timm's train.py: args as a Namespace, the EMA copy beside the trained weights
        # (timm's loader prefers the EMA, and so does imgclf).
        "timm-train": {
            "state_dict": other,
            "state_dict_ema": prefixed,
            "args": argparse.Namespace(model="test_resnet", lr=0.1),
            "arch": "test_resnet",
        },
    }


@pytest.mark.parametrize(
    "layout", ["plain", "state_dict", "model", "module-prefixed", "timm-train"]
)
def test_weights_file_in_each_layout_gives_timms_outputs(tmp_path: Path, layout: str) -> None:
    state = _timm_state()
    path = tmp_path / f"{layout}.pth"
    torch.save(_layouts(state)[layout], path)
    model = create("timm/test_resnet", NUM_CLASSES, input_size=SIZE, weights=path).eval()
    reference = timm.create_model("test_resnet")
    reference.load_state_dict(state)
    reference.eval()
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(
            model.net.forward_head(model.net.forward_features(x), pre_logits=True),
            reference.forward_head(reference.forward_features(x), pre_logits=True),
        )
    assert model.model_args["weights"] is None and model.model_args["pretrained"] is False


def test_safetensors_file_from_the_hub_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = _timm_state("test_efficientnet")
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    model = create("timm/test_efficientnet", NUM_CLASSES, input_size=SIZE, weights=path)
    own = model.state_dict()
    for key, value in state.items():
        if not key.startswith("classifier."):
            assert torch.equal(own[f"net.{key}"], value), key


def test_vit_file_for_another_size_is_resampled_as_timm_does(tmp_path: Path) -> None:
    state = _timm_state("test_vit")  # position embeddings for 160 px
    torch.save(state, tmp_path / "vit.pth")
    model = create("timm/test_vit", 3, input_size=SIZE, weights=tmp_path / "vit.pth").eval()
    # timm's own pretrained path, given the same state dict: no download involved.
    reference = timm.create_model(
        "test_vit", img_size=SIZE, pretrained=True, pretrained_cfg_overlay={"state_dict": state}
    ).eval()
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model.net.forward_features(x), reference.forward_features(x))


def test_weights_that_do_not_fit_are_one_line(tmp_path: Path) -> None:
    torch.save(_timm_state("test_resnet"), tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="weights do not fit timm/test_convnext") as info:
        create("timm/test_convnext", 3, input_size=SIZE, weights=tmp_path / "resnet.pth")
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="no such weights file"):
        create("timm/test_resnet", 3, input_size=SIZE, weights=tmp_path / "missing.pth")


def test_offline_download_is_one_line_naming_the_file_and_weights_option(offline) -> None:
    with pytest.raises(WeightsMissing) as info:
        create("timm/test_resnet", 3, input_size=SIZE, pretrained=True)
    message = str(info.value)
    assert "\n" not in message and message.startswith("timm/test_resnet: ")
    url = "https://huggingface.co/timm/test_resnet.r160_in1k/resolve/main/model.safetensors"
    assert f"fetch {url} and train with --weights FILE" in message
    assert "pretrained: false" in message and "local cache" in message
    assert offline and set(offline) == {weights.DOWNLOAD_TIMEOUT_S}  # never an endless wait
    assert socket.getdefaulttimeout() is None
    with pytest.raises(WeightsMissing, match=r"\(or https://github\.com/.*resnet10t_176") as r10:
        create("timm/resnet10t", 3, input_size=SIZE, pretrained=True)  # a cfg URL too
    assert "huggingface.co/timm/resnet10t.c3_in1k" in str(r10.value)
    with pytest.raises(WeightsMissing, match="timm has no pretrained weights for it"):
        create("timm/test_mambaout", 3, input_size=SIZE, pretrained=True)


# ---------------------------------------------------------------- end to end


def test_train_with_weights_file_then_predict_from_the_run(tmp_path, capsys) -> None:
    """``imgclf train --weights FILE`` with ``model: timm/test_resnet``, a head stage on
    cached features and then everything; the run rebuilds on its own for predict."""
    import_tiny(tmp_path, size=32)
    torch.save({"state_dict": _timm_state()}, tmp_path / "start.pth")
    stages = [{"epochs": 3, "train": ["head"]}, {"epochs": 1, "train": "all"}]
    recipe = tiny_recipe(model="timm/test_resnet", input_size=SIZE, stages=stages)
    # Fixed views: cacheable; 2 views for 3 epochs: the cache pays.
    recipe["augment"] = {"crop_padding": 0, "flip": True}
    path = write_recipe(tmp_path / "timm.yaml", recipe)
    out = tmp_path / "run"
    argv = ["train", path, "--data", "tiny", "--out", out, "--weights", tmp_path / "start.pth"]
    assert main([str(a) for a in [*argv, "--threads", "1"]]) == 0
    # The head stage ran on the features after the frozen prefix, computed once.
    assert "feature cache: 2 view(s)" in capsys.readouterr().err
    state = load_checkpoint(out / "best.pt")
    assert state["model_name"] == "timm/test_resnet"
    assert state["model_args"]["pretrained"] is False and state["model_args"]["weights"] is None
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["weights"] == str((tmp_path / "start.pth").resolve())
    model = build_model_from_checkpoint(state)
    assert type(model).__name__ == "TimmModel" and model.mean == (0.5, 0.5, 0.5)

    folder = make_image_folder(tmp_path / "unlabelled", per_class=2, size=32)
    csv_path = tmp_path / "pred.csv"
    argv = ["predict", out, "--input", folder, "--out", csv_path, "--backend", "torch"]
    assert main([str(a) for a in argv]) == 0
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["label"] in {"a", "b", "c"} and not r["error"] for r in rows)


def test_models_lists_what_is_offline_and_timms_names_without_building(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import torchvision

    def no_build(*args, **kwargs):
        raise AssertionError("imgclf models built a model")

    monkeypatch.setattr(timm, "create_model", no_build)
    monkeypatch.setattr(torchvision.models, "get_model", no_build)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert " none " in rows["fast"] and " download " in rows["resnet18"]
    from imgclf.models.lite0 import shipped_weights

    if shipped_weights() is not None:
        assert " on disk " in rows["efficientnet_lite0"]
    assert f"timm/<name>: any of timm's {len(timm.list_models())} model names" in out
    assert "--weights FILE" in out
