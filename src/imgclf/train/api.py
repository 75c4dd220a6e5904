"""``train(recipe, data)``: the public entry to training.

It reads the call's arguments (a recipe and a data set, or a run to resume or to train
more, or the run folder of a torchrun job that was restarted), joins the process group
under torchrun, claims the run folder and runs the :class:`~imgclf.train.trainer.Trainer`
in it: every stage of the recipe, ``metrics.csv`` and TensorBoard each epoch,
``last.pt``/``best.pt``, and finally the best weights evaluated on the validation split.

One process trains in a run folder at a time (:func:`~imgclf.train.rundir.claim_run_dir`).
Under torchrun (``torchrun --nproc-per-node N -m imgclf train ...``) it trains
data-parallel (:mod:`imgclf.train.trainer`); the returned summary is rank 0's, other ranks
get an empty one. After torchrun restarts a failed job (``--max-restarts``), ``out`` is
what lets the restarted processes find the run and resume it from its ``last.pt``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.data.cache import Dataset, load_dataset
from imgclf.errors import CheckpointError, RecipeError
from imgclf.runtime import distributed
from imgclf.runtime.checkpoint import check_same_dataset, load_resumable
from imgclf.runtime.device import resolve_device
from imgclf.runtime.distributed import Dist
from imgclf.train import init_from, more
from imgclf.train.budget import parse_duration
from imgclf.train.callbacks import Callback
from imgclf.train.choose import choose_recipe
from imgclf.train.final import FinalFit, read_source, refuse_selection
from imgclf.train.recipe import Recipe, load_recipe, validate
from imgclf.train.rundir import (
    check_run_dir,
    claim_run_dir,
    disk_full_is_an_error,
    launched_here,
    new_run_dir,
)
from imgclf.train.state import Run
from imgclf.train.trainer import Trainer


def train(
    recipe: str | Path | Recipe | dict | None = None,
    data: str | Path | Dataset | None = None,
    *,
    out: str | Path | None = None,
    epochs: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    resume: str | Path | None = None,
    time_budget: str | float | None = None,
    device: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    runs_dir: str | Path = "runs",
    exist_ok: bool = False,
    new_data: bool = False,
    init: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    final: bool | str | Path = False,
) -> Run:
    """Train a recipe on a dataset (``imgclf train``).

    Args:
        recipe: a bundled recipe's name (``imgclf recipes``), a YAML path, a ``Recipe`` or
            a dict; None: one chosen from the data. ``data``: a cached dataset's name or
            folder, or a ``Dataset`` (:func:`imgclf.import_dataset`).
        out: the run folder (default: ``runs_dir/<recipe>-<n>``); one holding a run only
            with ``exist_ok`` (replaced). ``epochs``: the total, shared among the stages.
        overrides: ``"key.path=value"`` changes (``--set``). ``resume``: a run folder to
            continue from its ``last.pt`` (on its data set unless ``new_data``).
        time_budget: ``"10m"``, ``"1h30m"`` or seconds: stages scaled to fit, evaluation
            included. ``device``, ``threads``, ``progress``: as ``imgclf train``'s options.
        init: a run or checkpoint to start from (classes matched by name:
            :mod:`imgclf.train.init_from`); ``resume`` and ``epochs`` on a finished run:
            that many epochs more (:mod:`imgclf.train.more`).
        callbacks: :class:`~imgclf.train.callbacks.Callback` instances, whose hooks the
            trainer calls as it writes metrics.csv and TensorBoard.
        final: True: a final fit (:mod:`imgclf.train.final`), on train + val, no validation;
            a run folder: that, and the validation run that chose its settings (--from).

    Returns:
        The :class:`Run`: its ``path`` (``best.pt``, ``metrics.csv``…) and ``summary``.

    Example::

        clf = imgclf.load(imgclf.train("fast", data="c10", time_budget="10m"))
        more = imgclf.train(resume="runs/fast-1", epochs=5)
    """
    started = time.perf_counter()
    env = distributed.from_env()
    given = (recipe, data, out, epochs, tuple(overrides), resume, time_budget, exist_ok)
    args = _Args(*given, new_data, init, final)
    job = _resolve(args, env)
    device, threads = _per_process(job.recipe, env, device, threads)
    dist = distributed.init(resolve_device(device))
    try:
        options = {"device": device, "threads": threads, "progress": progress}
        trainer = _trainer(job, dist, started, callbacks=callbacks, **options)
        return _train_in_folder(trainer, job, Path(runs_dir))
    finally:
        dist.shutdown()


@dataclass
class _Args:
    """What train() was asked to train; a torchrun restart changes some of it."""

    recipe: Any
    data: Any
    out: str | Path | None
    epochs: int | None
    overrides: tuple[str, ...]
    resume: str | Path | None
    time_budget: str | float | None
    exist_ok: bool
    new_data: bool
    init: str | Path | None = None
    final: bool | str | Path = False  # True, or the validation run that chose it (--from)


@dataclass
class _Job:
    """What train()'s arguments resolve to."""

    recipe: Recipe
    ds: Dataset
    out: Path | None  # None: numbered once the trainer is built
    state: dict | None  # the checkpoint resumed from
    budget: float | None  # seconds
    exist_ok: bool
    more: more.More | None = None  # epochs added to a finished run
    init: dict | None = None  # the checkpoint a fresh run starts from (--init)
    final: FinalFit | None = None  # a final fit (--final), from a checkpoint on resume


