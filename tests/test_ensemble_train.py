"""An ensemble in one command (issue #34, items 2 and 3): ``imgclf train A B --data D``
and ``--seeds N`` train the members into one folder with an ensemble.yaml, which eval,
predict, export, serve and report take as one model, voted as the file says; a kill in
member 2 resumes exactly; ``--time`` is shared; study-vote is an ensemble recipe.

Everything trains the tiny learnable images of helpers_train (16 px, a step in
milliseconds); the references are the same runs named one by one, as before this change.
"""

from __future__ import annotations

import csv
import json
import signal
import time
from pathlib import Path

import pytest
import yaml

from helpers_train import (
    assert_same_run,
    cli_process,
    load_pt,
    make_image_folder,
    tiny_recipe,
    write_recipe,
)
from imgclf.cli import main
from imgclf.data.importer import import_dataset
from imgclf.runtime.ensemble_file import ENSEMBLE_FILE, read_ensemble


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The one ``error:`` line of a user mistake; no traceback, nothing else."""
    (line,) = err.strip().splitlines()
    assert line.startswith("error: "), err
    return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two recipes × 2 seeds, hard vote, ties to recipe b: the fixture every reader test
    shares (4 one-epoch members)."""
    root = tmp_path_factory.mktemp("ens")
    src = make_image_folder(root / "src", per_class=8)
    ds = import_dataset(src, "tiny", dest=root / "tiny", warn=lambda msg: None)
    a = write_recipe(root / "a.yaml", tiny_recipe(epochs=1, name="a"))
    b = write_recipe(root / "b.yaml", tiny_recipe(epochs=1, name="b", seed=5))
    out = root / "ens"
    argv = [a, b, "--data", ds.root, "--seeds", 2, "--vote", "hard", "--prefer", "b"]
    code = main([str(x) for x in ["train", *argv, "--out", out, "--threads", 1, "--quiet"]])
    assert code == 0
    return out, ds.root, src


MEMBERS = ["member-1-a-s0", "member-2-a-s1", "member-3-b-s5", "member-4-b-s6"]


def test_seeds_and_recipes_train_every_member_into_one_folder(trained):
    out, data, _ = trained
    spec = read_ensemble(out)
    assert [m.path for m in spec.members] == MEMBERS
    assert all(m.state == "done" for m in spec.members)
    assert spec.vote == "hard" and spec.prefer == ["member-3-b-s5", "member-4-b-s6"]
    assert spec.data == str(data)
    for name, seed in zip(MEMBERS, [0, 1, 5, 6], strict=True):
        # each member a whole run, seeded the recipe's seed + k
        state = load_pt(out / name / "best.pt")
        assert state["recipe"]["seed"] == seed and (out / name / "summary.json").is_file()


def test_eval_of_the_folder_prints_members_and_the_files_vote(trained, capsys):
    out, data, _ = trained
    code, stdout, _ = run_cli(capsys, "eval", out, "--data", data, "--out-dir", out.parent)
    assert code == 0
    assert all(name in stdout for name in MEMBERS)
    (chosen,) = [line for line in stdout.splitlines() if line.endswith("ensemble")]
    assert chosen.startswith("vote hard")
    code, stdout, _ = run_cli(
        capsys, "eval", out, "--data", data, "--vote", "soft", "--out-dir", out.parent
    )
    (chosen,) = [line for line in stdout.splitlines() if line.endswith("ensemble")]
    assert code == 0 and chosen.startswith("vote soft")  # --vote overrides the file


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_of_the_folder_is_its_members_named_one_by_one(trained, tmp_path, capsys):
    out, _, src = trained
    code, stdout, _ = run_cli(capsys, "predict", out, "--input", src, "--out", tmp_path / "e.csv")
    assert code == 0 and "4 runs, hard vote" in stdout
    members = [out / name for name in MEMBERS]
    by_hand = ["--vote", "hard", "--prefer", "member-3-b-s5", "member-4-b-s6"]
    args = ["predict", *members, "--input", src, "--out", tmp_path / "m.csv", *by_hand]
    assert run_cli(capsys, *args)[0] == 0
    assert _rows(tmp_path / "e.csv") == _rows(tmp_path / "m.csv")


