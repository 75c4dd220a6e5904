"""imgclf serve against hostile clients (issue #31, items 1-4): pixels, bytes while
streaming, Host/Origin/CORS/docs, stalled and vanishing clients. Servers on 127.0.0.1 only,
a handful of requests each, timeouts of a second or less."""

from __future__ import annotations

import io
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from helpers_runs import session_runs
from imgclf.serve import Predictor, create_app, start_in_thread
from imgclf.serve.options import ServeOptions

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def run32(tmp_path_factory):
    return session_runs(tmp_path_factory).run32


def _png(size=(32, 32), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 0).save(buf, "PNG")  # one colour: compresses to a few KB
    return buf.getvalue()


def _client(app, host="127.0.0.1") -> TestClient:
    return TestClient(app, base_url=f"http://{host}")


def _post_file(url: str, data: bytes, name: str = "a.png", **kw) -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"file": (name, data)}, timeout=30, **kw)


# ---------------------------------------------------------------- item 1: pixels


def test_an_image_over_max_pixels_is_a_413_before_any_decoding(run32, monkeypatch):
    from PIL import ImageFile

    loads = []  # Pillow decodes a whole PNG to look for its EXIF: the check must not
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: loads.append(im) or real_load(im))
    predictor = Predictor([run32])
    decoded = []
    real = predictor.decode
    predictor.decode = lambda files: decoded.append(files) or real(files)
    app = create_app(predictor, ServeOptions(max_pixels=1_000_000))
    with _client(app) as client:
        r = client.post("/predict", files={"file": ("wide.png", _png((2000, 1000), "L"))})
        assert r.status_code == 413
        assert r.json()["error"] == (
            "wide.png: 2000×1000 is 2,000,000 pixels, over the 1,000,000-pixel limit (--max-pixels)"
        )
        assert decoded == [] and loads == []  # refused from the header alone
        ok = client.post("/predict", files={"file": ("square.png", _png((1000, 1000)))})
        assert ok.status_code == 200 and len(decoded) == 1
        assert client.get("/info").json()["max_pixels"] == 1_000_000


def test_decodes_share_a_pixel_budget_small_images_pass_large_ones_wait_then_503(run32):
    """Budget 1,000,000 + room: one 1000×1000 decode at a time (made slow here); a second
    waits 0.3 s and gets a 503, a 32×32 image passes meanwhile."""
    predictor = Predictor([run32])
    real = predictor.decode

    def slow_for_large(files):
        if len(files[0][1]) > 1000:
            time.sleep(1.5)
        return real(files)

    predictor.decode = slow_for_large
    options = ServeOptions(max_pixels=1_000_000, decode_pixels=1_010_000, decode_wait=0.3)
    running = start_in_thread(create_app(predictor, options))
    large = _png((1000, 1000), "RGB") + b"\0" * 2000  # trailing bytes: the "large" marker
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_post_file, running.url, large, "first.png")
            time.sleep(0.4)  # the first holds the budget now
            second = pool.submit(_post_file, running.url, large, "second.png")
            t0 = time.perf_counter()
            small = _post_file(running.url, _png(), "small.png")
            small_s = time.perf_counter() - t0
            busy, done = second.result(), first.result()
    finally:
        running.stop()
    assert done.status_code == 200
    assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
    assert busy.json()["error"].startswith("busy: images of 1,000,000 pixels are being decoded")
    assert small.status_code == 200 and small_s < 1.0  # not behind the large one


# ---------------------------------------------------------------- item 2: bytes


def _multipart_head(port: int, length: int, boundary: str = "b0undary") -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {length}\r\n\r\n"
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="huge.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()


