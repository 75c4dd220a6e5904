"""The Python predictor: ``clf = imgclf.load("runs/a")``, then ``clf.predict(images)``.

::

    import imgclf
    clf = imgclf.load("runs/photos")                 # or [run_a, run_b], "model.onnx", "best.pt"
    for p in clf.predict("holiday/", top_k=3):      # a folder, files, PIL images, arrays, bytes
        print(p.source, p.label, p.confidence, p.top_k)

It is ``imgclf predict`` without the CSV: the same listing of a folder
(:mod:`imgclf.inference.inputs`, natural order), the same decoding and preprocessing
(:mod:`imgclf.inference.decode` → :mod:`imgclf.data.preprocess`), the same members on the
same backend and device (:func:`~imgclf.inference.engine.make_members`,
:func:`~imgclf.inference.engine.scored_chunks`) and the same vote
(:class:`~imgclf.inference.rows.Plan`), so a file gets the probabilities ``predict``,
``serve`` and ``eval`` give it (tests/test_predictor.py checks all four).

Pixels given in memory (a Pillow image, an H×W×3 uint8 array) go through the same
transform from the decoded image on (:func:`imgclf.data.preprocess.image_to_uint8`); raw
bytes are a file's bytes. An input that cannot be read or decoded gets a result with its
``error``, in its place; it never costs the other inputs their results.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgclf.data.decode import default_workers
from imgclf.data.sources import is_archive
from imgclf.errors import DataError, UserError
from imgclf.inference.decode import Item
from imgclf.inference.engine import (
    Autocast,
    Member,
    autocast_for,
    make_members,
    scored_chunks,
)
from imgclf.inference.inputs import list_inputs
from imgclf.inference.rows import Plan, top_k_pairs
from imgclf.inference.runs import check_vote, load_runs
from imgclf.runtime.device import Hardware, resolve_hardware
from imgclf.runtime.onnx import resolve_backend

Source = str | int  # a file's path, or an in-memory input's position in what was given
KINDS = "a path, a folder, a PIL image, an H×W×3 uint8 numpy array or bytes"


@dataclass
class Prediction:
    """One input's answer.

    ``label`` and ``confidence``: the vote's class and its score (one run: its probability;
    several: the soft or weighted mean probability, or the hard vote's share of models).
    ``top_k``: the ``k`` best (label, score) pairs, best first (ties in class order).
    ``probs``: every class's score, when asked. ``source``: the file's path (files in a
    folder: the folder joined with their path inside it), or the input's position in the
    list given (in-memory images and bytes). ``error``: why the input could not be read, in
    one line (``label`` and ``confidence`` are None then, ``top_k`` empty)."""

    source: Source
    label: str | None
    confidence: float | None
    top_k: list[tuple[str, float]]
    probs: dict[str, float] | None = None
    error: str | None = None


@dataclass
class _Scored:
    """Every input's voted label (-1 where unreadable), scores (NaN rows there), reason."""

    labels: np.ndarray
    scores: np.ndarray
    reasons: list[str | None]


