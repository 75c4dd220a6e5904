"""Files in, one row per file out: ``predict(runs, input, out)``.

The input is a folder (searched recursively), an archive (.tar, .tar.gz, .tgz, .zip, read
in place) or a text file listing image paths, one per line, relative to the list's folder.
Every image file (by extension) becomes exactly one row, in natural filename order
(``2.png`` before ``10.png``); a file that cannot be read keeps its row, with an empty label
and the reason in the ``error`` column, so no row is ever shifted or dropped. Listed
files always get a row, whatever their extension: the list says they are images.

Output columns (``format="default"``)::

    file,label,confidence[,label_<run>...],error

``error`` is always there (empty when the file was read) so the schema does not depend on
the data; ``label_<run>`` columns appear with several runs. ``confidence`` is the
ensemble's score of the chosen label: the model's probability for one run, the share of
models voting for it (hard), the mean (soft) or weighted mean (weighted) probability.
``format="kaggle"`` writes ``id,label`` with the file stem as id.

Decoding overlaps with compute: chunks of files are read and decoded in a thread pool
(file reads, simplejpeg and Pillow release the GIL) while the main thread runs the models
on earlier chunks. Every file goes through :mod:`imgclf.data.preprocess`, the transform
the runs' training and validation images went through: cropped to cover the run's
``source_size`` (the size of the cache it was trained on, from its checkpoint), then
normalized and resized to its input size on the batch. A file is decoded once per distinct
source size among the runs (usually once), so a 32-px scratch net and a 224-px backbone
vote on the same files, each seeing them as it saw its training data.

Under torchrun (``torchrun --nproc-per-node N -m imgclf predict ...``) the sorted file list
is cut into N contiguous blocks, each process labels its own, and rank 0 gathers the rows
(over Gloo: they are Python objects) and writes the one CSV, in the same order and with
the same content as one process would.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from imgclf.data.decode import Size
from imgclf.data.preprocess import Preprocess, file_to_uint8
from imgclf.data.sources import IMAGE_EXTENSIONS, is_archive, open_tree
from imgclf.ensemble import vote as ensemble_vote
from imgclf.errors import DataError, UserError
from imgclf.evaluate.tta import TTA
from imgclf.inference.runs import (
    RunSet,
    check_vote,
    load_runs,
    prefer_order,
    resolve_weights,
)
from imgclf.io_utils import atomic_path, check_output_file
from imgclf.runtime import distributed
from imgclf.runtime.device import resolve_hardware
from imgclf.runtime.onnx import backend_for, onnx_net, resolve_backend

FORMATS = ("default", "kaggle")
# Chunks decoded ahead of the model, per decoding thread: enough to hide a slow chunk.
PREFETCH_PER_WORKER = 2


class PredictFailures(UserError):
    """``strict=True`` and some files could not be read (the output is written anyway)."""

    exit_code = 1
    result: PredictResult


# ---------------------------------------------------------------------------- inputs


@dataclass
class Item:
    """One input file: its name in the output, and where its bytes come from."""

    file: str  # relative POSIX path (folder, archive) or the line as listed
    path: str | None = None  # read by a decoding thread
    data: bytes | None = None  # archive members, already in memory
    error: str | None = None  # known unreadable before decoding (e.g. a broken link)


@dataclass
class Inputs:
    items: list[Item]
    ignored: Counter = field(default_factory=Counter)  # reason → files


_DIGITS = re.compile(r"(\d+)")


def natural_key(rel: str) -> tuple:
    """Sort key: digit runs compare as numbers (``2.png`` < ``10.png``), per path part,
    case-insensitively; the path itself breaks the remaining ties (``02`` vs ``2``)."""
    parts = tuple(
        tuple(int(t) if i % 2 else t.casefold() for i, t in enumerate(_DIGITS.split(part)))
        for part in rel.split("/")
    )
    return parts, rel


def _is_image(rel: str) -> bool:
    return PurePosixPath(rel).suffix.lower() in IMAGE_EXTENSIONS


def _os_metadata(rel: str) -> bool:
    # macOS archive litter: __MACOSX/ trees and AppleDouble "._name.jpg" files are not images
    parts = rel.split("/")
    return "__MACOSX" in parts or parts[-1].startswith("._")


def list_inputs(src: str | os.PathLike[str]) -> Inputs:
    """Every image under a folder or in an archive, or every file a list names, sorted."""
    src = Path(src).expanduser()
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if src.is_dir() or is_archive(src):
        inputs = _tree_inputs(src)
    elif src.suffix.lower() in IMAGE_EXTENSIONS:
        inputs = Inputs([Item(src.name, path=str(src))])
    else:
        inputs = _list_file_inputs(src)
    if not inputs.items:
        ignored = sum(inputs.ignored.values())
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"{src}: no image files ({exts}); {ignored} other files ignored")
    inputs.items.sort(key=lambda item: natural_key(item.file))
    return inputs


def _tree_inputs(src: Path) -> Inputs:
    tree = open_tree(src)  # a folder walk, or an archive read once into memory
    folder = src.is_dir()
    inputs = Inputs([])
    for rel in tree.files:
        if _os_metadata(rel):
            inputs.ignored["OS metadata"] += 1
        elif not _is_image(rel):
            inputs.ignored["not an image file"] += 1
        elif folder:
            inputs.items.append(Item(rel, path=str(src / rel)))
        else:
            inputs.items.append(Item(rel, data=tree.read(rel)))
    # Entries the walk could not turn into files (a broken link, an archive member over
    # the size cap, an unsafe or duplicate member): an image among them keeps its row,
    # with the reason, so no input is ever left out; anything else is counted.
    for skipped in tree.skipped:
        rel = _relative(skipped.path, src)
        if _is_image(rel):
            inputs.items.append(Item(rel, error=skipped.reason))
        else:
            inputs.ignored[skipped.reason] += 1
    return inputs


def _relative(described: str, src: Path) -> str:
    root = str(src).rstrip("/") + "/"
    return described[len(root) :] if described.startswith(root) else described


def _list_file_inputs(src: Path) -> Inputs:
    try:
        lines = src.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{src}: not a folder, an archive or a text list of image paths") from None
    inputs, seen = Inputs([]), set()
    for line in lines:
        name = line.strip()
        if not name:
            continue
        full = os.path.normpath(src.parent / name)
        if full in seen:
            inputs.ignored["listed twice"] += 1
            continue
        seen.add(full)
        inputs.items.append(Item(name, path=full))
    return inputs


# ---------------------------------------------------------------------------- decoding


@dataclass
class Decoded:
    """One chunk: the reason each file failed (None when read), and for each source size
    the good images as (positions in the chunk, N×H×W×3 uint8)."""

    reasons: list[str | None]
    groups: dict[Size, tuple[np.ndarray, np.ndarray]]


def _read(item: Item) -> tuple[bytes | None, str | None]:
    if item.error is not None:
        return None, item.error
    if item.data is not None:
        return item.data, None
    try:
        with open(item.path, "rb") as f:  # type: ignore[arg-type]
            return f.read(), None
    except OSError as exc:
        return None, f"cannot read file ({exc.strerror or exc})"


def decode_items(items: Sequence[Item], sizes: Sequence[Size]) -> Decoded:
    """Decode a chunk at every source size (runs in a worker thread)."""
    reasons: list[str | None] = []
    good: dict[Size, list[tuple[int, np.ndarray]]] = {size: [] for size in sizes}
    for pos, item in enumerate(items):
        data, why = _read(item)
        arrays = {}
        for size in sizes:
            if why is not None:
                break
            arrays[size], why = file_to_uint8(data, None, size)
        reasons.append(why)
        if why is None:
            for size, arr in arrays.items():
                good[size].append((pos, arr))
    groups = {
        size: (
            np.array([p for p, _ in rows], dtype=np.int64),
            np.stack([a for _, a in rows]) if rows else np.empty((0, *size, 3), np.uint8),
        )
        for size, rows in good.items()
    }
    return Decoded(reasons, groups)


def _decode_ahead(
    chunks: list[list[Item]], sizes: Sequence[Size], workers: int
) -> Iterator[tuple[list[Item], Decoded]]:
    """Chunks in order, each decoded in the pool while the caller works on earlier ones."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="imgclf-decode")
    pending: deque[tuple[list[Item], Future[Decoded]]] = deque()
    todo = iter(chunks)
    try:
        for chunk in todo:
            pending.append((chunk, pool.submit(decode_items, chunk, sizes)))
            if len(pending) >= workers * PREFETCH_PER_WORKER:
                break
        while pending:
            chunk, future = pending.popleft()
            following = next(todo, None)
            if following is not None:
                pending.append((following, pool.submit(decode_items, following, sizes)))
            yield chunk, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------- models


