"""Faults: ``kill -9`` and Ctrl-C mid-training, a failed save, a diverging loss.

The reference is an uninterrupted run of the same recipe; an interrupted run resumed with
``imgclf train --resume`` must end with the same weights and the same metrics rows (on
CPU, one thread, bit for bit). The interrupted runs are real processes killed with real
signals, so each of those tests pays one interpreter start (~5-10 s here) and is marked
slow; the in-process tests at the end interrupt at chosen steps and run in the quick set.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
import torch

from helpers_train import (
    assert_same_run,
    cli_process,
    import_tiny,
    interrupt_at,
    make_image_folder,
    metric_rows,
    tiny_recipe,
    write_recipe,
)
from imgclf.cli import main
from imgclf.data.importer import import_dataset
from imgclf.errors import UserError
from imgclf.runtime.checkpoint import load_checkpoint
from imgclf.train.api import train
from imgclf.train.recipe import load_recipe
from imgclf.train.rundir import LOCK_NAME
from imgclf.train.trainer import Trainer

EPOCHS = 3


@pytest.fixture(scope="module")
def long_epochs(tmp_path_factory):
    """A dataset and recipe whose epochs take long enough (54 steps of batch 4, about half
    a second here) for a signal to land inside one, and the uninterrupted reference run."""
    root = tmp_path_factory.mktemp("faults")
    folder = make_image_folder(root / "src", per_class=80)
    ds = import_dataset(folder, "long", dest=root / "long", warn=lambda msg: None)
    recipe = write_recipe(root / "long.yaml", tiny_recipe(epochs=EPOCHS, batch_size=4))
    reference = train(recipe, ds.root, out=root / "reference", threads=1, progress=False)
    seconds = max(float(r) for r in _column(reference.path, "seconds"))
    return recipe, ds.root, reference, seconds


def _column(run: Path, name: str) -> list[str]:
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return [row[name] for row in csv.DictReader(f)]


def start_then_signal(recipe: Path, data: Path, out: Path, sig: int, epoch_seconds: float):
    """Start ``imgclf train`` in a child, wait for its first checkpoint, then send ``sig``
    part-way into the next epoch. Returns (exit code, stderr)."""
    proc = cli_process(
        "train", str(recipe), "--data", str(data), "--out", str(out), "--threads", "1", "--quiet"
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "last.pt").exists():
            assert proc.poll() is None, (
                "training ended before its first checkpoint:\n" + (proc.communicate()[1])
            )
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.005)
        time.sleep(0.4 * epoch_seconds)  # well inside epoch 2 (epochs take ~epoch_seconds)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (out / "summary.json").exists(), "the signal came after training had finished"
    return proc.returncode, stderr


def resume_in_process(out: Path, capsys) -> None:
    code = main(["train", "--resume", str(out), "--threads", "1", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"run folder:       {out}" in captured.out


@pytest.mark.slow  # a real child process: ~12 s idle, 20-30 s on a busy machine
def test_kill_9_then_resume_equals_an_uninterrupted_run(long_epochs, tmp_path, capsys):
    recipe, data, reference, seconds = long_epochs
    out = tmp_path / "killed"
    code, _ = start_then_signal(recipe, data, out, signal.SIGKILL, seconds)
    assert code == -signal.SIGKILL
    at_kill = load_checkpoint(out / "last.pt")  # what a kill leaves is loadable
    assert 1 <= at_kill["position"]["epoch"] < EPOCHS
    assert at_kill["optimizer_state"] is not None and at_kill["scheduler_state"] is not None
    resume_in_process(out, capsys)
    assert_same_run(out, reference.path)


@pytest.mark.slow  # a real child process: ~12 s idle, 20-30 s on a busy machine
def test_ctrl_c_saves_mid_epoch_exits_130_and_resumes_exactly(long_epochs, tmp_path, capsys):
    recipe, data, reference, seconds = long_epochs
    out = tmp_path / "interrupted"
    code, stderr = start_then_signal(recipe, data, out, signal.SIGINT, seconds)
    assert code == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert f"continue with `imgclf train --resume {out}`" in stderr
    position = load_checkpoint(out / "last.pt")["position"]
    assert position["epoch"] < EPOCHS and position["batch"] > 0, position  # mid-epoch
    resume_in_process(out, capsys)
    assert_same_run(out, reference.path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    ds = import_tiny(tmp_path)
    recipe = tiny_recipe(epochs=EPOCHS)
    reference = train(recipe, ds, out=tmp_path / "reference", threads=1, progress=False)

    real_save = torch.save
    calls = []

    def save_then_die(obj, path, *args, **kwargs):
        """The third save (epoch 2) dies half-way through writing its file."""
        calls.append(Path(path))
        if len(calls) == 3:
            real_save(obj, path, *args, **kwargs)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_die)
    out = tmp_path / "run"
    # One line naming the folder and the checkpoint kept, not a traceback (issue #10.12).
    with pytest.raises(UserError, match=re.escape(f"disk full in {out}: the last good")):
        train(recipe, ds, out=out, threads=1, progress=False)
    monkeypatch.undo()
    # Writes go to a temporary sibling: the failed one never touched the checkpoints.
    assert all(p.parent == out and p.name.startswith(".") for p in calls)
    assert load_checkpoint(out / "last.pt")["position"]["epoch"] == 1
    assert load_checkpoint(out / "best.pt")["position"]["epoch"] == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [LOCK_NAME]

    # A kill -9 mid-save leaves its partial temporary file behind: resume ignores it.
    (out / ".last.tmp-999-dead.pt").write_bytes(b"PK\x03\x04 half a checkpoint")
    resume_in_process(out, capsys)
    assert_same_run(out, reference.path)


def test_non_finite_loss_stops_with_stage_epoch_and_step(tmp_path, capsys):
    import_tiny(tmp_path)
    two_stages = tiny_recipe(stages=[{"epochs": 1}, {"epochs": 2}])
    recipe = write_recipe(tmp_path / "two.yaml", two_stages)
    out = tmp_path / "run"
    argv = ["train", str(recipe), "--data", "tiny", "--out", str(out), "--quiet"]
    code = main([*argv, "--set", "stages.1.lr=1e30"])
    captured = capsys.readouterr()
    assert code == 3
    (line,) = captured.err.splitlines()
    assert line.startswith("error: loss became ")
    assert "at stage 2, epoch 2, step " in line
    assert f"last good checkpoint: {out / 'last.pt'}" in line
    state = load_checkpoint(out / "last.pt")  # stage 1's end, finite
    assert state["position"] == {"stage": 0, "epoch": 1, "batch": 0}
    assert all(torch.isfinite(t).all() for t in state["model_state"].values())
    assert load_checkpoint(out / "best.pt")["position"]["epoch"] == 1
    assert len(metric_rows(out)) == 1


def test_non_finite_loss_before_any_checkpoint(tmp_path, capsys):
    import_tiny(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "scratch-simple", "--data", "tiny", "--out", str(out), "--quiet"]
    code = main([*argv, "--set", "optimizer.lr=1e30", "--set", "batch_size=8"])
    captured = capsys.readouterr()
    assert code == 3
    (line,) = captured.err.splitlines()
    assert "at stage 1, epoch 1, step " in line and "(no checkpoint)" in line
    assert not (out / "last.pt").exists()


# ---------------------------------------------------------------- Ctrl-C at chosen moments
# In-process and deterministic: the flag the SIGINT handler sets is set by hand at an
# exact point, including the awkward ones (the last step of an epoch, validation, a
# stage boundary). Two stages, so a resume also has to pick the right optimizer.

TWO_STAGES = [{"epochs": 1, "train": ["head"]}, {"epochs": 2, "train": "all", "lr": 0.02}]
# A weight EMA over both stages (imgclf.train.ema): one average carried across the stage
# boundary, saved in every checkpoint, validated, and best.pt.
EMA = {"decay": 0.9, "warmup": True}


def _two_stage(tmp_path_factory, **changes):
    root = tmp_path_factory.mktemp("two-stage")
    folder = make_image_folder(root / "src")
    ds = import_dataset(folder, "tiny", dest=root / "tiny", warn=lambda msg: None)
    recipe = load_recipe(tiny_recipe(stages=TWO_STAGES, **changes))
    run = train(recipe, ds, out=root / "reference", threads=1, progress=False)
    return recipe, ds, run


@pytest.fixture(scope="module")
def two_stage_reference(tmp_path_factory):
    return _two_stage(tmp_path_factory)


@pytest.fixture(scope="module")
def two_stage_ema_reference(tmp_path_factory):
    return _two_stage(tmp_path_factory, ema=EMA)


@pytest.mark.parametrize("ema", [False, True], ids=["plain", "ema"])
@pytest.mark.parametrize(
    "epoch, batch, position",
    [
        (1, None, {"stage": 0, "epoch": 1, "batch": 0}),  # validation at the stage's end
        (2, 0, {"stage": 1, "epoch": 0, "batch": 1}),  # first step of stage 2
        (2, 5, {"stage": 1, "epoch": 0, "batch": 6}),  # last step of an epoch (6 steps)
        (3, 2, {"stage": 1, "epoch": 1, "batch": 3}),
    ],
)
def test_ctrl_c_anywhere_then_resume_is_exact(request, tmp_path, epoch, batch, position, ema):
    name = "two_stage_ema_reference" if ema else "two_stage_reference"
    recipe, ds, reference = request.getfixturevalue(name)
    out = tmp_path / "run"
    trainer = Trainer(recipe, ds, out, threads=1, progress=False)
    interrupt_at(trainer, epoch, batch)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    at_interrupt = load_checkpoint(out / "last.pt")
    assert at_interrupt["position"] == position
    assert (at_interrupt["ema_state"] is not None) == ema
    train(None, resume=out, threads=1, progress=False)
    assert_same_run(out, reference.path)  # best.pt: the average's weights, with EMA
    if ema:
        got, want = (load_checkpoint(p / "last.pt")["ema_state"] for p in (out, reference.path))
        assert got["updates"] == want["updates"] == 3 * 6
        for key, value in want["weights"].items():
            assert torch.equal(got["weights"][key], value), key


def test_periodic_mid_epoch_checkpoints_change_nothing(two_stage_reference, tmp_path, monkeypatch):
    recipe, ds, reference = two_stage_reference
    monkeypatch.setattr("imgclf.train.steps.CHECKPOINT_MINUTES", 0.0)  # after every step
    saves = []
    monkeypatch.setattr(Trainer, "_checkpoint_mid_epoch", _counting(saves))
    run = train(recipe, ds, out=tmp_path / "run", threads=1, progress=False)
    assert len(saves) == 3 * 6
    assert_same_run(run.path, reference.path)


def _counting(calls: list):
    original = Trainer._checkpoint_mid_epoch

    def checkpoint(self, *args, **kwargs):
        calls.append(self.position.batch)
        return original(self, *args, **kwargs)

    return checkpoint
