"""Inference: trained runs → probabilities → votes, shared by ``eval``, ``predict``,
``serve`` and ``export``.

- :mod:`imgclf.inference.runs`: load runs (:func:`~imgclf.inference.runs.load_run`,
  :func:`~imgclf.inference.runs.load_runs` → :class:`~imgclf.inference.runs.RunSet`: unique
  names, one class order) and check the vote options (``--vote``, ``--prefer``,
  ``--weights``).
- :mod:`imgclf.inference.engine`: the forward passes, over a cached data set's split
  (``eval``) or over decoded files (``predict``, ``serve``), on PyTorch or ONNX Runtime.

Layer: above the scoring modules (:mod:`imgclf.evaluate.metrics`, :mod:`imgclf.evaluate.tta`,
:mod:`imgclf.ensemble`), the models, the data and :mod:`imgclf.runtime`; beside
:mod:`imgclf.train`, which it does not import; below the commands.
"""
