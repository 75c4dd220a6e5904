"""The report as Markdown, with its PNGs as files beside it (``<name>_files/``)."""

from __future__ import annotations

from collections.abc import Sequence

from imgclf.report.collect import RunInfo, short_number


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _image(alt: str, link: str) -> str:
    return f"![{_cell(alt)}](<{link}>)"  # <...>: links with spaces still work


def _run_section(run: RunInfo, links: dict[str, str]) -> str:
    parts = [f"## {run.name}", f"`{run.path}`", "### Recipe"]
    parts.append(table(["setting", "value"], [list(r) for r in run.recipe_rows()]))
    stages = run.stage_rows()
    if stages:
        parts += ["### Stages", table(list(stages[0]), [list(s.values()) for s in stages])]
    if "curves" in links:
        parts += ["### Curves", _image(f"{run.name} curves", links["curves"])]
    if "confusion" in links:
        parts += ["### Confusion matrix", _image(f"{run.name} confusion", links["confusion"])]
    if run.per_class:
        header = list(run.per_class[0])
        rows = [[short_number(row.get(h, "")) for h in header] for row in run.per_class]
        parts += ["### Per class (validation)", table(header, rows)]
    return "\n\n".join(parts)


def _ensemble_section(ensemble: dict, link: str) -> str:
    c = ensemble["comparison"]
    rows = []
    for kind, name, acc in c.rows():
        role = "best model" if kind == "model" and name == c.best_model else ""
        role = "ensemble" if kind == "vote" and name == c.vote else role
        rows.append([name if kind == "model" else f"{name} vote", kind, f"{acc:.4f}", role])
    parts = [
        "## Ensemble",
        f"{len(c.names)} runs on {c.dataset} {c.split} ({c.count} images); "
        f"the ensemble is the {c.vote} vote.",
        table(["", "kind", "accuracy", ""], rows),
    ]
    if c.weights:
        shown = ", ".join(f"{n} {w:.4g}" for n, w in c.weights.items())
        parts.append(f"weighted vote weights: {shown}")
    parts += [f"note: {note}" for note in c.notes]
    parts.append(_image("best model and ensemble confusion matrices", link))
    return "\n\n".join(parts)


def render_markdown(
    runs: list[RunInfo],
    links: dict[str, dict[str, str]],
    *,
    title: str,
    generated: str,
    ensemble: dict | None = None,
    ensemble_link: str = "",
) -> str:
    """``links[run.name][kind]``: relative paths of the PNGs written beside the report."""
    parts = [f"# {title}", f"generated {generated} by imgclf"]
    parts += [_run_section(r, links.get(r.name, {})) for r in runs]
    header = list(runs[0].comparison_row())
    parts += ["## Comparison", table(header, [list(r.comparison_row().values()) for r in runs])]
    if ensemble is not None:
        parts.append(_ensemble_section(ensemble, ensemble_link))
    return "\n\n".join(parts) + "\n"
