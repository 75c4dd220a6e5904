"""``build_report(paths, out)``: run folders → one HTML page or a Markdown file + PNGs."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgclf.errors import UserError
from imgclf.evaluate.compare import Comparison, compare_runs
from imgclf.io_utils import atomic_write_text, check_output_file, make_folder
from imgclf.report.collect import Page, RunInfo, read_runs, vote_sources
from imgclf.report.to_html import render_html
from imgclf.report.to_markdown import render_markdown

FORMATS = ("html", "md")
ENSEMBLE_IMAGE = "ensemble_confusion.png"


@dataclass
class Report:
    path: Path
    runs: list[RunInfo]
    comparison: Comparison | None = None
    files: list[Path] = field(default_factory=list)  # PNGs written beside a Markdown report


def _format(out: Path | None, fmt: str | None) -> str:
    if fmt is None:
        fmt = "md" if out is not None and out.suffix.lower() in (".md", ".markdown") else "html"
    if fmt not in FORMATS:
        raise UserError(f"unknown report format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return fmt


def _ensemble(
    paths: list[str | os.PathLike[str]], ensemble: Mapping[str, Any] | Comparison | None
) -> dict | None:
    """The comparison (computed from ``compare_runs`` options unless given: the runs of
    ``paths``, an ensemble folder's with its own vote unless one is given) and its PNG."""
    if ensemble is None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from imgclf.evaluate.plots import confusion_figure

    if isinstance(ensemble, Comparison):
        comparison = ensemble
    else:
        comparison = compare_runs(vote_sources(paths), **dict(ensemble))
    fig = confusion_figure(comparison.confusion_panels(), comparison.classes)
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return {"comparison": comparison, "png": buffer.getvalue()}


def build_report(
    paths: list[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    format: str | None = None,
    ensemble: Mapping[str, Any] | Comparison | None = None,
    title: str | None = None,
) -> Report:
    """Report run folders (or folders of them) into ``out``, written atomically.

    ``format``: ``"html"`` (one self-contained file, images embedded) or ``"md"`` (PNGs
    copied into ``<out stem>_files/``); default from ``out``'s suffix, else html.
    ``ensemble``: keyword arguments of :func:`~imgclf.evaluate.compare.compare_runs`
    (``{"data": "c10", "split": "val", "vote": "soft"}``) or a ready ``Comparison``, for
    the ensemble section of all the runs.
    """
    out_path = Path(out) if out is not None else None
    fmt = _format(out_path, format)
    out_path = out_path or Path(f"report.{fmt}")
    check_output_file(out_path)  # before runs are read and the ensemble scored
    runs = read_runs(list(paths))
    ens = _ensemble(list(paths), ensemble)
    title = title or f"imgclf report: {len(runs)} run{'s' if len(runs) != 1 else ''}"
    generated = time.strftime("%Y-%m-%d %H:%M:%S %z")
    comparison = ens["comparison"] if ens else None
    page = Page(runs, title, generated, ens)
    if fmt == "html":
        pngs = {r.name: {k: p.read_bytes() for k, p in r.images.items()} for r in runs}
        text = render_html(page, pngs)
        atomic_write_text(out_path, text)
        return Report(out_path, runs, comparison)
    files_dir = out_path.with_name(f"{out_path.stem}_files")
    links, files = _write_files(runs, ens, files_dir)
    text = render_markdown(page, links, f"{files_dir.name}/{ENSEMBLE_IMAGE}")
    atomic_write_text(out_path, text)
    return Report(out_path, runs, comparison, files)


def _write_files(
    runs: list[RunInfo], ens: dict | None, files_dir: Path
) -> tuple[dict[str, dict[str, str]], list[Path]]:
    """Copy the PNGs into a fresh ``files_dir``, swapped in whole (never half-written)."""
    make_folder(files_dir.parent, "--out")
    tmp = Path(tempfile.mkdtemp(prefix=f".{files_dir.name}.tmp-", dir=files_dir.parent))
    links: dict[str, dict[str, str]] = {}
    names: list[str] = []
    try:
        for run in runs:
            for kind, src in run.images.items():
                name = f"{run.name}-{src.name}"
                shutil.copyfile(src, tmp / name)
                links.setdefault(run.name, {})[kind] = f"{files_dir.name}/{name}"
                names.append(name)
        if ens is not None:
            (tmp / ENSEMBLE_IMAGE).write_bytes(ens["png"])
            names.append(ENSEMBLE_IMAGE)
        old = files_dir.with_name(f".{files_dir.name}.old-{os.getpid()}")
        if files_dir.exists():
            files_dir.rename(old)
        tmp.rename(files_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return links, [files_dir / n for n in names]
