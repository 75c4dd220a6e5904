"""``imgclf report``: one self-contained HTML page (or Markdown + PNGs) of run folders."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from html import escape
from urllib.parse import unquote

import pytest
from PIL import Image

from conftest import CHROMIUM_FLAGS
from helpers_runs import session_runs
from helpers_train import make_image_folder, tiny_recipe
from imgclf.cli import main
from imgclf.errors import DataError
from imgclf.report import build_report, find_runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return session_runs(tmp_path_factory)


# A run folder and class names a report must show as text, never as markup.
HOSTILE_RUN = "<img src=x onerror=alert(1)>"
HOSTILE_CLASSES = ("$\\foo$", "<script>alert(2)<\\script>", "c")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A 2-epoch run that makes mistakes (its first two classes share a colour), named and
    with classes named like HTML and mathtext."""
    from imgclf.data.importer import import_dataset
    from imgclf.train import train

    base = tmp_path_factory.mktemp("hostile")
    folder = make_image_folder(base / "src", per_class=12, classes=HOSTILE_CLASSES)
    ds = import_dataset(folder, "odd", val_fraction=0.25, dest=base / "odd", warn=print)
    run = train(tiny_recipe(epochs=2), ds, out=base / HOSTILE_RUN, threads=1, progress=False)
    return run.path


def comparison_rows(page: str) -> list[str]:
    table = re.search(r'<table id="comparison">(.*?)</table>', page, re.S)
    assert table, "no comparison table"
    return re.findall(r"<tr>(.*?)</tr>", table.group(1).split("<tbody>", 1)[1], re.S)


def test_html_has_one_comparison_row_per_run_and_embeds_every_image(trained, tmp_path):
    out = tmp_path / "report.html"
    report = build_report([trained.runs_dir, trained.swapped], out)  # a folder of runs + a run
    page = out.read_text(encoding="utf-8")
    assert [r.name for r in report.runs] == ["run16", "run32", "swapped"]
    rows = comparison_rows(page)
    assert len(rows) == 3
    assert all(name in row for name, row in zip(["run16", "run32", "swapped"], rows, strict=True))
    assert "simple" in rows[0] and "16×16" in rows[0] and "32×32" in rows[1]
    sources = re.findall(r'<img[^>]*\bsrc="([^"]*)"', page)
    assert len(sources) == 3 * 3  # curves, confusion matrix and reliability of each run
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    # nothing is fetched: no external stylesheet, script or link to another origin
    assert not re.search(r"<link\b|<script[^>]*\bsrc=|https?://|@import", page)
    sections = ("Recipe", "Stages", "Validation", "Curves", "Confusion matrix", "Calibration")
    for section in (*sections, "Per class"):
        assert section in page
    assert "sgd, lr 0.05, momentum 0.9" in page
    # these runs got every validation image right: said, with no empty grid
    assert page.count("no mistakes on the validation split") == 3
    header = re.search(r'<table id="comparison"><thead>(.*?)</thead>', page).group(1)
    assert "<th>val balanced acc</th><th>val macro F1</th>" in header
    summary = json.loads((trained.run32 / "summary.json").read_text())
    assert f'<td class="num">{summary["val_balanced_accuracy"]:.4f}</td>' in rows[1]


def test_ensemble_section_from_compare_runs(trained, tmp_path, capsys):
    out = tmp_path / "report.html"
    code = main(
        [
            "report",
            str(trained.run32),
            str(trained.swapped),
            "--out",
            str(out),
            "--data",
            str(trained.ds.root),
            "--split",
            "all",
        ]
    )
    assert code == 0 and "report of 2 runs" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert 'id="ensemble"' in page and "hard vote" in page and "soft vote" in page
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 3 * 2 + 1


def test_markdown_writes_pngs_beside_it(trained, tmp_path):
    out = tmp_path / "notes" / "report.md"
    report = build_report(
        [trained.run32, trained.run16], out, ensemble={"data": trained.ds, "split": "all"}
    )
    text = out.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(<([^>]+)>\)", text)
    assert len(links) == 3 * 2 + 1
    for link in links:
        assert link.startswith("report_files/")
        with Image.open(out.parent / link) as im:
            assert im.format == "PNG"
    assert sorted(p.name for p in report.files) == sorted(
        p.name for p in (out.parent / "report_files").iterdir()
    )
    assert len(re.findall(r"^\| run32 \| simple \|", text, re.M)) == 1  # comparison row
    assert "## Ensemble" in text
    # a second report replaces the folder whole: no PNGs of the first remain
    build_report([trained.run32], out)
    assert len(list((out.parent / "report_files").iterdir())) == 3
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_format_from_the_suffix_and_a_run_without_summary(trained, tmp_path):
    partial = tmp_path / "stopped"
    partial.mkdir()
    shutil.copy(trained.run32 / "metrics.csv", partial / "metrics.csv")
    report = build_report([partial], tmp_path / "r.md")
    assert report.path.suffix == ".md" and "| stopped |" in report.path.read_text()


