"""imgclf: image classification from a folder of images to an HTML report.

Library use mirrors the CLI::

    import imgclf
    imgclf.import_dataset("photos/", name="photos")
    run = imgclf.train("fast", data="photos")
    print(imgclf.evaluate(run, data="photos").accuracy)
    clf = imgclf.load(run)
    print(clf.predict("holiday/", top_k=3))
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Imported lazily so `import imgclf` (and `imgclf --help`) do not pay for torch.
_EXPORTS = {
    "train": "imgclf.train.api",
    "Run": "imgclf.train.state",
    "evaluate": "imgclf.evaluate.runs",
    "import_dataset": "imgclf.data.importer",
    "load_dataset": "imgclf.data.cache",
    "load_recipe": "imgclf.train.recipe",
    "load": "imgclf.predictor",
    "Classifier": "imgclf.predictor",
    "Prediction": "imgclf.predictor",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'imgclf' has no attribute {name!r}")
