"""Connections: a cap on how many are open, and a deadline for each request's headers.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive`` but has no
deadline for a request's headers: a client that connects and sends nothing, or one byte
every few seconds (each byte cancels the keep-alive timer, ``H11Protocol.data_received``),
holds its connection for ever (200 such connections all stayed open). Its
``limit_concurrency`` answers 503 to *requests* once that many connections are open, but
cannot close the stalled ones that fill it. So :class:`GuardedH11Protocol` (uvicorn's h11
protocol, chosen by passing the class as ``Config(http=...)``):

* closes a connection whose request headers have not all arrived ``header_timeout``
  seconds after it opened or after its previous answer (slowloris);
* answers a connection beyond ``max_connections`` with a JSON 503 and closes it at once.

Headers are bounded in size by h11 (``h11_max_incomplete_event_size``, 16 KiB by default:
a larger header block is a 400); bodies by the app (``--max-bytes``, ``--body-timeout``).
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("uvicorn.error")

DEFAULT_HEADER_TIMEOUT = 10.0  # seconds: headers are a few hundred bytes
DEFAULT_MAX_CONNECTIONS = 64  # the thread pool runs 40 decodes; the rest queue


def _busy(limit: int) -> bytes:
    body = json.dumps({"error": f"busy: {limit} connections are open (--max-connections)"})
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    )
    return (head + body).encode()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_busy(self.max_connections))
            transport.close()
            log.warning("%s: connection refused, %d open", self._who(), self.max_connections)
            return
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy or self.transport.is_closing():
            return  # a request is being answered: its body has the app's deadline
        log.info("%s: no request headers within %g s, closed", self._who(), self.header_timeout)
        self.transport.close()

    def _who(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "client"


def guarded_protocol(header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class with these limits, for ``uvicorn.Config(http=...)``."""
    attrs = {"header_timeout": header_timeout, "max_connections": max_connections}
    return type("GuardedH11Protocol", (GuardedH11Protocol,), attrs)
