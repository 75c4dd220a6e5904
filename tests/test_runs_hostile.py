"""Run folders under concurrent or mistaken use, and one-line errors for odd input (#10.9,
#10.10, #10.12): a locked run folder, an existing run under --out, --resume on another data
set, a zero-byte checkpoint, an output path that is a folder or unwritable, a closed pipe,
a full disk mid-training, and a weights file that must not earn torch's unsafe hint.

Every input is built here; trainings are one or two epochs of the tiny recipe (seconds).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import imgclf
from conftest import is_root
from helpers_train import import_tiny, load_pt, make_image_folder, tiny_recipe, write_recipe
from imgclf.cli import main
from imgclf.errors import CheckpointError
from imgclf.models.backbones import load_state_file
from imgclf.runtime import checkpoint as checkpoint_module
from imgclf.runtime.checkpoint import load_checkpoint, save_checkpoint
from imgclf.train import rundir as rundir_module
from imgclf.train import trainer as trainer_module
from imgclf.train.rundir import LOCK_NAME, RunDirError, claim_run_dir, read_metrics


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(stderr: str) -> str:
    (line,) = stderr.splitlines()
    assert line.startswith("error: ") and "Traceback" not in stderr, stderr
    return line


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A finished one-epoch run, its data set folder, and a second data set with the same
    classes (another name, another folder), both outside any IMGCLF_HOME."""
    root = tmp_path_factory.mktemp("hostile-runs")
    quiet = dict(warn=lambda msg: None)
    ds = imgclf.import_dataset(make_image_folder(root / "src"), "tiny", dest=root / "tiny", **quiet)
    other_src = make_image_folder(root / "other-src", seed=1)
    other = imgclf.import_dataset(other_src, "other", dest=root / "other", **quiet)
    run = imgclf.train(tiny_recipe(epochs=1), ds, out=root / "run", threads=1, progress=False)
    return run.path, ds.root, other.root


def copy_run(finished, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished[0], tmp_path / "run"))


@contextlib.contextmanager
def lock_held_by_another_process(folder: Path) -> Iterator[int]:
    """A child that holds the run folder's lock as a training would; yields its pid."""
    code = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); "
        "print('locked', flush=True); sys.stdin.read()"
    )
    folder.mkdir(parents=True, exist_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(folder / LOCK_NAME)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "locked\n"
        yield child.pid
    finally:
        child.stdin.close()  # the child reads EOF, exits, and the kernel drops its lock
        child.wait(timeout=30)
        child.stdout.close()


# ---------------------------------------------------------------- 9: one run per folder


def test_a_locked_run_folder_is_refused_naming_the_folder_and_holder(tmp_path, capsys):
    import_tiny(tmp_path)
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(epochs=1))
    out = tmp_path / "busy"
    with lock_held_by_another_process(out) as pid:
        for extra in ([], ["--exist-ok"]):
            argv = ["train", recipe, "--data", "tiny", "--out", out, "--quiet", *extra]
            code, _, stderr = run_cli(capsys, *argv)
            assert code == 2
            line = one_error_line(stderr)
            assert str(out) in line and f"pid {pid}" in line and "in use" in line
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written


def test_resume_takes_the_lock_too(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    rows = (run / "metrics.csv").read_text()
    with lock_held_by_another_process(run) as pid:
        code, _, stderr = run_cli(capsys, "train", "--resume", run, "--quiet")
    assert code == 2
    line = one_error_line(stderr)
    assert str(run) in line and f"pid {pid}" in line
    assert (run / "metrics.csv").read_text() == rows


def test_a_second_claim_in_one_process_is_refused_and_the_lock_ends_with_the_run(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(rundir_module, "LOCK_PATIENCE", 0.1)
    folder = tmp_path / "run"
    refused = pytest.raises(RunDirError, match=f"pid {os.getpid()}")
    with claim_run_dir(folder), refused, claim_run_dir(folder):
        pass
    with claim_run_dir(folder):  # released on leaving: a later run in this process goes on
        pass


def test_an_existing_run_needs_exist_ok_which_replaces_it(finished, tmp_path, capsys):
    import_tiny(tmp_path)
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(epochs=1))
    out = copy_run(finished, tmp_path)
    (out / "tb" / "old.tfevents").write_bytes(b"old events")
    (out / ".last.tmp-999-dead.pt").write_bytes(b"half a checkpoint")  # a killed save's
    (out / "notes.txt").write_text("mine")
    argv = ["train", recipe, "--data", "tiny", "--out", out, "--quiet"]

    code, _, stderr = run_cli(capsys, *argv)
    assert code == 2
    line = one_error_line(stderr)
    assert f"{out} already holds a run" in line and "--exist-ok" in line and "--resume" in line

    code, stdout, stderr = run_cli(capsys, *argv, "--exist-ok")
    assert code == 0, stderr
    assert f"run folder:       {out}" in stdout
    assert f"--exist-ok: removed the previous run in {out}" in stderr
    assert "last.pt" in stderr and "tb" in stderr
    assert not (out / "tb" / "old.tfevents").exists()
    assert not (out / ".last.tmp-999-dead.pt").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == [1]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["dataset"]["name"] == "tiny" and "imgclf-home" in config["dataset"]["path"]
    assert load_pt(out / "last.pt")["dataset"] == config["dataset"]["path"]  # the new run's


def test_exist_ok_in_a_folder_without_a_run_keeps_its_files(tmp_path, capsys):
    import_tiny(tmp_path)
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(epochs=1))
    out = tmp_path / "plain"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["train", recipe, "--data", "tiny", "--out", out, "--quiet", "--exist-ok"]
    code, _, stderr = run_cli(capsys, *argv)
    assert code == 0 and "removed" not in stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "last.pt").is_file()


