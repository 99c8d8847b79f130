"""The HTTP search service: JSON API, media routes and the web page, over several indexes and ONE backbone.

Routes (OpenAPI schema at ``/openapi.json``, a self-contained reference page at ``/docs``)::

    GET  /search?q=TEXT&k=10&index=NAME&group=video   text -> videos (or their windows: start/end per hit)
    POST /search {"query": TEXT, "k": 10, "index": NAME, "group": "video"}
    GET  /videos/{index}/{video_id}          the video file (one HTTP byte range supported)
    GET  /thumbnails/{index}/{video_id}?n=4  a JPEG strip of n frames
    GET  /captions?index=NAME&video_id=ID&k=10  video -> text: the best captions of ``serve --captions BANK``
    GET  /indexes, /health, /                the collections, liveness, the web page

Input rules (every violation is a 4xx with a JSON body ``{"error": ..., "detail": ...}``, never a 500):
queries must be non-empty valid UTF-8 of at most 1000 characters; ``k`` must be an integer in [1, 1000] (422
otherwise) and is clamped to the index size; unknown indexes or ids are 404; request bodies over 64 KiB are
413; a Host header that is not an allowed name is 400 on every route (localhost names by default: a web page
that rebinds its own domain to 127.0.0.1 still sends its domain, so DNS rebinding cannot reach the service).
Queries and ``k`` are checked here (:func:`validate_query`, :func:`validate_k`); bodies and Host headers by the
middleware in :mod:`vidret.retrieval.http` (:class:`~vidret.retrieval.http.BodyLimitMiddleware`,
:class:`~vidret.retrieval.http.HostCheckMiddleware`).

Media rules (an index is data, not authority: a crafted one must not serve any other file): media routes serve
only files recorded in the index, looked up by id (user input is never joined into a path), and only inside the
collection root: the folders given to ``serve --media-root``, else the one recorded in the index when it was
built; with neither (or a recorded root of ``/``) media routes answer 403. Each file is opened ONCE (last
component not followed, non-blocking so a FIFO cannot stall a worker) and checked on that descriptor: a regular
file whose real path (the kernel's name for the descriptor) is the path recorded at indexing time, inside the
root (403 otherwise), with the recorded size and mtime (409 otherwise, also for a record without a file
identity). The bytes sent and the thumbnail frames are read from that descriptor only, so a symlink swapped in
after the check serves nothing. The lookup and the roots are :meth:`SearchService.open_media`'s; opening and
checking the file is :func:`vidret.retrieval.media.open_recorded`; sending it (one byte range) is
:func:`vidret.retrieval.http.send_media`.

Connection rules (:func:`vidret.retrieval.http.make_server`): a request head must arrive within 10 s and a body
within 10 s of its head (408), a connection that sends nothing is closed after 5 s, like an idle keep-alive one.

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
import functools
import logging
import math
import os
import queue
import re
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from vidret.errors import VidretError
from vidret.retrieval.captions import CaptionBank
from vidret.retrieval.http import (
    BODY_TIMEOUT_S,
    LOCAL_HOSTS,
    ApiError,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    Receive,
    Scope,
    Send,
    json_bytes,
    send_media,
)
from vidret.retrieval.index import VideoIndex
from vidret.retrieval.media import MediaFile, ThumbnailCache, open_recorded, thumbnail_strip
from vidret.retrieval.moments import GROUPS
from vidret.retrieval.query import TextCache

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 1000  # longer queries are refused (CLIP reads at most 77 tokens anyway)
MAX_K = 1000  # larger k is refused; k above the index size is clamped to it
MAX_THUMB_FRAMES = 8  # frames per thumbnail strip
SEARCH_TIMEOUT_S = 60.0
INDEX_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WEB_FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
    "docs.html": "text/html",
    "docs.js": "text/javascript",
}


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


def validate_group(group: Any) -> str:
    if group not in GROUPS:
        raise ApiError(422, "group must be 'video' (best window per video) or 'segment' (every window)")
    return str(group)


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
        if backend == "faiss":  # the effective settings (0 in the index settings: chosen from the size)
            d["nprobe"] = getattr(self.index.backend, "nprobe", self.index.settings.nprobe)
            d["nlist"] = getattr(self.index.backend, "nlist", self.index.settings.nlist)
        return d


@dataclass
class _Job:
    collection: Collection
    text: str
    k: int
    group: str = "video"  # windowed indexes: "video" = the best window per video, "segment" = every window
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
        text_cache_size: query embeddings kept (LRU) per service; 0 turns the cache off.
        captions: a caption bank for ``/captions`` (video -> text), encoded here once per adapter.
    """

    def __init__(
        self,
        bank: Any,
        collections: Sequence[Collection],
        max_batch: int = 64,
        media_roots: Sequence[str] = (),
        text_cache_size: int = 1024,
        captions: CaptionBank | None = None,
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
        self.text_cache = TextCache(text_cache_size)  # query sentence -> embedding, per adapter
        self.batcher = QueryBatcher(self._run_batch, max_batch)
        self.thumbnails = ThumbnailCache()
        self.captions = captions
        if captions is not None:
            for c in self.collections.values():
                with bank.lock:
                    captions.encode(self._text_key(c), bank.use(c.adapter), c.index.settings.max_words)
        self.started = time.time()

    def collection(self, name: str | None) -> Collection:
        if name is None or name == "":
            return self.collections[self.default]
        if not isinstance(name, str) or name not in self.collections:
            raise ApiError(404, f"unknown index; served: {', '.join(sorted(self.collections))}")
        return self.collections[name]

    # -------------------------------------------------------------------------------------- search

    def submit(self, collection: Collection, text: str, k: int, group: str = "video") -> concurrent.futures.Future:
        """Queue a text query; the future yields [(row, score), ...] best first."""
        return self.batcher.submit(_Job(collection, text, k, validate_group(group)))

    def search(self, text: str, k: int = 10, index: str | None = None, group: str = "video") -> list[dict[str, Any]]:
        """Blocking text search (validated like the HTTP API); returns result dicts."""
        c = self.collection(index)
        hits = self.submit(c, validate_query(text), validate_k(k), group).result(timeout=SEARCH_TIMEOUT_S)
        return self.results(c, hits)

    @torch.no_grad()
    def _run_batch(self, jobs: list[_Job]) -> None:
        from vidret.retrieval.query import encode_texts

        groups: dict[str, list[_Job]] = {}
        for j in jobs:
            groups.setdefault(j.collection.name, []).append(j)
        for group in groups.values():
            try:
                c = group[0].collection
                key = self._text_key(c)
                with self.bank.lock:
                    model = self.bank.use(c.adapter)
                    # repeated queries (the same sentence, paging, a page reload) skip the text tower
                    text = encode_texts(
                        model, [j.text for j in group], c.index.settings.max_words, self.text_cache, key
                    )
                    ks, modes = [j.k for j in group], [j.group for j in group]
                    if c.index.kind == "frames":  # the head runs per query: keep the adapter active
                        device = next(model.clip.text.parameters()).device
                        q = text.to(device)
                        hits = c.index.top_hits(functools.partial(c.index.search_text, model, q), ks, modes)
                if c.index.kind == "pooled":
                    hits = c.index.top_hits(functools.partial(c.index.search_text, None, text), ks, modes)
            except Exception as e:  # noqa: BLE001 - one bad group must not fail the others
                for j in group:
                    j.future.set_exception(e)
                continue
            for j, h in zip(group, hits):
                j.future.set_result(h)

    @staticmethod
    def _text_key(c: Collection) -> str:
        return f"{c.adapter}/{c.index.settings.max_words}"

    def describe(self, index: str | None, video_id: Any, k: Any) -> dict[str, Any]:
        """Video -> text: the ``k`` captions of the bank that best describe an indexed video (or window).

        Raises:
            ApiError: 404 no caption bank served, unknown index or video id; 422 bad ``k`` or id.
        """
        c = self.collection(index)
        if not isinstance(video_id, str) or not video_id or len(video_id) > MAX_QUERY_CHARS:
            raise ApiError(422, f"video_id must be a non-empty string of at most {MAX_QUERY_CHARS} characters")
        k = validate_k(k)
        if self.captions is None:
            raise ApiError(404, "no caption bank is served; start `vidret serve` with --captions BANK")
        return self.captions.describe(c.name, c.index, self._text_key(c), video_id, k, self.bank, c.adapter)

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
            if rec.start is not None or rec.end is not None:  # a window (or a manifest segment), in seconds
                item["start"] = rec.start
                item["end"] = rec.end
            if rec.parent:
                item["parent"] = rec.parent
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
        return open_recorded(rec, roots)

    def warm_up(self) -> None:
        """Run one query per collection so the first real query does not pay for loading the tokenizer."""
        for c in self.collections.values():
            self.submit(c, "warm up", 1).result(timeout=SEARCH_TIMEOUT_S)

    def close(self) -> None:
        self.batcher.close()


# ------------------------------------------------------------------------------------------ helpers


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
        group: str = Field("video", description="windowed indexes: 'video' (best window per video) or 'segment'")

    class SearchHit(BaseModel):
        rank: int
        video_id: str
        score: float | None = Field(None, description="cosine similarity (text-conditioned heads: logit / scale)")
        duration: float | None = None
        start: float | None = Field(None, description="the matching window's start in seconds (windowed indexes)")
        end: float | None = Field(None, description="the matching window's end in seconds")
        parent: str | None = Field(None, description="the video a window belongs to")
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

    async def run_search(text: Any, k: Any, index: Any, group: Any = "video") -> dict[str, Any]:
        t0 = time.perf_counter()
        c = service.collection(index)
        query = validate_query(text)
        k = validate_k(k)
        fut = service.submit(c, query, k, validate_group(group))
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
        group: str = Query("video", description="windowed indexes: 'video' (best window per video) or 'segment'"),
    ) -> Any:
        """Search a collection by sentence."""
        params = strict_query_params(request.scope)  # FastAPI replaced invalid UTF-8; re-read strictly
        return await run_search(params.get("q", q), k, index, group)

    @app.post("/search", response_model=SearchResponse, response_model_exclude_none=True, responses=errors)
    async def search_post(body: SearchBody) -> Any:
        """Search a collection by sentence (JSON body)."""
        return await run_search(body.query, body.k, body.index, body.group)

    class CaptionHit(BaseModel):
        rank: int
        caption: str
        caption_id: int = Field(..., description="the caption's position in the bank (0 = first caption)")
        score: float | None = Field(None, description="cosine similarity (text-conditioned heads: logit / scale)")
        start: float | None = Field(None, description="windowed indexes: the best-matching window's start (s)")
        end: float | None = None

    class CaptionsResponse(BaseModel):
        index: str
        video_id: str
        k: int = Field(..., description="results returned at most: min(k asked, bank size)")
        took_ms: float
        results: list[CaptionHit]

    @app.get("/captions", response_model=CaptionsResponse, response_model_exclude_none=True, responses=errors)
    def captions(
        request: Request,
        video_id: str = Query(..., description="an indexed video (or one window of it)"),
        k: int = Query(10, description=f"captions wanted, 1 to {MAX_K}; clamped to the bank size"),
        index: str | None = Query(None, description="collection name (default: the first served)"),
    ) -> Any:
        """Video -> text: the captions of the served bank (``serve --captions``) that best describe a video."""
        params = strict_query_params(request.scope)
        return service.describe(index, params.get("video_id", video_id), k)

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
    captions: str | None = None,
) -> SearchService:
    """Load indexes and their adapters over ONE backbone (refusing indexes built on different backbones).

    ``media_roots`` (``serve --media-root``) replaces the collection folders recorded in the indexes as the only
    folders media routes serve from. ``captions`` (``serve --captions``): a caption bank file for ``/captions``.
    """
    from vidret.adapters.base import backbone_state_dict
    from vidret.adapters.io import read_adapter_meta
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
        backbone, read_adapter_meta(first.adapter_path), first.backbone_spec, where=f"index {loaded[0][1]}"
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
    # queries never run the vision tower (stored vectors / per-frame features): release its frozen weights
    from vidret.adapters.base import backbone_named_parameters
    from vidret.retrieval.query import drop_vision

    params = dict(backbone_named_parameters(clip))
    keep = {id(params[k]) for k in bank._pristine} | {
        id(p) for m in bank.models.values() for _, p in m.trainable_named_parameters()
    }
    for m in bank.models.values():
        drop_vision(m, keep)
    bank_of_captions = CaptionBank.read(captions) if captions else None
    service = SearchService(bank, collections, media_roots=media_roots, captions=bank_of_captions)
    service.warm_up()
    return service


__all__ = [
    "MAX_K",
    "MAX_QUERY_CHARS",
    "MAX_THUMB_FRAMES",
    "Collection",
    "QueryBatcher",
    "SearchService",
    "create_app",
    "open_service",
    "parse_index_specs",
    "set_threads",
    "strict_query_params",
    "validate_k",
    "validate_query",
]
