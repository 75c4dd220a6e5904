"""Any timm model by name: ``model: timm/<name>`` in a recipe, ``--set model=timm/<name>``.

``<name>`` is any of ``timm.list_models()`` (1,371 in timm 1.0.31), optionally with a
pretrained tag (``timm/resnet50.a1_in1k``; without one, timm's default tag). The model is
timm's network (``self.net``) with its classifier, ``get_classifier()``, replaced by the
recipe's head (backbones.py's ``Backbone``: linear or MLP, last layer zero-initialised),
normalized with its pretrained_cfg's mean and std, at the recipe's ``input_size`` (default:
the pretrained_cfg's; models whose cfg says ``fixed_input_size``, ViTs, are built for it).

Weights, in this order (as :func:`imgclf.models.weights.resolve_weights` for torchvision):

1. ``weights: FILE`` (``imgclf train --weights FILE``): read by ``load_state_file`` (any of
   timm's checkpoint layouts, ``module.`` prefixes, ``.safetensors``), passed through the
   model module's ``checkpoint_filter_fn`` as timm passes its downloads (a ViT's position
   embeddings are resampled to the input size), then loaded strictly but for the classifier;
2. ``pretrained: false``: random initialisation, nothing fetched;
3. timm's own download, ``timm.create_model(name, pretrained=True)``: the Hugging Face hub
   (or the pretrained_cfg's URL) into its cache. Offline, one :class:`WeightsMissing` line
   names the file to fetch and ``--weights FILE``.

Groups, in network order, ``head`` last: ``stem`` (all before the first stage, with
top-level parameters such as a ViT's ``cls_token`` and ``pos_embed``); the stages, by their
timm names (``layer1`` …, ``s1`` …) or, inside a ``stages``/``blocks``/``layers`` container,
``stage1`` …, ``blocks1`` …, ``layer1`` …; ``top`` (pretrained layers after the last stage:
EfficientNet's ``conv_head``, ConvNeXt's head norm, a ViT's final norm); ``head``. A model
without such stages: one group per top-level child (``top`` for what the classifier's
parent holds besides it), and ``head``.

:meth:`TimmModel.sequence` (the frozen-prefix feature cache) is there for the families whose
forward is a chain of those modules (ResNet, EfficientNet, MobileNetV3, and stem → stages →
head: ConvNeXt, ByobNet, NFNet, RegNet, MaxViT); any other raises NotImplementedError and trains
uncached, as a torchvision model without a split does.
"""

from __future__ import annotations

import difflib
import functools
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from imgclf.errors import CheckpointError, UnknownModel, WeightsMissing, one_line
from imgclf.models.backbones import (
    INPUT_MULTIPLE,
    Backbone,
    backbone_builder,
    check_backbone_size,
)
from imgclf.models.base import Classifier
from imgclf.models.registry import SUGGEST_CUTOFF, ModelSpec, register_fallback
from imgclf.models.weights import (
    download_failure,
    download_timeout,
    is_download_error,
    load_backbone_state,
    load_state_file,
)

TIMM_PREFIX = "timm/"

# Stage containers (their elements are the stages) and the group name of element i.
_CONTAINERS = {"stages": "stage", "blocks": "blocks", "layers": "layer"}
# Stages that are top-level children themselves: ResNet's layer1-4, RegNet's s1-s4.
_STAGE = re.compile(r"(?:layer|stage|s)\d+")


@functools.lru_cache(maxsize=1)
def timm_names() -> tuple[str, ...]:
    """Every timm model name, without tags (``timm.list_models()``)."""
    import timm

    return tuple(timm.list_models())


# ---------------------------------------------------------------------------- names


