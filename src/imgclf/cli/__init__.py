"""Command line: parses arguments and calls library functions, nothing else.

User mistakes (:class:`imgclf.errors.UserError`) print one ``error: ...`` line and exit
with the error's code (2), without a traceback. Heavy modules (torch) are imported inside
the commands so ``imgclf --help`` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
from collections.abc import Callable, Sequence

from imgclf import __version__
from imgclf.cli.data import add_data, add_models, add_recipes
from imgclf.cli.deploy import add_export, add_serve
from imgclf.cli.options import apply_threads
from imgclf.cli.results import add_eval, add_predict, add_report
from imgclf.cli.training import add_demo, add_train
from imgclf.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    """The ``imgclf`` argument parser: one subcommand per entry of :data:`COMMANDS`."""
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
    add_data,
    add_models,
    add_recipes,
    add_train,
    add_eval,
    add_predict,
    add_report,
    add_demo,
    add_export,
    add_serve,
]


# Allocations between two collections of the youngest generation (Python's default: 700).
# Importing torch, timm and the rest for a training run makes ~460,000 objects, and at the
# default the collector made 7 full passes over them before the first epoch: 0.5-0.9 s of
# a 250-photo run on a 2-core CPU, none at 20,000 (docs/results.md, issue #30). Cyclic
# garbage is still collected, 20,000 allocations at a time.
GC_YOUNG = 20_000


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line (``sys.argv[1:]`` by default); returns the exit code. A user
    mistake is one ``error:`` line and its code (2), never a traceback."""
    args = build_parser().parse_args(argv)
    # The command line as given: what `train --nproc-per-node N` hands to torchrun.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        apply_threads(args)
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
    output is flushed, skipping the interpreter's shutdown, where a Gloo worker thread that
    DistributedDataParallel keeps alive could abort the process (SIGABRT) and fail the
    whole job (pytorch/pytorch PR 179291; how it was found and counted: docs/results.md,
    "Why a torchrun worker exits with os._exit"). Every file is closed by then.

    Any other process exits normally (its threads joined, atexit, every module cleared)
    but with its objects frozen (``gc.freeze``): the cycle collector's passes over the
    ~460,000 objects that torch, timm and ONNX Runtime leave took 0.8-1.2 s of a training
    run's exit on a 2-core CPU, against 0.3-0.4 s without them (docs/results.md, issue
    #30). Frozen objects in reference cycles are then left to the process's end, not
    finalized: every file a command writes is closed (or written atomically) by then.

    The cycle collector also runs less often while the process lives (:data:`GC_YOUNG`)."""
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
    code = main()
    if _torchrun_worker():
        for stream in (sys.stdout, sys.stderr):
            # A reader gone (BrokenPipeError) or a closed stream: nothing left to save.
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        logging.shutdown()
        os._exit(code)
    gc.freeze()
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
