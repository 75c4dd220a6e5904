"""Data-parallel training and sharded prediction under torchrun (issue #12).

The unit tests check the pieces in one process: how the loader shards an epoch and seeds
each rank's augmentation, the global-batch rule, the shorthand's command line, what a
restarted job resumes. The rest run real torchrun jobs of 2 CPU processes (Gloo, on the
loopback) on a 16-px, three-colour folder: each job costs two interpreter starts (~10 s
here), so only the equivalence and sharded-predict jobs are in the quick set; Ctrl-C +
resume, a SIGKILLed worker and the weight EMA's job are marked slow.

The reference is always one process with the global batch: with augmentation off and a
model without BatchNorm (`simple`), 2 processes × half the batch must end with the same
weights (float tolerance: DDP averages two half-batch gradients where one process sums
one batch's).
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_predictions import assert_same_prediction_csv
from helpers_train import load_pt, make_image_folder, tiny_recipe, write_recipe
from imgclf.data.importer import import_dataset
from imgclf.data.loader import BatchLoader, augment_generator, epoch_generator
from imgclf.errors import RecipeError
from imgclf.runtime import distributed
from imgclf.runtime.distributed import Dist
from imgclf.train.api import _after_restart, train
from imgclf.train.rundir import LAUNCH_MARKER

# Weights of 2 processes vs 1: the same arithmetic up to the order of a sum (measured
# 3e-8 after 2 epochs here); 1e-5 leaves room, a wrong batch would be off by 1e-2.
ATOL = 1e-5
NO_AUGMENT = {"augment": {"crop_padding": 0, "flip": False}, "label_smoothing": 0.0}
TIMEOUT = 240  # seconds for one torchrun job on a busy 2-core machine


def torchrun(*args: str, restarts: int = 0) -> list[str]:
    """``torchrun --nproc-per-node 2 ... -m imgclf ARGS``, on the loopback at a free port
    (the c10d rendezvous with port 0, as --standalone does, spelled with 127.0.0.1)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        f"--rdzv-id={uuid.uuid4().hex}",
        f"--max-restarts={restarts}",
        "-m",
        "imgclf",
        *args,
    ]


