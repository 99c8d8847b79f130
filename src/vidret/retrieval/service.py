"""The HTTP search service: JSON API, media routes and the web page, over several indexes and ONE backbone.

Routes (OpenAPI schema at ``/openapi.json``, a self-contained reference page at ``/docs``)::

    GET  /search?q=TEXT&k=10&index=NAME     text -> videos
    POST /search {"query": TEXT, "k": 10, "index": NAME}
    GET  /videos/{index}/{video_id}          the video file (one HTTP byte range supported)
    GET  /thumbnails/{index}/{video_id}?n=4  a JPEG strip of n frames
    GET  /indexes, /health, /                the collections, liveness, the web page

Input rules (every violation is a 4xx with a JSON body ``{"error": ..., "detail": ...}``, never a 500):
queries must be non-empty valid UTF-8 of at most 1000 characters; ``k`` must be an integer in [1, 1000] (422
otherwise) and is clamped to the index size; unknown indexes or ids are 404; request bodies over 64 KiB are
413; a Host header that is not an allowed name is 400 on every route (localhost names by default: a web page
that rebinds its own domain to 127.0.0.1 still sends its domain, so DNS rebinding cannot reach the service).

Media rules (an index is data, not authority: a crafted one must not serve any other file): media routes serve
only files recorded in the index, looked up by id (user input is never joined into a path), and only inside the
collection root: the folders given to ``serve --media-root``, else the one recorded in the index when it was
built; with neither (or a recorded root of ``/``) media routes answer 403. Each file is opened ONCE (last
component not followed, non-blocking so a FIFO cannot stall a worker) and checked on that descriptor: a regular
file whose real path (the kernel's name for the descriptor) is the path recorded at indexing time, inside the
root (403 otherwise), with the recorded size and mtime (409 otherwise, also for a record without a file
identity). The bytes sent and the thumbnail frames are read from that descriptor only, so a symlink swapped in
after the check serves nothing.

Connection rules (:func:`make_server`): a request head must arrive within 10 s and a body within 10 s of its
head (408), a connection that sends nothing is closed after 5 s, like an idle keep-alive one.

Several indexes, possibly built with different adapters, share one backbone in memory through
:class:`vidret.model.AdapterBank`; all must have been built on the same backbone weights. Concurrent queries
are batched: one worker thread takes every query waiting, encodes their texts in one forward pass per
adapter and searches each index once per batch.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations of create_app at runtime,
# and they name classes imported inside it (fastapi stays an optional dependency).
import asyncio
import concurrent.futures
import contextlib
import email.utils
import errno
import json
import logging
import math
import mimetypes
import os
import queue
import re
import socket
import stat
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidret.errors import VidretError
from vidret.retrieval.index import VideoIndex, VideoRecord

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000  # longer queries are refused (CLIP reads at most 77 tokens anyway)
MAX_K = 1000  # larger k is refused; k above the index size is clamped to it
MAX_BODY_BYTES = 64 * 1024  # larger request bodies are refused with 413
MAX_THUMB_FRAMES = 8  # frames per thumbnail strip
THUMB_SIZE = 96  # side of each square thumbnail frame, pixels
SEARCH_TIMEOUT_S = 60.0
KEEP_ALIVE_S = 5  # an idle connection (kept alive, or that never sent a byte) is closed after this
HEAD_TIMEOUT_S = 10.0  # a request head must arrive in full within this (slow-header clients)
BODY_TIMEOUT_S = 10.0  # a request body must arrive in full within this after its head (slow-body clients)
STREAM_CHUNK = 256 * 1024  # bytes read from a media file per send
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # Host names always allowed (with any port)
INDEX_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WEB_FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
    "docs.html": "text/html",
    "docs.js": "text/javascript",
}


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


def validate_query(text: Any) -> str:
    """The query text to encode, or ApiError 422 (empty, too long, not a string, not valid UTF-8)."""
    if not isinstance(text, str):
        raise ApiError(422, "query must be a string")
    try:
        text.encode("utf-8")  # lone surrogates (from JSON \\ud800 escapes) are not text
    except UnicodeEncodeError:
        raise ApiError(422, "query is not valid UTF-8 text") from None
    if len(text) > MAX_QUERY_CHARS:
        raise ApiError(422, f"query is longer than {MAX_QUERY_CHARS} characters ({len(text)})")
    stripped = text.strip()
    if not stripped:
        raise ApiError(422, "query is empty")
    return stripped


def validate_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ApiError(422, f"k must be an integer from 1 to {MAX_K}")
    return k


# ------------------------------------------------------------------------------------------ collections


@dataclass
class Collection:
    """One served index and the name of its adapter in the bank."""

    name: str  # URL-safe name (``/videos/{name}/...``)
    index: VideoIndex
    adapter: str  # adapter name in the AdapterBank
    folder: str = ""  # the index folder ("" for in-memory indexes)

    def info(self) -> dict[str, Any]:
        ident = self.index.identity
        backend = self.index.backend_name
        d: dict[str, Any] = {
            "name": self.name,
            "videos": len(self.index),
            "kind": self.index.kind,
            "backend": backend,
            "method": ident.adapter_method,
            "adapter_fingerprint": ident.adapter_fingerprint,
            "backbone": ident.backbone_name,
            "num_frames": self.index.settings.num_frames,
        }
        if backend == "faiss":
            d["nprobe"] = self.index.settings.nprobe
        return d


@dataclass
class MediaFile:
    """A recorded video file, opened once and checked: the media routes read only this descriptor."""

    record: VideoRecord
    fd: int  # read-only descriptor; -1 once closed
    path: str  # the real path the descriptor resolves to (inside the collection root)
    size: int
    mtime_ns: int

    @property
    def media_type(self) -> str:
        kind = mimetypes.guess_type(self.path)[0] or ""
        return kind if kind.startswith("video/") else "application/octet-stream"

    def read_path(self) -> str:
        """A path that opens this very file (not the recorded path), for decoders that take a path."""
        for base in ("/proc/self/fd", "/dev/fd"):  # Linux; macOS and the BSDs
            if os.path.isdir(base):
                return f"{base}/{self.fd}"
        raise ApiError(404, "thumbnails need /proc or /dev/fd on this system")

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _inside(path: str, roots: Sequence[str]) -> bool:
    """Whether absolute ``path`` lies inside one of the (real, absolute) ``roots``."""
    return any(os.path.commonpath([path, root]) == root for root in roots)


def _descriptor_path(fd: int, st: os.stat_result, recorded: str) -> str | None:
    """The real path of an open descriptor: the kernel's name for it (Linux), else ``recorded`` if that path
    still resolves to itself and names the same inode; None when it does not."""
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/self/fd/{fd}")
    try:
        now = os.stat(recorded)
    except OSError:
        return None
    if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and os.path.realpath(recorded) == recorded:
        return recorded
    return None


@dataclass
class _Job:
    collection: Collection
    text: str
    k: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class QueryBatcher:
    """One worker thread that runs every query waiting as one batch (``run(batch)`` resolves the futures)."""

    def __init__(self, run: Callable[[list[_Job]], None], max_batch: int = 64) -> None:
        self._run = run
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0  # informational: batches run so far
        self.jobs = 0

    def submit(self, job: _Job) -> concurrent.futures.Future:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="vidret-search", daemon=True)
                self._thread.start()
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._queue.put(None)
                self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]
            try:
                self._run(live)
            except BaseException as e:  # noqa: BLE001 - delivered to the waiting requests
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(e)
            self.batches += 1
            self.jobs += len(live)
            if stop:
                return


class SearchService:
    """Collections over one AdapterBank, a query batcher and a thumbnail cache.

    Args:
        bank: the AdapterBank holding every collection's adapter over one backbone.
        collections: the served collections; the first is the default of ``/search``.
        max_batch: most queries encoded and searched together.
        media_roots: the folders media routes may serve from, for every collection (``serve --media-root``);
            empty: each index's recorded collection root.
    """

    def __init__(
        self, bank: Any, collections: Sequence[Collection], max_batch: int = 64, media_roots: Sequence[str] = ()
    ) -> None:
        if not collections:
            raise VidretError("serve at least one index")
        self.bank = bank
        self.collections: dict[str, Collection] = {}
        for c in collections:
            if not INDEX_NAME_RE.match(c.name):
                raise VidretError(f"index name {c.name!r} must match {INDEX_NAME_RE.pattern} (letters, digits, ._-)")
            if c.name in self.collections:
                raise VidretError(f"two indexes are named {c.name!r}; name them with NAME=PATH")
            if c.adapter not in bank.names():
                raise VidretError(f"collection {c.name!r} uses adapter {c.adapter!r}, which the bank does not hold")
            self.collections[c.name] = c
        self.default = collections[0].name
        for r in media_roots:
            if not os.path.isdir(r):
                raise VidretError(f"--media-root {r!r} is not a folder")
        given = tuple(os.path.realpath(r) for r in media_roots)
        self._roots: dict[str, tuple[str, ...]] = {}
        for c in collections:
            recorded = getattr(c.index, "root", "") or ""
            real = os.path.realpath(recorded) if recorded and os.path.isabs(recorded) else ""
            is_fs_root = os.path.dirname(real) == real  # a crafted index recording "/" widens nothing
            self._roots[c.name] = given or ((real,) if real and not is_fs_root else ())
        self.batcher = QueryBatcher(self._run_batch, max_batch)
        self.thumbnails = ThumbnailCache()
        self.started = time.time()

    def collection(self, name: str | None) -> Collection:
        if name is None or name == "":
            return self.collections[self.default]
        if not isinstance(name, str) or name not in self.collections:
            raise ApiError(404, f"unknown index; served: {', '.join(sorted(self.collections))}")
        return self.collections[name]

    # -------------------------------------------------------------------------------------- search

    def submit(self, collection: Collection, text: str, k: int) -> concurrent.futures.Future:
        """Queue a text query; the future yields [(row, score), ...] best first."""
        return self.batcher.submit(_Job(collection, text, k))

    def search(self, text: str, k: int = 10, index: str | None = None) -> list[dict[str, Any]]:
        """Blocking text search (validated like the HTTP API); returns result dicts."""
        c = self.collection(index)
        hits = self.submit(c, validate_query(text), validate_k(k)).result(timeout=SEARCH_TIMEOUT_S)
        return self.results(c, hits)

    @torch.no_grad()
    def _run_batch(self, jobs: list[_Job]) -> None:
        from vidret.backbone.tokenizer import tokenize

        groups: dict[str, list[_Job]] = {}
        for j in jobs:
            groups.setdefault(j.collection.name, []).append(j)
        for group in groups.values():
            try:
                c = group[0].collection
                tokens = tokenize([j.text for j in group], context_length=c.index.settings.max_words, truncate=True)
                with self.bank.lock:
                    model = self.bank.use(c.adapter)
                    device = next(model.parameters()).device
                    text = model.encode_text(tokens.to(device))
                    if c.index.kind == "frames":  # the head runs per query: keep the adapter active
                        scores, rows = c.index.search_text(model, text, max(j.k for j in group))
                if c.index.kind == "pooled":
                    scores, rows = c.index.search_text(None, text, max(j.k for j in group))
            except Exception as e:  # noqa: BLE001 - one bad group must not fail the others
                for j in group:
                    j.future.set_exception(e)
                continue
            s, r = scores.tolist(), rows.tolist()
            for qi, j in enumerate(group):
                j.future.set_result([(row, sc) for row, sc in zip(r[qi][: j.k], s[qi][: j.k]) if row >= 0])

    def results(self, c: Collection, hits: list[tuple[int, float]]) -> list[dict[str, Any]]:
        out = []
        for rank, (row, score) in enumerate(hits, start=1):
            rec = c.index.records[row]
            quoted = urllib.parse.quote(rec.video_id, safe="")
            item: dict[str, Any] = {
                "rank": rank,
                "video_id": rec.video_id,
                "score": round(float(score), 6) if math.isfinite(score) else None,
                "duration": rec.duration,
            }
            if rec.path:
                item["video_url"] = f"/videos/{c.name}/{quoted}"
                item["thumbnail_url"] = f"/thumbnails/{c.name}/{quoted}"
            if rec.captions:
                item["captions"] = list(rec.captions[:3])
            out.append(item)
        return out

    # -------------------------------------------------------------------------------------- media

    def open_media(self, index: str, video_id: str) -> MediaFile:
        """Open the recorded file of a video once and check the open file; the caller closes it.

        Raises:
            ApiError: 404 unknown id or file gone; 403 outside the collection root (or no root known); 409 the
                file is not the one indexed (replaced, a symlink, changed, no recorded identity).
        """
        c = self.collection(index)
        rec = c.index.record(video_id)
        if rec is None:
            raise ApiError(404, "unknown video id")
        if not rec.path or not rec.real_path:
            raise ApiError(404, "this video has no file")
        roots = self._roots[c.name]
        if not roots:
            raise ApiError(
                403, f"index {c.name!r} records no collection folder; restart `vidret serve` with --media-root DIR"
            )
        recorded = rec.real_path
        if not os.path.isabs(recorded) or not _inside(os.path.normpath(recorded), roots):
            raise ApiError(403, "the video file lies outside the collection folder")
        changed = "the video file changed since indexing; run `vidret index --update`"
        if not rec.identity:
            raise ApiError(409, changed)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
        try:
            fd = os.open(recorded, flags)
        except FileNotFoundError:
            raise ApiError(404, "the video file is gone; run `vidret index --update`") from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EMLINK):  # the last component is now a symlink (EMLINK: BSDs)
                raise ApiError(409, changed) from None
            raise ApiError(404, "the video file cannot be read") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ApiError(409, changed)
            real = _descriptor_path(fd, st, recorded)
            if real != recorded:  # a folder on the way was swapped, or the file was replaced and deleted
                raise ApiError(409, changed)
            if not _inside(real, roots):
                raise ApiError(403, "the video file lies outside the collection folder")
            if rec.identity.split(":")[:2] != [str(st.st_size), str(st.st_mtime_ns)]:
                raise ApiError(409, changed)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return MediaFile(rec, fd, real, st.st_size, st.st_mtime_ns)

    def warm_up(self) -> None:
        """Run one query per collection so the first real query does not pay for loading the tokenizer."""
        for c in self.collections.values():
            self.submit(c, "warm up", 1).result(timeout=SEARCH_TIMEOUT_S)

    def close(self) -> None:
        self.batcher.close()


# ------------------------------------------------------------------------------------------ thumbnails


def encode_jpeg(rgb: np.ndarray, quality: int = 4) -> bytes:
    """uint8 [H, W, 3] RGB -> JPEG bytes, with FFmpeg's mjpeg encoder (no imaging library needed)."""
    import av

    h, w = rgb.shape[:2]
    h2, w2 = h - h % 2, w - w % 2  # 4:2:0 chroma needs even sides
    rgb = np.ascontiguousarray(rgb[:h2, :w2])
    ctx = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height = w2, h2
    ctx.pix_fmt = "yuvj420p"
    ctx.time_base = Fraction(1, 25)
    ctx.options = {"qmin": str(quality), "qmax": str(quality)}
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
    packets = list(ctx.encode(frame)) + list(ctx.encode(None))
    return b"".join(bytes(p) for p in packets)


