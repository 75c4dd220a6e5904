"""The report as Markdown, with its PNGs as files beside it (``<name>_files/``).

Names in it (runs, classes, recipes, paths, the title) are the user's, so every one goes
through :func:`text`: a run folder called ``<img src=x onerror=alert(1)>`` must show as
those characters, not run in whatever renders the Markdown (most renderers pass raw HTML
through), and a ``*`` or ``[`` must not start emphasis or a link.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from html import escape
from urllib.parse import quote

from imgclf.report.collect import (
    LABEL_ISSUES_NOTE,
    Page,
    RunInfo,
    ensemble_table,
    short_number,
    weights_text,
)

# CommonMark's backslash escapes for the characters that start inline markup here;
# "<", ">" and "&" become entities instead (a backslash does not stop an HTML block).
_MARKUP = re.compile(r"([\\`*_\[\]#|~!])")


def text(value: object) -> str:
    """Any value as literal Markdown text on one line."""
    plain = " ".join(str(value).splitlines())
    return escape(_MARKUP.sub(r"\\\1", plain), quote=False)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(text(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(text(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _image(alt: str, link: str) -> str:
    # percent-encoded inside <...>: a file named after a run with spaces, ">" or ")" still
    # links to itself and cannot end the link early
    return f"![{text(alt)}](<{quote(link, safe='/')}>)"


def _run_section(run: RunInfo, links: dict[str, str]) -> str:
    parts = [f"## {text(run.name)}", text(run.path), "### Recipe"]
    parts.append(table(["setting", "value"], [list(r) for r in run.recipe_rows()]))
    stages = run.stage_rows()
    if stages:
        parts += ["### Stages", table(list(stages[0]), [list(s.values()) for s in stages])]
    scores = run.score_rows()
    if scores:
        parts += ["### Validation (best weights)", table(["score", "value"], scores)]
    if "curves" in links:
        parts += ["### Curves", _image(f"{run.name} curves", links["curves"])]
    if "confusion" in links:
        parts += ["### Confusion matrix", _image(f"{run.name} confusion", links["confusion"])]
    if "reliability" in links:
        image = _image(f"{run.name} reliability diagram", links["reliability"])
        parts += ["### Calibration (validation)", image]
    parts += _mistakes(run, links)
    parts += _label_issues(run, links)
    if run.per_class:
        header = list(run.per_class[0])
        rows = [[short_number(row.get(h, "")) for h in header] for row in run.per_class]
        parts += ["### Per class (validation)", table(header, rows)]
    return "\n\n".join(parts)


def _mistakes(run: RunInfo, links: dict[str, str]) -> list[str]:
    if run.mistakes is None and "mistakes" not in links:
        return []  # a run from before mistakes were written, or without a validation split
    parts = ["### Most confident mistakes (validation)"]
    if "mistakes" in links:
        parts.append(_image(f"{run.name} most confident mistakes", links["mistakes"]))
    rows = run.mistake_rows()
    if rows:
        parts.append(table(list(rows[0]), [list(r.values()) for r in rows]))
    elif run.mistakes == []:
        parts.append("no mistakes on the validation split")
    return parts


def _label_issues(run: RunInfo, links: dict[str, str]) -> list[str]:
    if run.label_issues is None:
        return []  # the run's data set was never checked
    parts = [f"### Suspect training labels ({text(run.dataset_name)})"]
    if not run.label_issues:
        return [*parts, text("none found by imgclf data check --labels")]
    parts.append(text(LABEL_ISSUES_NOTE))
    if "label_issues" in links:
        parts.append(_image(f"{run.name} suspect training labels", links["label_issues"]))
    rows = run.label_issue_rows()
    return [*parts, table(list(rows[0]), [list(r.values()) for r in rows])]


def _ensemble_section(ensemble: dict, link: str) -> str:
    c = ensemble["comparison"]
    parts = [
        "## Ensemble",
        text(
            f"{len(c.names)} runs on {c.dataset} {c.split} ({c.count} images); "
            f"the ensemble is the {c.vote} vote."
        ),
        table(*ensemble_table(c)),
    ]
    if weights := weights_text(c):
        parts.append(text(weights))
    parts += [text(f"note: {note}") for note in c.notes]
    parts.append(_image("best model and ensemble confusion matrices", link))
    return "\n\n".join(parts)


def render_markdown(page: Page, links: dict[str, dict[str, str]], ensemble_link: str = "") -> str:
    """``links[run.name][kind]``: relative paths of the PNGs written beside the report;
    ``ensemble_link``: the ensemble's confusion image."""
    parts = [f"# {text(page.title)}", text(f"generated {page.generated} by imgclf")]
    parts += [_run_section(r, links.get(r.name, {})) for r in page.runs]
    parts += ["## Comparison", table(*page.comparison_table())]
    if page.ensemble is not None:
        parts.append(_ensemble_section(page.ensemble, ensemble_link))
    return "\n\n".join(parts) + "\n"
