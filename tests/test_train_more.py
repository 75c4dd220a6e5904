"""Train more (issue #32, item 3): ``imgclf train --resume RUN --epochs N`` on a finished
run adds a stage; ``imgclf train RECIPE --data D --init RUN`` starts from RUN's weights.

Each case trains a tiny run (the `simple` net on 16-px colour squares, seconds) and drives
the CLI or imgclf.train. The kill test is a real child process killed with SIGKILL at a
chosen step of the continuation; the reference is the same continuation uninterrupted.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import imgclf
from helpers_train import (
    assert_same_run,
    assert_same_weights,
    interrupt_at,
    load_pt,
    make_image_folder,
    metric_rows,
    tiny_recipe,
    write_recipe,
)
from imgclf.cli import main
from imgclf.train import api
from imgclf.train.budget import Plan
from imgclf.train.more import extend_plan
from imgclf.train.trainer import Trainer


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> SimpleNamespace:
    """A finished two-epoch run of the tiny recipe (2 steps an epoch), its data set."""
    root = tmp_path_factory.mktemp("more")
    src = make_image_folder(root / "src", per_class=8)
    ds = imgclf.import_dataset(src, "tiny", dest=root / "tiny", warn=lambda msg: None)
    run = imgclf.train(tiny_recipe(epochs=2), ds, out=root / "run", threads=1, progress=False)
    return SimpleNamespace(run=run.path, data=ds.root, root=root)


def copy_run(finished: SimpleNamespace, dest: Path) -> Path:
    return Path(shutil.copytree(finished.run, dest))


@pytest.fixture(scope="module")
def continued(finished, tmp_path_factory) -> Path:
    """The reference: the finished run trained 2 epochs more, uninterrupted."""
    out = copy_run(finished, tmp_path_factory.mktemp("reference") / "run")
    assert main(["train", "--resume", str(out), "--epochs", "2", "--threads", "1", "--quiet"]) == 0
    return out


# ---------------------------------------------------------------- --resume RUN --epochs N


def test_more_epochs_append_a_stage_at_the_last_rate(finished, continued, capsys):
    before = metric_rows(finished.run)
    rows = metric_rows(continued)
    assert rows[:2] == before  # the run's own rows are kept as they were
    assert [(r["stage"], r["epoch"], r["stage_epoch"]) for r in rows[2:]] == [
        ("2", "3", "1"),
        ("2", "4", "2"),
    ]
    # Constant at the rate the last step used (logged in the run's last row).
    assert rows[2]["lr"] == rows[3]["lr"] == before[-1]["lr"]
    stages = yaml.safe_load((continued / "config.yaml").read_text())["stages"]
    assert [s["name"] for s in stages] == ["", "more-1"]
    assert stages[1]["epochs"] == 2 and stages[1]["scheduler"]["name"] == "constant"
    assert load_pt(continued / "last.pt")["recipe"]["stages"] == stages
    summary = json.loads((continued / "summary.json").read_text())
    assert summary["epochs"] == 4
    # best.pt: the best validation of all four epochs (the first of equals, as always).
    accs = [float(r["val_acc"]) for r in rows]
    assert summary["best_epoch"] == accs.index(max(accs)) + 1
    if summary["best_epoch"] <= 2:  # no better epoch since: best.pt is the run's own
        assert_same_weights(continued / "best.pt", finished.run / "best.pt")


def test_more_prints_what_it_trains_and_from_which_rate(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path / "run")
    last_lr = float(metric_rows(finished.run)[-1]["lr"])
    code, _, err = run_cli(capsys, "train", "--resume", out, "--epochs", "1", "--quiet")
    assert code == 0, err
    (line,) = [x for x in err.splitlines() if x.startswith("more-")]
    assert line.startswith("more-1: 1 more epoch training all, at the last learning rate, ")
    assert f"{last_lr:.4g}, constant" in line
    # Again: a second stage, a cosine decay from the rate given.
    argv = ["train", "--resume", out, "--epochs", "2", "--set", "optimizer.lr=0.02", "--quiet"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "more-2: 2 more epochs training all, a cosine decay from --set optimizer.lr=0.02" in err
    rows = metric_rows(out)
    assert [r["stage"] for r in rows] == ["1", "1", "2", "3", "3"]
    # Cosine over 4 steps from 0.02; each row logs its epoch's last step (steps 1 and 3,
    # from 0): 0.02 × (1 + cos(π k/4)) / 2.
    assert [float(r["lr"]) for r in rows[3:]] == pytest.approx([0.0170711, 0.00292893], 1e-5)


def test_library_train_resume_epochs_is_the_cli(finished, continued, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    run = imgclf.train(resume=out, epochs=2, threads=1, progress=False)
    assert run.summary["epochs"] == 4
    assert_same_run(out, continued)


def test_resume_of_the_continued_run_changes_nothing(continued, tmp_path, capsys):
    out = Path(shutil.copytree(continued, tmp_path / "run"))
    code, _, _ = run_cli(capsys, "train", "--resume", out, "--quiet")
    assert code == 0
    assert_same_run(out, continued)


# The child: a checkpoint after every step (as CHECKPOINT_MINUTES elapsing would), and a
# SIGKILL of itself right after the one at (stage, epoch, batch): a kill at a known step.
KILL_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import imgclf.train.steps as steps
    from imgclf.cli import main
    from imgclf.train.trainer import Trainer

    steps.CHECKPOINT_MINUTES = 0.0
    save, at = Trainer._checkpoint_mid_epoch, tuple(map(int, sys.argv[1:4]))

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        pos = self.position
        if (pos.stage, pos.epoch, pos.batch) == at:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer._checkpoint_mid_epoch = save_then_die
    sys.exit(main(sys.argv[4:]))
    """
)


