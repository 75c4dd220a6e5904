"""`imgclf train` and `imgclf demo`: both end in :func:`imgclf.train.train`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from imgclf.cli.options import (
    add_training_options,
    add_vote_option,
    command,
    pick,
    positive_int,
)
from imgclf.errors import UserError


def print_run(run) -> None:
    acc = run.summary.get("val_accuracy")
    if run.summary.get("final"):
        print_final(run)
    elif acc is not None:
        print(
            f"val accuracy {acc:.4f} (balanced {run.summary['val_balanced_accuracy']:.4f}, "
            f"macro F1 {run.summary['val_macro_f1']:.4f}) on {run.summary['val_count']} "
            f"{run.summary['dataset']} images"
        )
    else:
        print("no validation split: nothing evaluated")
    if "budget_seconds" in run.summary:
        print(
            f"budget bought:    {run.summary['trained_epochs']:.2f} epochs, "
            f"{run.summary['images_seen']:,} training images in "
            f"{run.summary['wall_seconds']:.0f} s of {run.summary['budget_seconds']:.0f} s"
        )
    best = run.summary.get("best_epoch")
    if acc is not None and best:
        print(f"best epoch:       {best} (best.pt: what eval and predict use by default)")
    for text in run.summary.get("warnings", []):
        print(f"warning: {text}")
    print(f"run folder:       {run.path}")
    print(f"curves:           {run.path / 'curves.png'}")
    if (run.path / "confusion_matrix.png").is_file():  # none without validation
        print(f"confusion matrix: {run.path / 'confusion_matrix.png'}")
    if (run.path / "mistakes.png").is_file():
        print(f"worst mistakes:   {run.path / 'mistakes.png'}")
    if (run.path / "reliability.png").is_file():
        ece = run.summary.get("val_ece")
        shown = f" (expected calibration error {ece:.4f})" if ece is not None else ""
        print(f"calibration:      {run.path / 'reliability.png'}{shown}")


def print_final(run) -> None:
    """A final fit's lines in place of its validation accuracy: why there is none, and
    the validation run (--from) that chose its settings."""
    s = run.summary
    print(
        f"final fit on {' + '.join(s.get('final_splits') or [])} ({s.get('final_images', 0):,} "
        f"{s['dataset']} images): no validation accuracy can be reported, its validation "
        "images were trained on"
    )
    source = s.get("final_from")
    if source:
        print(f"chosen by:        {source['run']} (val accuracy {source['val_accuracy']:.4f})")
    else:
        print("chosen by:        no validation run named (--from RUN records it)")
    print(f"held-out score:   {held_out_command(run.path, s)}")


def held_out_command(path, summary: dict) -> str:
    """How to score a final fit (or an ensemble of them) on images it never trained on:
    its data set's test split where there is one, else a folder of labelled images."""
    if "test" in (summary.get("final_held_out") or []):
        return f"imgclf eval {path} --data {summary['dataset']} --split test"
    return (
        f"imgclf eval {path} FOLDER (labelled images it never saw: {summary['dataset']!r} "
        "has no test split)"
    )


def _launch_torchrun(args: argparse.Namespace) -> None:
    """``--nproc-per-node N``: become the torchrun job it is shorthand for (exec, so
    Ctrl-C and the exit status are torchrun's own); returns only to train here."""
    from imgclf.runtime import distributed

    if args.nproc_per_node is None:
        return
    if distributed.from_env().enabled:
        raise UserError(
            "--nproc-per-node starts torchrun itself; under torchrun, drop it (torchrun's "
            "own --nproc-per-node says how many processes)"
        )
    if args.nproc_per_node == 1:
        return
    command = distributed.torchrun_command(args.argv, args.nproc_per_node)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


def _training(args: argparse.Namespace) -> dict:
    """The options of add_training_options, as imgclf.train.train takes them."""
    return {
        **pick(args, "out", "epochs", "device", "threads"),
        "overrides": args.set or (),
        "time_budget": args.time,
        "progress": not args.quiet,
    }


