"""Command line: parses arguments and calls library functions, nothing else.

User mistakes (:class:`imgclf.errors.UserError`) print one ``error: ...`` line and exit
with the error's code (2), without a traceback. Heavy modules (torch) are imported inside
the commands so ``imgclf --help`` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from imgclf import __version__
from imgclf.errors import UserError

Handler = Callable[[argparse.Namespace], int | None]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1)")
    return value


# ---------------------------------------------------------------- data


def _data_import(args: argparse.Namespace) -> int:
    from imgclf.data import import_dataset, import_named

    if args.src.lower() in ("cifar10", "cifar100") and not _exists(args.src):
        ds = import_named(
            args.src,
            name_as=args.name,
            image_size=args.image_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
        )
    else:
        ds = import_dataset(
            args.src,
            args.name,
            image_size=args.image_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            labels_csv=args.labels,
        )
    print(describe_short(ds))
    return 0


def _exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).exists()


def describe_short(ds) -> str:
    h, w = ds.image_size
    counts = ", ".join(f"{s} {int((ds.splits == i).sum())}" for i, s in enumerate(ds.split_names))
    skipped = ds.meta["skipped"]
    return (
        f"imported {ds.name!r}: {len(ds.labels)} images {h}×{w}, {len(ds.classes)} classes "
        f"({counts}); {skipped} skipped; {ds.meta['import_seconds']} s → {ds.root}"
    )


def _data_info(args: argparse.Namespace) -> int:
    from imgclf.data import dataset_info, load_dataset

    info = dataset_info(load_dataset(args.name))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"dataset {info['name']} ({info['root']})")
    print(f"source: {info['source']} [{info['source_shape']}]")
    h, w = info["image_size"]
    print(f"images: {info['num_samples']} at {h}×{w}, resized {info['resized']}")
    splits = list(info["counts"])
    width = max(len(c) for c in ["class", "total", *info["classes"]])
    print(f"{'class':<{width}}  " + "  ".join(f"{s:>7}" for s in splits))
    for c in info["classes"]:
        print(f"{c:<{width}}  " + "  ".join(f"{info['counts'][s][c]:>7}" for s in splits))
    totals = [sum(info["counts"][s].values()) for s in splits]
    print(f"{'total':<{width}}  " + "  ".join(f"{t:>7}" for t in totals))
    print(f"validation split: {info['val_split']}")
    print(f"skipped files: {len(info['skipped'])}")
    for row in info["skipped"][:20]:
        print(f"  {row['path']}: {row['reason']}")
    if len(info["skipped"]) > 20:
        print(f"  … see {info['root']}/import-report.csv")
    return 0


def _data_list(args: argparse.Namespace) -> int:
    from imgclf.data import list_datasets, load_dataset
    from imgclf.paths import datasets_dir

    names = list_datasets()
    if not names:
        print(f"no datasets in {datasets_dir()}; run `imgclf data import SRC`")
    for name in names:
        ds = load_dataset(name)
        h, w = ds.image_size
        print(f"{name}\t{len(ds.labels)} images\t{h}×{w}\t{len(ds.classes)} classes")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="import, inspect and list datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    imp = dsub.add_parser(
        "import",
        help="decode a dataset once into the cache",
        description=(
            "Import SRC into the cache ($IMGCLF_HOME/datasets/NAME, default ~/.cache/imgclf). "
            "SRC: an image folder <class>/* or {train,val,test}/<class>/*, a flat folder with "
            "a labels CSV (id,label), CIFAR python batches, a .tar/.tar.gz/.tgz/.zip holding "
            "one of these, or the word cifar10/cifar100 (downloaded through torchvision)."
        ),
    )
    imp.add_argument("src", help="folder, archive, or cifar10/cifar100")
    imp.add_argument("--name", help="dataset name (default: the source's file name)")
    imp.add_argument(
        "--image-size",
        type=_positive_int,
        metavar="N",
        help="resize every image to N×N (default: the most common size)",
    )
    imp.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.1,
        metavar="F",
        help="stratified validation share of train when the source has no val split (0.1)",
    )
    imp.add_argument("--seed", type=int, default=0, help="seed of the validation split (0)")
    imp.add_argument("--labels", metavar="CSV", help="labels CSV for a flat image folder")
    imp.set_defaults(handler=_data_import)
    info = dsub.add_parser("info", help="classes, counts, size, source, skipped files")
    info.add_argument("name", help="dataset name or cache folder")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=_data_info)
    lst = dsub.add_parser("list", help="list cached datasets")
    lst.set_defaults(handler=_data_list)


# ---------------------------------------------------------------- models


def _models(args: argparse.Namespace) -> int:
    from imgclf.models import list_models

    for spec in list_models():
        print(f"{spec.name:<18} {spec.kind:<10} {spec.input_size:>4}px  {spec.description}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models")
    p.set_defaults(handler=_models)


# ---------------------------------------------------------------- recipes, train, eval


def _recipes(args: argparse.Namespace) -> int:
    from imgclf.train.recipe import list_recipes, load_recipe, recipe_yaml

    if args.name:
        print(recipe_yaml(load_recipe(args.name)), end="")
        return 0
    for name, description in list_recipes().items():
        print(f"{name:<24} {description}")
    return 0


def _add_recipes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list bundled recipes, or print one resolved")
    p.add_argument("name", nargs="?", help="a recipe to print in full")
    p.set_defaults(handler=_recipes)


def _add_hardware_options(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    """``--device`` and ``--threads`` (main() applies ``--threads`` once, for every
    command, before the command runs)."""
    if device:
        p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument(
        "--threads", type=_positive_int, metavar="N", help="CPU threads (default: physical cores)"
    )


def _apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        from imgclf.runtime.device import set_threads

        set_threads(args.threads)


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `train` and `demo`: both end in imgclf.train.train."""
    p.add_argument("--out", help="run folder (default runs/<recipe>-<n>)")
    p.add_argument(
        "--epochs", type=_positive_int, metavar="N", help="total epochs, shared among stages"
    )
    p.add_argument(
        "--time",
        metavar="DURATION",
        help="wall-time budget (90s, 10m, 1h30m): every stage is scaled to finish, "
        "evaluation included, within it on this machine",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. optimizer.lr=0.05 or stages.0.epochs=3 (repeatable)",
    )
    _add_hardware_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")


