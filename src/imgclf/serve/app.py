"""The prediction server: ``create_app(Predictor(runs))`` is a FastAPI app.

Why FastAPI on uvicorn: the most used Python async web stack, with JSON errors, a
file-upload parser (python-multipart), an in-process test client, and a production ASGI
server, so nothing here is hand-written HTTP.

A request goes through the very functions ``imgclf predict`` uses (:mod:`imgclf.inference`:
``decode_items`` → :mod:`imgclf.data.preprocess`, ``chunk_probs``, the same vote), so one
file gets one answer through both. Decoding runs in the request's worker thread (Pillow,
simplejpeg and file reads release the GIL); the models run in one thread that takes every
request waiting when it is free and scores them as one batch: simultaneous requests share a
forward pass, and a lone request waits for nothing.

Endpoints: ``POST /predict`` (multipart field ``file``, repeatable, or the raw image as the
body), ``GET /health``, ``GET /info``, ``GET /`` (the page in ``static/index.html``).
Bad input is a 4xx JSON ``{"error": ...}`` naming the file and the problem; the server
keeps serving. Its limits against hostile clients live beside it: uploads.py (bytes, as
they stream), pixels.py (pixels per image and decoded at once), priority.py (large images
decoded on a thread of lower priority), guard.py (Host, Origin, CORS), connections.py
(header deadline, connection cap); options.py holds their values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch

# Module level, not inside create_app: FastAPI reads the handlers' annotations (postponed by
# ``from __future__ import annotations``) from this module's globals.
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from imgclf import __version__
from imgclf.data.preprocess import Preprocess
from imgclf.errors import UserError
from imgclf.inference.decode import Decoded, Item, decode_items, merge
from imgclf.inference.engine import autocast_for, chunk_probs, make_members, source_sizes
from imgclf.inference.rows import Plan, top_k_pairs
from imgclf.inference.runs import check_vote, load_runs
from imgclf.runtime.device import resolve_hardware
from imgclf.runtime.onnx import resolve_backend
from imgclf.serve.connections import guarded_protocol
from imgclf.serve.guard import HostPolicy, protect
from imgclf.serve.options import ServeOptions
from imgclf.serve.pixels import PixelBudget, check_pixels
from imgclf.serve.priority import LARGE_PIXELS, LargeDecodes
from imgclf.serve.uploads import (
    DEFAULT_MAX_BYTES,
    MAX_FILES,
    BadImage,
    ByteBudget,
    receive_uploads,
)

MAX_BATCH = 256  # images per forward pass of the batching thread
log = logging.getLogger("uvicorn.error")  # uvicorn's log: the same format and level


def _status(reason: str) -> int:
    """HTTP status of a decode failure (imgclf.data.decode's reasons)."""
    if "decompression-bomb" in reason:
        return 413  # too large once decoded
    if reason.startswith("not an image"):
        return 415
    return 400  # empty, truncated, corrupt


# ---------------------------------------------------------------------------- model side


class Predictor:
    """The runs, their vote and their preprocessing, ready to answer requests."""

    def __init__(
        self,
        runs: Sequence[str | os.PathLike[str]],
        *,
        vote: str | None = None,
        prefer: Sequence[str] | None = None,
        weights: Mapping[str, float] | Sequence[float] | Sequence[str] | None = None,
        backend: str | None = None,
        top_k: int = 5,
        max_bytes: int = DEFAULT_MAX_BYTES,
        device: str | None = None,
    ) -> None:
        check_vote(vote)
        self.hw = resolve_hardware(device, "auto", "auto")  # as predict: same autocast
        self.backend = resolve_backend(backend, self.hw.device)
        self.rs = load_runs(runs)
        self.plan = Plan.for_runs(self.rs, vote, prefer, weights)
        self.vote = self.plan.vote  # as given, else an ensemble folder's own
        self.top_k = top_k
        self.max_bytes = max_bytes
        self.members = make_members(self.rs, self.hw.device, False, self.backend)
        self.backends = [m.backend for m in self.members]
        if self.backend == "auto":  # say what "auto" chose: one name, or "mixed"
            self.backend = self.backends[0] if len(set(self.backends)) == 1 else "mixed"
        self.autocast = autocast_for(self.hw, self.backend)
        self.sizes = source_sizes(self.members)

    # -- the steps of one request: decode (any thread), score (one thread), answer

    def decode(self, files: Sequence[tuple[str, bytes]]) -> Decoded:
        """Read every upload at every source size; raise :class:`BadImage` on the first
        that cannot be read."""
        decoded = decode_items([Item(name, data=data) for name, data in files], self.sizes)
        for (name, _), reason in zip(files, decoded.reasons, strict=True):
            if reason is not None:
                raise BadImage(_status(reason), f"{name}: {reason}")
        return decoded

    def probs(self, decoded: Decoded, rows: int) -> np.ndarray:
        """(models, rows, classes) probabilities, exactly as ``predict`` computes them."""
        with torch.inference_mode():
            classes = len(self.rs.classes)
            return chunk_probs(self.members, decoded, rows, classes, self.hw.device, self.autocast)

    def answer(self, names: Sequence[str], probs: np.ndarray) -> list[dict[str, Any]]:
        labels, scores = self.plan.decide(probs)  # predict's vote, tie-breaks included
        classes = self.rs.classes
        out = []
        for i, name in enumerate(names):
            top = top_k_pairs(scores[i], classes, self.top_k)
            item: dict[str, Any] = {
                "file": name,
                "label": classes[int(labels[i])],
                "confidence": float(scores[i, labels[i]]),
                "top": [{"label": label, "probability": p} for label, p in top],
            }
            if len(self.rs.runs) > 1:
                item["models"] = [
                    {
                        "run": run,
                        "label": classes[int(probs[m, i].argmax())],
                        "confidence": float(probs[m, i].max()),
                    }
                    for m, run in enumerate(self.rs.names)
                ]
            out.append(item)
        return out

    def info(self) -> dict[str, Any]:
        runs = []
        for lr in self.rs.runs:
            pre = Preprocess.from_state(lr.state)
            runs.append({"name": lr.name, "model": lr.state["model_name"], **pre.to_dict()})
        for run, backend in zip(runs, self.backends, strict=True):
            run["backend"] = backend
        return {
            "imgclf_version": __version__,
            "classes": self.rs.classes,
            "runs": runs,
            "input_size": sorted({r["input_size"] for r in runs}),
            "vote": self.vote if len(runs) > 1 else None,
            "scores": "vote share" if self.vote == "hard" and len(runs) > 1 else "probability",
            "backend": self.backend,
            "top_k": self.top_k,
            "max_bytes": self.max_bytes,
            "max_files": MAX_FILES,
        }


class Batcher:
    """One thread runs the models; requests queue here and are scored together."""

    def __init__(self, predictor: Predictor, max_batch: int = MAX_BATCH) -> None:
        self.predictor = predictor
        self.max_batch = max_batch
        self.queue: queue.Queue[tuple[Decoded, int, Future] | None] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        """Start the model thread (again, after :meth:`close`: an app can be served twice)."""
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.queue = queue.Queue()
                self.thread = threading.Thread(
                    target=self._loop, args=(self.queue,), name="imgclf-model", daemon=True
                )
                self.thread.start()

    def submit(self, decoded: Decoded, rows: int) -> Future:
        self.start()
        future: Future = Future()
        self.queue.put((decoded, rows, future))
        return future

    def close(self) -> None:
        with self.lock:
            self.queue.put(None)
            if self.thread is not None:
                self.thread.join(timeout=30)

    def _loop(self, jobs_in: queue.Queue[tuple[Decoded, int, Future] | None]) -> None:
        while True:
            job = jobs_in.get()
            if job is None:
                return
            jobs, rows = [job], job[1]
            # Whatever queued up while the last batch ran joins this one: no waiting.
            while rows < self.max_batch:
                try:
                    more = jobs_in.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    jobs_in.put(None)
                    break
                jobs.append(more)
                rows += more[1]
            self._run(jobs, rows)

    def _run(self, jobs: list[tuple[Decoded, int, Future]], rows: int) -> None:
        try:
            probs = self.predictor.probs(merge([(d, n) for d, n, _ in jobs]), rows)
        except Exception as exc:  # a bug, not bad input: every waiting request learns it
            for _, _, future in jobs:
                future.set_exception(exc)
            return
        start = 0
        for _, n, future in jobs:
            future.set_result(probs[:, start : start + n])
            start += n


# ---------------------------------------------------------------------------- HTTP side


def _answer_errors(app: FastAPI) -> None:
    """Refusals as JSON; a client gone mid-request as one log line."""

    @app.exception_handler(BadImage)
    async def bad_image(request: Request, exc: BadImage) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status in (408, 411, 413, 503):  # the body may be unread: end the connection
            headers["Connection"] = "close"
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect) -> Response:
        # One line, not starlette's traceback: a client going away is not a server error.
        client = request.client
        who = f"{client.host}:{client.port}" if client else "a client"
        log.warning("%s disconnected before its request was read; request dropped", who)
        return Response(status_code=400)  # sent to no one: uvicorn drops it


