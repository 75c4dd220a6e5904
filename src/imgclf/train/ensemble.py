"""An ensemble in one command: ``imgclf train fast --data D --seeds 3``, ``imgclf train
fast fast-accurate lite0-cpu --data D``, or an ensemble recipe (``imgclf train study-vote``).

The members (each recipe × each seed; member k of a recipe trains with the recipe's
``seed`` + k, so ``--seeds 1`` is the plain run) train one after another, each an ordinary
run of :func:`imgclf.train.train` in its own folder inside one ensemble folder::

    runs/fast-x3-1/ensemble.yaml            members, vote, each member's state
    runs/fast-x3-1/member-1-fast-s0/        a run folder like any other
    runs/fast-x3-1/member-2-fast-s1/ ...

Every option of the command that :func:`train` takes (``--epochs``, ``--set``, and any
added later) reaches each member unchanged: they are handed on as ``**options`` and
stored in ensemble.yaml, so that ``imgclf train --resume FOLDER`` trains the members not
started yet as the first command would have. A resume keeps each finished member as it
is, resumes the one that was training from its ``last.pt`` (exactly, as a single run's
resume) and trains the rest. ``--time`` is shared: each member may use the budget still
left divided by the members still to train, so one that ends early leaves its time to
the next. Under torchrun (``--nproc-per-node N``) each member trains data-parallel on all
processes in turn (the simpler of the two, and a member's run is then the same as a
single data-parallel run's); rank 0 writes ensemble.yaml.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imgclf.data.cache import Dataset, load_dataset, resolve_dataset_dir
from imgclf.errors import RecipeError, UserError
from imgclf.runtime import distributed
from imgclf.runtime.ensemble_file import (
    EnsembleSpec,
    Member,
    is_ensemble_dir,
    missing_member,
    read_ensemble,
    write_ensemble,
)
from imgclf.runtime.schema import read_summary
from imgclf.train.api import checked_budget, train
from imgclf.train.budget import describe_duration
from imgclf.train.choose import choose_recipe
from imgclf.train.ensemble_recipe import is_ensemble_recipe, load_ensemble_recipe
from imgclf.train.recipe import load_recipe
from imgclf.train.rundir import check_run_dir, claim_run_dir, new_run_dir
from imgclf.train.state import Run

MAX_SEEDS = 100  # members per recipe: past this a count is a typo, not an ensemble
# train()'s options that say how this process trains, not what: never stored, and the
# only ones a resume may give.
PER_PROCESS = ("device", "threads", "progress", "callbacks", "new_data")
# train()'s options the ensemble decides for each member itself.
OWN = ("recipe", "data", "out", "resume", "time_budget", "exist_ok", "runs_dir")


@dataclass
class Ensemble:
    """A trained ensemble: its folder, its ensemble.yaml and each member's run."""

    path: Path
    spec: EnsembleSpec
    runs: list[Run]


def wants_ensemble(recipes: Sequence[Any], seeds: int | None, resume: Any) -> bool:
    """Whether ``imgclf train`` was asked for an ensemble: several recipes, ``--seeds``,
    an ensemble recipe, or ``--resume`` of an ensemble folder."""
    if resume is not None:
        return is_ensemble_dir(resume)
    return len(recipes) > 1 or seeds is not None or any(is_ensemble_recipe(r) for r in recipes)