def _print_run(run) -> None:
    acc = run.summary.get("val_accuracy")
    if acc is not None:
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
    print(f"confusion matrix: {run.path / 'confusion_matrix.png'}")
    if (run.path / "mistakes.png").is_file():
        print(f"worst mistakes:   {run.path / 'mistakes.png'}")


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


def _train(args: argparse.Namespace) -> int:
    from imgclf.train import train

    _launch_torchrun(args)
    if args.recipe is None and args.resume is None and args.data is None:
        raise UserError(
            "give --data DATASET (a recipe is chosen for it), a RECIPE (see `imgclf "
            "recipes`) or --resume RUN_DIR"
        )
    run = train(
        args.recipe,
        args.data,
        out=args.out,
        epochs=args.epochs,
        overrides=args.set or (),
        resume=args.resume,
        time_budget=args.time,
        device=args.device,
        threads=args.threads,
        progress=not args.quiet,
        exist_ok=args.exist_ok,
        new_data=args.new_data,
    )
    if run.summary:  # empty on torchrun's ranks other than 0: rank 0 reports the run
        _print_run(run)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a recipe on a dataset",
        description="Train RECIPE (a bundled name or a .yaml path) on an imported dataset. "
        "Writes runs/<recipe>-<n>/ with config.yaml, metrics.csv, last.pt, best.pt, curves, "
        "confusion matrix, per-class scores, summary.json and TensorBoard events.",
    )
    p.add_argument("recipe", nargs="?", help="recipe name (imgclf recipes) or YAML path")
    p.add_argument("--data", help="dataset name or cache folder (imgclf data list)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last.pt")
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
        "--nproc-per-node",
        type=_positive_int,
        metavar="N",
        help="train data-parallel in N processes on this machine: shorthand for `torchrun "
        "--standalone --nproc-per-node N -m imgclf train ...` (the recipe's batch_size is "
        "the global batch)",
    )
    _add_training_options(p)
    p.set_defaults(handler=_train)


def _eval(args: argparse.Namespace) -> int:
    from imgclf.evaluate.runs import evaluate

    if len(args.runs) > 1:
        return _eval_ensemble(args)
    run = args.runs[0]
    kwargs = dict(split=args.split, tta=args.tta, batch_size=args.batch_size)
    metrics = evaluate(run, args.data, device=args.device, **kwargs)
    if args.json:
        print(json.dumps({"run": run, **metrics.to_dict()}))
    else:
        _print_metrics(run, metrics)
    return 0