def _weights_override(args: argparse.Namespace) -> list[str]:
    """``--weights FILE`` as the recipe field it sets (``--set weights=PATH``), the path
    absolute so config.yaml says which file the run started from."""
    if args.weights is None:
        return []
    if args.resume is not None:
        raise UserError(
            "--weights starts a run from a weights file; --resume continues from the run's "
            "own last.pt: drop --weights"
        )
    path = Path(args.weights).expanduser()
    if not path.is_file():
        raise UserError(f"--weights {args.weights}: no such file")
    # JSON quoting is YAML too: a path with ':' or '#' stays one string.
    return [f"weights={json.dumps(str(path.resolve()))}"]


def _trackers(names: list[str] | None) -> list:
    """``--log`` as the tracker callbacks it names (imgclf.train.trackers, imported only
    when asked: MLflow is an optional extra)."""
    if not names:
        return []
    from imgclf.train.trackers import tracker

    return [tracker(name) for name in dict.fromkeys(names)]


def _train(args: argparse.Namespace) -> int:
    """train a recipe on a dataset

    Train RECIPE (a bundled name or a .yaml path) on an imported dataset. Writes
    runs/<recipe>-<n>/ with config.yaml, metrics.csv, last.pt, best.pt, curves, confusion
    matrix, per-class scores, summary.json and TensorBoard events.
    """
    from imgclf.train import train
    from imgclf.train.ensemble import wants_ensemble

    # Before torchrun or any training: a tracker not installed is one line now.
    callbacks = _trackers(args.log)
    _launch_torchrun(args)
    if not args.recipe and args.resume is None and args.data is None:
        raise UserError(
            "give --data DATASET (a recipe is chosen for it), a RECIPE (see `imgclf "
            "recipes`) or --resume RUN_DIR"
        )
    options = pick(args, "resume", "exist_ok", "new_data", "init")
    options["final"] = _final(args)
    training = _training(args)
    training["overrides"] = (*training["overrides"], *_weights_override(args))
    if wants_ensemble(args.recipe, args.seeds, args.resume):
        # Every train() option above reaches each member unchanged (imgclf.train.ensemble).
        return _train_ensemble(args, {**options, **training, "callbacks": callbacks})
    if args.vote or args.prefer:
        raise UserError("--vote and --prefer are an ensemble's: name several recipes or --seeds N")
    recipe = args.recipe[0] if args.recipe else None
    run = train(recipe, args.data, **options, **training, callbacks=callbacks)
    if run.summary:  # empty on torchrun's ranks other than 0: rank 0 reports the run
        print_run(run)
    return 0