def test_load_and_serve_take_the_folder_as_one_model(trained):
    import imgclf
    from imgclf.serve import Predictor

    out, _, src = trained
    clf = imgclf.load(out)
    assert "hard vote" in repr(clf) and clf.runs == MEMBERS
    assert Predictor([out]).vote == "hard"
    assert Predictor([out], vote="soft").vote == "soft"
    assert clf.predict(sorted(src.rglob("*.png"))[:2])[0].label in ("a", "b", "c")


def test_export_of_a_hard_ensemble_asks_for_a_mean_vote_then_writes_one(trained, tmp_path, capsys):
    out, _, _ = trained
    code, _, err = run_cli(capsys, "export", out, "--out", tmp_path / "e.onnx")
    line = one_error_line(err)
    assert code == 2 and "votes hard" in line and "--vote soft" in line
    assert not (tmp_path / "e.onnx").exists()
    code, stdout, _ = run_cli(capsys, "export", out, "--vote", "soft", "--out", tmp_path / "e.onnx")
    assert code == 0 and all(name in stdout for name in MEMBERS)
    assert (tmp_path / "e.onnx").is_file()


def test_report_shows_the_members_and_the_files_vote(trained, tmp_path, capsys):
    out, data, _ = trained
    report = tmp_path / "r.md"
    code, stdout, _ = run_cli(capsys, "report", out, "--data", data, "--out", report)
    text = report.read_text()
    assert code == 0 and "report of 4 runs" in stdout
    assert all(name in text for name in MEMBERS) and "the hard vote" in text


# ---------------------------------------------------------------------------- bad input


@pytest.fixture
def copied(trained, tmp_path):
    """A copy of the trained ensemble folder, to damage."""
    import shutil

    out, data, _ = trained
    return Path(shutil.copytree(out, tmp_path / "ens")), data


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda f: (f / "member-2-a-s1" / "best.pt").parent.rename(f / "gone"), "no such folder"),
        (lambda f: (f / ENSEMBLE_FILE).write_text("members: [\n"), "not a readable YAML file"),
        (lambda f: (f / ENSEMBLE_FILE).write_text("!!python/object:os.system {}\n"), "YAML"),
        (lambda f: _edit(f, lambda d: d.update(vote="loudest")), "vote"),
        (lambda f: _edit(f, lambda d: d.update(extra=1)), "extra"),
        (lambda f: _edit(f, lambda d: d["members"][0].update(path="../x")), "members.0.path"),
        (lambda f: _edit(f, lambda d: d.update(prefer=["nobody"])), "not a member"),
    ],
)
def test_a_damaged_ensemble_folder_is_one_error_line(copied, capsys, damage, says):
    folder, data = copied
    damage(folder)
    for argv in (["eval", folder, "--data", data], ["predict", folder, "--input", data]):
        code, _, err = run_cli(capsys, *argv)
        line = one_error_line(err)
        assert code == 2 and str(folder / ENSEMBLE_FILE) in line and says in line, line


