"""Output paths through a broken symbolic link (issue #31, item 13): every command that
writes somewhere (train --out, or runs/ without it; predict, export and report --out;
eval --out-dir; data import into IMGCLF_HOME) answers one ``error:`` line that names the
link and what to do, exit 2, before any work, and creates nothing. These were
``FileExistsError`` tracebacks from ``Path.mkdir``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers_train import make_image_folder, tiny_recipe, write_recipe
from imgclf.cli import main
from imgclf.errors import UserError
from imgclf.io_utils import atomic_write_text


def one_error_line(stderr: str) -> str:
    (line,) = stderr.splitlines()
    assert line.startswith("error: ") and "Traceback" not in stderr, stderr
    return line


@pytest.fixture
def broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``link`` → ``missing`` (which does not exist), in the working folder."""
    monkeypatch.chdir(tmp_path)
    os.symlink(tmp_path / "missing", "link")
    return tmp_path


# A run and data that do not exist: the output path must be what the error is about.
COMMANDS = {
    "predict": ["predict", "no-such-run", "--input", "no-such-input", "--out", "{}/p.csv"],
    "export": ["export", "no-such-run", "--out", "{}/model.onnx"],
    "report": ["report", "no-such-run", "--out", "{}/report.html"],
    "eval": ["eval", "no-such-run", "no-such-run-2", "--data", "no-such", "--out-dir", "{}"],
    "train": ["train", "r.yaml", "--data", "no-such", "--out", "{}"],
}


@pytest.mark.parametrize("under", ["link", "link/sub"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_output_in_a_broken_link_is_one_line(broken, capsys, command, under):
    write_recipe(broken / "r.yaml", tiny_recipe(epochs=1))
    argv = [arg.format(under) for arg in COMMANDS[command]]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    option = "--out-dir" if command == "eval" else "--out"
    assert line.startswith(f"error: {option} {under}")
    assert f"link is a broken symbolic link (to {broken / 'missing'}); create that folder, " in line
    assert line.endswith(f"remove the link, or choose another {option}")
    assert not (broken / "missing").exists()


def test_train_without_out_into_a_broken_runs_link(broken, capsys):
    """runs/ is made when the run is numbered, after the data set loads."""
    make_image_folder(broken / "src", per_class=4)
    assert main(["data", "import", "src", "--name", "tiny"]) == 0
    os.symlink(broken / "gone", "runs")
    write_recipe(broken / "r.yaml", tiny_recipe(epochs=1))
    capsys.readouterr()
    assert main(["train", "r.yaml", "--data", "tiny"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (
        f"error: cannot create runs: runs is a broken symbolic link (to {broken / 'gone'}); "
        "create that folder, remove the link, or give --out"
    )


def test_data_import_into_a_broken_imgclf_home(broken, capsys, monkeypatch):
    make_image_folder(broken / "src", per_class=4)
    monkeypatch.setenv("IMGCLF_HOME", str(broken / "link"))
    assert main(["data", "import", "src", "--name", "tiny"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: IMGCLF_HOME {broken / 'link' / 'datasets'}: ")
    assert line.endswith("remove the link, or choose another IMGCLF_HOME")


def test_any_write_under_a_broken_link_names_it(broken):
    """atomic_path, under every file imgclf writes, makes its folder the same way."""
    with pytest.raises(UserError) as info:
        atomic_write_text(Path("link/a/b.txt"), "x")
    assert str(info.value).startswith("cannot create link/a: link is a broken symbolic link")
