"""What every layer above the data may use to run a model: checkpoints (atomic save, the
one safe ``torch.load``), device and precision choice, and torchrun process groups.

It imports nothing of imgclf but :mod:`imgclf.errors` and :mod:`imgclf.io_utils`, so
``models``, ``evaluate``, ``train`` and inference share it without importing each other.
"""
