"""`imgclf export` and `imgclf serve`."""

from __future__ import annotations

import argparse

from imgclf.cli.options import (
    add_backend_option,
    add_hardware_options,
    add_vote_option,
    add_vote_options,
    add_weights_option,
    positive_int,
)


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


def add_export(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--opset", type=positive_int, default=18, metavar="N", help="ONNX opset (18)")
    p.add_argument(
        "--dynamic-batch", action="store_true", help="any batch size (default: batches of 1)"
    )
    add_vote_option(
        p, "soft", "how runs combine: soft or weighted (one graph averages probabilities)"
    )
    add_weights_option(p)
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


def add_serve(sub: argparse._SubParsersAction) -> None:
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
    add_vote_options(p)
    add_backend_option(p)
    p.add_argument(
        "--max-bytes",
        type=positive_int,
        default=20 * 1024 * 1024,
        metavar="N",
        help="largest accepted upload, per image (20 MiB)",
    )
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K", help="classes (5)")
    add_hardware_options(p, device=False)
    p.set_defaults(handler=_serve)
