"""One self-contained HTML page: CSS inline, every image a ``data:`` URI, nothing fetched.

Plain string building with :func:`html.escape` on every value: the page is a handful of
tables and images, not worth a template engine dependency.

A small inline script records on ``<body>``, once the page has loaded, whether every image
decoded (``data-images-ok``), how many images there are (``data-images``) and how many rows
the comparison table has (``data-run-rows``): a headless browser's ``--dump-dom`` shows
them, which is how the tests check the page renders.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape

from imgclf.report.collect import (
    LABEL_ISSUES_NOTE,
    Page,
    RunInfo,
    ensemble_table,
    short_number,
    weights_text,
)

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.mark td { font-weight: bold; }
img { max-width: 100%; height: auto; display: block; margin: .5em 0; }
.meta { color: #666; font-size: .9em; } .note { color: #844; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.every(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.dataset.imagesOk = ok ? "true" : "false";
  document.body.dataset.images = String(images.length);
  document.body.dataset.runRows =
    String(document.querySelectorAll("#comparison tbody tr").length);
});
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{data_uri(png)}" alt="{escape(alt)}">'


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").split()[0])
    except (ValueError, IndexError):
        return False
    return True


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    table_id: str = "",
    marked: Sequence[bool] = (),
) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(
            f'<td class="num">{escape(c)}</td>' if _is_number(c) else f"<td>{escape(c)}</td>"
            for c in row
        )
        mark = ' class="mark"' if i < len(marked) and marked[i] else ""
        body.append(f"<tr{mark}>{cells}</tr>")
    ident = f' id="{escape(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _run_section(run: RunInfo, pngs: dict[str, bytes]) -> str:
    parts = [f'<section id="run-{escape(run.name)}"><h2>{escape(run.name)}</h2>']
    parts.append(f'<p class="meta">{escape(str(run.path))}</p>')
    parts.append("<h3>Recipe</h3>")
    parts.append(table(["setting", "value"], [list(r) for r in run.recipe_rows()]))
    stages = run.stage_rows()
    if stages:
        parts.append("<h3>Stages</h3>")
        parts.append(table(list(stages[0]), [list(s.values()) for s in stages]))
    scores = run.score_rows()
    if scores:
        parts.append("<h3>Validation (best weights)</h3>")
        parts.append(table(["score", "value"], [list(r) for r in scores]))
    if "curves" in pngs:
        parts.append("<h3>Curves</h3>" + _img(pngs["curves"], f"{run.name} curves"))
    if "confusion" in pngs:
        alt = f"{run.name} confusion matrix"
        parts.append("<h3>Confusion matrix</h3>" + _img(pngs["confusion"], alt))
    if "reliability" in pngs:
        alt = f"{run.name} reliability diagram"
        parts.append("<h3>Calibration (validation)</h3>" + _img(pngs["reliability"], alt))
    parts.append(_mistakes(run, pngs))
    parts.append(_duplicates(run, pngs))
    parts.append(_label_issues(run, pngs))
    if run.per_class:
        header = list(run.per_class[0])
        rows = [[short_number(row.get(h, "")) for h in header] for row in run.per_class]
        per_class = table(header, rows)
        if len(rows) > 22:  # 20 classes + macro avg + accuracy: fold long tables away
            per_class = f"<details><summary>{len(rows) - 2} classes</summary>{per_class}</details>"
        parts.append("<h3>Per class (validation)</h3>" + per_class)
    parts.append("</section>")
    return "\n".join(parts)


def _mistakes(run: RunInfo, pngs: dict[str, bytes]) -> str:
    """The most confident mistakes: the thumbnail grid, then its rows (with file paths)."""
    if run.mistakes is None and "mistakes" not in pngs:
        return ""  # a run from before mistakes were written, or without a validation split
    parts = ["<h3>Most confident mistakes (validation)</h3>"]
    if "mistakes" in pngs:
        parts.append(_img(pngs["mistakes"], f"{run.name} most confident mistakes"))
    rows = run.mistake_rows()
    if rows:
        listed = table(list(rows[0]), [list(r.values()) for r in rows])
        shown = f"{len(rows)} of {len(run.mistakes or [])}"
        parts.append(f"<details><summary>{escape(shown)} mistakes</summary>{listed}</details>")
    elif run.mistakes == []:
        parts.append('<p class="meta">no mistakes on the validation split</p>')
    return "\n".join(parts)


def _duplicates(run: RunInfo, pngs: dict[str, bytes]) -> str:
    """The data set's duplicate groups within and across splits and its closest
    cross-split pairs, from its last ``imgclf data check``."""
    d = run.duplicates
    if not d:
        return ""
    rows = []
    for kind in ("exact", "near"):
        c = d.get(kind) or {}
        within = ", ".join(f"{s} {n}" for s, n in (c.get("within") or {}).items())
        across = ", ".join(f"{k.replace('-', '↔')} {n}" for k, n in (c.get("across") or {}).items())
        rows.append([kind, str(c.get("groups", "")), within, across])
    parts = ["<h3>Duplicates in the data set (imgclf data check)</h3>"]
    parts.append(table(["kind", "groups", "within splits", "across splits"], rows))
    if "duplicates" in pngs:
        parts.append(_img(pngs["duplicates"], f"{run.name}: closest cross-split pairs"))
    return "\n".join(parts)


def _label_issues(run: RunInfo, pngs: dict[str, bytes]) -> str:
    """The training images whose labels `imgclf data check --labels` found suspect."""
    if run.label_issues is None:
        return ""  # the run's data set was never checked
    parts = [f"<h3>Suspect training labels ({escape(run.dataset_name)})</h3>"]
    if not run.label_issues:
        parts.append('<p class="meta">none found by imgclf data check --labels</p>')
        return "\n".join(parts)
    parts.append(f'<p class="meta">{escape(LABEL_ISSUES_NOTE)}</p>')
    if "label_issues" in pngs:
        parts.append(_img(pngs["label_issues"], f"{run.name} suspect training labels"))
    rows = run.label_issue_rows()
    listed = table(list(rows[0]), [list(r.values()) for r in rows])
    shown = f"{len(rows)} of {len(run.label_issues)}"
    parts.append(f"<details><summary>{escape(shown)} suspects</summary>{listed}</details>")
    return "\n".join(parts)


def _ensemble_section(ensemble: dict) -> str:
    c = ensemble["comparison"]
    parts = ['<section id="ensemble"><h2>Ensemble</h2>']
    parts.append(
        f'<p class="meta">{len(c.names)} runs on {escape(c.dataset)} {escape(c.split)} '
        f"({c.count} images); the ensemble is the {escape(c.vote)} vote.</p>"
    )
    header, rows = ensemble_table(c)
    marked = [bool(row[-1]) for row in rows]
    parts.append(table(header, rows, table_id="ensemble-table", marked=marked))
    if weights := weights_text(c):
        parts.append(f'<p class="meta">{escape(weights)}</p>')
    parts += [f'<p class="note">{escape(note)}</p>' for note in c.notes]
    parts.append(_img(ensemble["png"], "best model and ensemble confusion matrices"))
    parts.append("</section>")
    return "\n".join(parts)


def render_html(page: Page, pngs: dict[str, dict[str, bytes]]) -> str:
    """The page. ``pngs[run.name][kind]``: image bytes."""
    runs, title = page.runs, page.title
    header, rows = page.comparison_table()
    links = " · ".join(f'<a href="#run-{escape(r.name)}">{escape(r.name)}</a>' for r in runs)
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">generated {escape(page.generated)} by imgclf · {links} · '
        '<a href="#comparison-section">comparison</a></p>',
    ]
    # The order of the study: each run, then the runs against each other.
    body += [_run_section(r, pngs.get(r.name, {})) for r in runs]
    body.append('<section id="comparison-section"><h2>Comparison</h2>')
    body.append(table(header, rows, table_id="comparison") + "</section>")
    if page.ensemble is not None:
        body.append(_ensemble_section(page.ensemble))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style>"
        f"<script>{_SCRIPT}</script></head>\n"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
