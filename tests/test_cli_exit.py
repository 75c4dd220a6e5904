"""The command's process and its exit (issue #30, small sets): ``imgclf`` runs the cycle
collector less often (its full passes over what torch and timm import), and freezes its
objects before the interpreter's shutdown, which then skips those passes too (about a
second of a 250-photo run each); a training run's files are whole afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers_train import import_tiny, metric_rows, tiny_recipe, write_recipe


def _train(argv: list[str], call: str) -> dict[str, int]:
    """``imgclf ARGV`` in a child through ``call`` (``entry()``: the command; ``main()``:
    the same command in a process Python's defaults run); its objects frozen at its end
    and the cycle collector's full passes."""
    code = (
        "import atexit, gc, sys\n"
        # Registered first, so it runs last of the atexit functions: after main() returned.
        "atexit.register(lambda: print('frozen', gc.get_freeze_count(), "
        "'full', gc.get_stats()[2]['collections']))\n"
        f"sys.argv = {argv!r}\n"
        "from imgclf.cli import entry, main\n"
        f"{call}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()[-4:]
    return {words[0]: int(words[1]), words[2]: int(words[3])}


def test_a_training_command_exits_frozen_with_every_file_whole(tmp_path):
    import_tiny(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(epochs=2))
    out = tmp_path / "run"
    argv = ["imgclf", "train", str(recipe), "--data", "tiny", "--out", str(out), "--quiet"]
    command = _train(argv, "entry()")
    assert command["frozen"] > 10_000  # torch's own objects at least
    # The same run at Python's collector defaults made more full passes.
    argv[argv.index(str(out))] = str(tmp_path / "default")
    default = _train(argv, "main()")
    assert default["frozen"] == 0 and default["full"] >= 3
    assert command["full"] < default["full"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and "val_accuracy" in summary
    assert [row["epoch"] for row in metric_rows(out)] == ["1", "2"]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2]
    assert [e.step for e in events.Scalars("accuracy/val")] == [1, 2]
