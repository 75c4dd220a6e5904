"""``imgclf train --log mlflow`` against a local MLflow file store in the test's folder,
read back with MLflow's own client; the one-line error where MLflow is not installed; and
no MLflow import where nobody asked for it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_train import import_tiny, tiny_recipe, write_recipe
from imgclf.cli import main

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


@pytest.fixture
def tiny_run_args(tmp_path, monkeypatch):
    """``imgclf train`` arguments for a 2-epoch tiny run into tmp_path/run; MLflow's own
    settings cleared (restored afterwards, MLFLOW_ALLOW_FILE_STORE too, which the tracker
    sets for a file store)."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    import_tiny(tmp_path)
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(epochs=2))
    out = tmp_path / "run"
    return ["train", str(recipe), "--data", "tiny", "--out", str(out), "--threads", "1"]


def only_run(uri: str, experiment: str = "Default"):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


def test_params_metrics_and_artefacts_reach_mlflow(tiny_run_args, tmp_path, monkeypatch, capsys):
    uri = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = main([*tiny_run_args, "--quiet", "--log", "mlflow"])
    _, err = capsys.readouterr()
    assert code == 0, err
    out = tmp_path / "run"
    client, run = only_run(uri)
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.tags["imgclf.run_dir"] == str(out.resolve())

    params = run.data.params  # the resolved recipe, flattened
    assert params["model"] == "simple" and params["optimizer.lr"] == "0.05"
    assert params["stages.0.epochs"] == "2" and params["stages.0.train"] == "all"
    assert params["augment.flip"] == "True" and params["batch_size"] == "8"

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for key in ("val_acc", "train_loss", "lr"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key  # one point an epoch
        assert [m.value for m in history] == pytest.approx(
            [float(r[key]) for r in rows], rel=1e-5
        )  # metrics.csv keeps 6 digits

    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.csv", "config.yaml", "best.pt", "last.pt", "tb"} <= logged
    assert not any(name.startswith(".") for name in logged)  # not the lock or launch marker
    assert any(a.path.startswith("tb/events") for a in client.list_artifacts(run.info.run_id, "tb"))
    local = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path)))
    assert local.read_text() == (out / "summary.json").read_text()


def test_default_store_is_mlruns_here(tiny_run_args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny-experiments")
    code = main([*tiny_run_args, "--quiet", "--log", "mlflow"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert f"in {(tmp_path / 'mlruns').as_uri()}" in err  # says where the run went
    client, run = only_run((tmp_path / "mlruns").as_uri(), "tiny-experiments")
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
    assert "summary.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_without_mlflow_it_is_one_line_before_training(
    tiny_run_args, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now fails as if missing
    code = main([*tiny_run_args, "--log", "mlflow"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.splitlines() == ["error: --log mlflow needs MLflow: pip install 'imgclf[mlflow]'"]
    assert not (tmp_path / "run").exists()  # nothing trained, no folder made


def test_a_tracking_hiccup_mid_run_is_a_warning(tiny_run_args, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "store").as_uri())

    def down(self, run_id, metrics=(), params=(), tags=()):
        if metrics:
            raise ConnectionError("tracking server\nunreachable")
        return real(self, run_id, metrics=metrics, params=params, tags=tags)

    real = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", down)
    code = main([*tiny_run_args, "--quiet", "--log", "mlflow"])
    _, err = capsys.readouterr()
    assert code == 0 and (tmp_path / "run" / "summary.json").is_file()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --log mlflow: tracking server unreachable; training goes on"], (
        err
    )  # once, not once an epoch
    client, run = only_run((tmp_path / "store").as_uri())
    assert run.info.status == "FINISHED" and run.data.params["model"] == "simple"
    assert client.get_metric_history(run.info.run_id, "val_acc") == []


def test_nothing_imports_mlflow_unless_asked(tiny_run_args):
    """``import imgclf``, the trainer and a whole `imgclf train` without --log leave MLflow
    (and the trackers module) unloaded: the base install stays as light as it was."""
    code = (
        "import sys, imgclf, imgclf.train.trainer, imgclf.train.api\n"
        "from imgclf.cli import main\n"
        f"assert main({tiny_run_args!r} + ['--quiet']) == 0\n"
        "loaded = [m for m in ('mlflow', 'imgclf.train.trackers') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
