"""Pretrained ImageNet backbones from torchvision, with a new head and named groups.

Registered by name: ``mobilenet_v2``, ``resnet18``, ``resnet50``, ``efficientnet_b0`` (the
study's backbones). Any other torchvision classification model works by name too
(``convnext_tiny``, or ``tv:convnext_tiny`` to be explicit) through a registry fallback.

Each model is the torchvision network with its last Linear layer replaced by the recipe's
head: ``{type: linear}`` (the default) or ``{type: mlp, hidden: 512, dropout: 0.3}`` =
Linear(in, 512) → ReLU → Dropout(0.3) → Linear(512, classes). What comes before that
Linear stays, e.g. MobileNetV2's Dropout(0.2): the study's 64 px MobileNet replaced
``classifier[1]`` the same way.

Parameter groups, in network order, ``head`` last:

- ResNet family: ``stem`` (conv1 + bn1), ``layer1`` … ``layer4``, ``head``;
- MobileNetV2 and EfficientNet: ``stem``, ``blocks1`` … ``blocks7`` (the inverted-residual
  stages of the papers' tables, i.e. torchvision's ``features[i]`` stages), ``top`` (the
  final 1×1 conv to 1280 channels, pretrained, so kept out of ``head``), ``head``;
- any other model: one group per top-level child of the torchvision network (``features``,
  ``classifier`` …) and ``head``.

Weights are loaded by :func:`imgclf.models.weights.resolve_weights`; ``model_args`` stores
``pretrained: false`` because a checkpoint's state dict already carries the weights.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from imgclf.errors import RecipeError, UnknownModel
from imgclf.models.base import Classifier
from imgclf.models.registry import ModelSpec, register, register_fallback

# The weights machinery lives in weights.py; these names stay importable from here.
from imgclf.models.weights import (  # noqa: F401
    DOWNLOAD_TIMEOUT_S,
    WeightsSource,
    cache_dir,
    load_backbone_state,
    load_state_file,
    resolve_weights,
)

# torchvision's ImageNet weights all use these (their ``transforms()`` mean/std); the
# generic path reads them from the weights anyway.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Below 32 px the last stride-2 stages run on 1×1 maps; a multiple of 16 keeps every
# stride-2 stage but the last exact (32, 48, 64, 96, 224 … are accepted; 225 is a typo).
MIN_INPUT_SIZE = 32
INPUT_MULTIPLE = 16

TORCHVISION_PREFIX = "tv:"

# ---------------------------------------------------------------------------- heads

_HEAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"dropout": 0.0},
    # The study's MobileNet 64 px head: hidden 512, Dropout(0.3) ("0.5 was too much").
    "mlp": {"hidden": 512, "dropout": 0.3},
}


def head_config(head: Mapping[str, Any] | None) -> dict[str, Any]:
    """The recipe's ``head`` mapping validated, with defaults filled in (what model_args keeps)."""
    # None: the type's default (a recipe's HeadConfig leaves unset values None).
    cfg = {k: v for k, v in dict(head or {}).items() if v is not None}
    kind = cfg.pop("type", "linear")
    if kind not in _HEAD_DEFAULTS:
        raise RecipeError(f"head.type must be one of {', '.join(_HEAD_DEFAULTS)}; got {kind!r}")
    defaults = _HEAD_DEFAULTS[kind]
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise RecipeError(
            f"head: unknown key(s) {unknown} for type {kind}; valid keys: type, "
            + ", ".join(defaults)
        )
    out = {"type": kind, **defaults, **cfg}
    dropout = out["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise RecipeError(f"head.dropout must be a number in [0, 1), got {dropout!r}")
    out["dropout"] = float(dropout)
    if kind == "mlp":
        hidden = out["hidden"]
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise RecipeError(f"head.hidden must be a positive integer, got {hidden!r}")
    return out


def build_head(in_features: int, num_classes: int, cfg: Mapping[str, Any]) -> nn.Module:
    """A fresh classification head from a :func:`head_config` mapping.

    Its last layer starts at zero, so the first logits are exactly 0 and the first loss is
    ln(classes), whatever the scale of the backbone's features (Big Transfer, Kolesnikov et
    al. 2020, zero-initialises its heads the same way). PyTorch's default init on Lite0's
    1280 features gave a first loss of 1.39 for two classes and a head that started out
    confidently wrong (issue #9). The gradient of a zero last layer is not zero (features
    times the softmax error), so it learns at once; an MLP's hidden layer follows a step
    later.
    """
    if cfg["type"] == "mlp":
        last = _zeroed(nn.Linear(cfg["hidden"], num_classes))
        return nn.Sequential(
            nn.Linear(in_features, cfg["hidden"]),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg["dropout"]),
            last,
        )
    linear = _zeroed(nn.Linear(in_features, num_classes))
    return nn.Sequential(nn.Dropout(cfg["dropout"]), linear) if cfg["dropout"] else linear