def _resolve(args: _Args, env: Dist) -> _Job:
    """The recipe, data set, run folder, checkpoint and budget that ``args`` ask for,
    each checked (in this order) against what it cannot go with."""
    if env.enabled and args.resume is None:
        _follow_restart(args, env)
    budget = _budget_seconds(args)
    if args.resume is not None:
        rec, state, out_dir, added = _resumed(args)
        job = _Job(rec, _dataset(args, state), out_dir, state, budget, args.exist_ok, added)
        job.final = _final_resumed(args, state)
        return job
    rec, out_dir = _fresh(args, env)
    source = init_from.load_source(rec) if rec.init is not None else None
    ds = _dataset(args, None)
    job = _Job(rec, ds, out_dir, None, budget, args.exist_ok, init=source)
    job.final = _final_fresh(args, rec, ds)
    return job


def _final_fresh(args: _Args, rec: Recipe, ds: Dataset) -> FinalFit | None:
    """A fresh run's final fit (None: a normal run), its recipe checked for what would
    select by validation and its --from run read and checked (imgclf.train.final)."""
    if args.final is False:
        return None
    refuse_selection(rec)
    return FinalFit() if args.final is True else read_source(args.final, rec, ds)


def _final_resumed(args: _Args, state: dict) -> FinalFit | None:
    """A resumed run's final fit, as its checkpoint records it; --final and --from may
    only repeat what it was started with (the same command again after a kill)."""
    final = FinalFit.from_state(state)
    if args.final is not False and final is None:
        raise CheckpointError(
            f"--final: {state['path']} is not a final fit, and --resume continues a run as it "
            "was started: drop --final, or start a final fit in a new --out"
        )
    given = None if isinstance(args.final, bool) else args.final
    if given is not None and final.source != str(Path(given).expanduser().resolve()):
        raise CheckpointError(
            f"--from {given}: --resume continues {state['path']} with the validation run it "
            "was started with: drop --from"
        )
    return final


def _trainer(job: _Job, dist: Dist, started: float, **options: Any) -> Trainer:
    """The job's trainer, before any run folder is claimed: with a finished run's added
    stage (--epochs) or another run's weights (--init), and a line that says which.
    ``options``: train()'s device, threads, progress and callbacks."""
    trainer = Trainer(
        job.recipe,
        job.ds,
        job.out,
        state=job.state,
        budget_seconds=job.budget,
        started=started,
        dist=dist,
        final=job.final,
        **options,
    )
    _start(trainer, job)
    return trainer