def test_not_a_run_folder_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a run folder"):
        find_runs([tmp_path / "empty"])
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "r.html").exists()


def test_html_shows_the_most_confident_mistakes_and_escapes_names(hostile, tmp_path):
    out = tmp_path / "report.html"
    build_report([hostile], out)
    page = out.read_text(encoding="utf-8")
    images = re.findall(r'<img src="data:image/png;base64,[^"]*" alt="([^"]*)">', page)
    assert len(images) == 4 and images[3].endswith("most confident mistakes")
    with open(hostile / "mistakes.csv", newline="", encoding="utf-8") as f:
        mistakes = list(csv.DictReader(f))
    assert mistakes  # the run did make mistakes
    listed = re.search(r"<summary>(\d+) of (\d+) mistakes</summary>(.*?)</details>", page, re.S)
    assert listed and listed.group(1) == listed.group(2) == str(len(mistakes))
    assert escape(mistakes[0]["file"]) in listed.group(3)
    assert "&lt;script&gt;alert(2)" in listed.group(3)
    summary = json.loads((hostile / "summary.json").read_text())
    scores = re.search(r"<h3>Validation \(best weights\)</h3>(.*?)</table>", page, re.S).group(1)
    balanced = f"{summary['val_balanced_accuracy']:.4f}"
    assert f'<td>balanced accuracy</td><td class="num">{balanced}</td>' in scores
    for raw in (HOSTILE_RUN, "<script>alert(2)"):
        assert raw not in page


def test_markdown_escapes_run_and_class_names_and_links_the_mistakes(hostile, tmp_path):
    out = tmp_path / "report.md"
    report = build_report([hostile], out)
    text = out.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(<([^>]+)>\)", text)
    assert len(links) == 4 and "mistakes" in links[3]
    for link in links:  # percent-encoded, they still lead to the PNGs written beside it
        assert (out.parent / unquote(link)).resolve() in {p.resolve() for p in report.files}
    # apart from the image links' <...>, no "<" reaches the Markdown: no raw HTML at all
    assert "<" not in re.sub(r"\]\(<[^>]+>\)", "", text)
    assert "## &lt;img src=x onerror=alert(1)&gt;" in text
    assert "&lt;script&gt;alert(2)&lt;\\\\script&gt;" in text  # the class, in the tables
    assert "$\\\\foo$" in text  # its backslash escaped: shown as typed
    with open(hostile / "mistakes.csv", newline="", encoding="utf-8") as f:
        count = len(list(csv.DictReader(f)))
    section = text.split("### Most confident mistakes (validation)", 1)[1].split("###", 1)[0]
    assert len(re.findall(r"^\| \d+ \|", section, re.M)) == min(count, 16)
    assert "| val balanced acc | val macro F1 |" in text


# ---------------------------------------------------------------------------- a browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Chromium not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(trained, tmp_path):
    """Every image decodes (naturalWidth > 0) and the comparison has one row per run, as
    the page's own load script reports on <body>; plus a screenshot."""
    out = tmp_path / "report.html"
    build_report(
        [trained.run32, trained.run16, trained.swapped],
        out,
        ensemble={"data": trained.ds, "split": "all"},
    )
    common = [
        _chromium(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = out.as_uri()
    dom = subprocess.run(
        [*common, "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, f"no DOM from Chromium: {dom.stderr[-2000:]}"
    attributes = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))
    assert attributes == {"images-ok": "true", "images": "10", "run-rows": "3"}

    shot = tmp_path / "shot.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1280,2000", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        assert len(im.convert("L").getcolors(1 << 16) or []) > 10  # not a blank page


def test_one_run_is_one_run_in_the_summary_line(trained, tmp_path, capsys):
    out = tmp_path / "one.md"
    assert main(["report", str(trained.run32), "--out", str(out)]) == 0
    assert f"report of 1 run: {out}" in capsys.readouterr().out