@pytest.mark.parametrize("again", [["--resume"], ["--resume", "--epochs", "2"]], ids=str)
def test_killed_continuation_resumes_to_the_uninterrupted_one(
    finished, continued, tmp_path, capsys, again
):
    out = copy_run(finished, tmp_path / "run")
    script = tmp_path / "child.py"
    script.write_text(KILL_CHILD)
    argv = ["train", "--resume", str(out), "--epochs", "2", "--threads", "1", "--quiet"]
    child = subprocess.run(
        [sys.executable, str(script), "1", "1", "1", *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    at_kill = load_pt(out / "last.pt")
    assert at_kill["position"] == {"stage": 1, "epoch": 1, "batch": 1}  # mid-epoch
    assert at_kill["recipe"]["stages"][-1]["name"] == "more-1"
    command = [again[0], out, *again[1:], "--threads", "1", "--quiet"]
    code, _, err = run_cli(capsys, "train", *command)
    assert code == 0, err
    assert_same_run(out, continued)


@pytest.mark.parametrize("epoch, batch", [(3, None), (4, 0)], ids=["validation", "step"])
def test_ctrl_c_in_a_continuation_resumes_exactly(
    finished, continued, tmp_path, monkeypatch, epoch, batch
):
    out = copy_run(finished, tmp_path / "run")
    build = api._trainer

    def interrupted(*args, **kwargs) -> Trainer:
        trainer = build(*args, **kwargs)
        interrupt_at(trainer, epoch, batch)
        return trainer

    monkeypatch.setattr(api, "_trainer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(resume=out, epochs=2, threads=1, progress=False)
    monkeypatch.undo()
    imgclf.train(resume=out, threads=1, progress=False)
    assert_same_run(out, continued)


def test_an_early_stopped_run_goes_on_from_where_it_stopped(finished, tmp_path, capsys):
    recipe = tiny_recipe(epochs=6, early_stopping={"patience": 2})
    recipe["optimizer"]["lr"] = 1e-9  # predictions never change: stopped after epoch 3
    run = imgclf.train(recipe, finished.data, out=tmp_path / "run", threads=1, progress=False)
    assert len(metric_rows(run.path)) == 3
    code, _, err = run_cli(capsys, "train", "--resume", run.path, "--epochs", "2", "--quiet")
    assert code == 0, err
    rows = metric_rows(run.path)
    assert [(r["stage"], r["epoch"]) for r in rows] == [
        ("1", "1"),
        ("1", "2"),
        ("1", "3"),
        ("2", "4"),
        ("2", "5"),  # patience counts from the continuation's start
    ]
    assert rows[3]["lr"] == rows[4]["lr"] == rows[2]["lr"]
    stages = load_pt(run.path / "last.pt")["recipe"]["stages"]
    assert [s["epochs"] for s in stages] == [3, 2]  # what the stopped stage ran


def test_a_budgeted_run_goes_on_with_its_added_stage_kept(finished, tmp_path, capsys):
    recipe = tiny_recipe(epochs=2)
    run = imgclf.train(recipe, finished.data, out=tmp_path / "run", time_budget=6, progress=False)
    plan = load_pt(run.path / "last.pt")["plan"]
    trained = len(metric_rows(run.path))
    code, _, err = run_cli(capsys, "train", "--resume", run.path, "--epochs", "2", "--quiet")
    assert code == 0, err
    rows = metric_rows(run.path)
    assert [r["stage"] for r in rows[trained:]] == ["2", "2"]
    after = load_pt(run.path / "last.pt")["plan"]
    assert after["stage_steps"] == [plan["stage_steps"][0], 4] and after["kept"][1] is True
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["trained_epochs"] == pytest.approx(plan["stage_steps"][0] / 2 + 2)


def test_extend_plan_cuts_a_stopped_stage_and_keeps_the_added_one():
    plan = Plan(
        budget_seconds=60,
        stage_steps=[10, 20, 30],
        stage_epochs=[1.0, 2.0, 3.0],
        text="",
        step_seconds=[0.1, 0.2, 0.3],
        setup_seconds=[1.0, 2.0, 3.0],
        reserve_seconds=1.0,
        spent_before=1.0,
        kept=[True],
        train_step_seconds=[0.05, 0.15, 0.25],
        epoch_seconds=[],
    )
    extend_plan(plan, si=1, done=14, steps=8, epochs=4)
    assert plan.stage_steps == [10, 14, 8] and plan.stage_epochs == [1.0, 2.0, 4.0]
    assert plan.step_seconds == [0.1, 0.2, 0.2] and plan.setup_seconds == [1.0, 2.0, 0.0]
    assert plan.kept == [True, False, True] and plan.train_step_seconds == [0.05, 0.15, 0.15]
    assert plan.epoch_seconds == []


BAD_MORE = [
    (["--set", "batch_size=4"], "takes only --set optimizer.lr=X"),
    (["--set", "optimizer.lr=-1"], "--set optimizer.lr=-1: Input should be greater than 0"),
    (["--exist-ok"], "--exist-ok starts a fresh run"),
    (["--init", "RUN"], "--init starts a new run from another run's weights"),
]


@pytest.mark.parametrize("args, expected", BAD_MORE)
def test_bad_more_input_is_one_error_line(finished, tmp_path, capsys, args, expected):
    out = copy_run(finished, tmp_path / "run")
    rows = (out / "metrics.csv").read_text()
    argv = [str(out) if a == "RUN" else a for a in args]
    code, _, err = run_cli(capsys, "train", "--resume", out, "--epochs", "2", *argv)
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith("error: ") and expected in line, line
    assert (out / "metrics.csv").read_text() == rows


def test_epochs_on_an_unfinished_run_is_refused(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path / "run")
    state = load_pt(out / "last.pt")
    state["position"]["epoch"] = 1  # as if stopped after its first epoch, mid-stage
    state["optimizer_state"] = {"state": {}, "param_groups": []}
    torch.save(state, out / "last.pt")
    code, _, err = run_cli(capsys, "train", "--resume", out, "--epochs", "2")
    assert code == 2
    assert "drop --set/--epochs (--epochs adds epochs to a finished run" in err


# ---------------------------------------------------------------- --init RUN


def start_weights(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Record the model's weights as training starts (after --init loaded them)."""
    seen: list[dict[str, torch.Tensor]] = []
    fit = Trainer.fit

    def recorded(self) -> None:
        seen.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        fit(self)

    monkeypatch.setattr(Trainer, "fit", recorded)
    return seen


def new_data(root: Path, classes: tuple[str, ...]) -> Path:
    src = make_image_folder(root / "src", per_class=8, classes=classes, seed=1)
    return imgclf.import_dataset(src, "new", dest=root / "new", warn=lambda m: None).root


def test_init_with_the_same_classes_starts_from_the_same_weights(
    finished, tmp_path, monkeypatch, capsys
):
    seen = start_weights(monkeypatch)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(epochs=1))
    data, out = new_data(tmp_path, ("a", "b", "c")), tmp_path / "run"
    argv = ["train", recipe, "--data", data, "--init", finished.run, "--out", out, "--quiet"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    best = finished.run / "best.pt"
    assert f"init: weights of {best}: 3 classes matched, 0 new, 0 dropped" in err
    source = load_pt(best)["model_state"]
    assert all(torch.equal(seen[0][k], source[k]) for k in source)
    assert json.loads((out / "summary.json").read_text())["init_from"] == str(best)
    assert yaml.safe_load((out / "config.yaml").read_text())["init"] == str(best)


def test_init_matches_classes_by_name_adds_and_drops(finished, tmp_path, monkeypatch, capsys):
    seen = start_weights(monkeypatch)
    # Classes b, c kept (now rows 0, 1), e new (row 2), a dropped; a larger input size.
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(epochs=1, input_size=24))
    data = new_data(tmp_path, ("b", "c", "e"))
    fresh = imgclf.train(recipe, data, out=tmp_path / "fresh", threads=1, progress=False)
    run = imgclf.train(
        recipe, data, out=tmp_path / "run", init=finished.run, threads=1, progress=False
    )
    err = capsys.readouterr().err
    assert "2 classes matched, 1 new (e), 1 dropped (a)" in err
    source = load_pt(finished.run / "best.pt")["model_state"]
    start, fresh_start = seen[1], seen[0]
    for key in ("head.weight", "head.bias"):
        assert torch.equal(start[key][:2], source[key][1:])  # b, c: their old rows
        assert torch.equal(start[key][2], fresh_start[key][2])  # e: the fresh model's row
    for key in source:
        if not key.startswith("head."):
            assert torch.equal(start[key], source[key]), key
    assert run.summary["classes"] == ["b", "c", "e"] and fresh.summary["init_from"] is None


BAD_INIT = [
    (["--set", "model=complex"], "that run's model is 'simple', this recipe's is 'complex'"),
    (["--init-file", "nothing"], "no such checkpoint"),
    (["--init-file", "text.pt"], "text.pt: unreadable checkpoint (not a PyTorch file"),
    (["--weights", "RECIPE"], "init and weights both give the starting weights"),
]


@pytest.mark.parametrize("args, expected", BAD_INIT)
def test_bad_init_is_one_error_line_and_no_run(finished, tmp_path, capsys, args, expected):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(epochs=1, model="simple"))
    (tmp_path / "text.pt").write_text("hello")
    init = finished.run
    if args[0] == "--init-file":
        init, args = tmp_path / args[1], []
    argv = [str(recipe) if a == "RECIPE" else a for a in args]
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "train", recipe, "--data", finished.data, "--init", init, "--out", out, *argv
    )
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith("error: ") and expected in line, line
    assert not out.exists()


def test_init_of_another_architecture_names_both_models(finished, tmp_path):
    from imgclf.errors import CheckpointError
    from imgclf.models import create
    from imgclf.runtime.checkpoint import load_checkpoint
    from imgclf.train.init_from import start_from

    state = load_checkpoint(finished.run / "best.pt")
    state["model_args"] = {**state["model_args"], "depth": 3}
    model = create("simple", num_classes=3, input_size=16)
    with pytest.raises(CheckpointError, match=r"'simple' \{'depth': 3\}, this recipe builds"):
        start_from(model, state, ["a", "b", "c"])