@dataclass
class _Member:
    """One run, ready to score batches: network, preprocessing, column order."""

    name: str
    net: torch.nn.Module
    preprocess: Preprocess
    order: torch.Tensor  # output columns in the first run's class order


def _members(rs: RunSet, device: torch.device, tta: bool, backend: str = "torch") -> list[_Member]:
    out = []
    for lr, order in zip(rs.runs, rs.orders, strict=True):
        lr.model.to(device, memory_format=torch.channels_last).eval()
        net = TTA(lr.model) if tta else lr.model
        pre = Preprocess.from_state(lr.state)
        # The same module, run by ONNX Runtime where asked or measured faster (imgclf.runtime.onnx)
        if backend_for(backend, lr.state["model_name"], device) == "onnx":
            wrapper = "tta" if tta else "plain"
            net = onnx_net(net, pre.input_size, lr.state.get("path"), wrapper=wrapper)
        out.append(
            _Member(
                lr.name,
                net,
                pre,
                torch.from_numpy(order).to(device),
            )
        )
    return out


def chunk_probs(
    members: list[_Member], decoded: Decoded, num_rows: int, num_classes: int, device, autocast
) -> np.ndarray:
    """Probabilities ``(models, rows, classes)`` of a chunk; failed rows stay NaN."""
    probs = np.full((len(members), num_rows, num_classes), np.nan, dtype=np.float32)
    for m, member in enumerate(members):
        positions, images = decoded.groups[member.preprocess.source_size]
        if len(positions) == 0:
            continue
        pixels = torch.from_numpy(images).to(device, non_blocking=True)
        # The loader's own preprocessing, so predict and eval feed models identically.
        x = member.preprocess.batch_to_input(pixels)
        with autocast():
            logits = member.net(x)
        scores = torch.softmax(logits.float(), dim=1)[:, member.order]
        probs[m, positions] = scores.cpu().numpy()
    return probs


