"""The three CNNs of the original study, trained from random initialisation.

Every flatten size is computed from ``input_size``, so one definition serves 32, 48, 64,
96 … pixels; sizes that are not a multiple of the total pooling factor are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from imgclf.models.base import Classifier, check_input_size
from imgclf.models.registry import register


def _conv_relu_pool(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


@register(
    "simple",
    description="2 conv-ReLU-pool blocks (64, 128 ch) + global average pool + 1 linear",
    input_size=32,
)
class SimpleNet(Classifier):
    """conv3×3 3→64 → ReLU → pool, conv3×3 64→128 → ReLU → pool, global average pool,
    Linear(128, classes).

    The study's only linear layer was Linear(128, 10) at 32×32; a global average pool over
    128 channels reproduces that shape at every input size, where flattening the 8×8 map
    would need Linear(8192, 10) (64× the head parameters of this 2-layer net).
    """

    widths = (64, 128)

    def __init__(self, num_classes: int, input_size: int = 32) -> None:
        check_input_size("simple", input_size, multiple=4, minimum=4)
        super().__init__(num_classes, input_size)
        self.block1 = _conv_relu_pool(3, self.widths[0])
        self.block2 = _conv_relu_pool(self.widths[0], self.widths[1])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(self.widths[1], num_classes)

    steps = ("block1", "block2", "pool", "flatten", "head")


def _conv_bn_pool(c_in: int, c_out: int, bn_first: bool) -> nn.Sequential:
    """conv3×3 → ReLU → BatchNorm → max-pool (the study's order for `complex`: the conv
    keeps its bias), or conv → BatchNorm → ReLU → max-pool (`medium`): no conv bias there,
    as the BatchNorm right after subtracts the mean and adds its own shift (Ioffe &
    Szegedy 2015, §3.2). Layer indices are the same in both orders."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn_first)
    bn, relu = nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    return nn.Sequential(conv, *((bn, relu) if bn_first else (relu, bn)), nn.MaxPool2d(2))


@register(
    "complex",
    description="3 conv-ReLU-BN blocks (128, 256, 512 ch) + global average pool + 1 linear",
    input_size=32,
)
class ComplexNet(Classifier):
    """Three conv3×3 → ReLU → BatchNorm → max-pool blocks (128, 256, 512 channels), global
    average pool, Linear(512, classes).

    The global average pool gives the study's Linear(512, classes) at any input size.
    """

    widths = (128, 256, 512)

    def __init__(self, num_classes: int, input_size: int = 32) -> None:
        check_input_size("complex", input_size, multiple=8, minimum=8)
        super().__init__(num_classes, input_size)
        w1, w2, w3 = self.widths
        self.block1 = _conv_bn_pool(3, w1, bn_first=False)
        self.block2 = _conv_bn_pool(w1, w2, bn_first=False)
        self.block3 = _conv_bn_pool(w2, w3, bn_first=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(w3, num_classes)

    steps = ("block1", "block2", "block3", "pool", "flatten", "head")


@register(
    "medium",
    description="4 conv-BN-ReLU blocks (64-512 ch) + MLP 1024-512 with dropout 0.5",
    input_size=64,
)
class MediumNet(Classifier):
    """The study's 64-pixel net: four conv3×3 → BatchNorm → ReLU → max-pool blocks with
    64, 128, 256, 512 channels (64→32→16→8→4 px), flatten 512·(s/16)² (8192 at 64 px),
    Linear 1024 → ReLU → Dropout → Linear 512 → ReLU → Dropout → Linear classes.
    """

    widths = (64, 128, 256, 512)
    hidden = (1024, 512)

    def __init__(self, num_classes: int, input_size: int = 64, dropout: float = 0.5) -> None:
        check_input_size("medium", input_size, multiple=16, minimum=16)
        super().__init__(num_classes, input_size, dropout=dropout)
        w1, w2, w3, w4 = self.widths
        h1, h2 = self.hidden
        self.block1 = _conv_bn_pool(3, w1, bn_first=True)
        self.block2 = _conv_bn_pool(w1, w2, bn_first=True)
        self.block3 = _conv_bn_pool(w2, w3, bn_first=True)
        self.block4 = _conv_bn_pool(w3, w4, bn_first=True)
        flat = w4 * (input_size // 16) ** 2
        self.fc = nn.Sequential(
            nn.Linear(flat, h1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(h1, h2),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The flatten ties the weights to one resolution: say so instead of a shape error
        # deep inside a matmul.
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"medium was built for {self.input_size}×{self.input_size} input, "
                f"got {tuple(x.shape[-2:])}"
            )
        return super().forward(x)

    steps = ("block1", "block2", "block3", "block4", "flatten", "fc", "head")