def thumbnail_strip(rec: VideoRecord, path: str, n: int, size: int = THUMB_SIZE) -> bytes:
    """A JPEG of ``n`` frames side by side, taken at the centres of n equal parts of the video (or segment)."""
    from vidret.data.decode import PyAVDecoder
    from vidret.data.sampling import segment_bounds
    from vidret.data.transforms import resize_crop

    def plan(info: Any) -> list[float]:
        s, e = segment_bounds(info.duration, rec.start, rec.end)
        return [s + (e - s) * (i + 0.5) / n for i in range(n)]

    _, frames = PyAVDecoder().probe_and_decode(path, plan, frame_fn=lambda f: resize_crop(f, size))
    frames[:, :, -2:] = 24  # a dark 2-pixel gap between neighbouring frames
    strip = np.concatenate(list(frames), axis=1)  # [n, S, S, 3] -> [S, n*S, 3]
    return encode_jpeg(strip[:, :-2])


class ThumbnailCache:
    """Thumbnail strips by (index, id, n), least recently used out; at most two decodes at a time."""

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str, int], bytes | str] = OrderedDict()
        self._lock = threading.Lock()
        self._decoders = threading.Semaphore(2)

    def get(self, key: tuple[str, str, int], make: Callable[[], bytes]) -> bytes:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
        if hit is None:
            with self._decoders:
                try:
                    hit = make()
                except (VidretError, ValueError) as e:
                    hit = f"no thumbnail: {getattr(e, 'reason', None) or e}"
            with self._lock:
                self._items[key] = hit
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        if isinstance(hit, str):
            raise ApiError(404, hit)
        return hit


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


