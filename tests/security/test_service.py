"""Security regressions of the HTTP service (issue 13, rows 4, 5, 6, 12 and 15).

Each collection here is built in memory (random vectors over the tiny backbone, records pointing at real files)
so a test controls exactly what an index claims: a crafted index needs no model and no `vidret index` run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.retrieval.helpers import COLOURS, write_clip

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

import vidret  # noqa: E402
from vidret.cli import main  # noqa: E402
from vidret.data.cache import file_identity  # noqa: E402
from vidret.model import AdapterBank  # noqa: E402
from vidret.retrieval import http as http_mod  # noqa: E402
from vidret.retrieval import service as service_mod  # noqa: E402
from vidret.retrieval.index import VideoIndex  # noqa: E402
from vidret.retrieval.index_files import VideoRecord  # noqa: E402
from vidret.retrieval.service import Collection, SearchService, create_app  # noqa: E402

SECRET = b"OUTSIDE-THE-COLLECTION-" + os.urandom(8).hex().encode()  # must never appear in a response
LOCAL = "http://localhost"  # TestClient's base URL: a Host the service allows by default


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def bank() -> AdapterBank:
    clip = vidret.create_backbone("pocket-tiny", seed=0).eval()
    b = AdapterBank(clip)
    b.add("frozen", vidret.build_model(clip, "frozen", adapter_name="frozen").eval())
    return b


def record_for(video_id: str, path: Path, identity: str | None = None) -> VideoRecord:
    real = os.path.realpath(path)
    return VideoRecord(video_id, str(path), real, 2.0, file_identity(real) if identity is None else identity)


def in_memory_index(records: list[VideoRecord], root: str | None) -> VideoIndex:
    idx = VideoIndex.from_vectors(torch.randn(len(records), 32), ids=[r.video_id for r in records])
    idx.records = records
    if root is not None:
        idx.root = root  # the collection root recorded at build time
    return idx


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """A collection folder with two clips and a big file; a secret file beside it (outside the root)."""
    root = tmp_path / "collection"
    red = write_clip(root / "red.mp4", COLOURS["red"])
    write_clip(root / "sub" / "green.mp4", COLOURS["green"])
    big = root / "big.mp4"
    big.write_bytes(os.urandom(1 << 20))  # streamed in several chunks
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(SECRET * (red.stat().st_size // len(SECRET) + 1))
    return {"root": root, "red": red, "green": root / "sub" / "green.mp4", "big": big, "secret": secret}


def make_service(bank: AdapterBank, records: list[VideoRecord], root: str | None, **kw: Any) -> SearchService:
    return SearchService(bank, [Collection("col", in_memory_index(records, root), "frozen")], **kw)


@pytest.fixture
def app(bank: AdapterBank, world: dict[str, Path]) -> Any:
    recs = [record_for("red", world["red"]), record_for("green", world["green"]), record_for("big", world["big"])]
    return create_app(make_service(bank, recs, str(world["root"])))


def open_fds_to(path: Path) -> list[str]:
    """The descriptors of this process open on ``path`` (Linux /proc)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath(path):
                out.append(fd)
    return out


# ------------------------------------------------------------------------------------------ row 4: the race


def test_symlink_swapped_in_during_requests_never_serves_the_outside_file(app: Any, world: dict[str, Path]) -> None:
    red, secret = world["red"], world["secret"]
    real_bytes = red.read_bytes()
    keep = red.parent.parent / "red.keep"  # a hard link: swapping back restores the very inode that was indexed
    os.link(red, keep)
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        link, back = red.parent / ".swap-link", red.parent / ".swap-back"
        while not stop.is_set():
            os.symlink(secret, link)
            os.replace(link, red)  # now a symlink to the outside file
            os.link(keep, back)
            os.replace(back, red)  # the indexed file again (same inode, size and mtime)
            swaps += 1

    thread = threading.Thread(target=swapper, daemon=True)
    statuses: dict[int, int] = {}
    with TestClient(app, base_url=LOCAL) as c:
        thread.start()
        try:
            for i in range(300):
                headers = {"Range": "bytes=0-99"} if i % 3 == 1 else {}
                url = "/thumbnails/col/red" if i % 10 == 9 else "/videos/col/red"
                r = c.get(url, headers=headers)
                assert SECRET[:16] not in r.content, (i, url, r.status_code)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200 and url.startswith("/videos"):
                    assert r.content == real_bytes
                elif r.status_code == 206:
                    assert r.content == real_bytes[:100]
        finally:
            stop.set()
            thread.join(10)
    assert swaps > 10 and set(statuses) <= {200, 206, 409}, (swaps, statuses)
    assert open_fds_to(keep) == []  # every descriptor opened for a response was closed