def create_app(predictor: Predictor, options: ServeOptions | None = None) -> FastAPI:
    """The app; ``options`` are the limits and the Host/Origin/CORS policy (defaults: a
    server on 127.0.0.1, ``imgclf serve``'s defaults)."""
    options = options or ServeOptions()
    options.check(predictor.max_bytes)
    batcher = Batcher(predictor)
    pixels = PixelBudget(options.decode_budget, options.decode_wait)
    large = LargeDecodes()
    upload_bytes = ByteBudget(options.upload_budget(predictor.max_bytes))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await run_in_threadpool(batcher.close)
        await run_in_threadpool(large.close)

    docs = {} if options.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="imgclf", version=__version__, lifespan=lifespan, **docs)
    protect(app, HostPolicy(options.host, options.allowed_hosts), options.cors)
    page = resources.files("imgclf.serve").joinpath("static/index.html").read_text("utf-8")

    _answer_errors(app)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict[str, Any]:
        return {**predictor.info(), "max_pixels": options.max_pixels}

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        received = receive_uploads(request, predictor.max_bytes, upload_bytes, options.body_timeout)
        async with received as uploads:
            files = [(u.name, u.data) for u in uploads]
            most = await run_in_threadpool(check_pixels, uploads, options.max_pixels)
            async with pixels.hold(most):
                if most > LARGE_PIXELS:  # on a thread of lower priority (serve/priority.py)
                    decoded = await large.run(predictor.decode, files)
                else:
                    decoded = await run_in_threadpool(predictor.decode, files)
        probs = await asyncio.wrap_future(batcher.submit(decoded, len(files)))
        return {
            "predictions": predictor.answer([u.name for u in uploads], probs),
            "milliseconds": round(1000 * (time.perf_counter() - started), 2),
        }

    for name, value in (("predictor", predictor), ("batcher", batcher), ("options", options)):
        setattr(app.state, name, value)
    app.state.pixels, app.state.large_decodes, app.state.upload_bytes = pixels, large, upload_bytes
    return app


