"""Who may talk to the server: the Host and Origin checks, and CORS when asked for.

DNS rebinding: a page on ``evil.example`` re-resolves its own name to 127.0.0.1 and its
scripts then reach ``http://evil.example:8000/predict`` on the user's machine; the browser
sees one origin, so the same-origin policy does not help. What gives it away is the
``Host`` header, which still names ``evil.example``. So a request is served only when its
Host is a name of the address the server is bound to: the loopback names for a loopback
address, the address itself, and ``--allowed-hosts``; bound to every interface (0.0.0.0,
::), any IP address is allowed too (an IP literal cannot be rebound) and this machine's
host name. The port is not checked: proxies and port forwards change it.
(https://en.wikipedia.org/wiki/DNS_rebinding; Starlette's TrustedHostMiddleware, Django's
ALLOWED_HOSTS do the same.)

A cross-origin POST (an ``Origin`` header other than the server's own) is refused unless
``--cors ORIGIN`` names it; then Starlette's CORSMiddleware answers its preflight and adds
the ``Access-Control-Allow-*`` headers. Clients without an Origin (curl, scripts) are not
browsers and pass.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def host_name(host: str) -> str:
    """``Host`` header → its name: no port, no IPv6 brackets, lower case, no final dot."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostPolicy:
    """The names a request's Host may carry, for a server bound to ``bound``."""

    def __init__(self, bound: str, extra: Sequence[str] = ()) -> None:
        name = host_name(bound)
        self.any_ip = name in ("0.0.0.0", "::", "")
        names = {name, *LOOPBACK_NAMES, *(host_name(h) for h in extra)}
        if self.any_ip:
            names.add(socket.gethostname().lower())
        self.names = frozenset(names - {"", "0.0.0.0", "::"})

    def allows(self, host: str) -> bool:
        name = host_name(host)
        return name in self.names or (self.any_ip and _is_ip(name))


def _refuse(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"})


class HostOriginGuard:
    """ASGI middleware: the Host check on every request, the Origin check on POSTs."""

    def __init__(self, app: ASGIApp, hosts: HostPolicy, cors: Sequence[str] = ()) -> None:
        self.app = app
        self.hosts = hosts
        self.cors = frozenset(o.rstrip("/").lower() for o in cors)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self.hosts.allows(host):
            allowed = ", ".join(sorted(self.hosts.names))
            message = (
                f"Host {host!r} is not an address of this server (allowed: {allowed}); "
                "add a name with --allowed-hosts"
            )
            await _refuse(400, message)(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is not None and scope["method"] not in SAFE_METHODS:
            own = f"{scope.get('scheme', 'http')}://{host}".lower()
            theirs = origin.rstrip("/").lower()
            if theirs != own and theirs not in self.cors and "*" not in self.cors:
                method = scope["method"]
                message = (
                    f"cross-origin {method} from {origin!r} refused; allow it with --cors ORIGIN"
                )
                await _refuse(403, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def protect(app: Starlette, hosts: HostPolicy, cors: Sequence[str] = ()) -> None:
    """Put ``app`` behind the checks; with ``cors``, CORS headers for those origins."""
    if cors:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors),
            allow_methods=["GET", "POST"],
            allow_headers=["content-type"],  # a raw image body is not a "simple" type
        )
    app.add_middleware(HostOriginGuard, hosts=hosts, cors=cors)  # added last: outermost
