"""What training imports, and when (issue #30, small sets): a 250-photo run spent seconds
importing sklearn (with scipy) for two metrics and onnx for two version strings. The
trainer's modules and `imgclf train --help` load none of sklearn, matplotlib, onnx or
onnxruntime; a whole run loads no sklearn; the feature cache's pass on a kept ONNX graph
opens it in ONNX Runtime without importing onnx."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from helpers_train import import_tiny, tiny_recipe, write_recipe

HEAVY = ("sklearn", "scipy", "matplotlib", "onnx", "onnxruntime")


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )


def test_the_trainer_and_train_help_import_no_metrics_plots_or_onnx():
    code = (
        "import sys, contextlib, io\n"
        "import imgclf.train.trainer, imgclf.train.api, imgclf.train.finish\n"
        "from imgclf.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['train', '--help'])\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr


def test_a_whole_training_run_imports_no_sklearn(tmp_path):
    import_tiny(tmp_path)
    recipe = tiny_recipe(
        model="complex",
        augment={"crop_padding": 0, "flip": True},
        stages=[{"epochs": 1, "train": ["block3", "head"]}, {"epochs": 1, "train": "all"}],
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)
    args = ["train", str(path), "--data", "tiny", "--out", str(tmp_path / "run"), "--quiet"]
    code = (
        "import sys\n"
        "from imgclf.cli import main\n"
        f"assert main({args!r}) == 0\n"
        "assert 'matplotlib' in sys.modules  # the run's plots were drawn\n"
        "loaded = [m for m in ('sklearn', 'scipy') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "confusion.csv").is_file()


def test_a_kept_graph_runs_in_onnx_runtime_without_importing_onnx():
    """The graph kept by an earlier process (here: this one) is found by its key and opened
    by ONNX Runtime in another, whose key needs onnx's version but not onnx."""
    from imgclf.models import create
    from imgclf.runtime.onnx import kept_onnx_path, kept_onnx_session

    torch.manual_seed(0)
    prefix, _ = create("complex", num_classes=3, input_size=16).eval().split_at("block3")
    example = torch.zeros(2, 3, 16, 16)
    kept_onnx_session(prefix, example)  # exported (onnx imported here) and kept
    assert kept_onnx_path(prefix, example).is_file()
    code = (
        "import sys, torch\n"
        "from imgclf.models import create\n"
        "from imgclf.train import prefix_pass\n"
        "torch.manual_seed(0)\n"
        "prefix, _ = create('complex', num_classes=3, input_size=16).eval().split_at('block3')\n"
        "x = torch.randn(8, 3, 16, 16)\n"
        "chosen = prefix_pass.choose(prefix, x, 10, None)\n"
        "assert 'onnxruntime' in sys.modules, 'the kept graph was not opened'\n"
        "assert 'onnx' not in sys.modules\n"
        "with torch.inference_mode():\n"
        "    assert prefix_pass.same_activations(chosen.run(x), prefix(x))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