def _edit(folder: Path, change) -> None:
    data = yaml.safe_load((folder / ENSEMBLE_FILE).read_text())
    change(data)
    (folder / ENSEMBLE_FILE).write_text(yaml.safe_dump(data))


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["RECIPE", "nosuch", "--data", "DATA"], "unknown recipe 'nosuch'"),
        (["RECIPE", "--data", "DATA", "--seeds", "0"], "--seeds 0: give the number of members"),
        (["RECIPE", "--data", "DATA", "--seeds", "2", "--prefer", "a"], "--prefer breaks hard"),
        (["RECIPE", "RECIPE", "--data", "DATA", "--vote", "hard", "--prefer", "zz"], "'zz'"),
        (["RECIPE", "--data", "DATA", "--vote", "hard"], "name several recipes or --seeds"),
    ],
)
def test_bad_ensemble_commands_are_one_line_and_leave_no_folder(
    trained, tmp_path, monkeypatch, capsys, argv, says
):
    _, data, _ = trained
    recipe = write_recipe(tmp_path / "a.yaml", tiny_recipe(epochs=1, name="a"))
    monkeypatch.chdir(tmp_path)
    names = {"RECIPE": str(recipe), "DATA": str(data)}
    code, _, err = run_cli(capsys, "train", *[names.get(a, a) for a in argv], "--quiet")
    assert code == 2 and says in one_error_line(err)
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_seeds_and_changes(copied, capsys):
    folder, _ = copied
    code, _, err = run_cli(capsys, "train", "--resume", folder, "--seeds", "2")
    assert code == 2 and "--seeds: a resumed ensemble keeps its members" in one_error_line(err)
    code, _, err = run_cli(capsys, "train", "--resume", folder, "--epochs", "3")
    assert code == 2 and "drop --epochs" in one_error_line(err)


def test_resume_of_a_finished_ensemble_changes_nothing(copied, capsys):
    folder, _ = copied
    before = {p: p.read_bytes() for p in folder.rglob("*.pt")}
    code, _, err = run_cli(capsys, "train", "--resume", folder, "--quiet")
    assert code == 0, err
    assert {p: p.read_bytes() for p in folder.rglob("*.pt")} == before


# ---------------------------------------------------------------------------- --time


def test_time_is_shared_and_a_member_that_ends_early_passes_its_time_on(
    trained, tmp_path, monkeypatch, capsys
):
    """Each member may use the budget left over the members left: the first 90/3 s; the
    first ends at once, so the second gets (90 - ~0)/2 and the third all that is left."""
    from imgclf.train import ensemble
    from imgclf.train.state import Run

    _, data, _ = trained
    budgets = []

    def member(recipe, data, *, out, time_budget, **kwargs):
        budgets.append(time_budget)
        return Run(Path(out), {"val_accuracy": 1.0})

    monkeypatch.setattr(ensemble, "train", member)
    recipe = write_recipe(tmp_path / "a.yaml", tiny_recipe(epochs=1, name="a"))
    ensemble.train_ensemble([recipe], data, seeds=3, time_budget="90s", out=tmp_path / "e")
    assert budgets[0] == pytest.approx(30, abs=0.5)
    assert budgets[1] == pytest.approx(45, abs=0.5) and budgets[2] == pytest.approx(90, abs=0.5)
    err = capsys.readouterr().err
    assert "--time 90 s shared: 30 s each at the start" in err
    assert read_ensemble(tmp_path / "e").time_budget == 90


# ---------------------------------------------------------------------------- kill -9


EPOCHS = 3


@pytest.mark.slow  # three members twice and a child process: ~40 s here
def test_kill_9_in_member_2_then_resume_equals_an_uninterrupted_ensemble(tmp_path, capsys):
    from imgclf.train.ensemble import train_ensemble

    folder = make_image_folder(tmp_path / "src", per_class=80)
    ds = import_dataset(folder, "long", dest=tmp_path / "long", warn=lambda msg: None)
    recipe = write_recipe(
        tmp_path / "long.yaml", tiny_recipe(epochs=EPOCHS, batch_size=4, name="long")
    )
    quiet = {"threads": 1, "progress": False}
    reference = train_ensemble([recipe], ds.root, seeds=3, out=tmp_path / "ref", **quiet)
    out = tmp_path / "killed"
    argv = ["train", recipe, "--data", ds.root, "--seeds", "3", "--out", out]
    proc = cli_process(*[str(a) for a in argv], "--threads", "1", "--quiet")
    second = out / "member-2-long-s1"
    try:
        deadline = time.monotonic() + 300
        while not (second / "last.pt").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "member 2 saved no checkpoint in 300 s"
            time.sleep(0.005)
        time.sleep(0.3)  # inside member 2's second epoch (an epoch takes about a second)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    spec = read_ensemble(out)
    assert [m.state for m in spec.members] == ["done", "running", "pending"]
    assert not (second / "summary.json").exists(), "the kill came after member 2 finished"
    first = {p: p.read_bytes() for p in (out / "member-1-long-s0").glob("*.pt")}
    for _ in range(2):  # the same command again changes nothing
        code, _, err = run_cli(capsys, "train", "--resume", out, "--threads", "1", "--quiet")
        assert code == 0, err
    assert {p: p.read_bytes() for p in (out / "member-1-long-s0").glob("*.pt")} == first
    assert [m.state for m in read_ensemble(out).members] == ["done"] * 3
    for run in reference.runs:
        assert_same_run(out / run.path.name, run.path)


