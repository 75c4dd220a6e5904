"""``fast``: an airbench94-style network for small images.

After Keller Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU" (arXiv 2404.00498),
written from the paper's description. The architecture is hlb-cifar10's (tysam-code) with a
narrower last block. "Ablation" below means the airbench ablation table
(github.com/KellerJordan/cifar10-zoo, airbench_ablations/README.md): epochs to reach 94%
on CIFAR-10 as each trick is added. The training tricks (label smoothing, Lookahead, 64×
learning rate for BatchNorm biases, test-time flips, freezing the stem bias after 3
epochs) belong to the trainer, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imgclf.models.base import Classifier, check_input_size
from imgclf.models.registry import register

# Variance floor for the whitening eigenvalues: the airbench value (5e-4). It caps the
# gain of the near-zero-variance patch directions, which are mostly noise.
WHITENING_EPS = 5e-4


class WhiteningStem(nn.Module):
    """2×2 patch-whitening conv (3 → 24 channels, no padding) followed by GELU.

    Ablation: whitening init (and no BatchNorm after it) cuts 35 → 21 epochs.

    The first 12 filters are the eigenvectors of the 2×2 patch covariance scaled by
    1/sqrt(eigenvalue), so their outputs are decorrelated with unit variance; the other 12
    are their negations so the GELU after them loses no information. The weight stays
    frozen; the bias is trainable (airbench trains it only for the first few epochs:
    the trainer's choice). Without padding the 2×2 kernel turns 32 px into 31, as airbench.
    """

    patch = 2

    def __init__(self) -> None:
        super().__init__()
        n_patch = 3 * self.patch * self.patch
        self.conv = nn.Conv2d(3, 2 * n_patch, self.patch, padding=0, bias=True)
        self.conv.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.conv(x))

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = WHITENING_EPS) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"init_whitening wants N×3×H×W images, got {tuple(images.shape)}")
        # float64: the smallest eigenvalues are orders of magnitude below the largest.
        patches = F.unfold(images.double(), self.patch)  # N × 12 × L, channel-major like conv
        patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        if len(patches) <= patches.shape[1]:
            raise ValueError(f"init_whitening needs more than {patches.shape[1]} patches")
        mean = patches.mean(0)
        centered = patches - mean
        covariance = centered.T @ centered / (len(patches) - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = eigenvectors.T / (eigenvalues.clamp_min(0) + eps).sqrt()[:, None]
        # Centering in the bias makes each whitened output zero-mean on this data, so the
        # +v/−v pair sits symmetrically around the GELU. airbench uses the uncentered second
        # moment; with normalized input the difference is small.
        bias = -(filters @ mean)
        weight = torch.cat([filters, -filters]).reshape(self.conv.weight.shape)
        self.conv.weight.copy_(weight)
        self.conv.bias.copy_(torch.cat([bias, -bias]))


def _batchnorm(channels: int, weight_trainable: bool) -> nn.BatchNorm2d:
    # airbench: running-stat momentum 0.6 in its convention = 0.4 in PyTorch's (fast
    # statistics pair with Lookahead, per the ablation notes), and eps 1e-12. Its BatchNorm
    # learns only the bias, the scale stays 1: the conv before it already sets the scale,
    # and the biases then get a 64× learning rate (ablation: 18 → 13.5 epochs).
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    bn.weight.requires_grad_(weight_trainable)
    return bn


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)  # BatchNorm follows: no bias
    # Partial identity ("dirac") initialization: the first c_in filters pass their input
    # through unchanged, so at init each block starts close to a skip connection; the rest
    # keep PyTorch's default init. Ablation: 21 → 18 epochs.
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(c_in, c_out)])
    return conv


class ConvGroup(nn.Module):
    """conv3×3 → max-pool 2 → BN → GELU → conv3×3 → BN → GELU (airbench's block).

    Pooling right after the first conv runs the second conv at a quarter of the pixels.
    """

    def __init__(self, c_in: int, c_out: int, bn_weight_trainable: bool) -> None:
        super().__init__()
        self.conv1 = _conv(c_in, c_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _batchnorm(c_out, bn_weight_trainable)
        self.conv2 = _conv(c_out, c_out)
        self.norm2 = _batchnorm(c_out, bn_weight_trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.pool(self.conv1(x))))
        return F.gelu(self.norm2(self.conv2(x)))


class _Scale(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


@register(
    "fast",
    description="airbench94-style: frozen 2×2 whitening stem + 3 conv groups (64, 256, 256)",
    input_size=32,
)
class FastNet(Classifier):
    """Whitening stem, three ConvGroups, global max-pool, Linear(width, classes, bias=False)
    and a fixed output scale.

    Call :meth:`init_whitening` with a batch of normalized training images before
    training; until then the stem is a fixed random projection (it still runs).
    """

    def __init__(
        self,
        num_classes: int,
        input_size: int = 32,
        widths: tuple[int, int, int] | list[int] = (64, 256, 256),
        bn_weight_trainable: bool = False,
        output_scale: float = 1 / 9,
    ) -> None:
        # Three 2× pools after the 2×2 stem (s → s−1): a multiple of 8 pools cleanly
        # (32 → 31 → 15 → 7 → 3); 16 is the smallest size that leaves one pixel.
        check_input_size("fast", input_size, multiple=8, minimum=16)
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"fast: widths must be three positive integers, got {widths}")
        super().__init__(
            num_classes,
            input_size,
            widths=widths,
            bn_weight_trainable=bn_weight_trainable,
            output_scale=output_scale,
        )
        self.output_scale = output_scale
        self.stem = WhiteningStem()
        stem_out = self.stem.conv.out_channels
        self.block1 = ConvGroup(stem_out, widths[0], bn_weight_trainable)
        self.block2 = ConvGroup(widths[0], widths[1], bn_weight_trainable)
        self.block3 = ConvGroup(widths[1], widths[2], bn_weight_trainable)
        # Global max rather than average pool: airbench's MaxPool(3) over the final 3×3.
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[2], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        # Fixed logit scale 1/9 (airbench94, inherited from hlb-cifar10): a temperature
        # that keeps logits small with the large learning rates used, at no parameter cost.
        return self.head(self.pool(x).flatten(1)) * self.output_scale

    def init_whitening(self, images: torch.Tensor, eps: float = WHITENING_EPS) -> None:
        """Set the stem to whiten 2×2 patches of ``images`` (float N×3×H×W, normalized).

        airbench uses the first 5000 training images; a few hundred already give a stable
        12×12 covariance.
        """
        self.stem.init_whitening(images, eps)

    def sequence(self) -> list[tuple[str | None, nn.Module]]:
        return [
            ("stem", self.stem),
            ("block1", self.block1),
            ("block2", self.block2),
            ("block3", self.block3),
            (None, self.pool),
            (None, nn.Flatten(1)),
            ("head", nn.Sequential(self.head, _Scale(self.output_scale))),
        ]

    def frozen_parameter_names(self) -> set[str]:
        # From the structure, not from requires_grad: a stage may have unfrozen them.
        names = {"stem.conv.weight"}
        if not self.model_args["bn_weight_trainable"]:
            bns = (n for n, m in self.named_modules() if isinstance(m, nn.BatchNorm2d))
            names |= {f"{n}.weight" for n in bns}
        return names
