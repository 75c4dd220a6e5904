"""CSV files a spreadsheet opens as data: every CSV imgclf writes goes through here.

A spreadsheet (Excel, LibreOffice Calc, Google Sheets) runs a cell that begins with ``=``,
``+``, ``-``, ``@``, tab or carriage return as a formula, and file and class names come from
whoever named the files ("CSV Injection", OWASP:
https://owasp.org/www-community/attacks/CSV_Injection). Such a text cell is written with a
``'`` in front, OWASP's remedy: the spreadsheet shows it as text. Numbers are left as they
are (``-0.5`` is a number to a spreadsheet, not a formula), whether given as numbers or as
their text.

The quote is reversible, so imgclf reads its own files back unchanged (:func:`restore`): a
text cell that already begins with ``'`` followed by a formula character gets one more
``'``, so that stripping one ``'`` is never ambiguous. ``raw=True`` writes the cells as they
are, for programs that read the file (``imgclf predict --csv-raw``).
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from imgclf.io_utils import atomic_path

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP's list
QUOTE = "'"
# A number a spreadsheet reads as one, e.g. what f"{x:.6f}" and f"{x:.6g}" write.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def _needs_quote(text: str) -> bool:
    bare = text.lstrip(QUOTE)
    return bare.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(bare)


def neutralise(value: Any) -> Any:
    """``value`` with a ``'`` in front if a spreadsheet would run it; non-text as it is."""
    if isinstance(value, str) and _needs_quote(value):
        return QUOTE + value
    return value


def restore(text: str) -> str:
    """The cell :func:`neutralise` was given (a text cell read back from our CSVs)."""
    if text.startswith(QUOTE) and _needs_quote(text[1:]):
        return text[1:]
    return text


def csv_text(rows: Iterable[Sequence[Any]], *, raw: bool = False, end: str = "\n") -> str:
    """``rows`` as CSV text, every cell neutralised unless ``raw``; lines end with ``end``."""
    buffer = io.StringIO()
    write_rows(buffer, rows, raw=raw, end=end)
    return buffer.getvalue()


def write_rows(
    f: io.TextIOBase, rows: Iterable[Sequence[Any]], *, raw: bool = False, end: str = "\n"
) -> None:
    """Write ``rows`` to the open text file ``f`` (opened with ``newline=""``)."""
    writer = csv.writer(f, lineterminator=end)
    for row in rows:
        writer.writerow(row if raw else [neutralise(cell) for cell in row])


def write_csv(
    path: str | os.PathLike[str],
    rows: Iterable[Sequence[Any]],
    *,
    raw: bool = False,
    end: str = "\n",
) -> None:
    """Write ``rows`` to ``path`` atomically (nothing on an error), neutralised unless
    ``raw``. ``rows`` may be a generator: it is written as it comes."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        write_rows(f, rows, raw=raw, end=end)


def read_dicts(f: Iterable[str]) -> list[dict[str, str]]:
    """The rows of one of our CSVs, open as ``f`` (``newline=""``), as ``{column: cell}``
    with every cell restored; a short row's missing cells are empty."""
    return [
        {restore(k): restore(v or "") for k, v in row.items() if k is not None}
        for row in csv.DictReader(f)
    ]