# ---------------------------------------------------------------------------- study-vote


@pytest.mark.slow  # three different networks, 2 epochs each at 32 px: ~30 s here
def test_study_vote_recipe_trains_a_resnet_a_mobilenet_and_the_medium_cnn(
    trained, tmp_path, capsys
):
    _, data, _ = trained
    code, stdout, _ = run_cli(capsys, "recipes")
    assert code == 0 and "study-vote" in stdout
    out = tmp_path / "study"
    small = ["--set", "pretrained=false", "--set", "input_size=32", "--epochs", "2"]
    args = ["train", "study-vote", "--data", data, "--out", out, *small, "--threads", "1"]
    code, _, err = run_cli(capsys, *args, "--quiet")
    assert code == 0, err
    spec = read_ensemble(out)
    models = [load_pt(out / m.path / "best.pt")["model_name"] for m in spec.members]
    assert models == ["resnet18", "mobilenet_v2", "medium"]
    assert spec.vote == "hard" and spec.prefer == [spec.members[0].path]
    assert spec.train_options["overrides"] == ["pretrained=false", "input_size=32"]


@pytest.mark.slow  # torchrun and two processes per member: ~30 s here
def test_nproc_per_node_trains_each_member_data_parallel(trained, tmp_path):
    _, data, _ = trained
    recipe = write_recipe(tmp_path / "a.yaml", tiny_recipe(epochs=1, name="a"))
    out = tmp_path / "ddp"
    argv = ["train", recipe, "--data", data, "--seeds", "2", "--nproc-per-node", "2"]
    proc = cli_process(*[str(a) for a in argv], "--out", str(out), "--threads", "1", "--quiet")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert stdout.count("ensemble folder:") == 1  # rank 0 reports
    spec = read_ensemble(out)
    assert [m.state for m in spec.members] == ["done", "done"]
    for m in spec.members:
        config = yaml.safe_load((out / m.path / "config.yaml").read_text())
        assert config["distributed"]["world_size"] == 2


def test_final_reaches_every_member_and_the_hint_scores_the_test_split(tmp_path, capsys):
    """``--seeds 2 --final``: each member a final fit (train + val, no validation), and the
    printout points at the test split, not at the val images the members trained on."""
    src = make_image_folder(tmp_path / "src", per_class=8)
    ds = import_dataset(src, "tiny", dest=tmp_path / "tiny", warn=lambda msg: None)
    recipe = write_recipe(tmp_path / "a.yaml", tiny_recipe(epochs=1, name="a"))
    out = tmp_path / "ens"
    argv = [recipe, "--data", ds.root, "--seeds", 2, "--final", "--out", out, "--threads", 1]
    code, stdout, _ = run_cli(capsys, "train", *argv, "--quiet")
    assert code == 0
    for member in read_ensemble(out).members:
        summary = json.loads((out / member.path / "summary.json").read_text())
        assert summary["final"] is True and "val_accuracy" not in summary
    # This data set has no test split: the command names a folder, not a split it lacks.
    assert "test" not in ds.split_names
    assert f"imgclf eval {out} FOLDER (labelled images it never saw: 'tiny' has no test" in stdout
