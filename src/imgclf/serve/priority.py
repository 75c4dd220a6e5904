"""Large images decode on one thread of lower CPU priority, so small ones keep their latency.

On a 2-core machine a 40-megapixel PNG takes a core for about a second to decode. Decoded
in the request thread pool at the same priority as everything else, a stream of them
doubled the p99 latency of small images (benchmarks/bench_serve_memory.py, docs/
benchmarks.md §6). Images above :data:`LARGE_PIXELS` go to one thread whose Linux nice
value is raised (``setpriority(2)`` with a thread id sets that thread alone): the scheduler
gives small images' decodes and the model's thread the CPU first, and large decodes queue
on that thread, one at a time, as :class:`imgclf.serve.pixels.PixelBudget` allows anyway.
Elsewhere (no per-thread nice) the thread runs at normal priority and still serialises.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from imgclf.serve.pixels import SMALL_ROOM

# An image above the room kept for small ones beside the largest (8 MP): a phone's 12-MP
# JPEG decodes at a fraction of its size (DCT scaling) but counts as large here.
LARGE_PIXELS = SMALL_ROOM
# nice +10 over the server's: well below the request threads, not starved (19 is the least).
NICE = 10

T = TypeVar("T")


def _lower_priority(nice: int) -> None:
    """Raise this thread's nice value by ``nice`` (it starts at its creator's)."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))


class LargeDecodes:
    """One background thread at ``nice`` for decoding large images; started on first use
    (and again after :meth:`close`: an app can be served twice)."""

    def __init__(self, nice: int = NICE) -> None:
        self.nice = nice
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    1,
                    thread_name_prefix="imgclf-large-decode",
                    initializer=_lower_priority,
                    initargs=(self.nice,),
                )
            return self._pool

    async def run(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.wrap_future(self._executor().submit(fn, *args))

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