# ------------------------------------------------------------------------------------------ row 5: the root


def test_crafted_record_outside_the_root_is_refused(bank: AdapterBank, world: dict[str, Path]) -> None:
    outside = record_for("outside", world["secret"], identity="")  # empty identity: no size/mtime to compare
    etc = VideoRecord("etc", "/etc/hostname", "/etc/hostname", None, "")
    dotdot = VideoRecord("dotdot", str(world["root"] / ".." / "secret.mp4"), str(world["root"] / ".." / "secret.mp4"))
    service = make_service(bank, [record_for("red", world["red"]), outside, etc, dotdot], str(world["root"]))
    with TestClient(create_app(service), base_url=LOCAL) as c:
        assert c.get("/videos/col/red").status_code == 200
        for vid in ("outside", "etc", "dotdot"):
            for route in ("videos", "thumbnails"):
                r = c.get(f"/{route}/col/{vid}")
                assert r.status_code == 403 and SECRET[:16] not in r.content, (route, vid, r.status_code)
                assert r.json()["error"] == "forbidden"


def test_directory_symlink_out_of_the_root_is_refused(bank: AdapterBank, world: dict[str, Path]) -> None:
    rec = record_for("green", world["green"])  # recorded while sub/ was a real folder
    service = make_service(bank, [rec], str(world["root"]))
    sub = world["root"] / "sub"
    outside = world["root"].parent / "elsewhere"
    os.rename(sub, outside)
    os.symlink(outside, sub)  # the same file, now reached through a symlinked folder outside the root
    with TestClient(create_app(service), base_url=LOCAL) as c:
        assert c.get("/videos/col/green").status_code == 409


def test_media_root_option_replaces_the_recorded_root(bank: AdapterBank, world: dict[str, Path]) -> None:
    recs = [record_for("red", world["red"]), record_for("outside", world["secret"])]
    no_root = make_service(bank, recs, None)  # an index from before roots were recorded
    with TestClient(create_app(no_root), base_url=LOCAL) as c:
        r = c.get("/videos/col/red")
        assert r.status_code == 403 and "--media-root" in r.json()["detail"]
    with_root = make_service(bank, recs, None, media_roots=[str(world["root"])])
    with TestClient(create_app(with_root), base_url=LOCAL) as c:
        assert c.get("/videos/col/red").content == world["red"].read_bytes()
        assert c.get("/videos/col/outside").status_code == 403
    # --media-root wins over the recorded root: a recorded root of "/" does not widen it
    narrowed = make_service(bank, recs, "/", media_roots=[str(world["root"])])
    with TestClient(create_app(narrowed), base_url=LOCAL) as c:
        assert c.get("/videos/col/outside").status_code == 403


def test_fifo_and_changed_files_are_refused_without_blocking(bank: AdapterBank, world: dict[str, Path]) -> None:
    fifo = world["root"] / "pipe.mp4"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    recs = [record_for("pipe", fifo, identity="0:0:x"), record_for("red", world["red"])]
    service = make_service(bank, recs, str(world["root"]))
    with TestClient(create_app(service), base_url=LOCAL) as c:
        assert c.get("/videos/col/pipe").status_code == 409
        with world["red"].open("ab") as f:
            f.write(b"appended")
        assert c.get("/videos/col/red").status_code == 409


# ------------------------------------------------------------------------------------------ range requests


def test_range_requests_over_the_open_descriptor(app: Any, world: dict[str, Path]) -> None:
    data = world["red"].read_bytes()
    n = len(data)
    with TestClient(app, base_url=LOCAL) as c:
        full = c.get("/videos/col/red")
        assert full.status_code == 200 and full.content == data and full.headers["accept-ranges"] == "bytes"
        assert full.headers["content-type"] == "video/mp4" and int(full.headers["content-length"]) == n
        for spec, (a, b) in {"bytes=10-19": (10, 19), "bytes=-5": (n - 5, n - 1), f"bytes={n - 3}-": (n - 3, n - 1),
                             f"bytes=5-{n + 100}": (5, n - 1)}.items():  # fmt: skip
            r = c.get("/videos/col/red", headers={"Range": spec})
            assert r.status_code == 206 and r.content == data[a : b + 1], spec
            assert r.headers["content-range"] == f"bytes {a}-{b}/{n}"
        for spec in (f"bytes={n}-", f"bytes={n + 10}-{n + 20}", "bytes=-0"):
            r = c.get("/videos/col/red", headers={"Range": spec})
            assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{n}", spec
        for spec in ("bytes=0-1,4-5", "items=0-1", "bytes=9-3", "bytes=x-y", "bytes=" + "9" * 5000 + "-"):
            r = c.get("/videos/col/red", headers={"Range": spec})
            assert r.status_code == 200 and r.content == data, spec  # ignored (RFC 9110 allows it)
        stale = c.get("/videos/col/red", headers={"Range": "bytes=0-9", "If-Range": '"other"'})
        assert stale.status_code == 200 and stale.content == data
        fresh = c.get("/videos/col/red", headers={"Range": "bytes=0-9", "If-Range": full.headers["etag"]})
        assert fresh.status_code == 206 and fresh.content == data[:10]
        big = c.get("/videos/col/big")
        assert big.content == world["big"].read_bytes()
    assert open_fds_to(world["big"]) == [] and open_fds_to(world["red"]) == []