def pretrained_cfg(name: str) -> dict[str, Any]:
    """The pretrained_cfg of ``timm/<arch>[.tag]``, read without building the model;
    :class:`UnknownModel` (with close names) for a name timm does not have."""
    from timm.models import get_pretrained_cfg, is_model, list_pretrained, split_model_name_tag

    arch, tag = split_model_name_tag(name.removeprefix(TIMM_PREFIX))
    if not is_model(arch):
        close = difflib.get_close_matches(arch, timm_names(), n=3, cutoff=SUGGEST_CUTOFF)
        hint = (
            "did you mean " + ", ".join(repr(TIMM_PREFIX + c) for c in close) + "?"
            if close
            else f"timm.list_models('*{_stem_word(arch)}*') lists names by pattern"
        )
        raise UnknownModel(f"unknown timm model {arch!r} ({name}); {hint}")
    try:
        cfg = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch, allow_unregistered=True)
    except RuntimeError:  # timm: "Invalid pretrained tag (...) for ..."
        tags = [n.partition(".")[2] for n in list_pretrained(f"{arch}.*")]
        raise UnknownModel(
            f"{name}: timm has no pretrained tag {tag!r} for {arch}; its tags: "
            f"{', '.join(tags) or 'none'}"
        ) from None
    return cfg.to_dict() if cfg is not None else {}


def _stem_word(arch: str) -> str:
    """The leading letters of a name ('resnet' of 'resnet9000'), for a list_models pattern."""
    match = re.match(r"[a-z]+", arch.lower())
    return match.group(0) if match else arch


def _hub_file(cfg: Mapping[str, Any]) -> str | None:
    """The URL of the weights file timm downloads first: the hub's model.safetensors
    (timm/models/_hub.py, load_state_dict_from_hf, tries it before pytorch_model.bin), or
    the cfg's own file name; else the pretrained_cfg's URL; None when timm has none."""
    hub = cfg.get("hf_hub_id")
    if hub:
        repo, _, revision = hub.partition("@")
        file = cfg.get("hf_hub_filename") or "model.safetensors"
        return f"https://huggingface.co/{repo}/resolve/{revision or 'main'}/{file}"
    return cfg.get("url") or None


def _missing(name: str, cfg: Mapping[str, Any], reason: str) -> str:
    url = cfg.get("url")
    file = _hub_file(cfg)
    also = f" (or {url})" if url and url != file else ""
    return (
        f"{name}: pretrained weights not found ({reason}); fetch {file}{also} and train "
        "with --weights FILE (--set weights=PATH), or set pretrained: false"
    )


# ---------------------------------------------------------------------------- weights


def _create(
    name: str, cfg: Mapping[str, Any], input_size: int, download: bool, timm_args: dict
) -> nn.Module:
    """timm's network for ``name``; with ``download``, timm's pretrained weights in it."""
    import timm

    kwargs = dict(timm_args)
    if cfg.get("fixed_input_size"):  # ViT-like: position embeddings sized for the input
        kwargs.setdefault("img_size", input_size)
    arch = name.removeprefix(TIMM_PREFIX)
    if not download:
        return timm.create_model(arch, pretrained=False, **kwargs)
    if _hub_file(cfg) is None:
        raise WeightsMissing(
            f"{name}: timm has no pretrained weights for it; train with --weights FILE "
            "(--set weights=PATH), or set pretrained: false"
        )
    try:
        # huggingface_hub has its own 10 s timeouts (HF_HUB_ETAG_TIMEOUT,
        # HF_HUB_DOWNLOAD_TIMEOUT); a URL goes through torch.hub, which the socket one bounds.
        with download_timeout():
            return timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as exc:
        if not is_download_error(exc):
            raise
        raise WeightsMissing(_missing(name, cfg, download_failure(exc))) from exc