def _train_ensemble(args: argparse.Namespace, options: dict) -> int:
    from imgclf.train.ensemble import train_ensemble

    voting = pick(args, "seeds", "vote", "prefer")
    ensemble = train_ensemble(args.recipe, args.data, **voting, **options)
    if not ensemble.runs or not any(run.summary for run in ensemble.runs):
        return 0  # under torchrun, rank 0 reports
    for member, run in zip(ensemble.spec.members, ensemble.runs, strict=True):
        acc = run.summary.get("val_accuracy")
        shown = f"val accuracy {acc:.4f}" if acc is not None else "no validation accuracy"
        print(f"{member.path}: {shown}")
    spec = ensemble.spec
    print(f"ensemble folder:  {ensemble.path} ({len(spec.members)} members, {spec.vote} vote)")
    command = f"imgclf eval {ensemble.path} --data {args.data or spec.data}"
    if options.get("final"):  # its members trained on val: only test or a folder is held out
        command = held_out_command(ensemble.path, ensemble.runs[-1].summary)
    print(f"members and vote: {command}")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "train", _train)
    p.add_argument(
        "recipe",
        nargs="*",
        help="recipe name (imgclf recipes) or YAML path; several, or an ensemble recipe: "
        "an ensemble, trained member by member into one folder with an ensemble.yaml",
    )
    p.add_argument("--data", help="dataset name or cache folder (imgclf data list)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run from its last.pt; with --epochs N, train a finished run N "
        "epochs more (at its last learning rate, or a cosine decay from --set optimizer.lr=X)",
    )
    p.add_argument(
        "--init",
        metavar="RUN",
        help="start from the weights of another run (its folder or a .pt file) with the "
        "same model: classes matched by name, a fresh head row for each new class",
    )
    p.add_argument(
        "--exist-ok",
        action="store_true",
        help="--out may hold a run: remove that run's files and start afresh there",
    )
    p.add_argument(
        "--new-data",
        action="store_true",
        help="with --resume: continue on --data although the run was trained on another "
        "data set (same classes)",
    )
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="start a pretrained model (a torchvision name, timm/<name>) from this weights "
        "file instead of downloading: a state dict, plain or in a timm/torchvision training "
        "checkpoint, or .safetensors (the recipe's weights field)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=positive_int,
        metavar="N",
        help="train data-parallel in N processes on this machine: shorthand for `torchrun "
        "--standalone --nproc-per-node N -m imgclf train ...` (the recipe's batch_size is "
        "the global batch)",
    )
    p.add_argument(
        "--log",
        action="append",
        choices=["mlflow"],
        help="also log the run to an experiment tracker: mlflow (params, metrics each epoch, "
        "the run folder at the end; MLFLOW_TRACKING_URI, else ./mlruns; needs "
        "pip install 'imgclf[mlflow]'); metrics.csv and TensorBoard are always written",
    )
    _add_ensemble_options(p)
    _add_final_options(p)
    add_training_options(p)


def _add_ensemble_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="an ensemble of N members per recipe, seeded the recipe's seed + 0..N-1, trained "
        "one after another into one folder (eval, predict, export, serve and report take it "
        "as one model); every other option applies to each member",
    )
    add_vote_option(p, "soft", "an ensemble's vote, written to its ensemble.yaml (soft)")
    p.add_argument(
        "--prefer",
        nargs="+",
        metavar="NAME",
        help="an ensemble's hard-vote tie-break order: member folders or recipes (all of "
        "that recipe's members), most preferred first",
    )


def _add_final_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--final",
        action="store_true",
        help="final fit: train on train + val (test stays out) with the recipe's schedule, no "
        "validation, best.pt the last epoch; early stopping is refused",
    )
    p.add_argument(
        "--from",
        dest="final_from",
        metavar="RUN",
        help="with --final: the validation run that chose the settings (same model, recipe, "
        "data set and settings), recorded with its val accuracy in summary.json",
    )


def _final(args: argparse.Namespace) -> bool | str:
    """``--final`` and ``--from RUN`` as train()'s ``final``: False, True or RUN."""
    if args.final_from is not None and not args.final:
        raise UserError("--from names the validation run of a final fit: add --final")
    return args.final_from if args.final_from is not None else args.final


def _demo(args: argparse.Namespace) -> int:
    """train the fast recipe on CIFAR-10 and show where the results are

    Train RECIPE (default fast) on CIFAR-10: the cached dataset cifar10, else --archive
    imported as cifar10, else a torchvision download; offline without an archive,
    scikit-learn's bundled 8×8 digits stand in. Prints the validation accuracy and where
    the run folder, curves and confusion matrix are.
    """
    from imgclf.demo import run_demo

    run = run_demo(args.archive, recipe=args.recipe, **_training(args))
    print_run(run)
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "demo", _demo)
    p.add_argument(
        "--archive",
        type=Path,
        metavar="PATH",
        help="CIFAR-10 archive to import, e.g. cifar-10-python.tar.gz or an image-folder .tar.gz",
    )
    p.add_argument("--recipe", default="fast", help="recipe name or YAML path (fast)")
    add_training_options(p)