def _start(trainer: Trainer, job: _Job) -> None:
    """What _trainer adds to a trainer that --epochs or --init asks for, and a final
    fit's line."""
    lines = []
    if job.more is not None:
        lines.append(more.extend(trainer, job.more))
    elif job.init is not None:
        lines.append(init_from.start_from(trainer.model, job.init, trainer.ds.classes))
    if job.final is not None:
        lines.append(job.final.describe(trainer.ds, trainer.train_loader.num_samples))
    # Printed even with --quiet: it says what is being trained, as the chosen recipe's line.
    if trainer.dist.is_main:
        for line in lines:
            print(line, file=sys.stderr)


def _per_process(
    rec: Recipe, env: Dist, device: str | None, threads: int | None
) -> tuple[str | None, int | None]:
    """Under torchrun, before any process group is joined (an error is then one line on
    every rank): the recipe's batch must divide among the processes, and each process
    takes its local device and its share of the threads."""
    if not env.enabled:
        return device, threads
    distributed.per_rank_batch(rec.batch_size, env)
    return distributed.local_device(device), distributed.default_threads(threads)


def _follow_restart(args: _Args, env: Dist) -> None:
    """Under a restarted torchrun job, resume its run (or start it afresh where the first
    attempt was killed before any checkpoint): see :func:`_after_restart`."""
    restarted = _after_restart(Path(args.out) if args.out else None, args.exist_ok, env)
    if restarted is not None:
        args.resume, args.exist_ok = restarted
    if args.resume is not None:  # the checkpoint holds the recipe, its length and plan
        args.overrides, args.epochs, args.time_budget, args.new_data = (), None, None, False
        args.init, args.final = None, False  # and a final fit's record


def _budget_seconds(args: _Args) -> float | None:
    """The time budget in seconds (None: none), checked against what it cannot go with."""
    if args.time_budget is None:
        return None
    if args.resume is not None:
        raise RecipeError("--time: a resumed run keeps the plan of its budget; drop --time")
    return checked_budget(args.time_budget, args.epochs)


def checked_budget(given: str | float, epochs: int | None) -> float:
    """``--time`` in seconds, refused beside ``--epochs`` or when not above zero (a run's
    and an ensemble's, imgclf.train.ensemble)."""
    if epochs is not None:
        raise RecipeError("--time and --epochs both set the length; give one of them")
    budget = parse_duration(given) if isinstance(given, str) else float(given)
    if not budget > 0:
        raise RecipeError(f"--time {given}: the budget must be more than zero")
    return budget


def _resumed(args: _Args) -> tuple[Recipe, dict, Path, more.More | None]:
    """A resume: the checkpoint, its recipe, its run folder and, with ``epochs`` on a
    finished run, the epochs to add (imgclf.train.more)."""
    if args.init is not None:
        raise CheckpointError(
            "--init starts a new run from another run's weights; --resume continues a run: drop one"
        )
    resume = Path(args.resume)
    last = resume / "last.pt" if resume.is_dir() else resume
    state = load_resumable(last)
    rec = validate(state["recipe"], str(last))
    added = _added(args, state, rec) if args.epochs or args.overrides else None
    if args.exist_ok:
        raise CheckpointError("--exist-ok starts a fresh run; --resume continues one")
    return rec, state, last.parent, added


def _added(args: _Args, state: dict, rec: Recipe) -> more.More | None:
    """What ``--epochs`` (and ``--set optimizer.lr``) add to a finished run; None where
    the run stopped inside that same continuation (the command again after a kill), which
    is then resumed as it is. Anything else changes a saved recipe: an error."""
    finished = more.is_finished(state, rec)
    if args.epochs and finished:
        return more.request(args.epochs, args.overrides)
    if args.epochs:
        with contextlib.suppress(RecipeError):
            if more.is_this_continuation(state, rec, more.request(args.epochs, args.overrides)):
                return None
    why = " (--epochs adds epochs to a finished run; this one has not finished)"
    raise CheckpointError(
        "--resume continues the saved recipe; drop --set/--epochs" + (why if args.epochs else "")
    )


