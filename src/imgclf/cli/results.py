"""`imgclf eval`, `imgclf predict` and `imgclf report`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imgclf.cli.options import (
    add_backend_option,
    add_hardware_options,
    add_runs_argument,
    add_vote_option,
    add_vote_options,
    command,
    pick,
    positive_int,
)

VOTING = ("vote", "prefer", "weights")  # add_vote_options, handed on as they are
TTA_HELP = "average flipped (and shifted) views"


def _eval(args: argparse.Namespace) -> int:
    """accuracy, per-class scores and confusion of runs on a dataset

    Evaluate RUN (a run folder or checkpoint) on an imported dataset or an image folder.
    Several runs, or an ensemble folder (imgclf train A B, --seeds N): each member's
    scores and each vote's. Classes are matched by name. Also top-5 accuracy (more than 5
    classes) and the expected calibration error (15 bins), with a reliability diagram
    drawn into the run folder (eval_reliability.png; --out-dir to put it elsewhere).
    """
    from imgclf.evaluate.runs import evaluate, reliability_path
    from imgclf.runtime.ensemble_file import is_ensemble_dir

    if len(args.runs) > 1 or is_ensemble_dir(args.runs[0]):  # members' and the vote's scores
        return _eval_ensemble(args)
    run = args.runs[0]
    image = reliability_path(run, args.out_dir)
    options = pick(args, "split", "tta", "batch_size", "device")
    metrics = evaluate(run, args.data, reliability_png=image, **options)
    drawn = str(image) if image is not None else None
    if args.json:
        print(json.dumps({"run": run, **metrics.to_dict(), "reliability_image": drawn}))
    else:
        print_metrics(run, metrics)
        unwritable = "not drawn (the run folder is read-only; --out-dir DIR draws it there)"
        print(f"reliability diagram: {drawn or unwritable}")
    return 0


def _eval_ensemble(args: argparse.Namespace) -> int:
    from imgclf.evaluate.compare import compare_runs
    from imgclf.io_utils import check_output_file

    image = Path(args.out_dir or ".") / "ensemble_confusion.png"
    check_output_file(image, "--out-dir")  # before the runs are scored
    options = pick(args, "split", *VOTING, "tta", "batch_size", "device")
    comparison = compare_runs(args.runs, args.data, **options)
    comparison.plot(image)
    if args.json:
        print(json.dumps({**comparison.to_dict(), "confusion_image": str(image)}))
    else:
        print(comparison.table())
        print(f"best model and {comparison.vote} vote, side by side: {image}")
    return 0


def print_metrics(run: str, metrics) -> None:
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
    # after the table, whose lines scripts may count
    top5 = metrics.top5_accuracy
    top5 = f"top-5 accuracy {top5:.4f}  " if top5 is not None else ""
    if metrics.calibration is not None:
        bins = metrics.calibration.bins
        print(f"{top5}expected calibration error {metrics.ece:.4f} ({bins} bins)")
    free = getattr(metrics, "duplicate_free", None)
    if free:
        acc = "n/a" if free["accuracy"] is None else f"{free['accuracy']:.4f}"
        print(
            f"{free['with_train_duplicate']} images have a near duplicate in train: accuracy "
            f"{metrics.accuracy:.4f} on all {metrics.count}, {acc} on the {free['count']} without"
        )


def _add_split_option(p: argparse.ArgumentParser, what: str) -> None:
    default = "default: test if present, else val, else all"
    p.add_argument("--split", choices=["train", "val", "test", "all"], help=f"{what} ({default})")


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "eval", _eval)
    add_runs_argument(p)
    p.add_argument("--data", required=True, help="dataset name, cache folder, or image folder")
    _add_split_option(p, "split to score")
    p.add_argument("--tta", action="store_true", help=TTA_HELP)
    p.add_argument("--batch-size", type=positive_int, default=512, metavar="N")
    add_hardware_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_vote_options(p)
    where = "where the plots go: one run's eval_reliability.png (default: its run folder), "
    where += "several runs' ensemble_confusion.png (default: here)"
    p.add_argument("--out-dir", metavar="DIR", help=where)


def _predict(args: argparse.Namespace) -> int:
    """label every image in a folder, archive or list with one run or a vote

    Write one CSV row per image file under PATH (a folder, searched recursively; a
    .tar/.tar.gz/.tgz/.zip archive; or a text file listing image paths relative to it), in
    natural filename order. Columns: file,label,confidence (+ label_K,confidence_K for
    the next classes with --top-k, label_<run> per run when several, prob_<class> per
    class with --probs) and error (why a file could not be read; empty otherwise). Scores
    are the vote's: the mean (soft) or weighted mean probability, or for a hard vote of
    several runs the share of runs voting each class (--probs is refused there). --format
    kaggle writes id,label with the file stem as id; --format jsonl (or an --out ending in
    .jsonl) one JSON object per file, in the same order. A name a spreadsheet would run as
    a formula (one beginning with =, +, -, @, tab or CR) is written with a ' in front;
    --csv-raw writes names as they are, for programs that read the CSV.
    """
    from imgclf.predict import default_output, predict
    from imgclf.runtime.distributed import from_env

    options = pick(args, *VOTING, "tta", "format", "top_k", "probs", "batch_size", "backend")
    out = args.out or default_output(args.format)
    result = predict(args.runs, args.input, out, **options, **pick(args, "device", "csv_raw"))
    if not from_env().is_main:  # under torchrun, rank 0 wrote the CSV and reports it
        return 0
    print(result.summary())
    if args.strict and result.failures:
        print(f"error: {result.failures} files could not be read (--strict)", file=sys.stderr)
        return 1
    return 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "predict", _predict)
    add_runs_argument(p)
    p.add_argument("--input", required=True, metavar="PATH", help="folder, archive or list")
    where = "file to write (predictions.csv; predictions.jsonl with --format jsonl)"
    p.add_argument("--out", help=where)
    add_vote_options(p)
    p.add_argument("--tta", action="store_true", help=TTA_HELP)
    formats = "default (CSV), kaggle (CSV id,label) or jsonl (default: jsonl for an --out "
    formats += "ending in .jsonl, else default)"
    p.add_argument("--format", choices=["default", "kaggle", "jsonl"], help=formats)
    # A plain int: 0 or more than the classes is the library's one-line error, not usage
    ranked = "also write the next K-1 classes by score: label_2,confidence_2,... (1)"
    p.add_argument("--top-k", type=int, default=1, metavar="K", help=ranked)
    p.add_argument("--probs", action="store_true", help="a prob_<class> column per class")
    p.add_argument("--batch-size", type=positive_int, default=256, metavar="N")
    p.add_argument("--strict", action="store_true", help="exit 1 when any file could not be read")
    raw = "write names as they are: no ' before a name a spreadsheet would run as a formula"
    p.add_argument("--csv-raw", action="store_true", help=raw)
    add_backend_option(p)
    add_hardware_options(p)


def _report(args: argparse.Namespace) -> int:
    """one self-contained HTML (or Markdown) report of runs

    Report RUN_OR_DIR (a run folder, or a folder of run folders): per run its recipe,
    stages, curves, confusion matrix and per-class scores; then a comparison table and,
    with --data, the ensemble of all runs on that data. HTML embeds every image; --format
    md writes PNGs into <out>_files/ beside it.
    """
    from imgclf.report import build_report

    ensemble = pick(args, "data", "split", "vote") if args.data else None
    report = build_report(args.paths, args.out, format=args.format, ensemble=ensemble)
    n = len(report.runs)
    print(f"report of {n} run{'s' if n != 1 else ''}: {report.path}")
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "report", _report)
    p.add_argument("paths", nargs="+", metavar="RUN_OR_DIR")
    p.add_argument("--out", default=None, help="report file (report.html or report.md)")
    formats = "html or md (default: from --out's suffix, else html)"
    p.add_argument("--format", choices=["html", "md"], default=None, help=formats)
    p.add_argument("--data", help="dataset to score the ensemble of all runs on")
    _add_split_option(p, "split for the ensemble")
    add_vote_option(p, help="the ensemble's vote (default: an ensemble folder's own, else hard)")
