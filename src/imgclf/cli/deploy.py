"""`imgclf export` and `imgclf serve`."""

from __future__ import annotations

import argparse

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
    on the run's validation images.
    """
    from imgclf.export import export

    options = pick(args, "format", "opset", "dynamic_batch", "vote", "weights")
    print(export(args.runs, args.out, **options).summary())
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "export", _export)
    add_runs_argument(p)
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    where = "file to write (default RUN/model.onnx; ./ensemble-VOTE.onnx for several)"
    p.add_argument("--out", help=where)
    p.add_argument("--opset", type=positive_int, default=18, metavar="N", help="ONNX opset (18)")
    batch = "any batch size (default: batches of 1)"
    p.add_argument("--dynamic-batch", action="store_true", help=batch)
    combine = "how runs combine: soft or weighted (one graph averages probabilities)"
    add_vote_option(p, "soft", combine)
    add_weights_option(p)


def _serve(args: argparse.Namespace) -> int:
    """HTTP server: POST /predict, GET /health, /info, and a web page at /

    Serve RUN (or the vote of several runs) over HTTP: POST /predict with images as
    multipart field `file` (repeatable) or a raw body; GET / is a page to drop images on.
    Same preprocessing as `imgclf predict`.
    """
    from imgclf.serve import serve

    names = ("host", "port", "vote", "prefer", "weights", "backend", "max_bytes", "top_k")
    serve(args.runs, **pick(args, *names))
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
    add_hardware_options(p, device=False)