def test_exist_ok_with_resume_is_refused(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    code, _, stderr = run_cli(capsys, "train", "--resume", run, "--exist-ok")
    assert code == 2 and "--exist-ok starts a fresh run" in one_error_line(stderr)


def test_resume_refuses_a_checkpoint_that_moved_on_after_it_was_read(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    state = load_checkpoint(run / "last.pt")
    moved_on = {**state, "position": {**state["position"], "epoch": 7}}
    moved_on.pop("path")
    save_checkpoint(moved_on, run / "last.pt")  # another process trained meanwhile
    with (
        pytest.raises(RunDirError, match="changed after it was read"),
        claim_run_dir(run, resume=state),
    ):
        pass


# ---------------------------------------------------------------- 10: resume on other data


def test_resume_on_another_data_set_is_refused_naming_both(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    _, data, other = finished
    rows = (run / "metrics.csv").read_text()
    code, _, stderr = run_cli(capsys, "train", "--resume", run, "--data", other, "--quiet")
    assert code == 2
    line = one_error_line(stderr)
    assert f"'tiny' ({data})" in line and f"'other' ({other})" in line
    assert "--new-data" in line
    assert (run / "metrics.csv").read_text() == rows


def test_resume_on_the_same_data_set_named_again_is_accepted(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    data = finished[1]
    code, _, stderr = run_cli(capsys, "train", "--resume", run, "--data", data, "--quiet")
    assert code == 0, stderr


def test_new_data_continues_on_another_data_set(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    other = finished[2]
    argv = ["train", "--resume", run, "--data", other, "--new-data", "--quiet"]
    code, _, stderr = run_cli(capsys, *argv)
    assert code == 0, stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["dataset"]["path"] == str(other)


def test_new_data_without_resume_is_refused(tmp_path, capsys):
    import_tiny(tmp_path)
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(epochs=1))
    code, _, stderr = run_cli(capsys, "train", recipe, "--data", "tiny", "--new-data")
    assert code == 2 and "--new-data goes with --resume" in one_error_line(stderr)


# ---------------------------------------------------------------- 12: one-line errors


def test_resume_from_a_zero_byte_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"")
    code, _, stderr = run_cli(capsys, "train", "--resume", run)
    assert code == 2
    line = one_error_line(stderr)
    assert str(run / "last.pt") in line and "empty or truncated" in line


def test_resume_from_a_checkpoint_without_a_position(tmp_path, capsys):
    run = tmp_path / "run"
    save_checkpoint({"model_state": {}}, run / "last.pt")
    code, _, stderr = run_cli(capsys, "train", "--resume", run)
    assert code == 2
    assert "cannot resume from this checkpoint (no recipe, dataset" in one_error_line(stderr)


OUT_COMMANDS = {
    # A run that does not exist: were --out not checked first, the error would be about it.
    "predict": ["predict", "no-such-run", "--input", "no-such-input", "--out"],
    "report": ["report", "no-such-run", "--out"],
}


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_out_onto_a_folder_is_refused_before_any_work(tmp_path, capsys, command):
    folder = tmp_path / "existing"
    folder.mkdir()
    code, _, stderr = run_cli(capsys, *OUT_COMMANDS[command], folder)
    assert code == 2
    assert f"--out {folder} is a folder" in one_error_line(stderr)


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_out_under_a_file_is_refused_before_any_work(tmp_path, capsys, command):
    (tmp_path / "afile").write_text("x")
    code, _, stderr = run_cli(capsys, *OUT_COMMANDS[command], tmp_path / "afile" / "out.csv")
    assert code == 2
    assert f"{tmp_path / 'afile'} is a file, not a folder" in one_error_line(stderr)


@pytest.mark.skipif(is_root(), reason="root writes into read-only folders")
@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_out_into_a_read_only_folder_is_refused_before_any_work(tmp_path, capsys, command):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, stderr = run_cli(capsys, *OUT_COMMANDS[command], folder / "out.csv")
    finally:
        folder.chmod(0o755)
    assert code == 2
    line = one_error_line(stderr)
    assert f"cannot write in {folder}" in line and "ermission denied" in line


def test_data_info_into_a_closed_pipe_is_quiet(tmp_path):
    """`imgclf data info NAME | head`: the reader leaves before the output is flushed."""
    import_tiny(tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-m", "imgclf", "data", "info", "tiny"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    child.stdout.close()  # before the child has written a byte: its flush meets EPIPE
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 1  # what Python does on EPIPE (docs: "Note on SIGPIPE")
    assert stderr == ""


@pytest.fixture
def two_epochs(tmp_path) -> Path:
    import_tiny(tmp_path)
    return write_recipe(tmp_path / "tiny.yaml", tiny_recipe(epochs=2))


def disk_full_at_epoch_2(real_save, names: tuple[str, ...]):
    """save_checkpoint that writes epoch 1, then finds the disk full saving any of
    ``names`` at epoch 2 (it saves best.pt first when it improved, then last.pt)."""

    def save(state, path):
        if state["position"]["epoch"] == 2 and Path(path).name in names:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(state, path)

    return save


@pytest.mark.parametrize(
    "failing", [("best.pt", "last.pt"), ("last.pt",)], ids=["first-save", "best-kept"]
)
def test_disk_full_saving_a_checkpoint_is_one_line_and_metrics_match_it(
    two_epochs, tmp_path, capsys, monkeypatch, failing
):
    out = tmp_path / "run"
    monkeypatch.setattr(
        trainer_module, "save_checkpoint", disk_full_at_epoch_2(save_checkpoint, failing)
    )
    code, _, stderr = run_cli(
        capsys, "train", two_epochs, "--data", "tiny", "--out", out, "--quiet"
    )
    assert code == 2
    line = one_error_line(stderr)
    assert f"disk full in {out}" in line
    assert f"the last good checkpoint {out / 'last.pt'} is kept" in line
    assert f"imgclf train --resume {out}" in line
    assert load_checkpoint(out / "last.pt")["position"]["epoch"] == 1
    # The epoch-2 row was logged before its checkpoint failed: rolled back.
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == [1]

    monkeypatch.undo()
    code, _, stderr = run_cli(capsys, "train", "--resume", out, "--quiet")
    assert code == 0, stderr
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == [1, 2]


def test_disk_full_before_any_checkpoint(two_epochs, tmp_path, capsys, monkeypatch):
    def no_room(state, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "run"
    monkeypatch.setattr(trainer_module, "save_checkpoint", no_room)
    code, _, stderr = run_cli(
        capsys, "train", two_epochs, "--data", "tiny", "--out", out, "--quiet"
    )
    assert code == 2
    assert "no checkpoint was written yet" in one_error_line(stderr)
    assert read_metrics(out / "metrics.csv") == []


def test_disk_full_writing_metrics_is_one_line(two_epochs, tmp_path, capsys, monkeypatch):
    real_write = rundir_module.atomic_write_text
    rows_written = []

    def write(path, text, **kwargs):
        if Path(path).name == "metrics.csv" and text.count("\n") == 3:  # header + 2 rows
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        rows_written.append(text.count("\n") - 1)
        real_write(path, text, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(rundir_module, "atomic_write_text", write)
    code, _, stderr = run_cli(
        capsys, "train", two_epochs, "--data", "tiny", "--out", out, "--quiet"
    )
    assert code == 2
    assert f"last good checkpoint {out / 'last.pt'} is kept" in one_error_line(stderr)
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == [1]
    assert load_checkpoint(out / "last.pt")["position"]["epoch"] == 1


def test_torch_reporting_a_full_disk_as_runtime_error_becomes_enospc(tmp_path, monkeypatch):
    """A real full disk makes torch.save raise RuntimeError('... unexpected pos N vs M')."""

    def short_write(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    state = {"model_state": {"w": torch.zeros(1000)}}
    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda p: SimpleNamespace(free=100))
    with pytest.raises(OSError) as err:
        save_checkpoint(state, tmp_path / "last.pt")
    assert err.value.errno == errno.ENOSPC and str(tmp_path / "last.pt") in str(err.value)
    assert list(tmp_path.iterdir()) == []  # the partial file is gone
    # With room to spare the RuntimeError is something else: it stays what it is.
    monkeypatch.setattr(
        checkpoint_module.shutil, "disk_usage", lambda p: SimpleNamespace(free=10**9)
    )
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint(state, tmp_path / "last.pt")


# ---------------------------------------------------------------- weights files


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["crafted", "raw-pickle", "empty"])
def test_unreadable_weights_never_suggest_weights_only_false(tmp_path, kind):
    marker, path = tmp_path / "pwned", tmp_path / "weights.pth"
    if kind == "crafted":
        torch.save({"w": _RunsCode(marker)}, path)
    elif kind == "raw-pickle":
        path.write_bytes(pickle.dumps(_RunsCode(marker)))
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        load_state_file(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: unreadable weights file (") and "\n" not in msg
    for hint in ("weights_only", "will likely succeed", "can still be loaded", "trust"):
        assert hint not in msg, msg
    assert not marker.exists()