def job_env() -> dict[str, str]:
    # Gloo on the loopback interface only; one thread a process on 2 cores.
    return {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_job(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    # One retry: in about 1 full-suite run in 4 a 2-process job here failed where it passed
    # alone, cause not found yet (a loopback rendezvous right after the previous job's is
    # the suspect). A real failure fails twice; the first one is reported as a warning.
    for attempt in range(2):
        done = subprocess.run(
            command, capture_output=True, text=True, env=job_env(), cwd=cwd, timeout=TIMEOUT
        )
        if done.returncode == 0 or attempt == 1:
            break
        warnings.warn(
            f"2-process job failed once, retrying: {worker_errors(done.stderr)}", stacklevel=2
        )
        # Start clean: the failed attempt may have left a run folder behind.
        if "--out" in command:
            shutil.rmtree(command[command.index("--out") + 1], ignore_errors=True)
        elif cwd is not None:
            shutil.rmtree(cwd / "runs", ignore_errors=True)
    assert done.returncode == 0, worker_errors(done.stderr)
    return done


def metric_values(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    skip = ("seconds", "images_per_second")
    return [{k: float(v or "nan") for k, v in row.items() if k not in skip} for row in rows]


def assert_close_runs(a: Path, b: Path, atol: float = ATOL) -> None:
    sa, sb = load_pt(a / "last.pt")["model_state"], load_pt(b / "last.pt")["model_state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=0, msg=key)
    ra, rb = metric_values(a), metric_values(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], abs=1e-4, nan_ok=True), key


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The data set, a recipe without augmentation, and its single-process reference."""
    root = tmp_path_factory.mktemp("ddp")
    ds = import_dataset(make_image_folder(root / "src"), "tiny", dest=root / "tiny", warn=print)
    recipe = write_recipe(root / "noaug.yaml", tiny_recipe(epochs=2, **NO_AUGMENT))
    reference = train(recipe, ds.root, out=root / "one", threads=1, progress=False)
    return root, ds, recipe, reference


# ---------------------------------------------------------------- loader (unit)


def _indexed(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 4, 4, 3).contiguous()


@pytest.mark.parametrize("n, world", [(61, 2), (40, 4), (9, 3)])
def test_each_step_of_the_ranks_is_the_single_process_batch(n, world):
    """Step i of all ranks together sees exactly step i of one process with the global
    batch (so the same recipe trains the same on 1 or N); every rank takes the same
    number of steps (DDP needs it) and no sample is seen twice in an epoch."""
    per_rank, labels = 2, np.arange(n)

    def loader(rank: int, ws: int, batch: int) -> BatchLoader:
        return BatchLoader(
            _indexed(n), labels, batch_size=batch, shuffle=True, seed=3, drop_last=True,
            rank=rank, world_size=ws,
        )  # fmt: skip

    single = loader(0, 1, per_rank * world)
    single.set_epoch(4)
    shards = []
    for rank in range(world):
        part = loader(rank, world, per_rank)
        part.set_epoch(4)
        assert len(part) == len(single) == n // (per_rank * world)
        shards.append([y.tolist() for _, y in part])
    for step, (_, y) in enumerate(single):
        together = sorted(i for rank in range(world) for i in shards[rank][step])
        assert together == sorted(y.tolist())
    seen = [i for s in shards for batch in s for i in batch]
    assert len(seen) == len(set(seen))


def test_each_rank_draws_its_own_augmentation_stream():
    """Rank 0 keeps the single-process stream (a 1-process run is unchanged); other ranks
    get their own, a function of (seed, epoch, rank) only."""

    def draws(seed: int, epoch: int, rank: int) -> list[int]:
        return torch.randint(0, 1000, (8,), generator=augment_generator(seed, epoch, rank)).tolist()

    single = torch.randint(0, 1000, (8,), generator=epoch_generator(1, 5)).tolist()
    assert draws(0, 5, 0) == single
    streams = {rank: draws(0, 5, rank) for rank in range(4)}
    assert len({tuple(s) for s in streams.values()}) == 4
    assert draws(0, 5, 2) == streams[2]  # reproducible
    assert draws(0, 6, 2) != streams[2] and draws(1, 5, 2) != streams[2]


# ---------------------------------------------------------------- rules (unit)


def test_batch_must_divide_among_processes(tiny, monkeypatch):
    _, ds, recipe, _ = tiny
    monkeypatch.setenv("WORLD_SIZE", "3")  # a 3-process job: 8 images a step do not split
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RecipeError, match=r"batch_size 8 does not divide among 3 processes"):
        train(recipe, ds.root, progress=False)  # refused before any process group


def test_sync_bn_needs_gpus_and_is_nothing_in_one_process():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert distributed.SINGLE.sync_batchnorm(model) is model
    with pytest.raises(RecipeError, match="sync_bn: true needs CUDA"):
        Dist(rank=0, world_size=2).check_sync_bn(True)


def test_torchrun_command_is_the_same_command_without_the_flag():
    argv = ["train", "fast", "--nproc-per-node", "2", "--data", "d", "--nproc=2", "--quiet"]
    command = distributed.torchrun_command(argv, 2)
    assert command[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    rest = ["-m", "imgclf", "train", "fast", "--data", "d", "--quiet"]
    assert command[4:] == ["--nproc-per-node=2", *rest]


def test_restarted_job_resumes_its_own_run_only(tmp_path, monkeypatch, capsys):
    env = Dist(rank=0, world_size=2)
    out = tmp_path / "run"
    out.mkdir()
    assert _after_restart(out, False, env) is None  # first attempt: as the command says
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    (out / "config.yaml").write_text("a run of someone else\n")
    assert _after_restart(out, False, env) is None  # not ours: the usual checks refuse it
    (out / LAUNCH_MARKER).write_text(distributed.launch_id() + "\n")
    assert _after_restart(out, False, env) == (None, True)  # ours, never checkpointed
    (out / "last.pt").write_bytes(b"")
    assert _after_restart(out, False, env) == (out, False)  # ours: resume it
    assert _after_restart(None, False, env) is None
    assert "give --out to resume" in capsys.readouterr().err


def test_a_restart_with_this_node_s_count_at_0_is_known_by_the_launch_marker(tmp_path, capsys):
    """With several nodes, an agent whose own worker did not fail restarts it with
    TORCHELASTIC_RESTART_COUNT still 0: the run folder's marker, naming every node's
    agent, says the folder is this job's, and the process resumes like the others."""
    env = Dist(rank=0, world_size=2)
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"")
    (out / LAUNCH_MARKER).write_text(f"other-host:1:job\n{distributed.launch_id()}\n")
    assert distributed.restart_count() == 0
    assert _after_restart(out, False, env) == (out, False)
    assert "torchrun restart (another node's): resuming from" in capsys.readouterr().err
    (out / LAUNCH_MARKER).write_text("other-host:1:job\n")  # another job's folder
    assert _after_restart(out, False, env) is None


def test_each_attempt_s_processes_share_a_prefix_no_dead_one_had():
    """attempt_prefix on one store by rank 0 and rank 1 (threads), after a dead attempt
    left its hello token and Gloo keys behind: both get the same fresh prefix."""
    import threading

    store = torch.distributed.HashStore()
    store.set("imgclf/hello/1", "dead-token")  # a killed attempt's rank 1
    got: dict[int, str] = {}

    def join(rank: int) -> None:
        got[rank] = distributed.attempt_prefix(store, rank, 2)

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got[0] == got[1] and got[0].startswith("imgclf/attempt/")
    assert store.get("imgclf/go/dead-token").decode() == got[0]  # answered, and unused
    assert distributed.attempt_prefix(store, 0, 1) != got[0]  # every attempt its own


# ---------------------------------------------------------------- torchrun jobs


def test_two_processes_train_like_one(tiny, tmp_path):
    """`imgclf train --nproc-per-node 2` (the shorthand for torchrun) trains in one run
    folder, written by rank 0 alone, to the single-process weights and metrics."""
    _, ds, recipe, reference = tiny
    done = run_job(
        [sys.executable, "-m", "imgclf", "train", str(recipe), "--data", str(ds.root),
         "--nproc-per-node", "2", "--quiet"],
        cwd=tmp_path,
    )  # fmt: skip
    runs = list((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["tiny-1"]
    run = runs[0]
    summary = load_json(run / "summary.json")
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert summary["images_seen"] == load_json(reference.path / "summary.json")["images_seen"]
    assert_close_runs(run, reference.path)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [p.name for p in reference.path.iterdir()] + [LAUNCH_MARKER]
    )
    assert done.stdout.count("val accuracy") == 1  # rank 0 alone reports


def load_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def test_stages_and_feature_cache_under_two_processes(tiny, tmp_path):
    """A head stage on cached features (each rank computes its shard of them), then the
    whole net: each stage wrapped anew, the same weights as one process."""
    _, ds, _, _ = tiny
    recipe = write_recipe(
        tmp_path / "staged.yaml",
        tiny_recipe(stages=[{"epochs": 2, "train": ["head"]}, {"epochs": 1, "train": "all"}],
                    **NO_AUGMENT),
    )  # fmt: skip
    one = train(recipe, ds.root, out=tmp_path / "one", threads=1, progress=False)
    done = run_job(torchrun("train", str(recipe), "--data", str(ds.root), "--out",
                            str(tmp_path / "two")))  # fmt: skip
    assert "feature cache: 1 view(s)" in done.stderr  # built: 1 view, 2 epochs
    assert_close_runs(tmp_path / "two", one.path)


@pytest.mark.slow  # one more 2-process job; the EMA's arithmetic is tested in one process
def test_weight_ema_of_two_processes_is_rank_0s_single_process_average(tiny, tmp_path):
    """With a weight EMA, rank 0 alone keeps the average (imgclf.train.ema): it validates
    it, and saves it as last.pt's ema_state and as best.pt, the single process's average
    to float tolerance."""
    _, ds, _, _ = tiny
    ema = {"decay": 0.9, "warmup": True}
    recipe = write_recipe(tmp_path / "ema.yaml", tiny_recipe(epochs=2, ema=ema, **NO_AUGMENT))
    one = train(recipe, ds.root, out=tmp_path / "one", threads=1, progress=False)
    two = tmp_path / "two"
    done = run_job(torchrun("train", str(recipe), "--data", str(ds.root), "--out", str(two)))
    assert_close_runs(two, one.path)  # the trained weights, and the average's val metrics
    assert done.stderr.count("val (ema) loss") == 2  # rank 0's two epoch lines
    last, reference = load_pt(two / "last.pt"), load_pt(one.last)
    assert last["ema_state"]["updates"] == reference["ema_state"]["updates"] == 2 * 6
    pairs = [(last["ema_state"]["weights"], reference["ema_state"]["weights"])]
    pairs.append((load_pt(two / "best.pt")["model_state"], load_pt(one.best)["model_state"]))
    for got, want in pairs:
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0, msg=key)
    summary = load_json(two / "summary.json")
    assert summary["ema"] == {**ema, "stages": [1], "best_pt": "ema"}
    assert summary["ema"] == one.summary["ema"]


def test_sharded_predict_writes_the_single_process_csv(tiny, tmp_path):
    """Two processes share the files; rank 0 writes one CSV with the answer a single
    process writes (same rows, same natural order, probabilities within PROB_ATOL: the
    ranks batch other files together), and says how many shared."""
    from imgclf.predict import predict

    _, _, _, reference = tiny
    folder = make_image_folder(tmp_path / "in", per_class=7, seed=5)  # 21 files: 11 + 10
    (folder / "a" / "broken.png").write_bytes(b"not a png")  # a failed row keeps its place
    one = predict([reference.path], folder, tmp_path / "one.csv")
    done = run_job(
        torchrun("predict", str(reference.path), "--input", str(folder), "--out",
                 str(tmp_path / "two.csv"), "--batch-size", "4")
    )  # fmt: skip
    two, one_csv = (tmp_path / "two.csv").read_text(), (tmp_path / "one.csv").read_text()
    assert_same_prediction_csv(two, one_csv)
    assert one.rows == 22 and one.failures == 1
    assert done.stdout.count("wrote 22 rows") == 1 and "shared by 2 processes" in done.stdout
    assert "1 file could not be read" in done.stdout


# ---------------------------------------------------------------- faults (slow)

EPOCHS = 4


@pytest.fixture(scope="module")
def long_epochs(tmp_path_factory):
    """Epochs long enough (60 global steps of 4 images) for a signal to land inside one,
    and the single-process reference they must end at."""
    root = tmp_path_factory.mktemp("ddp-long")
    folder = make_image_folder(root / "src", per_class=80)
    ds = import_dataset(folder, "long", dest=root / "long", warn=print)
    recipe = write_recipe(
        root / "long.yaml", tiny_recipe(epochs=EPOCHS, batch_size=4, **NO_AUGMENT)
    )
    reference = train(recipe, ds.root, out=root / "reference", threads=1, progress=False)
    return ds, recipe, reference


def start_job(command: list[str]) -> subprocess.Popen:
    def default_sigint() -> None:  # a child of a background shell would inherit SIG_IGN
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=job_env(),
        preexec_fn=default_sigint,
    )


def wait_for_checkpoint(run: Path, job: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    """Until the first epoch's last.pt is there (its metrics row is written just before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "last.pt").is_file():
            return
        if job.poll() is not None:
            pytest.fail(f"job ended early: {worker_errors(job.communicate()[1])}")
        time.sleep(0.05)
    job.kill()
    pytest.fail("no epoch finished in time")


def worker_errors(stderr: str) -> str:
    """The workers' own lines of a torchrun job's stderr (not the agent's W/E log lines)."""
    return "\n".join(line for line in stderr.splitlines() if line[:1] not in ("W", "E", "I"))[
        -4000:
    ]


@pytest.mark.slow
def test_ctrl_c_then_resume_of_two_processes(long_epochs, tmp_path):
    """Ctrl-C (torchrun passes SIGINT on to its workers) checkpoints mid-epoch on rank 0;
    `--resume` with two processes ends where one uninterrupted process does."""
    ds, recipe, reference = long_epochs
    out = tmp_path / "run"
    job = start_job(torchrun("train", str(recipe), "--data", str(ds.root), "--out", str(out)))
    wait_for_checkpoint(out, job)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=TIMEOUT)
    assert job.returncode != 0
    assert "interrupted (checkpoint saved)" in err, worker_errors(err)
    assert err.count("continue with `imgclf train --resume") == 1  # rank 0 alone says it
    run_job(torchrun("train", "--resume", str(out), "--quiet"))
    assert_close_runs(out, reference.path)


@pytest.mark.slow
def test_killed_worker_is_restarted_and_the_run_ends_as_planned(long_epochs, tmp_path):
    """`--max-restarts 1`: rank 0 killed with SIGKILL mid-run; torchrun restarts both
    processes, which resume from the run's last.pt (found through --out) and end with
    the epochs and weights of an uninterrupted run."""
    ds, recipe, reference = long_epochs
    out = tmp_path / "run"
    job = start_job(
        torchrun("train", str(recipe), "--data", str(ds.root), "--out", str(out), restarts=1)
    )
    wait_for_checkpoint(out, job)
    rank0 = int((out / ".imgclf-train.lock").read_text())  # the lock names its holder
    os.kill(rank0, signal.SIGKILL)
    _, err = job.communicate(timeout=TIMEOUT)
    assert job.returncode == 0, worker_errors(err)
    assert "torchrun restart 1: resuming from" in err, worker_errors(err)
    assert [int(r["epoch"]) for r in metric_values(out)] == list(range(1, EPOCHS + 1))
    assert load_json(out / "summary.json")["epochs"] == EPOCHS
    assert_close_runs(out, reference.path)


@pytest.mark.slow
def test_budgeted_run_of_two_processes_replans_within_epochs_in_step(tmp_path):
    """`--time`: rank 0 alone decides each re-plan (its clock) and broadcasts the steps,
    so both ranks stop at the same step; a rank left with a different plan would hang in
    its next all-reduce until the timeout. Epochs of 1,350 steps of 1–8 ms against a
    re-plan every 5% of a 10-s budget (20–625 steps): re-plans fall within epochs."""
    from imgclf.train.budget import Plan

    folder = make_image_folder(tmp_path / "src", per_class=2000)
    ds = import_dataset(folder, "budget", dest=tmp_path / "budget", warn=print)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(epochs=4, batch_size=4, **NO_AUGMENT))
    out = tmp_path / "run"
    done = run_job(torchrun("train", str(recipe), "--data", str(ds.root), "--out", str(out),
                            "--time", "10s"))  # fmt: skip
    summary = load_json(out / "summary.json")
    assert summary["world_size"] == 2 and summary["budget_seconds"] == 10.0
    assert (done.stdout + done.stderr).count("budget bought") == 1  # rank 0 alone reports
    steps_per_epoch = len(ds.indices("train")) // 4  # 4 images a step
    every = Plan.from_dict(load_pt(out / "last.pt")["plan"]).replan_every(0)
    assert every < steps_per_epoch - every // 2, f"no re-plan within an epoch: every {every}"
    # Past the first re-plan, counted in re-plan windows rather than in epochs: the steps
    # a 10-s budget buys depend on the CPU and on what else runs (half an epoch, the bound
    # this had, was missed in 2 of 3 runs on an AVX512-BF16 Xeon at 54ef7d9; two windows,
    # the next bound, in a clean-clone run on a 2-core AVX2 EPYC: 202 steps against 2 ×
    # 142, start-up and evaluation taking most of the 10 s there).
    assert summary["images_seen"] // 4 >= every
    assert summary["wall_seconds"] <= 10.0 * 1.5


@pytest.mark.parametrize("world_size", ["2", "1"])
def test_a_torchrun_worker_ends_without_the_interpreter_shutdown(world_size):
    """`imgclf` under torchrun ends with os._exit once its output is flushed: Gloo's worker
    threads, kept alive by a DDP model past destroy_process_group, abort the process when
    one frees a tensor during the interpreter's shutdown. A single process exits as usual.
    A real process with stdout on a pipe (block-buffered): output lost without the flush,
    an atexit handler that runs only when the interpreter shuts down."""
    script = (
        "import atexit, imgclf.cli as cli\n"
        "atexit.register(print, 'interpreter shutdown')\n"
        "cli.main = lambda: print('trained') or 3\n"
        "cli.entry()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["WORLD_SIZE"] = world_size
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 3, done.stderr
    shutdown = "" if world_size == "2" else "interpreter shutdown\n"
    assert done.stdout == "trained\n" + shutdown


def test_two_processes_stop_together_on_nan_and_keep_the_finite_checkpoint(tiny, tmp_path):
    """Issue #31, item 6, data-parallel: stage 2's one step at a learning rate of 1e30
    leaves weights that score NaN on rank 0's validation (before: exit 0, those weights in
    last.pt); every rank stops, none is left waiting in a collective, and last.pt stays
    stage 1's finite weights."""
    _, ds, _, _ = tiny
    stages = [{"epochs": 1}, {"epochs": 1, "lr": 1e30}]
    two = tiny_recipe(stages=stages, batch_size=64, **NO_AUGMENT)
    two["scheduler"] = {"name": "constant"}
    recipe = write_recipe(tmp_path / "two.yaml", two)
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "imgclf", "train", str(recipe), "--data", str(ds.root),
         "--nproc-per-node", "2", "--out", str(out), "--quiet"],
        capture_output=True, text=True, env=job_env(), timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    expected = "error: validation loss became nan after stage 2, epoch 2; lower the learning rate"
    assert errors and all(line.startswith(expected) for line in errors), errors
    assert all(f"(last good checkpoint: {out / 'last.pt'})" in line for line in errors)
    state = load_pt(out / "last.pt")
    assert state["position"] == {"stage": 0, "epoch": 1, "batch": 0}
    assert all(torch.isfinite(t).all() for t in state["model_state"].values())


# ---------------------------------------------------------------- two nodes (slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args: str, restarts: int = 0) -> list[list[str]]:
    """The README's multi-node command as two machines would run it, one process each:
    two torchrun agents meeting at a c10d rendezvous on 127.0.0.1. Node 0 hosts the
    rendezvous store (``is_host``; both would match 127.0.0.1 and race for it), and
    ``join_timeout`` bounds the wait for the other node (torchrun's default is 600 s).
    ``--node-rank`` is what a user types; c10d hands out the ranks itself and says so."""
    port, job = free_port(), uuid.uuid4().hex
    return [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
         "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
         f"--rdzv-id={job}", f"--rdzv-conf=is_host={int(node == 0)},join_timeout={TIMEOUT}",
         "--local-addr=127.0.0.1", f"--max-restarts={restarts}", "-m", "imgclf", *args]
        for node in (0, 1)
    ]  # fmt: skip


