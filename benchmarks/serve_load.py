"""A bounded load test for ``imgclf serve``: N requests from C concurrent clients.

Loopback only (the server must be this machine's: 127.0.0.0/8 or ::1), a fixed number of
requests and a time cap, so it always stops by itself. Used by benchmarks/bench_serve.py
and the slow test in tests/test_serve.py (which puts this folder on ``sys.path``); not
part of the package, which nothing of it needs.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np


@dataclass
class LoadResult:
    requests: int
    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> str:
        return (
            f"{len(self.latencies_ms)} of {self.requests} requests from {self.clients} clients "
            f"in {self.seconds:.1f} s: {self.requests_per_second:.1f} req/s, "
            f"p50 {self.percentile(50):.1f} ms, p99 {self.percentile(99):.1f} ms, "
            f"{len(self.errors)} errors"
        )


def _loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"load tests target this machine only (127.0.0.0/8, ::1), not {host!r}")


def load_test(
    url: str,
    images: Sequence[tuple[str, bytes]],
    *,
    requests: int = 500,
    clients: int = 8,
    time_limit: float = 300.0,
) -> LoadResult:
    """POST ``requests`` images (cycling through ``images``) to ``url``/predict from
    ``clients`` threads; stops after ``time_limit`` seconds whatever is left."""
    import httpx

    _loopback(url)
    result = LoadResult(requests, clients, 0.0)
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, data = images[i % len(images)]
                t0 = time.perf_counter()
                try:
                    r = http.post("/predict", files={"file": (name, data)})
                    ok = r.status_code == 200
                    why = f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, why = False, f"{type(exc).__name__}: {exc}"
                ms = 1000 * (time.perf_counter() - t0)
                with lock:
                    if ok:
                        result.latencies_ms.append(ms)
                    else:
                        result.errors.append(why)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - started
    return result
