"""imgclf serve: the API, its errors, predict parity, concurrency, the page in Chromium."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CHROMIUM_FLAGS
from helpers_predictions import close
from helpers_runs import session_runs
from imgclf.predict import predict
from imgclf.serve import Predictor, create_app, start_in_thread

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

# The load generator is a benchmark tool (benchmarks/serve_load.py), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_load import load_test  # noqa: E402

CLASSES = ["bird", "cat", "dog"]


def _client(app) -> TestClient:
    # The app serves the Host names of its bound address (127.0.0.1 by default), not the
    # test client's default "testserver".
    return TestClient(app, base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return session_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def single(trained):
    with _client(create_app(Predictor([trained.run32], max_bytes=200_000))) as client:
        yield client


@pytest.fixture(scope="module")
def ensemble(trained):
    runs = [trained.run32, trained.run16, trained.swapped]
    with _client(create_app(Predictor(runs, vote="hard"))) as client:
        yield client


def _files(trained, n: int = 6) -> list[Path]:
    return sorted(trained.src.rglob("*.png"))[:n]


def _png(size=(32, 32), colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _predict_csv(runs, src, out, **kw) -> dict[str, dict[str, str]]:
    predict(runs, src, out, **kw)
    rows = csv.DictReader(Path(out).read_text().splitlines())
    return {row["file"]: row for row in rows}


def test_health_and_info(single):
    assert single.get("/health").json() == {"status": "ok"}
    info = single.get("/info").json()
    assert info["classes"] == CLASSES and info["input_size"] == [32]
    assert info["runs"][0]["name"] == "run32" and info["runs"][0]["source_size"] == [32, 32]
    assert info["backend"] in ("torch", "onnx") and info["max_bytes"] == 200_000


def test_same_answer_as_predict_multipart_and_raw(single, trained, tmp_path):
    expected = _predict_csv([trained.run32], trained.src, tmp_path / "p.csv")
    files = _files(trained)
    r = single.post("/predict", files=[("file", (f.name, f.read_bytes())) for f in files])
    assert r.status_code == 200
    got = r.json()["predictions"]
    assert len(got) == len(files)
    for f, p in zip(files, got, strict=True):
        row = expected[f.relative_to(trained.src).as_posix()]
        assert p["file"] == f.name and p["label"] == row["label"]
        assert close(p["confidence"], float(row["confidence"]))  # helpers_predictions
        assert len(p["top"]) == 3 and p["top"][0]["label"] == p["label"]
        assert "models" not in p
    raw = single.post("/predict", content=files[0].read_bytes())
    assert raw.json()["predictions"][0]["label"] == got[0]["label"]


def test_ensemble_gives_each_members_vote(ensemble, trained, tmp_path):
    runs = [trained.run32, trained.run16, trained.swapped]
    expected = _predict_csv(runs, trained.src, tmp_path / "p.csv", vote="hard")
    for f in _files(trained, 9)[::3]:
        p = ensemble.post("/predict", files={"file": (f.name, f.read_bytes())}).json()
        p = p["predictions"][0]
        row = expected[f.relative_to(trained.src).as_posix()]
        assert p["label"] == row["label"]
        assert {m["run"]: m["label"] for m in p["models"]} == {
            "run32": row["label_run32"],
            "run16": row["label_run16"],
            "swapped": row["label_swapped"],
        }


def test_bad_input_is_a_4xx_json_error_and_the_server_keeps_serving(single, monkeypatch):
    r = single.post("/predict", files={"file": ("notes.txt", b"hello, not an image")})
    assert r.status_code == 415 and r.json()["error"].startswith("notes.txt: not an image")
    r = single.post("/predict", files={"file": ("big.png", b"x" * 200_001)})
    assert r.status_code == 413 and "200000-byte limit" in r.json()["error"]
    r = single.post("/predict", content=b"x" * 200_001)
    assert r.status_code == 413
    r = single.post("/predict", files={"file": ("empty.png", b"")})
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = single.post("/predict", data={"other": "1"}, files={"x": ("a.png", _png())})
    assert r.status_code == 400 and "field 'file'" in r.json()["error"]
    assert single.post("/predict", content=b"").status_code == 400
    # a decompression bomb: more pixels than Pillow's limit (lowered here to keep it small)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    r = single.post("/predict", files={"file": ("bomb.png", _png((64, 64)))})
    assert r.status_code == 413 and "decompression-bomb" in r.json()["error"]
    monkeypatch.undo()
    assert single.get("/health").status_code == 200
    ok = single.post("/predict", files={"file": ("fine.png", _png())})
    assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] in CLASSES


def test_onnx_backend_serves_the_same_labels(trained, single):
    files = _files(trained)
    payload = [("file", (f.name, f.read_bytes())) for f in files]
    with _client(create_app(Predictor([trained.run32], backend="onnx"))) as onnx:
        assert onnx.get("/info").json()["backend"] == "onnx"
        got = onnx.post("/predict", files=payload).json()["predictions"]
    want = single.post("/predict", files=payload).json()["predictions"]
    assert [p["label"] for p in got] == [p["label"] for p in want]
    for a, b in zip(got, want, strict=True):
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)


def test_concurrent_clients_on_a_real_server(trained):
    import httpx

    running = start_in_thread(create_app(Predictor([trained.run32, trained.run16], vote="soft")))
    try:
        data = _files(trained, 1)[0].read_bytes()

        def one(_: int) -> int:
            r = httpx.post(f"{running.url}/predict", files={"file": ("a.png", data)}, timeout=60)
            return r.status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(40)))
        assert codes == [200] * 40
    finally:
        running.stop()


@pytest.mark.slow
def test_load_500_requests_from_8_clients(trained):
    """The bounded load test of docs/benchmarks.md (benchmarks/bench_serve.py)."""
    running = start_in_thread(create_app(Predictor([trained.run32])))
    try:
        images = [(f.name, f.read_bytes()) for f in _files(trained, 20)]
        result = load_test(running.url, images, requests=500, clients=8, time_limit=240)
    finally:
        running.stop()
    print(result.summary())
    assert result.errors == [] and len(result.latencies_ms) == 500


def test_load_test_refuses_other_hosts():
    with pytest.raises(ValueError, match="this machine only"):
        load_test("http://192.168.1.10:8000", [("a", b"")], requests=1)


# ---------------------------------------------------------------------------- a browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """Chromium driven over --remote-debugging-pipe (fd 3: commands in, fd 4: replies
    out, NUL-separated JSON): the DevTools protocol with nothing to install."""

    def __init__(self, chromium: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends at the fds Chromium reads
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [
                chromium,
                *CHROMIUM_FLAGS,
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=fds,
            close_fds=False,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next = 0
        self.session: str | None = None

    def call(self, method: str, timeout: float = 30, **params):
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise TimeoutError(method)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(expression)

    def close(self) -> None:
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.mark.skipif(_chromium() is None, reason="Chromium not installed (apt-get install chromium)")
def test_page_in_headless_chromium_shows_the_apis_label(trained, tmp_path):
    runs = [trained.run32, trained.run16, trained.swapped]
    app = create_app(Predictor(runs, vote="soft"))
    running = start_in_thread(app)
    image = tmp_path / "upload.png"
    image.write_bytes(_files(trained, 1)[0].read_bytes())
    browser = DevTools(_chromium(), tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        attached = browser.call("Target.attachToTarget", targetId=target, flatten=True)
        browser.session = attached["sessionId"]
        browser.call("Page.navigate", url=f"{running.url}/")
        browser.wait_for("document.body && document.body.dataset.ready === 'true'")
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(image)])
        shown = browser.wait_for(
            "(document.querySelector('.card[data-label]') || {dataset: {}}).dataset.label"
            " || (document.querySelector('.card[data-error]') || {dataset: {}}).dataset.error"
        )
        votes = browser.evaluate("document.querySelector('.votes').textContent")
        bars = browser.evaluate("document.querySelectorAll('.card .bar').length")
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            width=900,
            height=700,
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = browser.call("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "page.png").write_bytes(base64.b64decode(shot))
    finally:
        browser.close()
        running.stop()
    with _client(app) as client:
        answer = client.post("/predict", files={"file": ("upload.png", image.read_bytes())})
    assert shown == answer.json()["predictions"][0]["label"]
    assert bars == 3 and all(name in votes for name in ("run32", "run16", "swapped"))
    with Image.open(tmp_path / "page.png") as im:
        assert im.size == (900, 700)
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # not a blank page
