"""The command's exit (issue #30, small sets): ``imgclf`` freezes its objects before the
interpreter's shutdown, which then skips the cycle collector's passes over everything
torch and timm made (about a second of a 250-photo run), and a training run's files are
all there and whole afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers_train import import_tiny, metric_rows, tiny_recipe, write_recipe


def test_a_training_command_exits_frozen_with_every_file_whole(tmp_path):
    import_tiny(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(epochs=2))
    out = tmp_path / "run"
    argv = ["imgclf", "train", str(recipe), "--data", "tiny", "--out", str(out), "--quiet"]
    code = (
        "import atexit, gc, sys\n"
        # Registered first, so it runs last of the atexit functions: after main() returned.
        "atexit.register(lambda: print('frozen objects:', gc.get_freeze_count()))\n"
        f"sys.argv = {argv!r}\n"
        "from imgclf.cli import entry\n"
        "entry()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr
    frozen = int(done.stdout.split("frozen objects:")[1])
    assert frozen > 10_000  # torch's own objects at least

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and "val_accuracy" in summary
    assert [row["epoch"] for row in metric_rows(out)] == ["1", "2"]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2]
    assert [e.step for e in events.Scalars("accuracy/val")] == [1, 2]