def workers_of(agent: int) -> set[int]:
    """The imgclf processes a torchrun agent started (its children, from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == agent and b"imgclf" in cmdline:
            found.add(int(entry.name))
    return found


class Nodes:
    """Two nodes' torchrun agents, started together and watched: every worker each agent
    ran (so a restart shows as a second one), and on any failure everything stopped.
    Their output goes to files: nothing reads a pipe while they run, and a full one would
    block them."""

    def __init__(self, commands: list[list[str]], logs: Path) -> None:
        self.logs = [logs / f"node{i}.log" for i in range(len(commands))]
        self.jobs = []
        for command, log in zip(commands, self.logs, strict=True):
            with open(log, "w") as f:
                self.jobs.append(
                    subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=job_env())
                )
        self.workers: dict[int, set[int]] = {job.pid: set() for job in self.jobs}

    def watch(self, until, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not until():
            for job in self.jobs:
                self.workers[job.pid] |= workers_of(job.pid)
            if time.monotonic() > deadline:
                output = "".join(log.read_text() for log in self.logs)
                pytest.fail(f"two nodes: no {what} in {TIMEOUT} s: {worker_errors(output)}")
            time.sleep(0.1)

    def ended(self) -> bool:
        return all(job.poll() is not None for job in self.jobs)

    def finish(self) -> str:
        """Both agents' output (their workers' included), once both ended with 0."""
        self.watch(self.ended, "end")
        output = "".join(log.read_text() for log in self.logs)
        assert [job.returncode for job in self.jobs] == [0, 0], worker_errors(output)
        return output

    def stop(self) -> None:
        """SIGTERM (an agent stops its workers), then SIGKILL for all; workers are in their
        own sessions (torchrun starts them so), so each is killed by pid."""
        for job in self.jobs:
            if job.poll() is None:
                job.terminate()
        for job in self.jobs:
            try:
                job.wait(timeout=30)
            except subprocess.TimeoutExpired:
                for pid in workers_of(job.pid):
                    os.kill(pid, signal.SIGKILL)
                job.kill()
                job.wait()


@contextlib.contextmanager
def nodes(commands: list[list[str]], logs: Path) -> Iterator[Nodes]:
    started = Nodes(commands, logs)
    try:
        yield started
    finally:
        started.stop()


@pytest.mark.slow  # two jobs of ~15-40 s each on 2 busy cores
def test_two_nodes_train_like_one_node_of_two_processes(tiny, tmp_path):
    """Two torchrun agents of one process each, meeting at a c10d rendezvous as two
    machines would, end with exactly the weights and metrics of one agent with two
    processes (the same global batch; augmentation on, drawn per rank)."""
    _, ds, _, _ = tiny
    recipe = write_recipe(tmp_path / "augment.yaml", tiny_recipe(epochs=2))
    args = ("train", str(recipe), "--data", str(ds.root), "--quiet")
    one, two = tmp_path / "one-node", tmp_path / "two-nodes"
    run_job(torchrun(*args, "--out", str(one)))
    with nodes(two_nodes(*args, "--out", str(two)), tmp_path) as job:
        err = job.finish()
    assert "node_rank is only used for static rdzv_backend" in err  # c10d ranks the nodes
    assert load_json(two / "summary.json")["world_size"] == 2
    assert_close_runs(two, one, atol=0.0)
    assert metric_values(two) == metric_values(one)


@pytest.mark.slow
def test_a_killed_worker_restarts_both_nodes_which_resume(long_epochs, tmp_path):
    """`--max-restarts 1` on both nodes: the worker of the node that does not hold rank 0
    is SIGKILLed mid-run. Its agent restarts it (a failure: its restart count becomes 1);
    the other agent sees the new rendezvous round and restarts its healthy worker with
    its count still 0. Each agent runs exactly two workers, every process resumes from
    last.pt, and the run ends with the epochs and weights of an uninterrupted run."""
    ds, recipe, reference = long_epochs
    out = tmp_path / "run"
    args = ("train", str(recipe), "--data", str(ds.root), "--out", str(out))
    with nodes(two_nodes(*args, restarts=1), tmp_path) as job:
        job.watch(lambda: (out / "last.pt").is_file() or job.ended(), "first checkpoint")
        assert not job.ended(), worker_errors(job.finish())
        rank0 = int((out / ".imgclf-train.lock").read_text())  # the lock names its holder
        (victim,) = set().union(*job.workers.values()) - {rank0}
        os.kill(victim, signal.SIGKILL)
        err = job.finish()
    assert [len(pids) for pids in job.workers.values()] == [2, 2], worker_errors(err)
    assert err.count("resuming from") == 1  # rank 0 says it, wherever it now runs
    assert "already holds a run" not in err
    assert [int(r["epoch"]) for r in metric_values(out)] == list(range(1, EPOCHS + 1))
    assert load_json(out / "summary.json")["epochs"] == EPOCHS
    assert_close_runs(out, reference.path)