def _fresh(args: _Args, env: Dist) -> tuple[Recipe, Path | None]:
    """A fresh run: its recipe (the one named, or one chosen for the data) and its run
    folder (None: numbered once the trainer is built)."""
    recipe = args.recipe
    if recipe is None:
        if args.data is None:
            raise CheckpointError("give a recipe, --data to choose one for, or --resume")
        recipe, why = choose_recipe(_load_data(args.data, None))
        # Printed even with --quiet: it says what is being trained and how to change it.
        if env.is_main:
            print(
                f"recipe: {recipe}, chosen because {why} (name a RECIPE to override)",
                file=sys.stderr,
            )
    overrides = (*args.overrides, *([init_from.as_override(args.init)] if args.init else []))
    rec = load_recipe(recipe, overrides, args.epochs)
    out_dir = Path(args.out) if args.out else None
    if args.new_data:
        raise CheckpointError("--new-data goes with --resume: a fresh run takes any --data")
    # Early, before a model is built; checked again when locked. Rank 0's alone: it
    # holds the lock, and may hold it already when another rank gets here.
    if out_dir is not None and env.is_main:
        check_run_dir(out_dir, exist_ok=args.exist_ok)
    return rec, out_dir


def _load_data(data: str | Path | Dataset | None, state: dict | None) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if data is None:
        if state is None:
            raise CheckpointError("no --data given and nothing to resume")
        data = state["dataset"]
    return load_dataset(data)


def _dataset(args: _Args, state: dict | None) -> Dataset:
    """The data set to train on: the one given, or a resumed checkpoint's, whose classes
    it must have (and, unless ``new_data``, be the same data set)."""
    ds = _load_data(args.data, state)
    if state is not None and args.data is not None and not args.new_data:
        check_same_dataset(state, ds.root)
    if state is not None and sorted(state["class_names"]) != sorted(ds.classes):
        raise CheckpointError(
            f"checkpoint classes {state['class_names']} do not match data classes {ds.classes}"
        )
    return ds


def _train_in_folder(trainer: Trainer, job: _Job, runs_dir: Path) -> Run:
    """Plan a budget, number the run folder (when none was given) and claim it, then
    train in it."""
    trainer.ensure_plan()  # a budget too short is an error before any folder is made
    dist = trainer.dist
    if trainer.out is None:  # numbered only now, so a bad recipe leaves no empty folder
        made = new_run_dir(job.recipe.name, runs_dir) if dist.is_main else None
        trainer.out = dist.broadcast(made)
    with (
        claim_run_dir(trainer.out, exist_ok=job.exist_ok, resume=job.state)
        if dist.is_main
        else contextlib.nullcontext(),
        disk_full_is_an_error(trainer.out),
    ):
        return trainer.run()


def _after_restart(out: Path | None, exist_ok: bool, env: Dist) -> tuple[Path | None, bool] | None:
    """After torchrun restarted the job's workers (``--max-restarts``): what to resume,
    as ``(resume, exist_ok)``, or None to start as the command line says. A restart is
    this node's restart count above 0, or ``out``'s launch marker naming this node's agent
    (:func:`~imgclf.train.rundir.launched_here`): with several nodes, the agents of the
    nodes that did not fail restart their workers with the count unchanged, and every
    process must resume alike.

    The run folder must be known (``--out``): with ``last.pt`` there the run resumes from
    it; without one, a folder whose launch marker names this same torchrun job is the
    first attempt's, killed before its first checkpoint, and is started afresh. A folder
    of anything else is left to the usual checks (a run there is never removed)."""
    count = distributed.restart_count()
    ours = out is not None and launched_here(out)
    if count == 0 and not ours:
        return None
    if out is None:
        if env.is_main:
            print(
                f"warning: torchrun restart {count}: without --out the restarted job cannot "
                "find its run folder and starts again in a new one; give --out to resume",
                file=sys.stderr,
            )
        return None
    if (out / "last.pt").is_file():
        if env.is_main:
            why = f"torchrun restart {count}" if count else "torchrun restart (another node's)"
            print(f"{why}: resuming from {out / 'last.pt'}", file=sys.stderr)
        return out, False
    return (None, True) if ours else None  # ours: the first attempt's folder, replaced
