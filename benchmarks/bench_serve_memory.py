"""The server's memory under large-pixel uploads, and small images' latency meanwhile.

Starts ``imgclf serve`` (the real CLI, its default limits unless ``--serve-args`` says
otherwise) on 127.0.0.1 with one untrained `fast` checkpoint, in a child process whose
peak RSS is read from /proc (VmHWM, Linux). Then:

1. unloaded: ``--small`` sequential requests of a 32×32 PNG → p50/p99 latency;
2. loaded: ``--concurrency`` clients post large PNGs for ``--seconds`` — one colour, so a
   9000×9000 one (81 MP: over the default --max-pixels, refused from its header) is 80 KB
   and a 6300×6300 one (39.7 MP: accepted, decoded through the pixel budget) 40 KB —
   alternating, while one client keeps timing 32×32 requests.

Prints the server's peak RSS, the large requests' answers by status, and the small
requests' p50/p99 unloaded and loaded. Targets with the defaults (issue #31): peak under
1.5 GiB at any concurrency, loaded small p99 within 2× of unloaded.

    python benchmarks/bench_serve_memory.py                    # 16 clients, 20 s
    python benchmarks/bench_serve_memory.py --concurrency 64 --seconds 30
    python benchmarks/bench_serve_memory.py --serve-args "--max-pixels 20000000"
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench_serve import fast_checkpoint  # beside this script


def png(side: int, colour=(90, 30, 160)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, "PNG")
    return buf.getvalue()


def peak_rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def start_server(run: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "imgclf", "serve", str(run), "--port", "0", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    err = open(os.environ.get("BENCH_SERVER_LOG", os.devnull), "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    line = proc.stdout.readline()
    if " at " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    # Drain its access log: a full pipe would block the server's event loop.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, line.split(" at ", 1)[1].split("/  ", 1)[0]


def small_latencies(
    url: str, data: bytes, n: int | None, stop: threading.Event, refused: Counter | None = None
) -> list[float]:
    """Milliseconds of each 200 answer; other answers are counted in ``refused``."""
    out: list[float] = []
    with httpx.Client(base_url=url, timeout=60) as http:
        while (n is None and not stop.is_set()) or (n is not None and len(out) < n):
            t0 = time.perf_counter()
            r = http.post("/predict", files={"file": ("small.png", data)})
            if r.status_code == 200:
                out.append(1000 * (time.perf_counter() - t0))
            elif refused is not None:
                refused[r.status_code] += 1
    return out


def flood(url: str, images: list[bytes], stop: threading.Event, answers: Counter) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        i = 0
        while not stop.is_set():
            try:
                r = http.post("/predict", files={"file": ("large.png", images[i % 2])})
                answers[r.status_code] += 1
            except httpx.HTTPError as exc:
                answers[type(exc).__name__] += 1
            i += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--small", type=int, default=100, help="unloaded small requests")
    parser.add_argument("--serve-args", default="", help="more `imgclf serve` options")
    args = parser.parse_args()
    small = png(32)
    large = [png(9000), png(6300)]
    print(
        f"large PNGs: 9000×9000 {len(large[0]) // 1024} KiB, 6300×6300 {len(large[1]) // 1024} KiB"
    )
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(fast_checkpoint(Path(tmp)), shlex.split(args.serve_args))
        try:
            stop = threading.Event()
            small_latencies(url, small, 10, stop)  # warm up
            rss, _ = peak_rss_mib(proc.pid)
            idle = small_latencies(url, small, args.small, stop)
            answers: Counter = Counter()
            clients = [
                threading.Thread(target=flood, args=(url, large, stop, answers))
                for _ in range(args.concurrency)
            ]
            for t in clients:
                t.start()
            loaded: list[float] = []
            refused: Counter = Counter()
            timer = threading.Thread(
                target=lambda: loaded.extend(small_latencies(url, small, None, stop, refused))
            )
            timer.start()
            time.sleep(args.seconds)
            stop.set()
            for t in [*clients, timer]:
                t.join()
            _, peak = peak_rss_mib(proc.pid)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    print(f"server RSS after start {rss:.0f} MiB, peak {peak:.0f} MiB ({peak / 1024:.2f} GiB)")
    print(f"large requests from {args.concurrency} clients in {args.seconds:g} s: {dict(answers)}")
    print(f"small 32×32, unloaded: {_latency(idle)}")
    print(f"small 32×32, loaded:   {_latency(loaded)}, not answered 200: {dict(refused)}")


def _latency(ms: list[float]) -> str:
    if not ms:
        return "no answers"
    p50, p99 = np.percentile(ms, [50, 99])
    return f"{len(ms)} requests, p50 {p50:.1f} ms, p99 {p99:.1f} ms"


if __name__ == "__main__":
    main()
