"""Files in, one row per file out: ``predict(runs, input, out)``.

The input is a folder (searched recursively), an archive (.tar, .tar.gz, .tgz, .zip, read
in place) or a text file listing image paths, one per line, relative to the list's folder.
Every image file (by extension) becomes exactly one row, in natural filename order
(``2.png`` before ``10.png``); a file that cannot be read keeps its row, with an empty label
and the reason in the ``error`` column, so no row is ever shifted or dropped. Hidden files
and OS metadata (dot-files, ``._x.jpg``, ``__MACOSX/``) are left out of a folder or archive
by the rule ``data import`` uses (:func:`imgclf.data.sources.is_hidden`). Listed files
always get a row, whatever their name: the list says they are images.

Output columns (``format="default"``)::

    file,label,confidence[,label_2,confidence_2,...,label_K,confidence_K][,label_<run>...]
    [,prob_<class>...],error

``error`` is always there (empty when the file was read) so the schema does not depend on
the data; ``label_<run>`` columns appear with several runs. ``confidence`` is the
ensemble's score of the chosen label: the model's probability for one run, the share of
models voting for it (hard), the mean (soft) or weighted mean (weighted) probability.
``top_k=K`` adds the next K-1 classes by that score, ``probs=True`` every class's score
(refused for a hard vote of several runs: it has shares, not probabilities).
``format="kaggle"`` writes ``id,label`` with the file stem as id; ``format="jsonl"`` one
JSON object per file, in the same order (:meth:`imgclf.inference.rows.Plan._record`):
``file``, ``label``, ``confidence``, ``top_k`` ([label, score] pairs), ``models`` (with
several runs), ``probs`` (when asked) and ``error`` (null when the file was read). Without
a format, an ``out`` ending in ``.jsonl`` gets JSON Lines and any other a CSV.

Decoding overlaps with compute: chunks of files are read and decoded in a thread pool
(file reads, simplejpeg and Pillow release the GIL) while the main thread runs the models
on earlier chunks (:mod:`imgclf.inference`: the listing of the inputs, decoding ahead, the
members' forward passes, the vote; this module writes the rows). Every file goes through
:mod:`imgclf.data.preprocess`, the transform the runs' training and validation images went
through: cropped to cover the run's ``source_size`` (the size of the cache it was trained
on, from its checkpoint), then normalized and resized to its input size on the batch. A
file is decoded once per distinct source size among the runs (usually once), so a 32-px
scratch net and a 224-px backbone vote on the same files, each seeing them as it saw its
training data.

Under torchrun (``torchrun --nproc-per-node N -m imgclf predict ...``) the sorted file list
is cut into N contiguous blocks, each process labels its own, and rank 0 gathers the rows
(over Gloo: they are Python objects) and writes the one CSV, in the same order and with
the same content as one process would.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from imgclf.csv_safe import write_csv
from imgclf.data.decode import default_workers
from imgclf.errors import DataError, UserError
from imgclf.inference.decode import Item
from imgclf.inference.engine import Autocast, Member, autocast_for, make_members, scored_chunks
from imgclf.inference.inputs import Inputs, list_inputs
from imgclf.inference.rows import ROW_FORMATS, Plan
from imgclf.inference.runs import check_vote, load_runs
from imgclf.io_utils import atomic_path, check_output_file
from imgclf.runtime import distributed
from imgclf.runtime.device import resolve_hardware
from imgclf.runtime.distributed import Dist
from imgclf.runtime.onnx import resolve_backend

FORMATS = ROW_FORMATS  # default (CSV), kaggle (CSV), jsonl


class PredictFailures(UserError):
    """``strict=True`` and some files could not be read (the output is written anyway)."""

    exit_code = 1
    result: PredictResult


# ---------------------------------------------------------------------------- output


def _check_kaggle_ids(items: list[Item]) -> None:
    seen: dict[str, str] = {}
    for item in items:
        stem = PurePosixPath(item.file).stem
        if stem in seen:
            raise DataError(
                f"--format kaggle: {seen[stem]} and {item.file} both give id {stem!r}; "
                "ids (file stems) must be unique"
            )
        seen[stem] = item.file


# ---------------------------------------------------------------------------- predict


@dataclass
class PredictResult:
    out: Path
    rows: int
    failures: int
    runs: list[str]
    vote: str
    seconds: float
    ignored: Counter = field(default_factory=Counter)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    processes: int = 1  # torchrun processes that shared the files

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        how = f"{len(self.runs)} runs, {self.vote} vote" if len(self.runs) > 1 else self.runs[0]
        shared = f", shared by {self.processes} processes" if self.processes > 1 else ""
        lines = [
            f"wrote {self.rows} rows to {self.out} ({how}) in {self.seconds:.1f} s, "
            f"{self.images_per_second:.0f} images/s{shared}"
        ]
        lines.append(f"{_files(self.failures)} could not be read" + (":" if self.failures else ""))
        lines += [f"  {file}: {reason}" for file, reason in self.failed[:10]]
        if self.failures > 10:
            lines.append(f"  … {self.failures - 10} more (see the error column)")
        if self.ignored:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.ignored.items()))
            lines.append(f"ignored {_files(sum(self.ignored.values()))} ({why})")
        return "\n".join(lines)


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def predict(
    runs: Sequence[str | os.PathLike[str]],
    input: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    vote: str | None = None,
    prefer: Sequence[str] | None = None,
    weights: Mapping[str, float] | Sequence[float] | Sequence[str] | None = None,
    tta: bool = False,
    format: str | None = None,
    top_k: int = 1,
    probs: bool = False,
    batch_size: int = 256,
    strict: bool = False,
    device: str | None = None,
    workers: int | None = None,
    backend: str | None = None,
    csv_raw: bool = False,
) -> PredictResult:
    """Label every image in ``input`` with the runs' vote; write ``out`` atomically.

    ``runs``: run or ensemble folders, or checkpoints (one class set). ``input``: a folder,
    an archive, a text list of image paths or one image; ``format`` (CSV ``default`` or
    ``kaggle``, or ``jsonl``; None: from ``out``'s suffix), ``top_k``, ``probs``: see the
    module's description. ``vote``: ``hard``, ``soft``, ``weighted`` or None (an ensemble
    folder's own, else hard). ``prefer``: run names, hard-vote tie-break order (default:
    as given). ``weights``: for ``vote="weighted"``, ``{run: w}``, ``["run:w", ...]`` or one
    per run (default: validation accuracies). ``tta``: each model's test-time views averaged.
    ``batch_size``: files per chunk. ``strict``: raise :class:`PredictFailures` after writing
    if a file could not be read. ``workers``: decoding threads (default: this process's
    share of the cores). ``backend``: torch, onnx or None. ``csv_raw``: see imgclf.csv_safe.
    """
    started = time.perf_counter()
    check_output_file(out)  # before any model loads or file decodes: fail in a second
    env = distributed.from_env()  # under torchrun: this process's share of the files
    format = _check_options(format or output_format(out), batch_size, vote)
    hw = resolve_hardware(distributed.local_device(device), "auto", "auto")
    backend = resolve_backend(backend, hw.device)
    rs = load_runs(runs)
    plan = Plan.for_runs(rs, vote, prefer, weights, format, top_k, probs)
    inputs = _inputs(input, format)
    threads = workers or max(1, default_workers() // env.local_world_size)  # cores shared
    members = make_members(rs, hw.device, tta, backend)
    pipeline = _Pipeline(members, plan, hw.device, autocast_for(hw, backend), batch_size, threads)
    write = _writer(out, plan, csv_raw)  # rank 0's (torchrun)
    failed = _label(inputs.items, pipeline.labelled, write, hw.device, env)
    result = PredictResult(
        out=Path(out),
        rows=len(inputs.items),
        failures=len(failed),
        runs=rs.names,
        vote=plan.vote,
        seconds=time.perf_counter() - started,
        ignored=inputs.ignored,
        failed=failed,
        processes=env.world_size,
    )
    if strict and failed and env.is_main:  # rank 0 holds every process's failures
        raise _failures(result, out)
    return result


def output_format(out: str | os.PathLike[str]) -> str:
    """The format an output file's name asks for: ``jsonl`` for ``.jsonl``, else CSV."""
    return "jsonl" if Path(out).suffix.lower() == ".jsonl" else "default"