class Classifier:
    """A trained run, a vote of several, or an exported ONNX file, ready to label images.

    Made by :func:`load`. ``classes``: the class names, in the column order of
    :meth:`predict_proba`. ``input_size``: the model's square input (a tuple, one per run,
    when runs of different sizes vote). ``runs``: the models' names. ``backend``: what
    runs them, ``torch``, ``onnx`` or ``mixed`` (chosen per model as ``imgclf predict``
    chooses, unless :func:`load` was given one). ``device``: where.
    """

    def __init__(
        self,
        members: list[Member],
        plan: Plan,
        hw: Hardware,
        backend: str,
        autocast: Autocast,
        batch_size: int,
        workers: int,
    ) -> None:
        self._members, self._plan, self._autocast = members, plan, autocast
        self.classes: list[str] = list(plan.classes)
        self.runs: list[str] = list(plan.names)
        backends = {m.backend for m in members}
        if backend == "auto":  # say what "auto" chose: one name, or "mixed"
            backend = backends.pop() if len(backends) == 1 else "mixed"
        self.backend = backend
        self.device = hw.device
        self.batch_size = batch_size
        self.workers = workers
        sizes = tuple(m.preprocess.input_size for m in members)
        self.input_size: int | tuple[int, ...] = sizes[0] if len(set(sizes)) == 1 else sizes

    def __repr__(self) -> str:
        runs = ", ".join(self.runs)
        vote = f", {self._plan.vote} vote" if len(self.runs) > 1 else ""
        return (
            f"Classifier({runs}{vote}: {len(self.classes)} classes, input {self.input_size}, "
            f"{self.backend} on {self.device})"
        )

    def predict(self, x: Any, top_k: int = 1, probs: bool = False) -> list[Prediction]:
        """Label images: one :class:`Prediction` per image, in order.

        Args:
            x: a path (an image file, or a folder or archive: its images, in the natural
                order ``imgclf predict`` writes them), a PIL image, an H×W×3 uint8 numpy
                array, an image file's bytes, or a list mixing these (an N×H×W×3 array is N
                images).
            top_k: how many (label, score) pairs each result's ``top_k`` holds.
            probs: also give every class's score, as ``Prediction.probs``.

        Returns:
            A list of :class:`Prediction`; an image that cannot be read has its ``error``.

        Raises:
            DataError: a path that does not exist, or a folder without images.
            UserError: an input of another kind, or ``top_k`` below 1.

        Example::

            clf = imgclf.load("runs/photos")
            best = clf.predict(["a.jpg", Image.open("b.png")], top_k=3)
            print(best[0].label, best[0].top_k)
        """
        if not isinstance(top_k, int) or top_k < 1:
            raise UserError(f"top_k={top_k!r}: give a whole number of at least 1")
        items, sources = _expand(x)
        scored = self._score(items)
        k = min(top_k, len(self.classes))
        out = []
        for i, source in enumerate(sources):
            if scored.reasons[i] is not None:
                out.append(Prediction(source, None, None, [], None, scored.reasons[i]))
                continue
            row, label = scored.scores[i], int(scored.labels[i])
            every = dict(zip(self.classes, map(float, row), strict=True)) if probs else None
            pairs = top_k_pairs(row, self.classes, k)
            out.append(Prediction(source, self.classes[label], float(row[label]), pairs, every))
        return out

    __call__ = predict

    def predict_proba(self, x: Any) -> np.ndarray:
        """Every class's score for each image, as a ``(images, classes)`` float64 array,
        columns in :attr:`classes` order (scikit-learn's ``predict_proba``).

        ``x``: as :meth:`predict`. A row is the vote's scores: one run's probabilities, the
        soft or weighted mean probabilities, or the hard vote's share of models per class.
        The row of an image that cannot be read is all NaN (:meth:`predict` says why).

        Example::

            clf = imgclf.load("runs/photos")
            p = clf.predict_proba(["a.jpg", "b.jpg"])
            labels = np.asarray(clf.classes)[p.argmax(1)]
        """
        return self._score(_expand(x)[0]).scores

    def _score(self, items: list[Item]) -> _Scored:
        """The vote of every item, chunk by chunk as ``imgclf predict`` computes it."""
        n, classes = len(items), len(self.classes)
        labels = np.full(n, -1, dtype=np.int64)
        scores = np.full((n, classes), np.nan, dtype=np.float64)
        reasons: list[str | None] = []
        batching = (self.device, self._autocast, self.batch_size, self.workers)
        scored = scored_chunks(self._members, items, classes, *batching)
        with contextlib.closing(scored):  # on an error here, stop the decoding threads now
            for _, decoded, probs in scored:
                ok = np.array([r is None for r in decoded.reasons], dtype=bool)
                if ok.any():
                    voted, votes = self._plan.decide(probs[:, ok])
                    rows = len(reasons) + np.flatnonzero(ok)
                    labels[rows], scores[rows] = voted, votes
                reasons += decoded.reasons
        return _Scored(labels, scores, reasons)


# ---------------------------------------------------------------------------- inputs


