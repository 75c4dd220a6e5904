"""What several commands share, declared once: how a command is declared, option types,
hardware, training length, votes, backend, and handing options on to a library call."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def command(sub: argparse._SubParsersAction, name: str, handler: Handler) -> Any:
    """A subcommand run by ``handler``, whose docstring is its help: the first paragraph
    is the one-line help in ``imgclf --help``, the rest the description (as click does)."""
    doc = inspect.cleandoc(handler.__doc__ or "")
    summary, _, rest = doc.partition("\n\n")
    p = sub.add_parser(name, help=" ".join(summary.split()), description=" ".join(rest.split()))
    p.set_defaults(handler=handler)
    return p


def pick(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """Options handed on to a library function under their own names."""
    return {name: getattr(args, name) for name in names}


RUNS_HELP = (
    "run folder(s), ensemble folder(s) (imgclf train A B, --seeds N: their members, voted "
    "as their ensemble.yaml says), .pt checkpoint(s), or .onnx file(s) written by imgclf export"
)


def add_runs_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help=RUNS_HELP)


# Largest count any option takes: past it a number is a typo, and past 2**63 it ended in
# an OverflowError traceback far from the option (issue #31).
MOST = 2**31 - 1
# Epochs: a 100,000-epoch run is a year of a GPU on CIFAR; more is a typo.
MOST_EPOCHS = 100_000


def whole_number(text: str, least: int, most: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text} must be at least {least}")
    if value > most:
        raise argparse.ArgumentTypeError(f"{text} must be at most {most:,}")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, 1, MOST)


def epochs_count(text: str) -> int:
    return whole_number(text, 1, MOST_EPOCHS)


def port_number(text: str) -> int:
    """A TCP port: 0 (any free one) to 65535."""
    return whole_number(text, 0, 65535)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1)")
    return value


def add_hardware_options(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    """``--device`` and ``--threads`` (main() applies ``--threads`` once, for every
    command, before the command runs)."""
    if device:
        p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument(
        "--threads", type=positive_int, metavar="N", help="CPU threads (default: physical cores)"
    )


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        from imgclf.runtime.device import set_threads

        set_threads(args.threads)


def add_training_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `train` and `demo`: both end in imgclf.train.train."""
    p.add_argument("--out", help="run folder (default runs/<recipe>-<n>)")
    p.add_argument(
        "--epochs", type=epochs_count, metavar="N", help="total epochs, shared among stages"
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
    add_hardware_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")


VOTES = ("hard", "soft", "weighted")


def add_vote_option(p: argparse.ArgumentParser, default: str = "hard", help: str = "") -> None:
    """``--vote``, None when not given: an ensemble folder's own vote (its ensemble.yaml)
    is then used, else ``default`` (the library's)."""
    p.add_argument(
        "--vote",
        choices=VOTES,
        default=None,
        help=help
        or "how several runs combine (hard: majority of top-1 labels; soft: mean "
        f"probability; weighted: weighted mean probability) (default: an ensemble "
        f"folder's own vote, else {default})",
    )


def add_weights_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        nargs="+",
        metavar="RUN:W",
        help="weighted-vote weights, e.g. simple-1:0.5 fast-2:1 (default: each run's "
        "validation accuracy)",
    )


def add_vote_options(p: argparse.ArgumentParser) -> None:
    """``--vote``, ``--prefer`` and ``--weights``: how the runs of eval, predict and serve
    combine."""
    add_vote_option(p)
    p.add_argument(
        "--prefer",
        nargs="+",
        metavar="RUN",
        help="hard-vote tie-break order, by run name (default: the order the runs are given)",
    )
    add_weights_option(p)


def add_backend_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default=None,
        help="run the models in PyTorch, or exported to ONNX under ONNX Runtime "
        "(default: the one measured faster, see docs/benchmarks.md)",
    )