def test_client_disconnect_stops_the_stream_and_closes_the_file(app: Any, world: dict[str, Path]) -> None:
    sent: list[dict] = []
    asked = 0

    async def receive() -> dict:
        nonlocal asked
        asked += 1
        if asked == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(msg: dict) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/videos/col/big",
        "raw_path": b"/videos/col/big",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 1234),
        "server": ("localhost", 80),
    }
    asyncio.run(app(scope, receive, send))
    assert next(m["status"] for m in sent if m["type"] == "http.response.start") == 200
    streamed = sum(len(m.get("body", b"")) for m in sent if m["type"] == "http.response.body")
    assert streamed < world["big"].stat().st_size  # stopped early
    assert open_fds_to(world["big"]) == []


# ------------------------------------------------------------------------------------------ row 6: Host


def test_foreign_host_headers_are_refused_on_every_route(app: Any) -> None:
    with TestClient(app, base_url="http://evil.example.com") as c:
        for url in ("/search?q=red", "/videos/col/red", "/thumbnails/col/red", "/", "/health", "/nope"):
            r = c.get(url)
            assert r.status_code == 400 and r.json()["error"] == "bad_host", (url, r.status_code)
            assert "--allow-host" in r.json()["detail"]
        assert c.post("/search", json={"query": "red"}).status_code == 400
    for host in ("localhost:8000", "127.0.0.1", "127.0.0.1:1", "[::1]:8000", "[::1]", "::1", "LOCALHOST"):
        with TestClient(app, base_url=LOCAL, headers={"Host": host}) as c:
            assert c.get("/search", params={"q": "red"}).status_code == 200, host
            assert c.get("/videos/col/red").status_code == 200, host
    for host in ("localhost.evil.com", "127.0.0.1.nip.io", "evil.com:8000@localhost", "[::1", "localhost:x", ""):
        with TestClient(app, base_url=LOCAL, headers={"Host": host}) as c:
            assert c.get("/health").status_code == 400, host


def test_allow_host_adds_names(bank: AdapterBank, world: dict[str, Path]) -> None:
    recs = [record_for("red", world["red"])]
    app = create_app(make_service(bank, recs, str(world["root"])), allowed_hosts=["localhost", "media.lan"])
    with TestClient(app, base_url="http://media.lan:8000") as c:
        assert c.get("/videos/col/red").status_code == 200
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert c.get("/health").status_code == 400  # an explicit list replaces the defaults
    anyhost = create_app(make_service(bank, recs, str(world["root"])), allowed_hosts=["*"])
    with TestClient(anyhost, base_url="http://evil.example.com") as c:
        assert c.get("/health").status_code == 200


# ------------------------------------------------------------------------------------------ row 12: timeouts


@contextlib.contextmanager
def running_server(app: Any, keep_alive_s: int = 1, head_timeout_s: float = 1.0) -> Iterator[int]:
    sock = http_mod.bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = http_mod.make_server(app, keep_alive_s=keep_alive_s, head_timeout_s=head_timeout_s)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        assert server.started
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def closed_within(conn: socket.socket, seconds: float) -> tuple[bool, bytes, float]:
    """Read until the server closes the connection; (closed, bytes read, seconds waited)."""
    t0 = time.monotonic()
    conn.settimeout(0.2)
    got = b""
    while time.monotonic() - t0 < seconds:
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, got, time.monotonic() - t0
        if not chunk:
            return True, got, time.monotonic() - t0
        got += chunk
    return False, got, time.monotonic() - t0


@pytest.fixture
def timeout_app(bank: AdapterBank, world: dict[str, Path]) -> Any:
    service = make_service(bank, [record_for("red", world["red"])], str(world["root"]))
    return create_app(service, body_timeout_s=1.0)


