"""A run's summary.json edited to nonsense (issue #31, item 10): ``predict --vote
weighted`` (which weighs each run by its val_accuracy) refuses it in one line naming the
file and the field; ``report`` shows the run without it and says why in one warning line.
A missing summary.json is what a run stopped early has: the checkpoint's best accuracy
weighs it, and the report shows it from metrics.csv, without a warning.

Two copies of one finished one-epoch run (built once, seconds); the second's summary is
edited, and the real CLI runs on both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers_train import finished_tiny_run
from imgclf.cli import main


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> SimpleNamespace:
    """A finished one-epoch run of the tiny recipe, its data set and image folder."""
    return finished_tiny_run(tmp_path_factory.mktemp("summary"))


def two_runs(finished: SimpleNamespace, tmp_path: Path, summary: str | None) -> list[Path]:
    """Copies ``one`` and ``two`` of the run; ``two``'s summary.json holds ``summary``
    (None: no summary.json)."""
    runs = [Path(shutil.copytree(finished.run, tmp_path / name)) for name in ("one", "two")]
    target = runs[1] / "summary.json"
    if summary is None:
        target.unlink()
    else:
        target.write_text(summary)
    return runs


def _edit(**fields) -> str:
    return json.dumps(fields)


# (summary.json's text, what the line says after "<file>: ")
NONSENSE = {
    "a list": ("[1, 2, 3]", "not a JSON object but a list"),
    "accuracy as text": (_edit(val_accuracy="abc"), "val_accuracy: Input should be a valid number"),
    "accuracy above 1": (_edit(val_accuracy=2.5), "val_accuracy: Input should be less than"),
    "accuracy NaN": ('{"val_accuracy": NaN}', "val_accuracy: Input should be a finite number"),
    "not JSON": ('{"val_accuracy": 0.9', "not valid JSON"),
    "epochs as text": (_edit(val_accuracy=0.9, epochs="ten"), "epochs: Input should be"),
    "parameters as text": (_edit(parameters="many"), "parameters: Input should be"),
    "seconds as text": (_edit(train_seconds="abc"), "train_seconds: Input should be"),
    "model a number": (_edit(model=3), "model: Input should be a valid string"),
}


@pytest.mark.parametrize("case", list(NONSENSE))
def test_weighted_vote_refuses_a_bad_summary_in_one_line(finished, tmp_path, capsys, case):
    text, says = NONSENSE[case]
    one, two = two_runs(finished, tmp_path, text)
    out = tmp_path / "p.csv"
    argv = ["predict", one, two, "--vote", "weighted", "--input", finished.images, "--out", out]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = err.splitlines()
    assert line.startswith(f"error: {two / 'summary.json'}: {says}"), line
    assert "--weights" in line and not out.exists()


@pytest.mark.parametrize("case", list(NONSENSE))
def test_report_shows_the_run_without_a_bad_summary_and_warns(finished, tmp_path, capsys, case):
    text, says = NONSENSE[case]
    one, two = two_runs(finished, tmp_path, text)
    out = tmp_path / "r.md"
    code = main(["report", str(one), str(two), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    (line,) = err.splitlines()
    assert line.startswith(f"warning: {two / 'summary.json'}: {says}"), line
    report = out.read_text()
    # Both runs are in the comparison table; the edited one's accuracy is metrics.csv's.
    rows = [r for r in report.splitlines() if r.startswith(("| one ", "| two "))]
    assert len(rows) == 2 and "abc" not in report and "many" not in report


def test_weighted_report_ensemble_refuses_a_bad_summary(finished, tmp_path, capsys):
    one, two = two_runs(finished, tmp_path, "[1, 2, 3]")
    out = tmp_path / "r.html"
    argv = ["report", one, two, "--data", finished.data, "--vote", "weighted", "--out", out]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {two / 'summary.json'}: not a JSON object" in err.splitlines()[-1]
    assert "Traceback" not in err and not out.exists()


def test_without_summary_the_checkpoint_weighs_the_run_and_report_is_silent(
    finished, tmp_path, capsys
):
    one, two = two_runs(finished, tmp_path, None)
    out = tmp_path / "p.csv"
    argv = ["predict", one, two, "--vote", "weighted", "--input", finished.images, "--out", out]
    assert main([str(a) for a in argv]) == 0
    assert len(out.read_text().splitlines()) == 1 + 8  # a header and one row per image
    capsys.readouterr()
    assert main(["report", str(one), str(two), "--out", str(tmp_path / "r.md")]) == 0
    assert "warning" not in capsys.readouterr().err