def strict_query_params(scope: Scope) -> dict[str, str]:
    """Query parameters decoded strictly as UTF-8 (Starlette silently replaces invalid bytes)."""
    raw: bytes = scope.get("query_string", b"")
    try:
        pairs = urllib.parse.parse_qsl(raw.decode("utf-8"), keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise ApiError(422, "the query string is not valid UTF-8") from None
    out: dict[str, str] = {}
    for k, v in pairs:
        out.setdefault(k, v)
    return out


def set_threads(n: int) -> None:
    """Intra-op threads of torch and FAISS (one OpenMP pool each); process-wide, so only entry points call it."""
    torch.set_num_threads(n)
    with contextlib.suppress(ImportError):
        import faiss

        faiss.omp_set_num_threads(n)


def web_file(name: str) -> bytes:
    """A file of the bundled web page (only the fixed names in WEB_FILES)."""
    return resources.files("vidret.retrieval").joinpath("web", name).read_bytes()


# ------------------------------------------------------------------------------------------ the app


def create_app(
    service: SearchService, allowed_hosts: Sequence[str] | None = None, body_timeout_s: float = BODY_TIMEOUT_S
) -> Any:
    """The ASGI application serving ``service`` (FastAPI inside :class:`BodyLimitMiddleware`).

    Args:
        service: what to serve.
        allowed_hosts: Host header names accepted (any port; ``"*"``: any); default: the localhost names.
            ``vidret serve`` passes its own list.
        body_timeout_s: seconds a request body may take to arrive after its head (408 after).
    """
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    class JSONResponse(Response):
        media_type = "application/json"

        def render(self, content: Any) -> bytes:
            return json_bytes(content)

    class SearchBody(BaseModel):
        """A text query."""

        model_config = ConfigDict(extra="forbid")
        query: str = Field(..., description=f"the sentence to search for (1 to {MAX_QUERY_CHARS} characters)")
        k: int = Field(10, description=f"results wanted, 1 to {MAX_K}; clamped to the index size")
        index: str | None = Field(None, description="collection name (default: the first served)")

    class SearchHit(BaseModel):
        rank: int
        video_id: str
        score: float | None = Field(None, description="cosine similarity (text-conditioned heads: logit / scale)")
        duration: float | None = None
        video_url: str | None = None
        thumbnail_url: str | None = None
        captions: list[str] | None = None

    class SearchResponse(BaseModel):
        query: str
        index: str
        k: int = Field(..., description="results returned at most: min(k asked, index size)")
        took_ms: float
        results: list[SearchHit]

    class MediaResponse(Response):
        """Streams an opened, checked media file (see :func:`send_media`), which it closes."""

        def __init__(self, media: MediaFile) -> None:
            super().__init__(media_type=media.media_type)
            self.media = media

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await send_media(self.media, scope, receive, send)

    class ErrorBody(BaseModel):
        error: str
        detail: Any

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody, "description": text}
        for code, text in (
            (400, "Host header not allowed"),
            (404, "unknown index or id"),
            (413, "body over 64 KiB"),
            (422, "invalid input"),
        )
    }
    media_errors: dict[int | str, dict[str, Any]] = {
        **errors,
        403: {"model": ErrorBody, "description": "the file lies outside the collection folder"},
        409: {"model": ErrorBody, "description": "the file changed since indexing"},
    }

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(
        lifespan=lifespan,
        title="vidret search",
        version="1",
        description="Text-to-video search over indexes built with `vidret index`.",
        docs_url=None,  # the stock docs page loads its assets from a CDN; /docs is served locally below
        redoc_url=None,
        default_response_class=JSONResponse,
    )
    app.state.service = service
    hosts = LOCAL_HOSTS if allowed_hosts is None else tuple(allowed_hosts)
    app.add_middleware(HostCheckMiddleware, allowed_hosts=hosts)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(VidretError)
    async def vidret_error(request: Request, exc: VidretError) -> Response:
        return JSONResponse({"error": "invalid_request", "detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        # Only where and what: the offending input is not echoed (it may be huge, NaN or not text).
        detail = [
            {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()[:20]
        ]
        return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        name = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "bad_request")
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        return JSONResponse({"error": name, "detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": "internal", "detail": "internal server error"}, status_code=500)

    async def run_search(text: Any, k: Any, index: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        c = service.collection(index)
        query = validate_query(text)
        k = validate_k(k)
        fut = service.submit(c, query, k)
        try:
            hits = await asyncio.wait_for(asyncio.wrap_future(fut), SEARCH_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ApiError(503, "search timed out", "unavailable") from None
        return {
            "query": query,
            "index": c.name,
            "k": min(k, len(c.index)),
            "took_ms": round((time.perf_counter() - t0) * 1000, 3),
            "results": service.results(c, hits),
        }

    @app.get("/search", response_model=SearchResponse, response_model_exclude_none=True, responses=errors)
    async def search_get(
        request: Request,
        q: str = Query(..., description=f"the sentence to search for (1 to {MAX_QUERY_CHARS} characters)"),
        k: int = Query(10, description=f"results wanted, 1 to {MAX_K}; clamped to the index size"),
        index: str | None = Query(None, description="collection name (default: the first served)"),
    ) -> Any:
        """Search a collection by sentence."""
        params = strict_query_params(request.scope)  # FastAPI replaced invalid UTF-8; re-read strictly
        return await run_search(params.get("q", q), k, index)

    @app.post("/search", response_model=SearchResponse, response_model_exclude_none=True, responses=errors)
    async def search_post(body: SearchBody) -> Any:
        """Search a collection by sentence (JSON body)."""
        return await run_search(body.query, body.k, body.index)

    @app.get("/indexes")
    async def indexes() -> Any:
        """The served collections (name, size, method, backend)."""
        return {"default": service.default, "indexes": [c.info() for c in service.collections.values()]}

    @app.get("/health")
    async def health() -> Any:
        """Liveness: the backbone and how many videos are served."""
        return {
            "status": "ok",
            "backbone": service.bank.clip.name,
            "backbone_fingerprint": service.bank.fingerprint,
            "indexes": len(service.collections),
            "videos": sum(len(c.index) for c in service.collections.values()),
            "uptime_s": round(time.time() - service.started, 1),
        }

    @app.get("/videos/{index}/{video_id:path}", responses=media_errors, response_class=Response)
    def video(index: str, video_id: str) -> Any:
        """The video file of an indexed video (a single byte range supported)."""
        return MediaResponse(service.open_media(index, video_id))

    @app.get("/thumbnails/{index}/{video_id:path}", responses=media_errors, response_class=Response)
    def thumbnail(
        index: str,
        video_id: str,
        n: int = Query(1, description=f"frames in the strip, 1 to {MAX_THUMB_FRAMES}"),
    ) -> Any:
        """A JPEG strip of ``n`` frames evenly spread over the video."""
        if not 1 <= n <= MAX_THUMB_FRAMES:
            raise ApiError(422, f"n must be an integer from 1 to {MAX_THUMB_FRAMES}")
        media = service.open_media(index, video_id)
        try:  # frames are decoded from the checked descriptor, never from the recorded path
            key = (index, media.record.video_id, n)
            data = service.thumbnails.get(key, lambda: thumbnail_strip(media.record, media.read_path(), n))
        finally:
            media.close()
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    csp = (
        "default-src 'self'; img-src 'self'; media-src 'self'; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'"
    )

    def page(name: str) -> Response:
        return Response(
            web_file(name),
            media_type=WEB_FILES[name],
            headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"},
        )

    @app.get("/", include_in_schema=False)
    def home() -> Any:
        return page("index.html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Any:
        return page("docs.html")

    @app.get("/web/{name}", include_in_schema=False)
    def asset(name: str) -> Any:
        if name not in WEB_FILES:
            raise ApiError(404, "no such file")
        return page(name)

    return BodyLimitMiddleware(app, timeout_s=body_timeout_s)


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


# ------------------------------------------------------------------------------------------ loading


def parse_index_specs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """``[NAME=]PATH`` arguments -> (name, folder); the default name is the folder's name."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        out.append((name, Path(path)))
    names = [n for n, _ in out]
    for n in names:
        if not INDEX_NAME_RE.match(n):
            raise VidretError(f"index name {n!r} must match {INDEX_NAME_RE.pattern}; name it with NAME=PATH")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise VidretError(f"several indexes are named {dup}; name them with NAME=PATH")
    return out


def open_service(
    specs: Sequence[str],
    backbone: str | None = None,
    device: str = "cpu",
    backend: str | None = None,
    nprobe: int | None = None,
    media_roots: Sequence[str] = (),
) -> SearchService:
    """Load indexes and their adapters over ONE backbone (refusing indexes built on different backbones).

    ``media_roots`` (``serve --media-root``) replaces the collection folders recorded in the indexes as the only
    folders media routes serve from.
    """
    from vidret.adapters.base import backbone_state_dict
    from vidret.adapters.io import read_adapter
    from vidret.backbone.clip import fingerprint
    from vidret.model import AdapterBank
    from vidret.retrieval.build import load_backbone_spec, resolve_backbone

    named = parse_index_specs(specs)
    loaded = [(n, p, VideoIndex.load(p, backend=backend, nprobe=nprobe)) for n, p in named]  # type: ignore[arg-type]
    fps = {idx.identity.backbone_fingerprint for _, _, idx in loaded}
    if len(fps) > 1:
        listing = "; ".join(f"{n}: {idx.identity.describe_backbone()}" for n, _, idx in loaded)
        raise VidretError(f"these indexes were built on different backbones and cannot share one: {listing}")
    first = loaded[0][2].identity
    if not first.adapter_path or not Path(first.adapter_path).is_dir():
        raise VidretError(f"index {loaded[0][0]}: its adapter folder {first.adapter_path!r} is gone")
    spec = resolve_backbone(
        backbone, read_adapter(first.adapter_path)[0], first.backbone_spec, where=f"index {loaded[0][1]}"
    )
    clip = load_backbone_spec(spec)
    have = fingerprint(backbone_state_dict(clip))
    if have != first.backbone_fingerprint:
        raise VidretError(
            f"the indexes were built with backbone {first.describe_backbone()}, but {spec!r} is {clip.name!r} "
            f"(fingerprint {have}); pass --backbone with the backbone they were built with"
        )
    clip.to(device)
    bank = AdapterBank(clip)
    by_path: dict[str, str] = {}
    collections = []
    for name, folder, idx in loaded:
        ap = idx.identity.adapter_path
        if not ap or not Path(ap).is_dir():
            raise VidretError(f"index {name}: its adapter folder {ap!r} is gone; rebuild the index")
        key = os.path.realpath(ap)
        if key not in by_path:
            bank.load(ap, name)
            by_path[key] = name
        adapter = by_path[key]
        with bank.lock:
            idx.check_model(bank.use(adapter), where=f"index {name} ({folder})", adapter_path=ap)
        collections.append(Collection(name, idx, adapter, str(folder)))
    service = SearchService(bank, collections, media_roots=media_roots)
    service.warm_up()
    return service


__all__ = [
    "KEEP_ALIVE_S",
    "LOCAL_HOSTS",
    "MAX_BODY_BYTES",
    "MAX_K",
    "MAX_QUERY_CHARS",
    "ApiError",
    "BodyLimitMiddleware",
    "Collection",
    "HostCheckMiddleware",
    "MediaFile",
    "QueryBatcher",
    "SearchService",
    "bind_socket",
    "create_app",
    "encode_jpeg",
    "host_name",
    "make_server",
    "open_service",
    "parse_index_specs",
    "parse_range",
    "send_media",
    "set_threads",
    "thumbnail_strip",
    "validate_query",
]