def _eval_ensemble(args: argparse.Namespace) -> int:
    from imgclf.evaluate.compare import compare_runs

    comparison = compare_runs(
        args.runs,
        args.data,
        split=args.split,
        vote=args.vote,
        prefer=args.prefer,
        weights=args.weights,
        tta=args.tta,
        batch_size=args.batch_size,
        device=args.device,
    )
    image = comparison.plot(Path(args.out_dir) / "ensemble_confusion.png")
    if args.json:
        print(json.dumps({**comparison.to_dict(), "confusion_image": str(image)}))
    else:
        print(comparison.table())
        print(f"best model and {comparison.vote} vote, side by side: {image}")
    return 0


def _print_metrics(run: str, metrics) -> None:
    print(
        f"{run}: accuracy {metrics.accuracy:.4f}  "
        f"balanced accuracy {metrics.balanced_accuracy:.4f}  macro F1 {metrics.macro_f1:.4f}  "
        f"loss {metrics.loss:.4f}  ({metrics.count} images)"
    )
    corner = "true\\pred"  # rows: true class, columns: predicted class
    width = max(len(c) for c in [corner, *metrics.class_names])
    print(f"{'class':<{width}}  precision  recall      f1  support")
    for i, c in enumerate(metrics.class_names):
        print(
            f"{c:<{width}}  {metrics.precision[i]:>9.4f}  {metrics.recall[i]:>6.4f}  "
            f"{metrics.f1[i]:>6.4f}  {int(metrics.support[i]):>7}"
        )
    cell = max(5, *(len(c) for c in metrics.class_names))
    print(f"{corner:<{width}}  " + " ".join(f"{c:>{cell}}" for c in metrics.class_names))
    for c, counts in zip(metrics.class_names, metrics.confusion, strict=True):
        print(f"{c:<{width}}  " + " ".join(f"{int(n):>{cell}}" for n in counts))


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy, per-class scores and confusion of runs on a dataset",
        description="Evaluate RUN (a run folder or checkpoint) on an imported dataset or an "
        "image folder. Classes are matched by name.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) or .pt checkpoint(s)")
    p.add_argument("--data", required=True, help="dataset name, cache folder, or image folder")
    p.add_argument(
        "--split",
        choices=["train", "val", "test", "all"],
        help="split to score (default: test if present, else val, else all)",
    )
    p.add_argument("--tta", action="store_true", help="average flipped (and shifted) views")
    p.add_argument("--batch-size", type=_positive_int, default=512, metavar="N")
    _add_hardware_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_vote_options(p)
    p.add_argument(
        "--out-dir",
        default=".",
        metavar="DIR",
        help="with several runs: where ensemble_confusion.png goes (default: here)",
    )
    p.set_defaults(handler=_eval)


VOTES = ("hard", "soft", "weighted")


def _add_vote_option(p: argparse.ArgumentParser, default: str = "hard", help: str = "") -> None:
    p.add_argument(
        "--vote",
        choices=VOTES,
        default=default,
        help=help
        or "how several runs combine (hard: majority of top-1 labels; soft: mean "
        f"probability; weighted: weighted mean probability) ({default})",
    )


def _add_weights_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        nargs="+",
        metavar="RUN:W",
        help="weighted-vote weights, e.g. simple-1:0.5 fast-2:1 (default: each run's "
        "validation accuracy)",
    )


def _add_vote_options(p: argparse.ArgumentParser) -> None:
    """``--vote``, ``--prefer`` and ``--weights``: how the runs of eval, predict and serve
    combine."""
    _add_vote_option(p)
    p.add_argument(
        "--prefer",
        nargs="+",
        metavar="RUN",
        help="hard-vote tie-break order, by run name (default: the order the runs are given)",
    )
    _add_weights_option(p)


# ---------------------------------------------------------------- predict, report


