"""Models: one registry, one interface (:class:`Classifier`).

Importing this package registers every built-in model.
"""

from __future__ import annotations

# Imported for their @register side effect: the registry is filled on `import imgclf.models`.
from imgclf.models import fast, scratch  # noqa: F401
from imgclf.models.base import Classifier
from imgclf.models.registry import ModelSpec, create, list_models, model_spec, register

# Pretrained backbones (a later issue) register here too, e.g. `from imgclf.models import
# pretrained`, with kind="pretrained"; weights should load lazily so that listing models
# stays offline.

__all__ = ["Classifier", "ModelSpec", "create", "list_models", "model_spec", "register"]