# ---------------------------------------------------------------------------- running


def serve(
    runs: Sequence[str | os.PathLike[str]],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **options: Any,
) -> None:
    """Load the runs and serve them until Ctrl-C. ``options``: :class:`Predictor`'s and
    :class:`ServeOptions`' keyword arguments."""
    import uvicorn

    limits = {k: options.pop(k) for k in list(options) if k in ServeOptions.__dataclass_fields__}
    serve_options = ServeOptions(host=host, **limits)
    serve_options.check(options.get("max_bytes", DEFAULT_MAX_BYTES))  # before loading models
    predictor = Predictor(runs, **options)
    app = create_app(predictor, serve_options)
    sock = _bind(host, port)
    where = f"http://{host}:{sock.getsockname()[1]}/"
    what = ", ".join(predictor.rs.names)
    vote = f", {predictor.vote} vote" if len(predictor.rs.runs) > 1 else ""
    print(f"serving {what} ({predictor.backend}{vote}) at {where}  (Ctrl-C stops)", flush=True)
    uvicorn.Server(uvicorn_config(app, log_level)).run(sockets=[sock])


def uvicorn_config(app: FastAPI, log_level: str = "info") -> Any:
    """uvicorn's settings for ``app``: its connection limits (``app.state.options``)."""
    import uvicorn

    options: ServeOptions = app.state.options
    return uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        http=guarded_protocol(options.header_timeout, options.max_connections),
        timeout_keep_alive=5,  # uvicorn's default, said: idle keep-alive connections close
        # Requests in progress, counting those whose client has gone (their task runs on):
        # past this uvicorn answers 503. The protocol caps open connections at one less.
        limit_concurrency=options.max_connections + 1,
    )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(128)
    return sock


@dataclass
class Running:
    """A server started by :func:`start_in_thread` (tests, benchmarks)."""

    url: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_in_thread(app: FastAPI, host: str = "127.0.0.1") -> Running:
    """Serve ``app`` on a free loopback port in a background thread; ``.stop()`` ends it."""
    import uvicorn

    sock = _bind(host, 0)
    server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return Running(f"http://{host}:{sock.getsockname()[1]}", server, thread)