def test_slow_idle_and_trickled_connections_time_out(timeout_app: Any) -> None:
    with running_server(timeout_app) as port:
        # half a request head, then nothing
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"GET /health HTTP/1.1\r\nHost: local")
        # a head trickled one byte at a time (each byte would re-arm a per-read timer)
        trickle = socket.create_connection(("127.0.0.1", port))
        # a connection that never sends a byte
        silent = socket.create_connection(("127.0.0.1", port))
        # a body that never completes
        body = socket.create_connection(("127.0.0.1", port))
        body.sendall(
            b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        # an idle keep-alive connection after one complete request
        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")

        t0 = time.monotonic()
        for b in b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 40:
            try:
                trickle.sendall(bytes([b]))
            except OSError:  # closed by the server: what this test wants
                break
            time.sleep(0.1)
            if time.monotonic() - t0 > 6:
                break
        conns = {"half": half, "trickle": trickle, "silent": silent, "body": body, "idle": idle}
        results = {name: closed_within(s, 6.0) for name, s in conns.items()}
        for s in conns.values():
            s.close()
    for name, (closed, _, waited) in results.items():
        assert closed, f"{name} connection still open after {waited:.1f} s"
    assert results["body"][1].startswith(b"HTTP/1.1 408"), results["body"][1][:80]
    for name in ("half", "trickle"):
        assert results[name][1].startswith(b"HTTP/1.1 408"), (name, results[name][1][:80])
    assert results["idle"][1].startswith(b"HTTP/1.1 200")


def test_media_through_a_real_server(timeout_app: Any, world: dict[str, Path]) -> None:
    """h11 holds the streamed body to its Content-Length; a foreign Host is refused by the real server too."""
    import http.client

    data = world["red"].read_bytes()
    with running_server(timeout_app) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for headers, status, body in (
            ({}, 200, data),
            ({"Range": "bytes=3-12"}, 206, data[3:13]),
            ({"Range": f"bytes={len(data)}-"}, 416, None),
            ({"Host": "evil.example.com"}, 400, None),
        ):
            conn.request("GET", "/videos/col/red", headers=headers)  # one keep-alive connection throughout
            r = conn.getresponse()
            got = r.read()
            assert r.status == status and (body is None or got == body), (headers, r.status)
            assert SECRET[:16] not in got
        conn.close()


# ------------------------------------------------------------------------------------------ row 15: bind first


def test_serve_on_a_busy_port_fails_before_announcing(
    bank: AdapterBank, world: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    service = make_service(bank, [record_for("red", world["red"])], str(world["root"]))
    monkeypatch.setattr(service_mod, "open_service", lambda *a, **kw: service)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(["serve", "col=unused", "--port", str(port)])
    captured = capsys.readouterr()
    assert rc == 1 and "serving" not in captured.out
    assert f"port {port} on 127.0.0.1 is in use; pass --port" in captured.err
    assert "Traceback" not in captured.err


def test_serve_binds_then_announces_and_runs_hardened(
    bank: AdapterBank, world: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    service = make_service(bank, [record_for("red", world["red"])], None)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(service_mod, "open_service", lambda *a, **kw: seen.update(open_kw=kw) or service)

    def fake_run(self: Any, sockets: list[socket.socket] | None = None) -> None:
        seen.update(config=self.config, sockname=sockets[0].getsockname() if sockets else None)
        seen["printed_before_run"] = capsys.readouterr().out

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    argv = ["serve", "col=unused", "--port", "0", "--allow-host", "media.lan", "--media-root", str(world["root"])]
    assert main(argv) == 0
    host, port = seen["sockname"]
    assert host == "127.0.0.1" and port > 0
    assert f"at http://127.0.0.1:{port}/" in seen["printed_before_run"]
    assert seen["open_kw"]["media_roots"] == [str(world["root"])]
    config = seen["config"]
    assert config.timeout_keep_alive == http_mod.KEEP_ALIVE_S
    from uvicorn.protocols.http.h11_impl import H11Protocol

    assert issubclass(config.http, H11Protocol)
    with TestClient(config.app, base_url="http://media.lan") as c:
        assert c.get("/health").status_code == 200
    with TestClient(config.app, base_url="http://evil.example.com") as c:
        assert c.get("/health").status_code == 400
    with TestClient(config.app, base_url=f"http://127.0.0.1:{port}") as c:
        assert c.get("/health").status_code == 200
    with pytest.raises(OSError):  # the listening socket was closed when the server returned
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