def default_output(format: str | None) -> str:
    """The file ``imgclf predict`` writes without ``--out``."""
    return "predictions.jsonl" if format == "jsonl" else "predictions.csv"


def _inputs(input: str | os.PathLike[str], format: str) -> Inputs:
    inputs = list_inputs(input)
    if format == "kaggle":
        _check_kaggle_ids(inputs.items)
    return inputs


def _check_options(format: str, batch_size: int, vote: str | None) -> str:
    """``format``, once it and the other options are checked."""
    if format not in FORMATS:
        raise UserError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    check_vote(vote)
    return format


Labelled = Iterator[tuple[list, list[tuple[str, str]]]]
Labelling = Callable[[list[Item]], Labelled]  # items → (rows, failures) per chunk


@dataclass
class _Pipeline:
    """Files → rows: chunks decoded ahead in threads, each scored by every member in one
    forward pass (:func:`~imgclf.inference.engine.scored_chunks`) and voted into rows."""

    members: list[Member]
    plan: Plan
    device: torch.device
    autocast: Autocast
    batch_size: int
    threads: int

    def labelled(self, items: list[Item]) -> Labelled:
        """(rows, failures) of each chunk of ``items``, in order."""
        classes = len(self.plan.classes)
        scored = scored_chunks(
            self.members, items, classes, self.device, self.autocast, self.batch_size, self.threads
        )
        with contextlib.closing(scored):  # on an error here, stop the decoding threads now
            for chunk, decoded, probs in scored:
                yield (
                    self.plan.rows(chunk, decoded.reasons, probs),
                    [(it.file, r) for it, r in zip(chunk, decoded.reasons, strict=True) if r],
                )


