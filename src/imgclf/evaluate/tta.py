"""Test-time augmentation as a model wrapper: a function of logits like any other model.

Views: the image and its mirror; for small images (≤ 64 px) also both shifted by one
pixel up-left and down-right (airbench94's 6-view TTA, arXiv 2404.00498 §3.6). The wrapper
returns log of the mean probability, so ``softmax`` of its output is the averaged
probability and argmax/accuracy/ensembles work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate by (dy, dx) pixels, filling the border by reflection."""
    p = max(abs(dy), abs(dx))
    h, w = x.shape[-2:]
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


class TTA(nn.Module):
    def __init__(self, model: nn.Module, shifts: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.shifts = shifts

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = [x, x.flip(-1)]
        small = max(x.shape[-2:]) <= 64 if self.shifts is None else self.shifts
        if small:
            for d in (-1, 1):
                moved = _shift(x, d, d)
                out += [moved, moved.flip(-1)]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = None
        views = self.views(x)
        for v in views:
            p = torch.softmax(self.model(v).float(), dim=1)
            probs = p if probs is None else probs + p
        return torch.log(probs / len(views) + 1e-12)