def train_ensemble(
    recipes: Sequence[str | Path] = (),
    data: str | Path | Dataset | None = None,
    *,
    seeds: int | None = None,
    vote: str | None = None,
    prefer: Sequence[str] | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    time_budget: str | float | None = None,
    exist_ok: bool = False,
    runs_dir: str | Path = "runs",
    **options: Any,
) -> Ensemble:
    """Train every member of an ensemble into one folder (``imgclf train A B --data D``,
    ``--seeds N``), or finish one (``resume``: its folder). See the module's description.

    ``recipes``: recipe names or YAML paths, ensemble recipes among them; none: one chosen
    for the data. ``seeds``: members per recipe (default 1). ``vote``: ``soft`` (default),
    ``hard`` or ``weighted``; ``prefer``: hard-vote tie-break order, by member folder or
    recipe name. ``options``: anything else :func:`imgclf.train.train` takes, given to
    every member as it is. Returns the :class:`Ensemble`.
    """
    _check_options(options)
    if resume is not None:
        _check_resume(recipes, seeds, vote, prefer, out, time_budget, exist_ok, options)
        return _resume(Path(resume), data, options)
    if options.get("new_data"):
        raise UserError("--new-data goes with --resume: a fresh ensemble takes any --data")
    budget = _budget(time_budget, options)
    spec = _plan(recipes, data, seeds, vote, prefer, options, budget)
    folder = _folder(spec.name, out, Path(runs_dir), exist_ok, distributed.from_env())
    _say(_plan_line(folder, spec))
    return _train_in(folder, spec, None, options, spent=0.0, fresh=True)


def _check_options(options: dict[str, Any]) -> None:
    """``options`` must be train()'s own (a typo is an error here, not in member 2)."""
    known = set(inspect.signature(train).parameters) - set(OWN)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"train_ensemble() got an unexpected option {unknown[0]!r}")


def _check_resume(recipes, seeds, vote, prefer, out, time_budget, exist_ok, options) -> None:
    """A resume continues the saved ensemble: what would change it is refused."""
    if seeds is not None:
        raise UserError("--seeds: a resumed ensemble keeps its members; drop --seeds")
    if time_budget is not None:
        raise RecipeError("--time: a resumed ensemble keeps the plan of its budget; drop --time")
    if exist_ok:
        raise UserError("--exist-ok starts a fresh ensemble; --resume continues one")
    defaults = inspect.signature(train).parameters
    given = [k for k, v in options.items() if k not in PER_PROCESS and v != defaults[k].default]
    named = {"RECIPE": recipes, "--vote": vote, "--prefer": prefer, "--out": out}
    changed = [name for name, v in named.items() if v]
    changed += [f"--{k.replace('_', '-')}" for k in given]
    if changed:
        raise UserError(
            f"--resume continues the saved ensemble (its ensemble.yaml); drop {', '.join(changed)}"
        )


def _budget(time_budget: str | float | None, options: dict[str, Any]) -> float | None:
    if time_budget is None:
        return None
    return checked_budget(time_budget, options.get("epochs"))


# ---------------------------------------------------------------------------- the plan


def _plan(recipes, data, seeds, vote, prefer, options, budget) -> EnsembleSpec:
    """ensemble.yaml's contents for a fresh ensemble, every member's recipe loaded (an
    unknown recipe or a bad ``--set`` is an error now, before any folder is made)."""
    if seeds is not None and not 1 <= seeds <= MAX_SEEDS:
        raise UserError(
            f"--seeds {seeds}: give the number of members per recipe, 1 to {MAX_SEEDS} "
            "(e.g. --seeds 3)"
        )
    if data is None:
        raise UserError("give --data DATASET: the data set every member trains on")
    data_dir = str(data.root if isinstance(data, Dataset) else resolve_dataset_dir(data))
    entries, own_vote, own_prefer = _entries(list(recipes), data_dir)
    vote = vote or own_vote or "soft"
    members: list[Member] = []
    overrides = tuple(options.get("overrides") or ())
    for recipe, changes in entries:
        for k in range(seeds or 1):
            rec = load_recipe(recipe, (*changes, *overrides), options.get("epochs"))
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", rec.name).lstrip(".") or "run"
            path = f"member-{len(members) + 1}-{safe}-s{rec.seed + k}"
            members.append(Member(path=path, recipe=recipe, set=changes, seed=rec.seed + k))
    if vote != "hard" and prefer:
        raise UserError(f"--prefer breaks hard-vote ties; add --vote hard (not {vote})")
    chosen = _prefer(members, prefer or (own_prefer if vote == "hard" else []))
    name = _name(recipes, entries, seeds)
    stored = {k: _plain(v) for k, v in options.items() if k not in PER_PROCESS}
    return EnsembleSpec(
        name=name,
        vote=vote,
        prefer=chosen,
        members=members,
        data=data_dir,
        train_options=stored,
        time_budget=budget,
    )


