"""HTTP and connection hardening of the search service (its rules are listed in :mod:`vidret.retrieval.service`).

The Host allow-list (:class:`HostCheckMiddleware`), the request body limit and deadline
(:class:`BodyLimitMiddleware`), one byte range sent from a checked descriptor (:func:`parse_range`,
:func:`send_media`), and a listening socket and uvicorn server whose connections all time out
(:func:`bind_socket`, :func:`make_server`). :class:`ApiError`, the 4xx every layer raises, lives here so that
the media module can raise it without importing the service.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import json
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from vidret.errors import VidretError

if TYPE_CHECKING:
    from vidret.retrieval.media import MediaFile

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # larger request bodies are refused with 413
KEEP_ALIVE_S = 5  # an idle connection (kept alive, or that never sent a byte) is closed after this
HEAD_TIMEOUT_S = 10.0  # a request head must arrive in full within this (slow-header clients)
BODY_TIMEOUT_S = 10.0  # a request body must arrive in full within this after its head (slow-body clients)
STREAM_CHUNK = 256 * 1024  # bytes read from a media file per send
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # Host names always allowed (with any port)


class ApiError(Exception):
    """A client error with an HTTP status and a message for the JSON body."""

    def __init__(self, status: int, detail: str, error: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.error = error or {
            403: "forbidden",
            404: "not_found",
            409: "conflict",
            413: "too_large",
            422: "invalid_request",
        }.get(status, "bad_request")


# ------------------------------------------------------------------------------------------ ASGI pieces


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def json_bytes(obj: Any) -> bytes:
    """Strict JSON (ASCII-escaped: lone surrogates can never break encoding; NaN refused)."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def _send_json(
    send: Send, status: int, obj: Any, headers: Sequence[tuple[bytes, bytes]] = (), close: bool = False
) -> None:
    """A JSON response; ``close`` ends the connection after it (the client may still be sending a body)."""
    body = json_bytes(obj)
    out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    if close:
        out.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


def host_name(value: str) -> str | None:
    """The name in a Host header value: lowercase, without the port or IPv6 brackets; None when malformed."""
    v = value.strip().lower()
    if v.startswith("["):
        name, sep, rest = v[1:].partition("]")
        return name if sep and name and re.fullmatch(r"(:\d{0,5})?", rest, re.ASCII) else None
    if v.count(":") == 1:
        name, _, port = v.partition(":")
        return name if name and re.fullmatch(r"\d{0,5}", port, re.ASCII) else None
    return v or None  # a bare name, or a bare IPv6 address