def _expand(x: Any) -> tuple[list[Item], list[Source]]:
    """What to decode, and each result's source: folders listed, paths checked."""
    if isinstance(x, np.ndarray) and x.ndim == 4:
        x = list(x)  # a batch of N images
    given = list(x) if isinstance(x, list | tuple) else [x]
    items: list[Item] = []
    sources: list[Source] = []
    for i, one in enumerate(given):
        if isinstance(one, str | os.PathLike):
            for item, source in _path_items(one):
                items.append(item)
                sources.append(source)
            continue
        if isinstance(one, Image.Image | np.ndarray):
            items.append(Item(f"#{i}", image=one))
        elif isinstance(one, bytes | bytearray | memoryview):
            items.append(Item(f"#{i}", data=bytes(one)))
        else:
            raise UserError(f"input {i} is a {type(one).__name__}; give {KINDS}, or a list")
        sources.append(i)
    return items, sources


def _path_items(given: str | os.PathLike[str]) -> Iterable[tuple[Item, Source]]:
    """One image file, or the images of a folder or archive (``predict``'s listing)."""
    path = Path(given).expanduser()
    if not path.exists() and not path.is_symlink():
        raise DataError(f"{given}: no such file or folder")
    if not (path.is_dir() or is_archive(path)):
        yield Item(os.fspath(given), path=str(path)), os.fspath(given)
        return
    for item in list_inputs(path).items:
        yield item, os.path.join(os.fspath(given), item.file)


# ---------------------------------------------------------------------------- load


def load(
    model: Any,
    *,
    vote: str | None = None,
    prefer: Sequence[str] | None = None,
    weights: Mapping[str, float] | Sequence[float] | Sequence[str] | None = None,
    backend: str | None = None,
    device: str | None = None,
    tta: bool = False,
    batch_size: int = 256,
    workers: int | None = None,
) -> Classifier:
    """A trained model, ready to label images in Python: a :class:`Classifier`.

    Args:
        model: a run folder (its ``best.pt``, else ``last.pt``), a checkpoint ``.pt``, a
            ``Run`` from :func:`imgclf.train`, a list of these (their ``vote``, as
            ``imgclf predict A B --vote ...``), or an ``.onnx`` file ``imgclf export``
            wrote (run by ONNX Runtime on the CPU; its preprocessing from its metadata).
        vote: ``hard``, ``soft`` or ``weighted``, for several runs (None: an ensemble
            folder's own, else ``hard``, as ``imgclf predict``).
        prefer: run names in hard-vote tie-break order (default: the order given).
        weights: for ``vote="weighted"``: ``{run: w}``, ``["run:w", ...]`` or one number per
            run (default: each run's validation accuracy).
        backend: ``"torch"``, ``"onnx"``, or None (per model, the one measured faster, as
            ``imgclf predict`` chooses).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``…; None: a GPU when there is one.
        tta: average each model's test-time views (the mirror image, and shifts for small
            images), as ``imgclf predict --tta``.
        batch_size: images per forward pass (``imgclf predict``'s default).
        workers: decoding threads (default: the cores this process may use).

    Returns:
        A :class:`Classifier`: ``predict``, ``predict_proba``, ``classes``, ``input_size``.

    Raises:
        UserError: a path that is no run, checkpoint or imgclf ONNX file, runs of different
            classes, or an option that does not apply (one line, naming the problem).

    Example::

        clf = imgclf.load(["runs/a", "runs/b"], vote="soft")
        print(clf.predict("photo.jpg")[0].label)
    """
    check_vote(vote)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size={batch_size!r}: give a whole number of at least 1")
    hw = resolve_hardware(device, "auto", "auto")  # as predict and serve: the same autocast
    many = list(model) if isinstance(model, list | tuple) else [model]
    threads = workers or default_workers()
    backend = resolve_backend(backend, hw.device)
    rs = load_runs(many)
    plan = Plan.for_runs(rs, vote, prefer, weights)
    members = make_members(rs, hw.device, tta, backend)
    return Classifier(members, plan, hw, backend, autocast_for(hw, backend), batch_size, threads)