def _entries(recipes: list, data_dir: str) -> tuple[list[tuple[str, list[str]]], str | None, list]:
    """(recipe, its own --set changes) for each member recipe, ensemble recipes expanded;
    and the vote and preference of the first ensemble recipe among them."""
    if not recipes:
        recipe, why = choose_recipe(load_dataset(data_dir))
        _say(f"recipe: {recipe}, chosen because {why} (name a RECIPE to override)")
        recipes = [recipe]
    entries: list[tuple[str, list[str]]] = []
    vote, prefer = None, []
    for recipe in recipes:
        if is_ensemble_recipe(recipe):
            ens = load_ensemble_recipe(recipe)
            entries += [(m.recipe, list(m.set)) for m in ens.members]
            if vote is None:
                vote, prefer = ens.vote, list(ens.prefer)
            continue
        if isinstance(recipe, dict) or not isinstance(recipe, str | Path):
            raise UserError("an ensemble's recipes are names or YAML paths, kept in ensemble.yaml")
        path = Path(recipe).expanduser()
        is_file = path.suffix in (".yaml", ".yml") or path.exists()
        entries.append((str(path.resolve()) if is_file else str(recipe), []))
    return entries, vote, prefer


def _prefer(members: list[Member], prefer: Sequence[str]) -> list[str]:
    """``--prefer`` names (member folders, or recipes: all of that recipe's members, in
    order) → member folder names."""
    out: list[str] = []
    for name in prefer:
        found = [m.path for m in members if name in (m.path, m.recipe, Path(m.recipe).stem)]
        if not found:
            shown = ", ".join(dict.fromkeys(Path(m.recipe).stem for m in members))
            raise UserError(f"--prefer {name!r}: no such member; the members' recipes: {shown}")
        out += [p for p in found if p not in out]
    return out


def _name(recipes: Sequence[Any], entries: list, seeds: int | None) -> str:
    if len(recipes) == 1 and is_ensemble_recipe(recipes[0]):
        return Path(str(recipes[0])).stem
    names = list(dict.fromkeys(Path(r).stem for r, _ in entries))
    base = names[0] if len(names) == 1 else "ensemble"
    return f"{base}-x{seeds}" if seeds else base


