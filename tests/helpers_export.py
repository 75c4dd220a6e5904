"""Checkpoints of untrained (but not default-initialised) models, for export and serve tests.

Training a `fast` net or a Lite0 takes minutes on 2 cores; what export must reproduce is
the forward pass, so a checkpoint of a model with random weights and BatchNorm statistics
moved off their defaults (a few batches in train mode) tests the same graph in a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imgclf.models import create
from imgclf.runtime.checkpoint import save_checkpoint


def make_checkpoint(
    folder: Path,
    model_name: str,
    classes: list[str],
    *,
    input_size: int = 32,
    source_size: int = 32,
    seed: int = 0,
    **model_kwargs,
) -> Path:
    """``folder/best.pt`` holding ``model_name`` as training would have saved it."""
    torch.manual_seed(seed)
    model = create(model_name, num_classes=len(classes), input_size=input_size, **model_kwargs)
    if hasattr(model, "init_whitening"):  # fast: a real whitening stem, not a random one
        model.init_whitening(torch.randn(64, 3, input_size, input_size))
    model.train()
    with torch.no_grad():
        for _ in range(3):  # BatchNorm running statistics away from 0 / 1
            model(torch.randn(8, 3, input_size, input_size) * 1.5 + 0.3)
    model.eval()
    state = {
        "model_name": model_name,
        "model_args": model.model_args,
        "model_state": model.state_dict(),
        "class_names": list(classes),
        "input_size": input_size,
        "mean": list(model.mean),
        "std": list(model.std),
        "source_size": [source_size, source_size],
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, folder / "best.pt")
    return folder