def _load_file(net: nn.Module, path: str | Path, head_path: str, name: str) -> None:
    """A weights file into ``net``, all of it but the classifier at ``head_path``."""
    state = load_state_file(path)
    # The conversion timm applies to its own downloads (timm/models/_builder.py,
    # load_pretrained: filter_fn(state_dict, model), retried with the state dict alone on
    # a TypeError). Each model module that needs one passes its checkpoint_filter_fn to
    # build_model_with_cfg; the others have none and the state dict is used as it is.
    convert = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    if convert is not None:
        try:
            try:
                state = convert(state, net)
            except TypeError:
                state = convert(state)
        except (KeyError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            raise CheckpointError(
                f"{path}: weights do not fit {name} (timm's checkpoint conversion: "
                f"{one_line(str(exc))[:200]})"
            ) from exc
    load_backbone_state(net, state, head_path, model=name)


# ---------------------------------------------------------------------------- groups


def _stage_children(net: nn.Module) -> list[str]:
    return [
        child
        for child, module in net.named_children()
        if _STAGE.fullmatch(child)
        or (child in _CONTAINERS and isinstance(module, nn.Sequential | nn.ModuleList))
    ]


def _group_of(net: nn.Module, head_path: str) -> Callable[[str], str]:
    """Parameter name (in ``net``) → its group, as the module docstring lays them out."""
    children = [child for child, _ in net.named_children()]
    stages = _stage_children(net)
    first = children.index(stages[0]) if stages else None
    head_root = head_path.split(".")[0]

    def group(param: str) -> str:
        if param == head_path or param.startswith(head_path + "."):
            return "head"
        child, _, rest = param.partition(".")
        if not rest:
            return "stem"  # a top-level parameter: a ViT's cls_token, pos_embed
        if child in stages:
            index = rest.split(".")[0]
            return f"{_CONTAINERS[child]}{int(index) + 1}" if child in _CONTAINERS else child
        if first is None:
            return "top" if child == head_root else child
        return "stem" if children.index(child) < first else "top"

    return group


def timm_groups(net: nn.Module, head_path: str) -> dict[str, list[str]]:
    """Group name → parameter names of ``net``, in network order, ``head`` last."""
    group = _group_of(net, head_path)
    groups: dict[str, list[str]] = {}
    for param, _ in net.named_parameters():
        groups.setdefault(group(param), []).append(param)
    groups["head"] = groups.pop("head")
    return groups


# ---------------------------------------------------------------------------- split


def _step(group: str, *modules: nn.Module) -> tuple[str | None, nn.Module]:
    """One step of a sequence; parameter-free glue (no group) when it has no parameters."""
    module = modules[0] if len(modules) == 1 else nn.Sequential(*modules)
    return (group if any(True for _ in module.parameters()) else None), module


def _stages(net: nn.Module) -> list[tuple[str | None, nn.Module]]:
    steps = []
    for child in _stage_children(net):
        module = getattr(net, child)
        if child in _CONTAINERS:
            steps += [(f"{_CONTAINERS[child]}{i}", m) for i, m in enumerate(module, start=1)]
        else:
            steps.append((child, module))
    return steps


def _head_steps(net: nn.Module, tail: tuple[str, ...]) -> list[tuple[str | None, nn.Module]]:
    """After the stages of a stem → stages → tail → head model: ``tail`` (the modules
    forward_features ends with) and timm's classifier head, split where the new
    classifier starts, so ``top`` holds the pretrained head norm and ``head`` only new
    weights (timm/layers/classifier.py: ClassifierHead pools, drops, classifies and
    flattens; NormMlpClassifierHead pools, normalizes, flattens, pre_logits, drops,
    classifies)."""
    from timm.layers import ClassifierHead, NormMlpClassifierHead

    modules = [getattr(net, name) for name in tail]
    head = net.head
    if isinstance(head, NormMlpClassifierHead):
        pre = (head.global_pool, head.norm, head.flatten, head.pre_logits)
        return [_step("top", *modules, *pre), ("head", nn.Sequential(head.drop, head.fc))]
    if isinstance(head, ClassifierHead):
        return [
            *([_step("top", *modules)] if modules else []),
            (None, head.global_pool),
            ("head", nn.Sequential(head.drop, head.fc, head.flatten)),
        ]
    raise NotImplementedError(f"{type(head).__name__}: no split for this head")


def timm_sequence(net: nn.Module, head_path: str) -> list[tuple[str | None, nn.Module]]:
    """``net``'s forward as (group, module) steps, for the families whose forward is a
    chain of its modules (their forward_features and forward_head in timm 1.0)."""
    from timm.models.byobnet import ByobNet
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.maxxvit import MaxxVit
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.nfnet import NormFreeNet
    from timm.models.regnet import RegNet
    from timm.models.resnet import ResNet

    classifier = net.get_submodule(head_path)
    # ResNet, EfficientNet and MobileNetV3 drop out functionally before the classifier:
    # as a module, it goes with the head, so a head-only stage keeps it.
    rate = float(getattr(net, "drop_rate", 0.0) or 0.0)
    head = ("head", nn.Sequential(nn.Dropout(rate), classifier) if rate else classifier)
    if isinstance(net, ResNet):
        stem = _step("stem", net.conv1, net.bn1, net.act1, net.maxpool)
        return [stem, *_stages(net), (None, net.global_pool), head]
    if isinstance(net, EfficientNet):
        top = _step("top", net.conv_head, net.bn2)
        return [
            _step("stem", net.conv_stem, net.bn1),
            *_stages(net),
            top,
            (None, net.global_pool),
            head,
        ]
    if isinstance(net, MobileNetV3):
        top = _step("top", net.conv_head, net.norm_head, net.act2)
        pool, flatten = (None, net.global_pool), (None, net.flatten)
        return [_step("stem", net.conv_stem, net.bn1), *_stages(net), pool, top, flatten, head]
    tails = {ConvNeXt: ("norm_pre",), ByobNet: ("final_conv",), MaxxVit: ("norm",)}
    tails.update({NormFreeNet: ("final_conv", "final_act"), RegNet: ("final_conv",)})
    tail = next((t for cls, t in tails.items() if isinstance(net, cls)), None)
    if tail is None:
        raise NotImplementedError(f"{type(net).__name__}: no split into groups")
    return [_step("stem", net.stem), *_stages(net), *_head_steps(net, tail)]


# ---------------------------------------------------------------------------- the model


def _classifier_path(net: nn.Module, name: str) -> str:
    classifier = net.get_classifier()
    if isinstance(classifier, nn.Linear):
        found = next((path for path, m in net.named_modules() if m is classifier), None)
        if found:
            return found
    raise UnknownModel(
        f"{name}: its classifier is a {type(classifier).__name__}, not one Linear layer, so "
        "imgclf cannot give it a new head; choose another timm model"
    )


class TimmModel(Backbone):
    """A timm model (``self.net``) with a new head in place of ``get_classifier()``
    (``self.head_path``). ``**config``: more keyword arguments for ``timm.create_model``
    (``model_args: {drop_path_rate: 0.1}``)."""

    def build_net(
        self, name: str, pretrained: bool, weights: str | Path | None, **config: Any
    ) -> tuple[nn.Module, str]:
        info = pretrained_cfg(name)
        net = _create(name, info, self.input_size, pretrained and weights is None, config)
        head_path = _classifier_path(net, name)
        if weights is not None:
            _load_file(net, weights, head_path, name)
        self.mean = tuple(float(v) for v in net.pretrained_cfg.get("mean", self.mean))
        self.std = tuple(float(v) for v in net.pretrained_cfg.get("std", self.std))
        net.num_classes = self.num_classes
        try:
            timm_sequence(net, head_path)
        except NotImplementedError:
            self.splits = False
        else:
            # As for torchvision's split families (backbones.py, INPUT_MULTIPLE).
            self.splits = True
            check_backbone_size(name, self.input_size, INPUT_MULTIPLE)
        return net, head_path

    def sequence(self) -> list[tuple[str | None, nn.Module]]:
        """The forward pass as (group, module) steps where the family allows a split."""
        if not self.splits:
            raise NotImplementedError(f"{self.name}: no split into groups for this model")
        return timm_sequence(self.net, self.head_path)

    def param_groups(self) -> dict[str, list[str]]:
        return {
            group: [f"net.{p}" for p in params]
            for group, params in timm_groups(self.net, self.head_path).items()
        }


# ---------------------------------------------------------------------------- registry


def _default_size(cfg: Mapping[str, Any]) -> int:
    return int((cfg.get("input_size") or (3, 224, 224))[-1])


def _resolve_timm(name: str) -> tuple[ModelSpec, Callable[..., Classifier]] | None:
    if not name.startswith(TIMM_PREFIX):
        return None
    cfg = pretrained_cfg(name)
    arch = name.removeprefix(TIMM_PREFIX).partition(".")[0]
    tag = f".{cfg['tag']}" if cfg.get("tag") else ""
    where = f"Hugging Face hub {cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else cfg.get("url")
    description = f"timm {arch}{tag} (pretrained weights: {where or 'none in timm'})"
    spec = ModelSpec(name, description, _default_size(cfg), "pretrained")
    return spec, backbone_builder(TimmModel, name, lambda: _default_size(pretrained_cfg(name)))


register_fallback(
    _resolve_timm,
    names=lambda: [TIMM_PREFIX + n for n in timm_names()],
    hint="or timm/<name> for any timm model, e.g. timm/convnext_atto",
    summary="timm/<name>: any of timm's {n} model names, e.g. timm/convnext_atto",
)
