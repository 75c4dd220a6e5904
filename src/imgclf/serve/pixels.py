"""Pixels, not bytes, are what decoding costs: a cap per image and a budget across requests.

A 76 KB PNG of 9000×9000 is under any byte limit and under Pillow's bomb limit
(``Image.MAX_IMAGE_PIXELS``, 89 million), yet decoding it raised the server's peak memory
by ~850 MiB, and the thread pool admitted ~40 at once. So before decoding, each image's
size is read from its header (:func:`imgclf.data.decode.stored_size`, no pixels decoded):

* an image over ``--max-pixels`` is refused with a 413;
* the decode then waits for its pixels in a :class:`PixelBudget` shared by all requests
  (``--decode-pixels``), and after ``wait`` seconds gives up with a 503.

What a decoded pixel costs (peak bytes over the process's, measured on 6000×6000 images
through :func:`imgclf.data.preprocess.file_to_uint8`): RGB PNG 4.1, palette PNG 5.0, RGBA
PNG 8.0, progressive JPEG 3.1 (libjpeg keeps the whole coefficient array of a progressive
file whatever the DCT scaling, jdcoefct.c), baseline JPEG ~0 (decoded at 1/8 scale). So
the budget bounds decoding memory at about 8 bytes × ``--decode-pixels``. Images are
weighed by their stored size, an upper bound for every path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import anyio
from PIL import Image

from imgclf.data.decode import stored_size
from imgclf.serve.uploads import BadImage, Upload

# 40 MP: above what cameras people send to a classifier save by default (phones 12-24 MP,
# most DSLRs 24-45 MP), 2.2× under Pillow's bomb limit, and at 8 bytes a pixel (the RGBA
# PNG above) 320 MB for the largest accepted image: with the default budget below the
# server stays under 1.5 GiB (benchmarks/bench_serve_memory.py).
DEFAULT_MAX_PIXELS = 40_000_000
# Room beside one largest image, so small images decode while a large one does.
SMALL_ROOM = 8_000_000
DEFAULT_DECODE_WAIT = 10.0  # seconds a decode waits for the budget before a 503
BYTES_PER_PIXEL = 8  # the worst common case above, for messages and docs


def default_decode_pixels(max_pixels: int) -> int:
    return max_pixels + SMALL_ROOM


def check_pixels(uploads: Sequence[Upload], max_pixels: int) -> int:
    """The most pixels any one upload holds (they are decoded one after another); 413 for
    one over ``max_pixels``. An unreadable header counts as ``max_pixels``: the decoder
    will name the problem, and may still allocate before it finds it."""
    most = 0
    for upload in uploads:
        size = stored_size(upload.data)
        if size is None:
            most = max(most, max_pixels)
            continue
        h, w = size
        if h * w > max_pixels:
            raise BadImage(
                413,
                f"{upload.name}: {w}×{h} is {h * w:,} pixels, over the {max_pixels:,}-pixel"
                " limit (--max-pixels)",
            )
        most = max(most, h * w)
    return most


class PixelBudget:
    """Pixels being decoded at once, across requests (``capacity``). Any waiter that fits
    goes, not first-come first-served: a small image never waits behind a large one; a
    large one waits at most ``wait`` seconds, then :class:`BadImage` 503."""

    def __init__(self, capacity: int, wait: float = DEFAULT_DECODE_WAIT) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.wait = wait
        self.used = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        # One per event loop: an app may be served by several in turn (tests, a restart).
        loop = asyncio.get_running_loop()
        if self._changed is None or self._loop is not loop:
            self._loop, self._changed = loop, asyncio.Condition()
        return self._changed

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        pixels = min(pixels, self.capacity)  # check_pixels keeps images under the capacity
        changed = self._condition()
        try:
            with anyio.fail_after(self.wait):
                async with changed:
                    await changed.wait_for(lambda: self.used + pixels <= self.capacity)
                    self.used += pixels
        except TimeoutError:
            raise BadImage(
                503,
                f"busy: images of {self.used:,} pixels are being decoded (--decode-pixels "
                f"{self.capacity:,}); try again shortly",
                {"Retry-After": "2"},
            ) from None
        try:
            yield
        finally:
            async with changed:
                self.used -= pixels
                changed.notify_all()


def limit_for_pillow(max_pixels: int) -> int | None:
    """Pillow's own limit, when ``max_pixels`` is above it (such images fail anyway)."""
    limit = Image.MAX_IMAGE_PIXELS
    return limit if limit and max_pixels > limit else None