Write = Callable[[Iterable[list]], None]  # the file's writer, given the rows of each chunk


def _label(
    items: list[Item], labelled: Labelling, write: Write, device: torch.device, env: Dist
) -> list[tuple[str, str]]:
    """Label ``items`` and write the CSV (under torchrun: share them, :func:`_sharded`);
    returns the files that could not be read, with the reasons."""
    if not env.enabled:
        failed: list[tuple[str, str]] = []
        write(_collect(labelled(items), failed))
        return failed
    d = distributed.init(device, backend="gloo")  # rows are Python objects: CPU transport
    try:
        return _sharded(items, labelled, write, d)
    finally:
        d.shutdown()


def _collect(labelled: Labelled, failed: list[tuple[str, str]]) -> Iterator[list]:
    """The rows of each chunk, its failures added to ``failed`` on the way."""
    for rows, bad in labelled:
        failed += bad
        yield rows


def _writer(out: str | os.PathLike[str], plan: Plan, raw: bool) -> Write:
    if plan.format == "jsonl":
        return functools.partial(_write_jsonl, out)
    return functools.partial(_write_csv, out, plan.header(), raw)


def _write_jsonl(out: str | os.PathLike[str], parts: Iterable[list]) -> None:
    """Every part's records, one JSON object a line, written atomically (nothing on an
    error). Names are JSON strings, never cells a spreadsheet runs: no quoting needed."""
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in itertools.chain.from_iterable(parts):
            f.write(json.dumps(record) + "\n")


def _write_csv(
    out: str | os.PathLike[str], header: list[str], raw: bool, parts: Iterable[list]
) -> None:
    """The header, then every part's rows, written atomically (nothing on an error); file,
    class and run names neutralised for spreadsheets unless ``raw`` (imgclf.csv_safe)."""
    write_csv(out, itertools.chain([header], itertools.chain.from_iterable(parts)), raw=raw)


def _failures(result: PredictResult, out: str | os.PathLike[str]) -> PredictFailures:
    first, why = result.failed[0]
    exc = PredictFailures(
        f"{result.failures} of {result.rows} files could not be read "
        f"(rows with an error in {out}); first: {first}: {why}"
    )
    exc.result = result
    return exc


def _sharded(
    items: list[Item], labelled: Labelling, write: Write, d: Dist
) -> list[tuple[str, str]]:
    """Label this rank's contiguous block of ``items``; rank 0 gathers every block's rows
    in rank order (that is, input order) and writes the CSV atomically. Returns the
    failures: every rank's on rank 0, its own elsewhere."""
    begin, end = (len(items) * r // d.world_size for r in (d.rank, d.rank + 1))
    rows: list = []
    failed: list[tuple[str, str]] = []
    for part, bad in labelled(items[begin:end]):
        rows += part
        failed += bad
    gathered = d.gather((rows, failed))
    if gathered is None:
        return failed
    write(part for part, _ in gathered)
    return [bad for _, part in gathered for bad in part]