# ---------------------------------------------------------------------------- rows


@dataclass
class _Plan:
    """How rows are labelled and written: the vote and the output columns."""

    classes: list[str]
    names: list[str]
    vote: str
    prefer: list[int] | None
    weights: list[float] | None
    format: str

    def header(self) -> list[str]:
        if self.format == "kaggle":
            return ["id", "label"]
        per_model = [f"label_{n}" for n in self.names] if len(self.names) > 1 else []
        return ["file", "label", "confidence", *per_model, "error"]

    def rows(self, items: list[Item], reasons: list[str | None], probs: np.ndarray) -> list:
        ok = np.array([r is None for r in reasons], dtype=bool)
        labels = np.full(len(items), -1, dtype=np.int64)
        confidence = np.zeros(len(items), dtype=np.float64)
        per_model = np.full((len(self.names), len(items)), -1, dtype=np.int64)
        if ok.any():
            good = probs[:, ok]
            voted, scores = self._vote(good)
            labels[ok] = voted
            confidence[ok] = scores[np.arange(len(voted)), voted]
            per_model[:, ok] = good.argmax(axis=2)
        return [
            self._row(items[i], reasons[i], labels[i], confidence[i], per_model[:, i])
            for i in range(len(items))
        ]

    def _vote(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(probs) == 1:
            return probs[0].argmax(axis=1), probs[0]
        weights = self.weights if self.vote == "weighted" else None
        return ensemble_vote(self.vote, probs, prefer_order=self.prefer, weights=weights)

    def _row(self, item: Item, reason, label: int, confidence: float, models) -> list[str]:
        name = self.classes[label] if label >= 0 else ""
        if self.format == "kaggle":
            return [PurePosixPath(item.file).stem, name]
        per_model = [self.classes[m] if m >= 0 else "" for m in models]
        conf = f"{confidence:.6f}" if label >= 0 else ""
        return [item.file, name, conf, *(per_model if len(self.names) > 1 else []), reason or ""]


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
    vote: str = "hard",
    prefer: Sequence[str] | None = None,
    weights: Mapping[str, float] | Sequence[float] | Sequence[str] | None = None,
    tta: bool = False,
    format: str = "default",
    batch_size: int = 256,
    strict: bool = False,
    device: str | None = None,
    workers: int | None = None,
    backend: str | None = None,
) -> PredictResult:
    """Label every image in ``input`` with the runs' vote; write a CSV to ``out`` atomically.

    ``prefer``: run names in hard-vote tie-break order (default: the order given).
    ``weights``: for ``vote="weighted"``, ``{run: w}``, ``["run:w", ...]`` or one number per
    run (default: each run's validation accuracy). ``strict``: raise
    :class:`PredictFailures` (after writing ``out``) when any file could not be read.
    ``backend``: ``"torch"``, ``"onnx"`` (ONNX Runtime, :mod:`imgclf.runtime.onnx`), or None:
    per model, the one measured faster. The preprocessing is the same on both.
    """
    started = time.perf_counter()
    check_output_file(out)  # before any model loads or file decodes: fail in a second
    env = distributed.from_env()  # under torchrun: this process's share of the files
    device = distributed.local_device(device)
    if format not in FORMATS:
        raise UserError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    check_vote(vote)
    hw = resolve_hardware(device, "auto", "auto")
    backend = resolve_backend(backend, hw.device)
    rs = load_runs(runs)
    plan = _Plan(
        classes=rs.classes,
        names=rs.names,
        vote=vote,
        prefer=prefer_order(rs, prefer),
        weights=resolve_weights(rs, weights) if vote == "weighted" and len(rs.runs) > 1 else None,
        format=format,
    )
    if vote != "hard" and plan.prefer is not None:
        raise UserError(f"--prefer breaks hard-vote ties; it does not apply to --vote {vote}")
    if vote != "weighted" and weights is not None:
        raise UserError(f"--weights apply to --vote weighted, not --vote {vote}")
    inputs = list_inputs(input)
    if format == "kaggle":
        _check_kaggle_ids(inputs.items)
    members = _members(rs, hw.device, tta, backend)
    sizes = list(dict.fromkeys(m.preprocess.source_size for m in members))

    def autocast() -> contextlib.AbstractContextManager:
        if hw.autocast_dtype is None or backend == "onnx":
            return contextlib.nullcontext()
        return torch.autocast(hw.device.type, dtype=hw.autocast_dtype)

    def labelled(items: list[Item]) -> Iterator[tuple[list, list[tuple[str, str]]]]:
        """(rows, failures) of each chunk of ``items``, in order."""
        chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        # The machine's cores are shared among the processes on it.
        threads = workers or max(1, default_workers() // env.local_world_size)
        decoding = _decode_ahead(chunks, sizes, threads)
        # closing: on an error, stop the decoding threads now
        with torch.inference_mode(), contextlib.closing(decoding):
            for chunk, decoded in decoding:
                probs = chunk_probs(
                    members, decoded, len(chunk), len(rs.classes), hw.device, autocast
                )
                yield (
                    plan.rows(chunk, decoded.reasons, probs),
                    [(it.file, r) for it, r in zip(chunk, decoded.reasons, strict=True) if r],
                )

    failed: list[tuple[str, str]] = []
    if env.enabled:
        failed = _sharded(inputs.items, labelled, out, plan.header(), hw.device, env)
    else:
        with (
            atomic_path(out) as tmp,
            open(tmp, "w", newline="", encoding="utf-8") as f,
        ):
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(plan.header())
            for rows, bad in labelled(inputs.items):
                writer.writerows(rows)
                failed += bad
    result = PredictResult(
        out=Path(out),
        rows=len(inputs.items),
        failures=len(failed),
        runs=rs.names,
        vote=vote,
        seconds=time.perf_counter() - started,
        ignored=inputs.ignored,
        failed=failed,
        processes=env.world_size,
    )
    if strict and failed and env.is_main:  # rank 0 holds every process's failures
        exc = PredictFailures(
            f"{len(failed)} of {result.rows} files could not be read "
            f"(rows with an error in {out}); first: {failed[0][0]}: {failed[0][1]}"
        )
        exc.result = result
        raise exc
    return result


def _sharded(
    items: list[Item],
    labelled: Callable[[list[Item]], Iterator[tuple[list, list[tuple[str, str]]]]],
    out: str | os.PathLike[str],
    header: list[str],
    device: torch.device,
    env: distributed.Dist,
) -> list[tuple[str, str]]:
    """Label this rank's contiguous block of ``items``; rank 0 gathers every block's rows
    in rank order (that is, input order) and writes the CSV atomically. Returns the
    failures: every rank's on rank 0, its own elsewhere."""
    d = distributed.init(device, backend="gloo")  # rows are Python objects: CPU transport
    try:
        begin, end = (len(items) * r // d.world_size for r in (d.rank, d.rank + 1))
        rows: list = []
        failed: list[tuple[str, str]] = []
        for part, bad in labelled(items[begin:end]):
            rows += part
            failed += bad
        gathered = d.gather((rows, failed))
        if gathered is None:
            return failed
        with (
            atomic_path(out) as tmp,
            open(tmp, "w", newline="", encoding="utf-8") as f,
        ):
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            for part, _ in gathered:
                writer.writerows(part)
        return [bad for _, part in gathered for bad in part]
    finally:
        d.shutdown()
