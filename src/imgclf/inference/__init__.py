"""Inference: trained runs → probabilities → votes, shared by ``eval``, ``predict``,
``serve`` and ``export``.

- :mod:`imgclf.inference.runs`: load runs (:func:`~imgclf.inference.runs.load_run`,
  :func:`~imgclf.inference.runs.load_runs` → :class:`~imgclf.inference.runs.RunSet`: unique
  names, one class order) and check the vote options (``--vote``, ``--prefer``,
  ``--weights``).
- :mod:`imgclf.inference.decode`: files (:class:`~imgclf.inference.decode.Item`) → uint8
  images at each run's source size, decoded ahead in threads.
- :mod:`imgclf.inference.engine`: the forward passes, of a run set's members over decoded
  files (``predict``, ``serve``; PyTorch or ONNX Runtime) and of one run over a cached
  data set's split (``eval``).
- :mod:`imgclf.inference.rows`: the vote over the members' probabilities → one label and
  score per file (:class:`~imgclf.inference.rows.Plan`).

Layer: above the scoring modules (:mod:`imgclf.evaluate.metrics`, :mod:`imgclf.evaluate.tta`,
:mod:`imgclf.ensemble`), the models, the data and :mod:`imgclf.runtime`; beside
:mod:`imgclf.train`, which it does not import; below the commands.
"""
