"""What every layer above the data may use to run a model: checkpoints (atomic save, the
one safe ``torch.load``), device and precision choice, torchrun process groups, and ONNX
(export mechanics, ONNX Runtime sessions, the torch-or-ONNX backend choice).

It imports nothing of imgclf but :mod:`imgclf.errors`, :mod:`imgclf.io_utils`,
:mod:`imgclf.paths` and the package's ``__version__``, so ``models``, ``evaluate``,
``train``, inference and ``export`` share it without importing each other.
"""
