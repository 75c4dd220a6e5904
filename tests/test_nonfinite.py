"""NaN and infinite weights (issue #31, item 6): a run stops before it saves them, in one
line naming where and the last good checkpoint, and no loader (predict, eval, export,
serve, resume, a weights file) takes them.

Training runs are tiny (60 images of 16 px, the ``simple`` CNN, 6 steps an epoch).
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch

from helpers_train import (
    cli_process,
    import_tiny,
    interrupt_at,
    load_pt,
    metric_rows,
    tiny_recipe,
    write_recipe,
)
from imgclf.cli import main
from imgclf.errors import CheckpointError, TrainingDiverged
from imgclf.models.weights import load_state_file
from imgclf.runtime.checkpoint import check_finite, load_checkpoint
from imgclf.runtime.finite import checkpoint_tensors, nonfinite
from imgclf.train import steps
from imgclf.train.recipe import load_recipe
from imgclf.train.steps import StageRun
from imgclf.train.trainer import Trainer


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """The exit code of ``imgclf ARGV`` and its stderr lines but the guard-rail warnings (a
    diverging run also learns nothing)."""
    code = main(list(argv))
    err = capsys.readouterr().err.splitlines()
    return code, [line for line in err if not line.startswith("warning: ")]


def _train(capsys, recipe: Path, out: Path) -> tuple[int, list[str]]:
    return _cli(capsys, "train", str(recipe), "--data", "tiny", "--out", str(out), "--quiet")


def _poison_at(monkeypatch, done: int) -> None:
    """A NaN in the head's bias right after the stage's step ``done`` (counted from 1): the
    loss of that step was finite, as after a step with an infinite learning rate."""
    original = StageRun.stepped

    def stepped(self: StageRun, n: int) -> None:
        original(self, n)
        if n == done:
            with torch.no_grad():
                self.model.head.bias[0] = float("nan")

    monkeypatch.setattr(StageRun, "stepped", stepped)


def _finite(path: Path) -> bool:
    return not nonfinite(checkpoint_tensors(load_pt(path)))


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_non_finite_learning_rate_is_a_recipe_error(tmp_path, capsys, value):
    import_tiny(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "scratch-simple", "--data", "tiny", "--out", str(out), "--quiet"]
    code, lines = _cli(capsys, *argv, "--set", f"optimizer.lr={value}")
    assert code == 2
    (line,) = lines
    assert line.startswith("error: ") and line.endswith(
        "scratch-simple.yaml: optimizer.lr: Input should be a finite number"
    )
    assert not out.exists()


def test_a_learning_rate_past_float32_is_a_recipe_error(tmp_path, capsys):
    """AdamW's step ended in torch's float-overflow traceback at lr 1e38."""
    import_tiny(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "scratch-simple", "--data", "tiny", "--out", str(out), "--quiet"]
    code, lines = _cli(capsys, *argv, "--set", "optimizer.name=adamw", "--set", "optimizer.lr=1e38")
    assert code == 2
    (line,) = lines
    assert line.startswith("error: ") and line.endswith(
        "optimizer.lr: 1e+38 is past any useful learning rate (at most 1e+30)"
    )
    assert not out.exists()


def test_a_last_epoch_that_predicts_nan_is_not_saved(tmp_path, capsys):
    """lr 1e30 in a one-step second stage: its step's loss is finite, the weights it leaves
    score NaN on validation. Before: exit 0 with those weights in last.pt."""
    import_tiny(tmp_path)
    recipe = tiny_recipe(stages=[{"epochs": 1}, {"epochs": 1, "lr": 1e30}], batch_size=64)
    recipe["scheduler"] = {"name": "constant"}
    out = tmp_path / "run"
    code, lines = _train(capsys, write_recipe(tmp_path / "two.yaml", recipe), out)
    assert code == 3
    assert lines == [
        "error: validation loss became nan after stage 2, epoch 2; lower the learning rate "
        f"(last good checkpoint: {out / 'last.pt'})"
    ]
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(out / name)["position"] == {"stage": 0, "epoch": 1, "batch": 0}
    assert len(metric_rows(out)) == 1
    # What was kept predicts finite confidences.
    table = tmp_path / "p.csv"
    code = main(["predict", str(out), "--input", str(tmp_path / "tiny-src"), "--out", str(table)])
    with open(table, newline="") as f:
        confidences = [float(row["confidence"]) for row in csv.DictReader(f)]
    assert code == 0 and len(confidences) == 60 and all(map(math.isfinite, confidences))


@pytest.mark.parametrize(
    ("every", "done", "where"),
    [
        (50, 12, "epoch 2, step 6"),  # the epoch's last step: checked before validation
        (2, 8, "epoch 2, step 2"),  # a periodic check, before the next step's loss
    ],
)
def test_nan_weights_behind_a_finite_loss_stop_the_run(
    tmp_path, capsys, monkeypatch, every, done, where
):
    import_tiny(tmp_path)
    monkeypatch.setattr(steps, "WEIGHT_CHECK_EVERY", every)
    _poison_at(monkeypatch, done)
    out = tmp_path / "run"
    code, lines = _train(capsys, write_recipe(tmp_path / "r.yaml", tiny_recipe(epochs=3)), out)
    assert code == 3
    assert lines == [
        f"error: weights became NaN or infinite ('head.bias') by stage 1, {where}; lower "
        f"the learning rate (last good checkpoint: {out / 'last.pt'})"
    ]
    assert load_checkpoint(out / "last.pt")["position"]["epoch"] == 1
    assert _finite(out / "last.pt") and _finite(out / "best.pt")


def test_a_mid_epoch_checkpoint_is_never_written_with_nan_weights(tmp_path, monkeypatch):
    """Ctrl-C right after a step that left NaN weights (no check due there): the save
    refuses them, and last.pt stays the finite one of epoch 1."""
    ds = import_tiny(tmp_path)
    _poison_at(monkeypatch, 9)  # epoch 2, step 3 of 6
    out = tmp_path / "run"
    trainer = Trainer(load_recipe(tiny_recipe(epochs=3)), ds, out, threads=1, progress=False)
    interrupt_at(trainer, epoch=2, batch=2)
    expected = (
        "weights became NaN or infinite ('head.bias') by stage 1, epoch 2; lower the "
        f"learning rate (last good checkpoint: {out / 'last.pt'})"
    )
    try:
        trainer.run()
    except (TrainingDiverged, KeyboardInterrupt) as exc:  # before: saved, then interrupted
        raised: BaseException | None = exc
    else:
        raised = None
    assert isinstance(raised, TrainingDiverged) and str(raised) == expected
    assert load_pt(out / "last.pt")["position"] == {"stage": 0, "epoch": 1, "batch": 0}
    assert _finite(out / "last.pt")


# ---------------------------------------------------------------- loading


@pytest.fixture
def poisoned_run(tmp_path) -> Path:
    """A trained run whose best.pt and last.pt hold one NaN weight, as the code before this
    change saved them."""
    import_tiny(tmp_path)
    good = tmp_path / "good"
    assert main(["train", "scratch-simple", "--data", "tiny", "--out", str(good), "--quiet",
                 "--epochs", "1", "--set", "input_size=16"]) == 0  # fmt: skip
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    for name in ("best.pt", "last.pt"):
        state = load_pt(bad / name)
        state["model_state"]["head.weight"][0, 0] = float("nan")
        torch.save(state, bad / name)
    return bad


def test_every_command_refuses_a_checkpoint_with_nan_weights(poisoned_run, tmp_path, capsys):
    bad, src = poisoned_run, tmp_path / "tiny-src"
    refusal = (
        "{}: its weights hold NaN or infinite values ('head.weight'): the training that "
        "wrote it diverged; use an earlier checkpoint, or train again with a lower learning "
        "rate"
    )
    commands = {
        "best.pt": [
            ["predict", str(bad), "--input", str(src), "--out", str(tmp_path / "p.csv")],
            ["eval", str(bad), "--data", "tiny"],
            ["export", str(bad), "--out", str(tmp_path / "m.onnx")],
        ],
        "last.pt": [["train", "--resume", str(bad), "--quiet"]],
    }
    for name, argvs in commands.items():
        for argv in argvs:
            code, lines = _cli(capsys, *argv)
            assert (code, lines) == (2, ["error: " + refusal.format(bad / name)]), argv
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.onnx").exists()
    # The server loads its runs before it listens: it exits instead of serving NaN.
    proc = cli_process("serve", str(bad), "--port", "0")
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == "error: " + refusal.format(bad / "best.pt")


def test_a_nan_weight_average_is_refused_too(tmp_path):
    state = {"model_state": {"w": torch.ones(2)}, "ema_state": {"weights": {"w": torch.ones(2)}}}
    assert nonfinite(checkpoint_tensors(state)) == []
    state["ema_state"]["weights"]["w"][1] = float("inf")
    assert nonfinite(checkpoint_tensors(state)) == ["ema w"]
    # The loader's finite check itself (load_checkpoint runs it after the fields' schema,
    # which this partial state would fail first).
    with pytest.raises(CheckpointError, match=r"a\.pt: its weights hold NaN .*\('ema w'\)"):
        check_finite(state, tmp_path / "a.pt")


def test_a_weights_file_with_nan_is_refused(tmp_path):
    path = tmp_path / "backbone.pt"
    torch.save({"conv.weight": torch.tensor([1.0, float("nan")]), "n": torch.tensor(3)}, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_state_file(path)
    assert str(excinfo.value) == (
        f"{path}: its weights hold NaN or infinite values ('conv.weight'); use another weights file"
    )


def test_the_screening_sums_flag_exactly_the_tensors_holding_nan_or_infinity():
    """nonfinite screens with one sum per tensor (issue #30, small sets): finite values
    whose sum overflows (fp32 near its maximum, fp16 past 65,504) are not flagged, every
    NaN or infinity is, whatever the dtype and wherever it sits, and the answer is the
    element-by-element check's on every tensor."""
    big = torch.finfo(torch.float32).max
    tensors = {
        "fine": torch.randn(50),
        "overflowing fp32": torch.full((4,), big),
        "overflowing fp16": torch.full((8,), 60000.0, dtype=torch.float16),
        "nan": torch.tensor([1.0, float("nan"), 2.0]),
        "inf": torch.tensor([float("inf")]),
        "both infinities": torch.tensor([float("inf"), float("-inf")]),
        "bf16 -inf": torch.tensor([0.5, float("-inf")], dtype=torch.bfloat16),
        "fp16 nan": torch.tensor([float("nan")], dtype=torch.float16),
        "integers": torch.tensor([1, 2]),  # not floating point: skipped
        "empty": torch.empty(0),
        "not a tensor": 3.0,
    }
    assert torch.isinf(tensors["overflowing fp32"].sum())  # the sums do overflow
    assert torch.isinf(tensors["overflowing fp16"].sum())
    elementwise = [
        name
        for name, t in tensors.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()
    ]
    assert elementwise == ["nan", "inf", "both infinities", "bf16 -inf", "fp16 nan"]
    assert nonfinite(tensors) == elementwise


def test_finite_weights_cost_one_elementwise_check_not_one_per_tensor(monkeypatch):
    """A model's few hundred finite tensors are screened by their sums: one isfinite call
    on the stacked sums, not one per tensor (which took 110-130 ms for Lite0's 296 at
    every check on a 2-core CPU)."""
    calls: list[int] = []
    isfinite = torch.isfinite

    def counting(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.numel())
        return isfinite(t)

    monkeypatch.setattr(torch, "isfinite", counting)
    weights = {f"layer{i}.weight": torch.randn(3, 4) for i in range(300)}
    assert nonfinite(weights) == []
    assert calls == [300]
    weights["layer7.weight"][1, 2] = float("nan")
    calls.clear()
    assert nonfinite(weights) == ["layer7.weight"]
    assert calls == [300, 12]  # the sums, then the one flagged tensor element by element