def _zeroed(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


# ---------------------------------------------------------------------------- torchvision


@dataclass(frozen=True)
class _Arch:
    """What imgclf needs to know about a torchvision architecture before building it."""

    name: str
    weights_name: str  # e.g. "ResNet18_Weights.IMAGENET1K_V1"
    source: WeightsSource
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int  # the weights' evaluation crop
    top1: float | None
    builder_kwargs: dict[str, Any] = field(default_factory=dict)
    ignore_prefixes: tuple[str, ...] = ()


# Architectures whose torchvision builder changes the network when given weights; imgclf
# builds with weights=None and loads the file itself, so it passes the same settings.
_BUILDER_KWARGS: dict[str, dict[str, Any]] = {
    # transform_input: the Google weights expect (x - 0.5) / 0.5 input, the network converts
    # from ImageNet normalization. Auxiliary classifiers are train-time extras: dropped.
    "googlenet": {"aux_logits": False, "transform_input": True, "init_weights": True},
    "inception_v3": {"aux_logits": False, "transform_input": True, "init_weights": True},
}
_IGNORE_PREFIXES: dict[str, tuple[str, ...]] = {
    "googlenet": ("aux1.", "aux2."),
    "inception_v3": ("AuxLogits.",),
}


@functools.lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    """Every torchvision classification model name."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


@functools.cache
def _arch(name: str) -> _Arch:
    import torchvision

    w = torchvision.models.get_model_weights(name).DEFAULT
    transforms = w.transforms()
    filename = Path(urlparse(w.url).path).name
    metrics = w.meta.get("_metrics", {}).get("ImageNet-1K", {})
    return _Arch(
        name=name,
        weights_name=str(w),
        source=WeightsSource(model=name, filename=filename, url=w.url),
        mean=tuple(float(v) for v in transforms.mean),
        std=tuple(float(v) for v in transforms.std),
        input_size=int(transforms.crop_size[0]),
        top1=metrics.get("acc@1"),
        builder_kwargs=_BUILDER_KWARGS.get(name, {}),
        ignore_prefixes=_IGNORE_PREFIXES.get(name, ()),
    )


# DenseNet weights were saved with old key names ("norm.1" for "norm1"); torchvision fixes
# them on load with this pattern (torchvision/models/densenet.py, _load_state_dict).
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _fix_keys(name: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not name.startswith("densenet"):
        return dict(state)
    out = {}
    for key, value in state.items():
        m = _DENSENET_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


# Inverted-residual blocks per stage in torchvision's MobileNetV2 (the ``n`` column of
# Sandler et al. 2018, Table 2); its ``features`` is flat: stem, 17 blocks, last conv.
_MOBILENET_V2_STAGE_DEPTHS = (1, 2, 3, 4, 3, 3, 1)


def _family_groups(net: nn.Module) -> dict[str, nn.Module] | None:
    """Named groups for the families imgclf knows (head excluded), or None."""
    from torchvision.models import EfficientNet, MobileNetV2, ResNet

    if isinstance(net, ResNet):
        return {
            "stem": nn.ModuleList([net.conv1, net.bn1]),
            **{f"layer{i}": getattr(net, f"layer{i}") for i in range(1, 5)},
        }
    if isinstance(net, MobileNetV2):
        features = net.features
        groups: dict[str, nn.Module] = {"stem": features[0]}
        start = 1
        for i, depth in enumerate(_MOBILENET_V2_STAGE_DEPTHS, start=1):
            groups[f"blocks{i}"] = features[start : start + depth]
            start += depth
        if start != len(features) - 1:
            return None  # not the standard layout: fall back to top-level groups
        return {**groups, "top": features[start]}
    if isinstance(net, EfficientNet):
        # features[0] is the stem, features[1:-1] the MBConv stages, features[-1] the last conv.
        features = net.features
        stages = {f"blocks{i}": features[i] for i in range(1, len(features) - 1)}
        return {"stem": features[0], **stages, "top": features[-1]}
    return None


def _last_linear(net: nn.Module) -> str | None:
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def check_backbone_size(model: str, input_size: int, multiple: int) -> None:
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise ValueError(f"{model}: input_size must be an integer, got {input_size!r}")
    if input_size < MIN_INPUT_SIZE or input_size % multiple:
        nearest = max(MIN_INPUT_SIZE, round(input_size / multiple) * multiple)
        rule = f"a multiple of {multiple} and at least" if multiple > 1 else "at least"
        raise ValueError(
            f"{model}: input_size must be {rule} {MIN_INPUT_SIZE}, got {input_size}; e.g. {nearest}"
        )


class Backbone(Classifier):
    """A pretrained network (``self.net``) whose classifier, at ``self.head_path``, is
    replaced by the recipe's head, so the network's own forward runs unchanged.

    Subclasses build the network and load its weights in :meth:`build_net`. ``model_args``
    keeps ``pretrained: false`` and no weights file: a checkpoint's state dict carries the
    weights, and rebuilding from it must not fetch or read them again.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        input_size: int,
        *,
        pretrained: bool = False,
        weights: str | Path | None = None,
        head: Mapping[str, Any] | None = None,
        **config: Any,
    ) -> None:
        cfg = head_config(head)
        check_backbone_size(name, input_size, 1)
        super().__init__(
            num_classes, input_size, pretrained=False, weights=None, head=cfg, **config
        )
        net, head_path = self.build_net(name, pretrained, weights, **config)
        old = net.get_submodule(head_path)
        net.set_submodule(head_path, build_head(old.in_features, num_classes, cfg))
        self.head_path = head_path
        self.net = net

    def build_net(
        self, name: str, pretrained: bool, weights: str | Path | None, **config: Any
    ) -> tuple[nn.Module, str]:
        """The network, its weights loaded (:func:`resolve_weights`' order), and the path
        of the classifier the head replaces."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def backbone_builder(
    cls: type[Backbone], name: str, default_size: Callable[[], int]
) -> Callable[..., Classifier]:
    """The registry's constructor of ``name``: ``build(num_classes, input_size=None,
    pretrained=..., weights=..., head=..., **config)``, at ``default_size()`` by default."""

    def build(num_classes: int, input_size: int | None = None, **options: Any) -> Classifier:
        size = default_size() if input_size is None else input_size
        return cls(name, num_classes, size, **options)

    build.__name__ = name
    return build


class TorchvisionBackbone(Backbone):
    """A torchvision classification network with a new head in place of its last Linear
    layer (``self.head_path``, e.g. ``fc`` or ``classifier.1``)."""

    def build_net(
        self, name: str, pretrained: bool, weights: str | Path | None, **config: Any
    ) -> tuple[nn.Module, str]:
        import torchvision

        if config:  # as the registry's build() refused them before Backbone took **config
            raise TypeError(f"{name}: unexpected model_args {sorted(config)}")
        info = _arch(name)
        self.arch = name
        self.mean, self.std = info.mean, info.std
        kwargs = dict(info.builder_kwargs)
        if name.startswith("vit_"):
            kwargs["image_size"] = self.input_size  # position embeddings are sized for it
        net = torchvision.models.get_model(name, weights=None, **kwargs)
        self._groups = _family_groups(net)
        if self._groups is not None:
            check_backbone_size(name, self.input_size, INPUT_MULTIPLE)
        head_path = _last_linear(net)
        if head_path is None:
            raise UnknownModel(
                f"{name}: its classifier is not a Linear layer (a 1×1 convolution), so imgclf "
                "cannot give it a new head; choose another torchvision model"
            )
        state = resolve_weights(info.source, pretrained=pretrained, weights=weights)
        if state is not None:
            load_backbone_state(
                net,
                _fix_keys(name, state),
                head_path,
                model=name,
                ignore_prefixes=info.ignore_prefixes,
            )
        return net, head_path

    def sequence(self) -> list[tuple[str | None, nn.Module]]:
        """The forward pass as (group, module) steps, for the families imgclf knows.

        The dropout torchvision puts before the classifier goes with the head, so a
        head-only stage keeps it active (as the study's did) and a cached frozen prefix
        ends at the pooled features.
        """
        from torchvision.models import ResNet

        net = self.net
        if isinstance(net, ResNet):
            return [
                ("stem", nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)),
                *((f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)),
                (None, net.avgpool),
                (None, nn.Flatten(1)),
                ("head", net.fc),
            ]
        if self._groups is not None:  # MobileNetV2, EfficientNet: features → pool → classifier
            return [
                *self._groups.items(),
                (None, nn.AdaptiveAvgPool2d(1)),
                (None, nn.Flatten(1)),
                ("head", net.classifier),
            ]
        raise NotImplementedError(f"{self.name}: no split into groups for this architecture")

    def param_groups(self) -> dict[str, list[str]]:
        head = self.net.get_submodule(self.head_path)
        if self._groups is not None:
            return self.groups_from_modules({**self._groups, "head": head})
        # Any other torchvision model: one group per top-level child (or top-level
        # parameter, like ViT's class_token), then the head.
        head_ids = {id(p) for p in head.parameters()}
        groups: dict[str, list[str]] = {}
        for name, p in self.named_parameters():
            group = "head" if id(p) in head_ids else name.split(".")[1]
            groups.setdefault(group, []).append(name)
        groups["head"] = groups.pop("head")
        return groups


def _builder(arch: str) -> Callable[..., Classifier]:
    return backbone_builder(TorchvisionBackbone, arch, lambda: _arch(arch).input_size)


# The study's backbones, listed by ``imgclf models``. ``pretrained`` defaults to False here
# (as in timm's create_model); recipes default to ``pretrained: true``.
_REGISTERED = {
    "mobilenet_v2": "MobileNetV2 (torchvision, ImageNet 71.9%): stem, blocks1-7, top, head",
    "resnet18": "ResNet-18 (torchvision, ImageNet 69.8%): stem, layer1-4, head",
    "resnet50": "ResNet-50 (torchvision IMAGENET1K_V2, ImageNet 80.9%): stem, layer1-4, head",
    "efficientnet_b0": "EfficientNet-B0 (torchvision, ImageNet 77.7%): stem, blocks1-7, top, head",
}


def _local(arch: str) -> Callable[[], Path | None]:
    return lambda: _arch(arch).source.local()


for _name, _description in _REGISTERED.items():
    register(
        _name,
        description=_description,
        input_size=224,
        kind="pretrained",
        local_weights=_local(_name),
    )(_builder(_name))


def _resolve_torchvision(name: str) -> tuple[ModelSpec, Callable[..., Classifier]] | None:
    arch = name.removeprefix(TORCHVISION_PREFIX)
    if arch not in torchvision_names():
        return None
    info = _arch(arch)
    top1 = f", ImageNet {info.top1:.1f}%" if info.top1 else ""
    description = f"torchvision {arch} ({info.weights_name}{top1})"
    spec = ModelSpec(name, description, info.input_size, "pretrained", info.source.local)
    return spec, _builder(arch)


register_fallback(
    _resolve_torchvision,
    names=torchvision_names,
    hint="or any torchvision classification model by name, e.g. tv:convnext_tiny",
    summary="tv:<name>: any of torchvision's {n} classification models, e.g. tv:convnext_tiny",
)