def _predict(args: argparse.Namespace) -> int:
    from imgclf.predict import predict

    result = predict(
        args.runs,
        args.input,
        args.out,
        vote=args.vote,
        prefer=args.prefer,
        weights=args.weights,
        tta=args.tta,
        format=args.format,
        batch_size=args.batch_size,
        backend=args.backend,
        device=args.device,
    )
    from imgclf.runtime.distributed import from_env

    if not from_env().is_main:  # under torchrun, rank 0 wrote the CSV and reports it
        return 0
    print(result.summary())
    if args.strict and result.failures:
        print(f"error: {result.failures} files could not be read (--strict)", file=sys.stderr)
        return 1
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="label every image in a folder, archive or list with one run or a vote",
        description="Write one CSV row per image file under PATH (a folder, searched "
        "recursively; a .tar/.tar.gz/.tgz/.zip archive; or a text file listing image paths "
        "relative to it), in natural filename order. Columns: file,label,confidence "
        "(+ label_<run> per run when several) and error (why a file could not be read; "
        "empty otherwise). --format kaggle writes id,label with the file stem as id.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) or .pt checkpoint(s)")
    p.add_argument("--input", required=True, metavar="PATH", help="folder, archive or list")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (predictions.csv)")
    _add_vote_options(p)
    p.add_argument("--tta", action="store_true", help="average flipped (and shifted) views")
    p.add_argument("--format", choices=["default", "kaggle"], default="default")
    p.add_argument("--batch-size", type=_positive_int, default=256, metavar="N")
    p.add_argument("--strict", action="store_true", help="exit 1 when any file could not be read")
    _add_backend_option(p)
    _add_hardware_options(p)
    p.set_defaults(handler=_predict)


def _report(args: argparse.Namespace) -> int:
    from imgclf.report import build_report

    ensemble = None
    if args.data:
        ensemble = {"data": args.data, "split": args.split, "vote": args.vote}
    report = build_report(args.paths, args.out, format=args.format, ensemble=ensemble)
    n = len(report.runs)
    print(f"report of {n} run{'s' if n != 1 else ''}: {report.path}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML (or Markdown) report of runs",
        description="Report RUN_OR_DIR (a run folder, or a folder of run folders): per run "
        "its recipe, stages, curves, confusion matrix and per-class scores; then a "
        "comparison table and, with --data, the ensemble of all runs on that data. HTML "
        "embeds every image; --format md writes PNGs into <out>_files/ beside it.",
    )
    p.add_argument("paths", nargs="+", metavar="RUN_OR_DIR")
    p.add_argument("--out", default=None, help="report file (report.html or report.md)")
    p.add_argument(
        "--format",
        choices=["html", "md"],
        default=None,
        help="html or md (default: from --out's suffix, else html)",
    )
    p.add_argument("--data", help="dataset to score the ensemble of all runs on")
    p.add_argument(
        "--split",
        choices=["train", "val", "test", "all"],
        help="split for the ensemble (default: test if present, else val, else all)",
    )
    _add_vote_option(p, help="the ensemble's vote (hard)")
    p.set_defaults(handler=_report)


# ---------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from imgclf.demo import run_demo

    run = run_demo(
        args.archive,
        args.epochs,
        time_budget=args.time,
        recipe=args.recipe,
        out=args.out,
        overrides=args.set or (),
        device=args.device,
        threads=args.threads,
        progress=not args.quiet,
    )
    _print_run(run)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train the fast recipe on CIFAR-10 and show where the results are",
        description="Train RECIPE (default fast) on CIFAR-10: the cached dataset cifar10, "
        "else --archive imported as cifar10, else a torchvision download; offline without "
        "an archive, scikit-learn's bundled 8×8 digits stand in. Prints the validation "
        "accuracy and where the run folder, curves and confusion matrix are.",
    )
    p.add_argument(
        "--archive",
        type=Path,
        metavar="PATH",
        help="CIFAR-10 archive to import, e.g. cifar-10-python.tar.gz or an image-folder .tar.gz",
    )
    p.add_argument("--recipe", default="fast", help="recipe name or YAML path (fast)")
    _add_training_options(p)
    p.set_defaults(handler=_demo)


# ---------------------------------------------------------------- export, serve


