"""The server's limits and who may reach it, in one value (``imgclf serve``'s options)."""

from __future__ import annotations

from dataclasses import dataclass

from imgclf.errors import UserError
from imgclf.serve.connections import DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS
from imgclf.serve.pixels import (
    DEFAULT_DECODE_WAIT,
    DEFAULT_MAX_PIXELS,
    default_decode_pixels,
    limit_for_pillow,
)
from imgclf.serve.uploads import DEFAULT_BODY_TIMEOUT, DEFAULT_UPLOAD_BUDGET


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"  # the bound address: what the Host header must name
    allowed_hosts: tuple[str, ...] = ()
    cors: tuple[str, ...] = ()
    docs: bool = False  # /docs and /openapi.json (the docs page loads scripts from a CDN)
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_pixels: int | None = None  # None: max_pixels + SMALL_ROOM
    decode_wait: float = DEFAULT_DECODE_WAIT
    upload_bytes: int | None = None  # None: the larger of 256 MiB and 4 × max_bytes
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    @property
    def decode_budget(self) -> int:
        if self.decode_pixels is None:
            return default_decode_pixels(self.max_pixels)
        return self.decode_pixels

    def upload_budget(self, max_bytes: int) -> int:
        if self.upload_bytes is None:
            return max(DEFAULT_UPLOAD_BUDGET, 4 * max_bytes)
        return self.upload_bytes

    def check(self, max_bytes: int) -> None:
        """One error line for limits that cannot work together."""
        pillow = limit_for_pillow(self.max_pixels)
        if pillow is not None:
            raise UserError(
                f"--max-pixels {self.max_pixels} is above Pillow's decompression-bomb limit "
                f"({pillow}), which refuses such images anyway; use at most {pillow}"
            )
        if self.decode_budget < self.max_pixels:
            raise UserError(
                f"--decode-pixels {self.decode_budget} is below --max-pixels "
                f"{self.max_pixels}: the largest accepted image could never be decoded"
            )
        budget = self.upload_budget(max_bytes)
        if budget < 2 * max_bytes:
            raise UserError(
                f"the upload budget ({budget} bytes) is under twice --max-bytes "
                f"({max_bytes}): the largest accepted upload would always be refused"
            )
        for name in ("header_timeout", "body_timeout", "decode_wait"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive number of seconds")