def _response(sock: socket.socket, limit: float = 10) -> bytes:
    sock.settimeout(limit)
    out = b""
    try:
        while b"\r\n\r\n" not in out or not out.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def test_max_bytes_stops_a_multipart_part_as_it_streams_nothing_spooled(run32, monkeypatch):
    """A 60 MB part under --max-bytes 1,000,000: the 413 comes after 2 MB were sent, and
    no temporary file is made (Starlette's form parser spooled the whole part first)."""
    import starlette.formparsers

    spooled = []
    monkeypatch.setattr(
        starlette.formparsers,
        "SpooledTemporaryFile",
        lambda *a, **k: spooled.append(1) or __import__("tempfile").SpooledTemporaryFile(),
    )
    running = start_in_thread(create_app(Predictor([run32], max_bytes=1_000_000)))
    port = int(running.url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(_multipart_head(port, 60_000_000))
            sent = 0
            try:
                while sent < 2_000_000:
                    sock.sendall(b"\0" * 65536)
                    sent += 65536
            except (ConnectionResetError, BrokenPipeError):
                # The server answered and closed with our bytes unread (a reset): it stopped
                # reading, as it should. Its answer was sent before the close.
                pass
            answer = _response(sock)
        assert httpx.get(f"{running.url}/health", timeout=10).status_code == 200
    finally:
        running.stop()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"huge.png: larger than the 1000000-byte limit (--max-bytes)" in answer
    assert b"connection: close" in answer.lower()
    assert spooled == []


# ---------------------------------------------------------------- item 3: Host, Origin


def test_host_check_refuses_rebound_names_and_allows_the_bound_ones(run32):
    app = create_app(Predictor([run32]), ServeOptions(allowed_hosts=("imgclf.lan",)))
    with _client(app, "evil.example:8000") as client:
        r = client.get("/health")
    assert r.status_code == 400
    assert r.json()["error"] == (
        "Host 'evil.example:8000' is not an address of this server (allowed: 127.0.0.1, "
        "::1, imgclf.lan, localhost); add a name with --allowed-hosts"
    )
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "imgclf.lan"):
        with _client(app, host) as client:
            assert client.get("/health").status_code == 200, host
    everywhere = create_app(Predictor([run32]), ServeOptions(host="0.0.0.0"))
    with _client(everywhere, "192.168.1.20:8000") as client:  # an IP cannot be rebound
        assert client.get("/health").status_code == 200
    with _client(everywhere, "evil.example") as client:
        assert client.get("/health").status_code == 400