def _export(args: argparse.Namespace) -> int:
    from imgclf.export import export

    result = export(
        args.runs,
        args.out,
        format=args.format,
        opset=args.opset,
        dynamic_batch=args.dynamic_batch,
        vote=args.vote,
        weights=args.weights,
    )
    print(result.summary())
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run (or a soft vote of runs) as ONNX or TorchScript, verified",
        description="Export RUN as one model file whose input is the run's preprocessed "
        "image tensor (N×3×H×W float32, normalized); class names, sizes, mean/std and the "
        "preprocessing go into its metadata. Several runs: one graph averaging their "
        "probabilities (--vote soft or weighted). The file is written only after its "
        "outputs equal PyTorch's within 1e-4 on the run's validation images.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) or .pt checkpoint(s)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument(
        "--out", help="file to write (default RUN/model.onnx; ./ensemble-VOTE.onnx for several)"
    )
    p.add_argument("--opset", type=_positive_int, default=18, metavar="N", help="ONNX opset (18)")
    p.add_argument(
        "--dynamic-batch", action="store_true", help="any batch size (default: batches of 1)"
    )
    _add_vote_option(
        p, "soft", "how runs combine: soft or weighted (one graph averages probabilities)"
    )
    _add_weights_option(p)
    p.set_defaults(handler=_export)


def _serve(args: argparse.Namespace) -> int:
    from imgclf.serve import serve

    serve(
        args.runs,
        host=args.host,
        port=args.port,
        vote=args.vote,
        prefer=args.prefer,
        weights=args.weights,
        backend=args.backend,
        max_bytes=args.max_bytes,
        top_k=args.top_k,
    )
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP server: POST /predict, GET /health, /info, and a web page at /",
        description="Serve RUN (or the vote of several runs) over HTTP: POST /predict with "
        "images as multipart field `file` (repeatable) or a raw body; GET / is a page to "
        "drop images on. Same preprocessing as `imgclf predict`.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) or .pt checkpoint(s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000; 0 picks a free one)")
    _add_vote_options(p)
    _add_backend_option(p)
    p.add_argument(
        "--max-bytes",
        type=_positive_int,
        default=20 * 1024 * 1024,
        metavar="N",
        help="largest accepted upload, per image (20 MiB)",
    )
    p.add_argument("--top-k", type=_positive_int, default=5, metavar="K", help="classes (5)")
    _add_hardware_options(p, device=False)
    p.set_defaults(handler=_serve)


def _add_backend_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default=None,
        help="run the models in PyTorch, or exported to ONNX under ONNX Runtime "
        "(default: the one measured faster, see docs/benchmarks.md)",
    )


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgclf",
        description="Image classification: import data, train, evaluate, ensemble, predict.",
    )
    parser.add_argument("--version", action="version", version=f"imgclf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_data,
    _add_models,
    _add_recipes,
    _add_train,
    _add_eval,
    _add_predict,
    _add_report,
    _add_demo,
    _add_export,
    _add_serve,
]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The command line as given: what `train --nproc-per-node N` hands to torchrun.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _apply_threads(args)
        code = args.handler(args) or 0
        # Flushed here so that a reader gone early (`imgclf data info NAME | head`) is a
        # BrokenPipeError below, not an "Exception ignored" at interpreter exit.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The Python docs' "Note on SIGPIPE": the reader has all it wanted; no message,
        # and stdout goes to /dev/null so the flush at exit cannot fail again.
        _stdout_to_devnull()
        return 1
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The process entry (the ``imgclf`` command and ``python -m imgclf``): :func:`main`,
    then the exit. A torchrun worker (``WORLD_SIZE`` > 1) ends with ``os._exit`` once its
    output is flushed, skipping the interpreter's shutdown: a DistributedDataParallel model
    keeps its Gloo process group, and the group's worker threads, alive past
    ``destroy_process_group`` (seen in torch 2.14), and a worker thread that frees its last
    collective's tensor after the interpreter began shutting down takes the GIL, which
    then ends that thread through a C++ frame that may not throw: "terminate called
    without an active exception", SIGABRT, and torchrun fails the whole job (2 in 13 runs of
    tests/test_distributed.py's restarted 2-process job on a loaded 2-core machine, 0 in 30
    with this exit; the crash of pytorch/pytorch PR 179291). Nothing is left for that
    shutdown to do: every file a command writes is closed by then."""
    code = main()
    if _torchrun_worker():
        for stream in (sys.stdout, sys.stderr):
            # A reader gone (BrokenPipeError) or a closed stream: nothing left to save.
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        logging.shutdown()
        os._exit(code)
    raise SystemExit(code)


def _torchrun_worker() -> bool:
    if "WORLD_SIZE" not in os.environ:  # a plain command's exit imports no torch
        return False
    from imgclf.runtime.distributed import from_env

    try:
        return from_env().enabled
    except UserError:  # a WORLD_SIZE that is not torchrun's: main() said so where it mattered
        return False


def _stdout_to_devnull() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a stdout without a file: nothing to do
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    entry()