def _plain(value: Any) -> Any:
    """An option as ensemble.yaml stores it (a tuple of --set items as a list, a path as
    text)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _plan_line(folder: Path, spec: EnsembleSpec) -> str:
    n = len(spec.members)
    prefer = f", ties to {', '.join(spec.prefer)}" if spec.prefer else ""
    line = f"ensemble: {n} member{'s' * (n > 1)} in {folder}, {spec.vote} vote{prefer}"
    if spec.time_budget is not None:
        share = describe_duration(spec.time_budget / n)
        line += (
            f"; --time {describe_duration(spec.time_budget)} shared: {share} each at the "
            "start, a member's unused time passed on to the next"
        )
    return line


# ---------------------------------------------------------------------------- training


def _folder(name: str, out, runs_dir: Path, exist_ok: bool, env) -> Path:
    """The ensemble folder: ``out``, else ``runs/<name>-<n>`` (rank 0's, under torchrun)."""
    if out is not None:
        folder = Path(out)
        if env.is_main:
            check_run_dir(folder, exist_ok=exist_ok)
            if is_ensemble_dir(folder) and not exist_ok:
                raise UserError(
                    f"{folder} already holds an ensemble (ensemble.yaml): choose another "
                    f"--out, add --exist-ok to replace it, or `imgclf train --resume {folder}`"
                )
        return folder
    if not env.enabled:
        return new_run_dir(name, runs_dir)
    d = distributed.init(torch.device("cpu"), backend="gloo")
    try:
        return d.broadcast(new_run_dir(name, runs_dir) if d.is_main else None)
    finally:
        d.shutdown()


def _resume(folder: Path, data: Any, options: dict[str, Any]) -> Ensemble:
    spec = read_ensemble(folder)
    done = [m for m in spec.members if m.state == "done"]
    for m in done:  # a finished member is kept as it is: it must be there
        if not (folder / m.path).is_dir():
            raise missing_member(folder, m)
    _say(
        f"ensemble {folder}: {len(done)} of {len(spec.members)} members trained; resuming the rest"
    )
    return _train_in(folder, spec, data, options, spent=sum(m.seconds or 0.0 for m in done))


def _train_in(
    folder: Path, spec: EnsembleSpec, data: Any, options: dict, spent: float, fresh: bool = False
) -> Ensemble:
    """Train each member not done yet, holding the ensemble folder (one process at a time,
    as a run folder); a Ctrl-C says how to continue the whole ensemble. ``data``: the
    command's --data on a resume (None: each member's own), ensemble.yaml's for the rest."""
    main = distributed.from_env().is_main
    with claim_run_dir(folder, exist_ok=True) if main else contextlib.nullcontext():
        if fresh and main:
            write_ensemble(folder, spec)
        try:
            runs = _members(folder, spec, data, options, spent, main)
        except KeyboardInterrupt:
            if main:
                _say(f"continue the ensemble with `imgclf train --resume {folder}`")
            raise
    return Ensemble(folder, spec, runs)


def _members(folder, spec, data, options, spent, main) -> list[Run]:
    started = time.perf_counter()
    per_process = {k: v for k, v in options.items() if k in PER_PROCESS}
    runs, n = [], len(spec.members)
    for i, m in enumerate(spec.members):
        where = folder / m.path
        if m.state == "done":
            runs.append(Run(where, read_summary(where / "summary.json") or {}))
            continue
        left = None
        if spec.time_budget is not None:
            left = (spec.time_budget - spent - (time.perf_counter() - started)) / (n - i)
        member_started = time.perf_counter()
        m.state = "running"
        if main:
            write_ensemble(folder, spec)
            _say(_member_line(i, n, m, where, left))
        runs.append(_train_member(m, where, data, spec, per_process, left))
        m.state, m.seconds = "done", time.perf_counter() - member_started
        if main:
            write_ensemble(folder, spec)
    return runs


def _train_member(m: Member, where: Path, data, spec, per_process, budget) -> Run:
    """One member: resumed from its ``last.pt`` where it has one, else trained afresh with
    the ensemble's stored options (its folder replaced: a member killed before its first
    checkpoint leaves a config.yaml)."""
    if (where / "last.pt").is_file():
        return train(None, data, resume=where, **per_process)
    data = data or spec.data
    stored = dict(spec.train_options)
    overrides = (*m.set, *(stored.pop("overrides", None) or ()), f"seed={m.seed}")
    budget = max(budget, 1.0) if budget is not None else None  # train() says if too short
    options = {**stored, **per_process, "new_data": False}
    return train(
        m.recipe, data, out=where, exist_ok=True, overrides=overrides, time_budget=budget, **options
    )


def _member_line(i: int, n: int, m: Member, where: Path, budget: float | None) -> str:
    how = "resuming from its last.pt" if (where / "last.pt").is_file() else "training"
    line = f"member {i + 1}/{n}: {Path(m.recipe).stem}, seed {m.seed}, {how} in {where}"
    if budget is not None and how == "training":
        line += f" ({describe_duration(max(budget, 0.0))} of the budget)"
    return line


def _say(line: str) -> None:
    # Printed even with --quiet, as a chosen recipe's line: it says what is trained where.
    if distributed.from_env().is_main:
        print(line, file=sys.stderr)
