"""`imgclf export` and `imgclf serve`."""

from __future__ import annotations

import argparse
import math

from imgclf.cli.options import (
    add_backend_option,
    add_hardware_options,
    add_runs_argument,
    add_vote_option,
    add_vote_options,
    add_weights_option,
    command,
    pick,
    port_number,
    positive_int,
)


def _export(args: argparse.Namespace) -> int:
    """write a run (or a soft vote of runs) as ONNX or TorchScript, verified

    Export RUN as one model file whose input is the run's preprocessed image tensor
    (N×3×H×W float32, normalized); class names, sizes, mean/std and the preprocessing go
    into its metadata. Several runs: one graph averaging their probabilities (--vote soft
    or weighted). The file is written only after its outputs equal PyTorch's within 1e-4
    on the run's validation images. --int8: a statically quantized ONNX model
    (RUN/model.int8.onnx), calibrated on the run's training images and written only where
    its labels agree with the float model's on --min-agreement of the validation images.
    """
    if args.int8:
        return _export_int8(args)
    from imgclf.export import export

    options = pick(args, "format", "opset", "dynamic_batch", "vote", "weights")
    print(export(args.runs, args.out, **options).summary())
    return 0


def _export_int8(args: argparse.Namespace) -> int:
    from imgclf.errors import ExportError
    from imgclf.export_int8 import export_int8

    if args.format != "onnx":
        raise ExportError(f"--int8 writes an ONNX model; drop --format {args.format}")
    if len(args.runs) > 1:
        raise ExportError("--int8 quantizes one run; export each run of a vote separately")
    options = pick(args, "opset", "dynamic_batch", "calibration_images")
    options["min_agreement"] = args.min_agreement / 100
    print(export_int8(args.runs[0], args.out, **options).summary())
    return 0


def percentage(text: str) -> float:
    """A percentage, 0 to 100."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0 <= value <= 100):
        raise argparse.ArgumentTypeError(f"{text!r}: give a percentage, 0 to 100")
    return value


def add_export(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "export", _export)
    add_runs_argument(p)
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    where = "file to write (default RUN/model.onnx; ./ensemble-VOTE.onnx for several)"
    p.add_argument("--out", help=where)
    p.add_argument("--opset", type=positive_int, default=18, metavar="N", help="ONNX opset (18)")
    batch = "any batch size (default: batches of 1)"
    p.add_argument("--dynamic-batch", action="store_true", help=batch)
    combine = "how runs combine: soft or weighted (one graph averages probabilities; "
    combine += "default: an ensemble folder's own vote, else soft)"
    add_vote_option(p, "soft", combine)
    add_weights_option(p)
    int8 = "a statically quantized int8 ONNX model (default file RUN/model.int8.onnx)"
    p.add_argument("--int8", action="store_true", help=int8)
    calib = "--int8: training images to calibrate on (256)"
    p.add_argument("--calibration-images", type=positive_int, default=256, metavar="N", help=calib)
    agree = (
        "--int8: least share of validation images, in percent, whose top-1 label the int8 "
        "model must share with the float one, else nothing is written (90; 0 writes it anyway)"
    )
    p.add_argument("--min-agreement", type=percentage, default=90.0, metavar="PCT", help=agree)


def seconds(text: str) -> float:
    """A timeout: a positive number of seconds, at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and 0 < value <= 86400):
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds above 0, at most 86400")
    return value


def _serve(args: argparse.Namespace) -> int:
    """HTTP server: POST /predict, GET /health, /info, and a web page at /

    Serve RUN (or the vote of several runs) over HTTP: POST /predict with images as
    multipart field `file` (repeatable) or a raw body; GET / is a page to drop images on.
    Same preprocessing as `imgclf predict`. Only requests whose Host names this server
    are answered (DNS rebinding), cross-origin POSTs only with --cors.
    """
    from imgclf.serve import serve

    names = ("host", "port", "vote", "prefer", "weights", "backend", "max_bytes", "top_k")
    limits = ("max_pixels", "decode_pixels", "header_timeout", "body_timeout", "max_connections")
    options = pick(args, *names, *limits, "docs")
    options["allowed_hosts"] = tuple(args.allowed_hosts)
    options["cors"] = tuple(args.cors)
    serve(args.runs, **options)
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "serve", _serve)
    add_runs_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="port (8000; 0 picks a free one)")
    add_vote_options(p)
    add_backend_option(p)
    largest = "largest accepted upload, per image (20 MiB)"
    p.add_argument("--max-bytes", type=positive_int, default=20 << 20, metavar="N", help=largest)
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K", help="classes (5)")
    _add_limits(p)
    add_hardware_options(p, device=False)


def _add_limits(p: argparse.ArgumentParser) -> None:
    n = "N"
    most = "largest accepted image in pixels, width × height (40,000,000); larger: 413"
    p.add_argument("--max-pixels", type=positive_int, default=40_000_000, metavar=n, help=most)
    budget = "pixels decoded at once over all requests (--max-pixels + 8,000,000); waits, 503"
    p.add_argument("--decode-pixels", type=positive_int, metavar=n, help=budget)
    hosts = "another name clients may use for this server (Host header); repeatable"
    p.add_argument("--allowed-hosts", action="append", default=[], metavar="NAME", help=hosts)
    cors = "a web origin allowed to POST from its pages, e.g. https://app.example; repeatable"
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN", help=cors)
    p.add_argument("--docs", action="store_true", help="serve /docs (loads scripts from a CDN)")
    header = "seconds a connection has to send its request headers (10)"
    p.add_argument("--header-timeout", type=seconds, default=10.0, metavar="S", help=header)
    body = "seconds a request has to send its body (60); then 408"
    p.add_argument("--body-timeout", type=seconds, default=60.0, metavar="S", help=body)
    conns = "open connections at most (64); more get a 503"
    p.add_argument("--max-connections", type=positive_int, default=64, metavar=n, help=conns)
