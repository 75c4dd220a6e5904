"""A request's images, read as they arrive and never past a limit.

Starlette's ``request.form()`` spools every multipart part to a temporary file in full
before the handler can look at its size (a 60 MB part was written to disk under
``--max-bytes 1000000``). Here python-multipart's push parser sees each chunk as it comes
off the socket: a part's bytes are counted as they arrive and the first byte over
``--max-bytes`` stops the reading with a 413, with nothing on disk. Bytes held by all
requests together are counted too (:class:`ByteBudget`), so many concurrent uploads get a
503 rather than growing the process; the body must arrive within ``--body-timeout``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
from starlette.requests import Request

try:  # python-multipart >= 0.0.13 names its module python_multipart; older ones multipart
    import python_multipart as multipart
    from python_multipart.multipart import parse_options_header
except ImportError:  # pragma: no cover
    import multipart  # type: ignore[no-redef]
    from multipart.multipart import parse_options_header  # type: ignore[no-redef]

DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # per image: a 12-megapixel phone JPEG is 3-8 MiB
MAX_FILES = 64  # per request
# Uploads held in memory by all requests at once: a dozen of the largest accepted images.
DEFAULT_UPLOAD_BUDGET = 256 * 1024 * 1024
MULTIPART_OVERHEAD = 4096  # per part: boundary and part headers
DEFAULT_BODY_TIMEOUT = 60.0  # seconds for a whole body: 20 MiB at 3 Mbit/s


class BadImage(Exception):
    """An upload the server will not take: becomes a 4xx/5xx JSON answer."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


@dataclass
class Upload:
    name: str
    data: bytes


def too_large(name: str, limit: int) -> BadImage:
    return BadImage(413, f"{name}: larger than the {limit}-byte limit (--max-bytes)")


class ByteBudget:
    """Upload bytes held in memory by all requests at once. Touched only from the event
    loop's thread (the readers below are coroutines), so it needs no lock."""

    def __init__(self, limit: int = DEFAULT_UPLOAD_BUDGET) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise BadImage(
                503,
                f"busy: {self.used} bytes of uploads are in memory already (limit "
                f"{self.limit}); try again shortly",
                {"Retry-After": "1"},
            )
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


class _Parts:
    """python-multipart callbacks → the ``file`` parts in memory, each at most
    ``max_bytes``; other fields are counted against the request but not kept."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.uploads: list[Upload] = []
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.disposition = b""
        self.current: bytearray | None = None
        self.name = ""
        self.count = 0

    def callbacks(self) -> dict[str, Callable]:
        return {
            "on_part_begin": self.begin,
            "on_header_field": lambda d, s, e: self.header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self.header_value.extend(d[s:e]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.data,
            "on_part_end": self.end,
        }

    def begin(self) -> None:
        self.disposition, self.current = b"", None
        self.count += 1
        if self.count > 2 * MAX_FILES:
            raise BadImage(413, f"more than {2 * MAX_FILES} form fields in one request")

    def header_end(self) -> None:
        if bytes(self.header_name).lower() == b"content-disposition":
            self.disposition = bytes(self.header_value)
        self.header_name.clear()
        self.header_value.clear()

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if options.get(b"name") != b"file":
            return  # another field: read past, not kept
        n = len(self.uploads) + 1
        if b"filename" not in options:
            raise BadImage(400, f"field 'file' #{n} is text, not a file")
        if n > MAX_FILES:
            raise BadImage(413, f"more than {MAX_FILES} files in one request")
        self.name = options[b"filename"].decode("utf-8", "replace") or f"file{n}"
        self.current = bytearray()

    def data(self, data: bytes, start: int, end: int) -> None:
        if self.current is None:
            return
        if len(self.current) + (end - start) > self.max_bytes:
            raise too_large(self.name, self.max_bytes)  # stops reading: nothing more arrives
        self.current += data[start:end]

    def end(self) -> None:
        if self.current is not None:
            self.uploads.append(Upload(self.name, bytes(self.current)))
            self.current = None


def _declared_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise BadImage(413, f"request of {length} bytes is over the limit (--max-bytes)")


async def _multipart(request: Request, max_bytes: int, take: Callable[[int], None]) -> list:
    _, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadImage(400, "multipart upload without a boundary")
    limit = MAX_FILES * (max_bytes + MULTIPART_OVERHEAD)
    _declared_length(request, limit)
    parts = _Parts(max_bytes)
    parser = multipart.MultipartParser(boundary, parts.callbacks())
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise BadImage(413, f"request over {limit} bytes (--max-bytes × {MAX_FILES})")
            take(len(chunk))
            parser.write(chunk)
        parser.finalize()
    except multipart.exceptions.FormParserError as exc:
        raise BadImage(400, f"malformed multipart body ({exc})") from None
    if not parts.uploads:
        raise BadImage(400, "no images: send multipart field 'file' (repeatable)")
    return parts.uploads


async def _raw(request: Request, max_bytes: int, take: Callable[[int], None]) -> list:
    length = request.headers.get("content-length", "0")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large("body", max_bytes)
    body = bytearray()
    async for chunk in request.stream():  # chunked bodies: counted as they arrive
        if len(body) + len(chunk) > max_bytes:
            raise too_large("body", max_bytes)
        take(len(chunk))
        body += chunk
    if not body:
        raise BadImage(400, "empty request: send an image as the body or as field 'file'")
    return [Upload("body", bytes(body))]


@contextlib.asynccontextmanager
async def receive_uploads(
    request: Request,
    max_bytes: int,
    budget: ByteBudget,
    timeout: float = DEFAULT_BODY_TIMEOUT,
) -> AsyncIterator[list[Upload]]:
    """The images of a request (multipart field ``file``, repeatable, or the raw body),
    held against ``budget`` until the block ends."""
    held = 0

    def take(n: int) -> None:
        nonlocal held
        budget.take(2 * n)  # the chunks as read, and the bytes object made of them
        held += 2 * n

    try:
        kind = request.headers.get("content-type", "")
        read = _multipart if kind.startswith("multipart/form-data") else _raw
        try:
            with anyio.fail_after(timeout):
                uploads = await read(request, max_bytes, take)
        except TimeoutError:
            raise BadImage(
                408, f"the request body took over {timeout:g} s (--body-timeout)"
            ) from None
        yield uploads
    finally:
        budget.give(held)