def test_cross_origin_posts_are_refused_unless_cors_names_them(run32):
    png = {"file": ("a.png", _png())}
    with _client(create_app(Predictor([run32]))) as client:
        r = client.post("/predict", files=png, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        assert r.json()["error"] == (
            "cross-origin POST from 'http://evil.example' refused; allow it with --cors ORIGIN"
        )
        same = client.post("/predict", files=png, headers={"Origin": "http://127.0.0.1"})
        assert same.status_code == 200  # the page served at / posts to its own origin
        assert client.post("/predict", files=png).status_code == 200  # curl: no Origin
        assert client.get("/docs").status_code == 404  # the docs load a CDN's scripts
        assert client.get("/openapi.json").status_code == 404
    app = create_app(Predictor([run32]), ServeOptions(cors=("https://app.example",), docs=True))
    with _client(app) as client:
        origin = {"Origin": "https://app.example"}
        r = client.post("/predict", files=png, headers=origin)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        pre = client.options(
            "/predict",
            headers={**origin, "Access-Control-Request-Method": "POST"},
        )
        assert pre.status_code == 200 and "POST" in pre.headers["access-control-allow-methods"]
        evil = client.post("/predict", files=png, headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403
        assert client.get("/docs").status_code == 200


# ---------------------------------------------------------------- item 4: slow clients


def test_stalled_connections_are_closed_and_capped_and_a_slow_body_is_a_408(run32):
    options = ServeOptions(header_timeout=0.5, body_timeout=0.5, max_connections=3)
    running = start_in_thread(create_app(Predictor([run32]), options))
    port = int(running.url.rsplit(":", 1)[1])
    try:
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port)) as extra:
            refused = _response(extra, 5)
        t0 = time.perf_counter()
        closed = [_response(s, 5) for s in stalled]  # b"": the server hung up
        waited = time.perf_counter() - t0
        for s in stalled:
            s.close()
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(_multipart_head(port, 10_000) + b"\0" * 100)  # then nothing
            timed_out = _response(slow, 5)
        assert _post_file(running.url, _png()).status_code == 200
    finally:
        running.stop()
    assert refused.startswith(b"HTTP/1.1 503") and b"(--max-connections)" in refused
    assert closed == [b"", b"", b""] and waited < 2
    assert timed_out.startswith(b"HTTP/1.1 408")
    assert b"the request body took over 0.5 s (--body-timeout)" in timed_out


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_client_leaving_mid_body_is_one_log_line_not_a_traceback(run32):
    running = start_in_thread(create_app(Predictor([run32])))
    port = int(running.url.rsplit(":", 1)[1])
    lines = _Lines()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(lines)
    try:
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(_multipart_head(port, 100_000) + b"\0" * 1000)
                time.sleep(0.2)
        deadline = time.monotonic() + 5
        while len(lines.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        logger.removeHandler(lines)
        running.stop()
    messages = [r.getMessage() for r in lines.records]
    assert len(messages) == 2, messages
    assert all(
        m.endswith("disconnected before its request was read; request dropped") for m in messages
    )
    assert not any(r.exc_info for r in lines.records)
    assert all("\n" not in m for m in messages)


def test_limits_that_cannot_work_are_one_error_line(run32):
    from imgclf.errors import UserError

    with pytest.raises(UserError, match=r"--decode-pixels 10 is below --max-pixels 1000:"):
        create_app(Predictor([run32]), ServeOptions(max_pixels=1000, decode_pixels=10))
    with pytest.raises(UserError, match="above Pillow's decompression-bomb limit"):
        create_app(Predictor([run32]), ServeOptions(max_pixels=10**9))


# ---------------------------------------------------------------- the real CLI


def test_cli_serve_options_reach_the_server_and_a_disconnect_is_one_stderr_line(run32):
    import signal

    from helpers_train import cli_process

    proc = cli_process(
        "serve", str(run32), "--port", "0", "--max-pixels", "2000", "--header-timeout", "1",
        "--allowed-hosts", "imgclf.lan", "--cors", "https://app.example",
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # "serving run32 (...) at http://127.0.0.1:PORT/ ..."
        url = line.split(" at ", 1)[1].split("/  ", 1)[0]
        port = int(url.rsplit(":", 1)[1])
        assert httpx.get(f"{url}/health", headers={"Host": "evil.example"}).status_code == 400
        assert httpx.get(f"{url}/health", headers={"Host": "imgclf.lan"}).status_code == 200
        big = _post_file(url, _png((64, 64)), "big.png")
        assert big.status_code == 413 and "(--max-pixels)" in big.json()["error"]
        cors = _post_file(url, _png(), headers={"Origin": "https://app.example"})
        assert cors.headers["access-control-allow-origin"] == "https://app.example"
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(_multipart_head(port, 100_000) + b"\0" * 1000)
            time.sleep(0.3)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err
    gone = [line for line in err.splitlines() if "disconnected" in line]
    assert len(gone) == 1 and gone[0].endswith("before its request was read; request dropped")


def test_cli_limits_are_checked_before_the_models_load(run32, capsys):
    from imgclf.cli import main

    assert main(["serve", str(run32), "--max-pixels", "100000000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-pixels 100000000 is above Pillow's decompression-bomb")
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(run32), "--header-timeout", "0"])
    assert exit_.value.code == 2 and "give seconds above 0" in capsys.readouterr().err


def test_cli_defaults_are_the_librarys():
    import argparse

    from imgclf.cli.deploy import add_serve
    from imgclf.serve.uploads import DEFAULT_MAX_BYTES

    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    args = parser.parse_args(["serve", "run"])
    default = ServeOptions()
    for name in ("max_pixels", "decode_pixels", "header_timeout", "body_timeout"):
        assert getattr(args, name) == getattr(default, name), name
    assert args.max_connections == default.max_connections and not args.docs
    assert args.max_bytes == DEFAULT_MAX_BYTES


# ---------------------------------------------------------------- large decodes' priority


def test_large_images_decode_on_one_thread_of_lower_priority(run32):
    """A 3000×3000 PNG (9 MP, over LARGE_PIXELS) decodes on the one low-priority thread,
    a small image in the request pool at normal priority; both are answered."""
    import threading

    from imgclf.serve.priority import LARGE_PIXELS, NICE

    app = create_app(Predictor([run32]))
    seen: dict[str, tuple[str, int]] = {}
    decode = app.state.predictor.decode

    def watched(files):
        tid = threading.get_native_id()
        seen[files[0][0]] = (threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, tid))
        return decode(files)

    app.state.predictor.decode = watched
    big, small = _png((3000, 3000)), _png((32, 32))
    assert LARGE_PIXELS < 3000 * 3000
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with _client(app, "127.0.0.1:8000") as client:
        for name, data in (("big.png", big), ("small.png", small)):
            r = client.post("/predict", files={"file": (name, data, "image/png")})
            assert r.status_code == 200, r.text
    name, nice = seen["big.png"]
    assert name.startswith("imgclf-large-decode") and nice == min(base + NICE, 19)
    name, nice = seen["small.png"]
    assert not name.startswith("imgclf-large-decode") and nice == base
