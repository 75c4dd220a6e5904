"""Models: one registry, one interface (:class:`Classifier`).

Importing this package registers every built-in model.
"""

from __future__ import annotations

# Imported for their @register side effect: the registry is filled on `import imgclf.models`.
from imgclf.models import backbones, fast, lite0, scratch, timm_models  # noqa: F401
from imgclf.models.base import Classifier
from imgclf.models.registry import (
    ModelSpec,
    build_model_from_checkpoint,
    create,
    list_models,
    model_spec,
    other_models,
    register,
)

# Pretrained backbones (backbones.py: torchvision, by name; lite0.py; timm_models.py:
# timm/<name>) import torchvision and timm only when a model is built or named, and fetch
# weights only for pretrained=True, so listing models stays fast and offline.

__all__ = [
    "Classifier",
    "ModelSpec",
    "build_model_from_checkpoint",
    "create",
    "list_models",
    "model_spec",
    "other_models",
    "register",
]