class HostCheckMiddleware:
    """Refuse requests whose Host header is not an allowed name with 400, on every route.

    DNS rebinding: a web page on an attacker's domain re-resolves that domain to 127.0.0.1 and calls the local
    service from the victim's browser; the browser still sends the attacker's domain as Host.

    Args:
        app: the ASGI app.
        allowed_hosts: names (any port; IPv6 with or without brackets); ``"*"`` allows every Host.
    """

    def __init__(self, app: Any, allowed_hosts: Sequence[str] = LOCAL_HOSTS) -> None:
        self.app = app
        self.any = "*" in allowed_hosts
        self.names = frozenset(n for h in allowed_hosts if h != "*" and (n := host_name(h)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.any:
            raw = next((v for k, v in scope.get("headers", []) if k == b"host"), b"")
            if host_name(raw.decode("latin-1")) not in self.names:
                detail = "this Host header is not served here; start `vidret serve` with --allow-host NAME to allow it"
                await _send_json(send, 400, {"error": "bad_host", "detail": detail})
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 before the app reads them (declared or streamed), and
    bodies that do not arrive in full within ``timeout_s`` of the request head with 408."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES, timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = {"error": "too_large", "detail": f"request body over {self.max_bytes} bytes"}
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    detail = {"error": "bad_request", "detail": "invalid Content-Length"}
                    await _send_json(send, 400, detail, close=True)
                    return
                if declared > self.max_bytes:
                    await _send_json(send, 413, too_large, close=True)
                    return
        chunks: list[bytes] = []
        total = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                slow = {"error": "timeout", "detail": f"the request body did not arrive within {self.timeout_s:g} s"}
                await _send_json(send, 408, slow, close=True)
                return
            if msg["type"] != "http.request":
                return  # client went away
            body = msg.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await _send_json(send, 413, too_large, close=True)
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnect notifications

        await self.app(scope, replay, send)


_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d{0,19})\s*-\s*(\d{0,19})\s*", re.ASCII)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The one byte range a Range header asks for, as (first, last) inclusive; None to send the whole file.

    Several ranges, other units and malformed values are ignored (RFC 9110 lets a server send the whole file).

    Raises:
        ValueError: the range cannot be satisfied (416): it starts at or past the end, or is an empty suffix.
    """
    m = _RANGE_RE.fullmatch(header) if header else None
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first:
        if not last:
            return None
        if int(last) == 0 or size == 0:
            raise ValueError("empty suffix range")
        return max(0, size - int(last)), size - 1
    a, b = int(first), int(last) if last else size - 1
    if last and b < a:
        return None
    if a >= size:
        raise ValueError("range starts past the end")
    return a, min(b, size - 1)


async def send_media(media: MediaFile, scope: Scope, receive: Receive, send: Send) -> None:
    """Send an opened media file, or the one byte range asked for, reading only its descriptor; closes it."""
    try:
        headers = dict(scope.get("headers", []))
        etag = f'"{media.size:x}-{media.mtime_ns:x}"'
        modified = email.utils.formatdate(media.mtime_ns / 1e9, usegmt=True)
        out = [
            (b"content-type", media.media_type.encode()),
            (b"accept-ranges", b"bytes"),
            (b"etag", etag.encode()),
            (b"last-modified", modified.encode()),
        ]
        if_range = headers.get(b"if-range", b"").decode("latin-1").strip()
        span = None
        if if_range in ("", etag, modified):  # If-Range naming another version: send the whole file
            try:
                span = parse_range(headers.get(b"range", b"").decode("latin-1"), media.size)
            except ValueError:
                unsatisfiable = {"error": "range_not_satisfiable", "detail": f"the file has {media.size} bytes"}
                await _send_json(send, 416, unsatisfiable, [(b"content-range", f"bytes */{media.size}".encode())])
                return
        first, last = span if span is not None else (0, media.size - 1)
        if span is not None:
            out.append((b"content-range", f"bytes {first}-{last}/{media.size}".encode()))
        out.append((b"content-length", str(last - first + 1).encode()))
        await send({"type": "http.response.start", "status": 200 if span is None else 206, "headers": out})
        await _stream_descriptor(media.fd, first, last - first + 1, receive, send)
    finally:
        media.close()


async def _stream_descriptor(fd: int, offset: int, length: int, receive: Receive, send: Send) -> None:
    """Send ``length`` bytes of ``fd`` from ``offset``; stops early when the client disconnects."""
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.ensure_future(watch())
    try:
        if length <= 0:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        while length > 0 and not gone.is_set():
            chunk = await asyncio.to_thread(os.pread, fd, min(STREAM_CHUNK, length), offset)
            if not chunk:  # truncated while sending: end the connection rather than send a short body
                logger.warning("a video file shrank while it was being sent")
                return
            offset += len(chunk)
            length -= len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": length > 0})
    finally:
        watcher.cancel()


# ------------------------------------------------------------------------------------------ serving


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (port 0: any free one), or VidretError saying why not."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        if os.name == "posix":  # rebind right after a restart (TIME_WAIT); a live listener still refuses the bind
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise VidretError(f"port {port} on {host} is in use; pass --port") from None
        raise VidretError(f"cannot listen on {host} port {port} ({e.strerror or e}); check --host and --port") from None
    return sock


def _timed_protocol(head_timeout_s: float) -> type:
    """uvicorn's h11 protocol, with a bound on receiving a request head and on a connection that never speaks.

    uvicorn (0.54) arms its keep-alive timer only after a response and cancels it on any byte received, so a
    client sending half a head (or trickling one byte at a time, or nothing at all) holds a connection forever.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json_bytes({"error": "timeout", "detail": f"the request head did not arrive within {head_timeout_s:g} s"})
    timeout_response = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )

    class TimedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            # a connection that never sends a byte is closed like an idle keep-alive one
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # the clock starts at the first byte of a head and is not reset by later bytes
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self._head_timer is None:
                self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)
            elif not waiting and self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(timeout_response)
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    return TimedH11Protocol


def make_server(
    app: Any, keep_alive_s: int = KEEP_ALIVE_S, head_timeout_s: float = HEAD_TIMEOUT_S, log_level: str = "warning"
) -> Any:
    """A uvicorn Server for ``app`` (h11) whose connections all time out; start it with ``.run(sockets=[sock])``.

    Args:
        app: the ASGI app (:func:`create_app`; its middleware bounds the body read).
        keep_alive_s: an idle connection (between requests, or before its first byte) is closed after this.
        head_timeout_s: a request head must arrive in full within this of its first byte (408 and close after).
        log_level: uvicorn's log level.
    """
    import uvicorn

    config = uvicorn.Config(
        app, http=_timed_protocol(head_timeout_s), timeout_keep_alive=keep_alive_s, log_level=log_level
    )
    return uvicorn.Server(config)


__all__ = [
    "BODY_TIMEOUT_S",
    "HEAD_TIMEOUT_S",
    "KEEP_ALIVE_S",
    "LOCAL_HOSTS",
    "MAX_BODY_BYTES",
    "STREAM_CHUNK",
    "ApiError",
    "BodyLimitMiddleware",
    "HostCheckMiddleware",
    "bind_socket",
    "host_name",
    "json_bytes",
    "make_server",
    "parse_range",
    "send_media",
]
