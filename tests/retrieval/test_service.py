"""The HTTP service: every route, several adapters over one backbone, and an attack suite (no 500s, no leaks)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.retrieval.helpers import BACKBONE, COLOURS, running_server, save_adapter_for, write_clip

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import vidret  # noqa: E402
from vidret.errors import VidretError  # noqa: E402
from vidret.retrieval.build import build_index, load_backbone_spec  # noqa: E402
from vidret.retrieval.http import MAX_BODY_BYTES  # noqa: E402
from vidret.retrieval.service import create_app, open_service  # noqa: E402

logging.getLogger("httpx").setLevel(logging.WARNING)

SECRET = b"TOP-SECRET-" + os.urandom(16).hex().encode()  # bytes that must never appear in a response


@pytest.fixture(scope="module")
def attack_setup(tmp_path_factory: pytest.TempPathFactory, lora_adapter: Path, lora_model) -> dict[str, Any]:
    """A collection with a secret file beside it and a symlink in it pointing at the secret."""
    root = tmp_path_factory.mktemp("attack")
    secret = root / "secret.mp4"  # outside the collection, with a video extension
    secret.write_bytes(SECRET)
    (root / "secret.txt").write_bytes(SECRET)
    videos = root / "videos"
    for name in ("red", "green", "blue", "yellow", "cyan"):
        write_clip(videos / f"{name}.mp4", COLOURS[name])
    write_clip(videos / "sub dir" / "white clip.mp4", COLOURS["white"])  # a space and a slash in the id
    os.symlink(secret, videos / "evil.mp4")  # must be skipped at indexing time
    out = root / "index"
    report = build_index(
        lora_model, videos, out, backbone_spec=BACKBONE, adapter_path=str(lora_adapter), max_bad_fraction=0.5
    )
    return {"root": root, "videos": videos, "index": out, "report": report, "secret": secret}


@pytest.fixture(scope="module")
def client(attack_setup: dict[str, Any], msrvtt_or_none: Path | None):
    specs = [f"col={attack_setup['index']}"]
    if msrvtt_or_none is not None:
        specs.append(f"msr={msrvtt_or_none}")
    service = open_service(specs)
    with TestClient(
        create_app(service), base_url="http://localhost"
    ) as c:  # raise_server_exceptions: a 500 fails the test loudly
        yield c


@pytest.fixture(scope="module")
def msrvtt_or_none(request: pytest.FixtureRequest) -> Path | None:
    try:
        return request.getfixturevalue("msrvtt_index")
    except pytest.skip.Exception:
        return None


def assert_no_leak(r: Any) -> None:
    assert SECRET not in r.content
    assert r.status_code < 500


def assert_json_error(r: Any, status: int | tuple[int, ...]) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert "error" in body and "detail" in body
    assert_no_leak(r)
    return body


def raw_request(
    app: Any, method: str, path: str, query: bytes = b"", body: bytes = b"", headers=()
) -> tuple[int, bytes]:
    """Call the ASGI app directly: the path reaches it exactly as given (no client-side normalisation)."""
    sent: list[dict] = []
    chunks = [body]

    async def receive() -> dict:
        return {"type": "http.request", "body": chunks.pop(0) if chunks else b"", "more_body": False}

    async def send(msg: dict) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"localhost"), *headers],
        "client": ("127.0.0.1", 1234),
        "server": ("localhost", 80),
    }
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


# ------------------------------------------------------------------------------------------ routes


def test_index_skipped_the_symlink_escape(attack_setup: dict[str, Any]) -> None:
    rep = attack_setup["report"]
    assert [v for v, _, _ in rep.bad.items] == ["evil"] and rep.indexed == 6


def test_search_get_and_post(client: TestClient) -> None:
    r = client.get("/search", params={"q": "a red ball", "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["index"] == "col" and body["k"] == 3 and len(body["results"]) == 3
    assert [h["rank"] for h in body["results"]] == [1, 2, 3]
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    p = client.post("/search", json={"query": "a red ball", "k": 3, "index": "col"})
    assert p.status_code == 200
    assert [h["video_id"] for h in p.json()["results"]] == [h["video_id"] for h in body["results"]]


def test_k_is_clamped_to_the_index_size(client: TestClient) -> None:
    r = client.get("/search", params={"q": "anything", "k": 1000})
    assert r.status_code == 200 and r.json()["k"] == 6 and len(r.json()["results"]) == 6


def test_media_routes_and_range_requests(client: TestClient, attack_setup: dict[str, Any]) -> None:
    hits = client.get("/search", params={"q": "white", "k": 10}).json()["results"]
    white = next(h for h in hits if h["video_id"] == "sub dir/white clip")
    assert white["video_url"] == "/videos/col/sub%20dir%2Fwhite%20clip"
    r = client.get(white["video_url"])
    expected = (attack_setup["videos"] / "sub dir" / "white clip.mp4").read_bytes()
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and r.content == expected
    part = client.get("/videos/col/red", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == (attack_setup["videos"] / "red.mp4").read_bytes()[10:20]
    t = client.get(white["thumbnail_url"], params={"n": 4})
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    assert t.content[:2] == b"\xff\xd8" and t.content[-2:] == b"\xff\xd9"
    assert client.get("/thumbnails/col/red").content[:2] == b"\xff\xd8"


def test_health_indexes_page_and_docs(client: TestClient) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["backbone"] == "pocket-tiny"
    ix = client.get("/indexes").json()
    assert ix["default"] == "col" and ix["indexes"][0]["videos"] == 6 and ix["indexes"][0]["method"] == "lora"
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text and "/web/app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css", "docs.js"):
        asset = client.get(f"/web/{name}")
        assert asset.status_code == 200 and "http://" not in asset.text and "https://" not in asset.text
    assert "https://" not in page.text and "http://" not in page.text  # no CDN, no external URL
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/search", "/videos/{index}/{video_id}", "/thumbnails/{index}/{video_id}", "/health"} <= set(spec["paths"])


def test_two_adapters_share_one_backbone(client: TestClient, msrvtt_or_none: Path | None) -> None:
    if msrvtt_or_none is None:
        pytest.skip("MSR-VTT samples not available")
    ix = {i["name"]: i for i in client.get("/indexes").json()["indexes"]}
    assert ix["col"]["method"] == "lora" and ix["msr"]["method"] == "frozen"
    app = client.app
    service = app.app.state.service  # BodyLimitMiddleware -> FastAPI app
    assert service.bank.names() == ["col", "msr"]  # one bank, one backbone, two adapters
    r = client.get("/search", params={"q": "a man is singing", "index": "msr", "k": 2})
    assert r.status_code == 200 and r.json()["index"] == "msr" and len(r.json()["results"]) == 2
    first = r.json()["results"][0]
    assert client.get(first["thumbnail_url"], params={"n": 3}).content[:2] == b"\xff\xd8"


def test_open_service_refuses_indexes_on_different_backbones(
    tmp_path: Path, attack_setup: dict[str, Any], collection_dir: Path
) -> None:

    ad = save_adapter_for(tmp_path / "ad", "lora", seed=3, backbone_seed=5)
    model = vidret.load_adapter(vidret.create_backbone("pocket-tiny", seed=5), ad).eval()
    build_index(model, collection_dir, tmp_path / "other", backbone_spec=BACKBONE, adapter_path=str(ad))
    with pytest.raises(VidretError, match="different backbones"):
        open_service([f"a={attack_setup['index']}", f"b={tmp_path / 'other'}"])
    with pytest.raises(VidretError, match="several indexes"):
        open_service([f"a={attack_setup['index']}", f"a={attack_setup['index']}"])
    with pytest.raises(VidretError, match="must match"):
        open_service([f"../x={attack_setup['index']}"])


# ------------------------------------------------------------------------------------------ attacks


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"q": ""},
        {"q": "   \t\n "},
        {"q": "a" * 1001},
        {"q": "red", "k": 0},
        {"q": "red", "k": -5},
        {"q": "red", "k": 1001},
        {"q": "red", "k": "ten"},
        {"q": "red", "k": "1.5"},
        {"q": "red", "k": "1e400"},
    ],
)
def test_bad_search_parameters_are_422(client: TestClient, params: dict) -> None:
    assert_json_error(client.get("/search", params=params), 422)


def test_longest_allowed_query_works(client: TestClient) -> None:
    assert client.get("/search", params={"q": "a" * 1000, "k": 1}).status_code == 200


def test_unknown_index_and_ids_are_404(client: TestClient) -> None:
    assert_json_error(client.get("/search", params={"q": "red", "index": "nope"}), 404)
    assert_json_error(client.post("/search", json={"query": "red", "index": "../col"}), 404)
    for url in ("/videos/nope/red", "/videos/col/nope", "/thumbnails/col/nope", "/thumbnails/nope/red", "/nope"):
        assert_json_error(client.get(url), 404)


@pytest.mark.parametrize(
    "query",
    [b"q=%FF", b"q=%C3%28", b"q=%ED%A0%80", b"q=\xff\xfe", b"q=red&index=%FF", b"q=%F0%9F%98"],
)
def test_non_utf8_query_strings_are_422(client: TestClient, query: bytes) -> None:
    status, body = raw_request(client.app, "GET", "/search", query=query)
    assert status == 422, body
    assert json.loads(body)["error"] == "invalid_request"


def test_post_bodies(client: TestClient) -> None:
    h = {"content-type": "application/json"}
    cases = [
        (b'{"query": "\\ud800 lone surrogate"}', 422),
        (b'{"query": "\xff\xfe"}', (400, 422)),
        (b'{"query": "red", "k": NaN}', 422),
        (b'{"query": "red", "k": 1e999}', 422),
        (b'{"query": "red", "k": 10000000000000000000000000}', 422),
        (b'{"query": ["red"]}', 422),
        (b'{"query": null}', 422),
        (b'{"query": "red", "unexpected": 1}', 422),
        (b'["red"]', 422),
        (b"not json", (400, 422)),
        (b"[" * 30000, (400, 422)),  # nesting deep enough to hit the JSON parser's recursion limit
        (b"", 422),
    ]
    for body, status in cases:
        assert_json_error(client.post("/search", content=body, headers=h), status)
    assert_json_error(client.post("/search", content=b'{"query": "red"}', headers={"content-type": "text/plain"}), 422)


def test_oversized_bodies_are_413(client: TestClient) -> None:
    big = json.dumps({"query": "red", "pad": "x" * MAX_BODY_BYTES}).encode()
    assert_json_error(client.post("/search", content=big, headers={"content-type": "application/json"}), 413)

    def chunked():  # no Content-Length: the limit must hold on the streamed bytes too
        for _ in range(20):
            yield b"x" * 8192

    assert_json_error(client.post("/search", content=chunked(), headers={"content-type": "application/json"}), 413)
    status, _ = raw_request(client.app, "POST", "/search", headers=[(b"content-length", b"99999999999")])
    assert status == 413
    status, _ = raw_request(client.app, "POST", "/search", headers=[(b"content-length", b"12abc")])
    assert status == 400


TRAVERSALS = [
    "../secret.mp4",
    "../../secret.txt",
    "..%2Fsecret.mp4",
    "%2e%2e%2fsecret.mp4",
    "%252e%252e%252fsecret.mp4",
    "..\\secret.mp4",
    "red/../../secret.mp4",
    "/etc/passwd",
    "//etc/passwd",
    "evil",
    "evil.mp4",
    "red%00.mp4",
    "red\x00",
    "....//secret.mp4",
    "%c0%ae%c0%ae/secret.mp4",
]


@pytest.mark.parametrize("vid", TRAVERSALS)
def test_path_traversal_on_media_routes(client: TestClient, attack_setup: dict[str, Any], vid: str) -> None:
    abs_secret = str(attack_setup["secret"])
    for route in ("videos", "thumbnails"):
        for index in ("col", "..", "%2e%2e"):
            status, body = raw_request(client.app, "GET", f"/{route}/{index}/{vid}")
            assert 400 <= status < 500 and SECRET not in body, (route, index, vid, status)
        # through a real HTTP client too (which normalises dot segments and percent-encodes)
        if vid.isprintable():  # the client itself refuses control characters in URLs
            assert_no_leak(client.get(f"/{route}/col/{vid}"))
        assert_no_leak(client.get(f"/{route}/col/{abs_secret}"))
        assert_no_leak(client.get(f"/{route}/col/" + abs_secret.replace("/", "%2F")))
    for name in (f"../{attack_setup['secret'].name}", "..%2F..%2Fsecret.txt", "index.html/../../secret.txt"):
        status, body = raw_request(client.app, "GET", f"/web/{name}")
        assert status == 404 and SECRET not in body


def test_file_swapped_for_a_symlink_after_indexing_is_refused(tmp_path: Path, lora_adapter: Path, lora_model) -> None:
    videos = tmp_path / "videos"
    for name in ("red", "green"):
        write_clip(videos / f"{name}.mp4", COLOURS[name])
    build_index(lora_model, videos, tmp_path / "ix", backbone_spec=BACKBONE, adapter_path=str(lora_adapter))
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(SECRET)
    (videos / "green.mp4").unlink()
    os.symlink(secret, videos / "green.mp4")
    shutil.copy(secret, videos / "red.mp4")  # same path, other content
    with TestClient(create_app(open_service([f"ix={tmp_path / 'ix'}"])), base_url="http://localhost") as c:
        for vid in ("green", "red"):
            assert_json_error(c.get(f"/videos/ix/{vid}"), 409)
            assert_json_error(c.get(f"/thumbnails/ix/{vid}"), 409)
        (videos / "green.mp4").unlink()
        assert_json_error(c.get("/videos/ix/green"), 404)


def test_wrong_methods_are_json_4xx(client: TestClient) -> None:
    assert_json_error(client.put("/search", json={"query": "red"}), 405)
    assert_json_error(client.delete("/videos/col/red"), 405)


@pytest.mark.parametrize("n", ["0", "9", "-1", "x", "1e3"])
def test_bad_thumbnail_counts_are_422(client: TestClient, n: str) -> None:
    assert_json_error(client.get("/thumbnails/col/red", params={"n": n}), 422)


# ------------------------------------------------------------------------------------------ fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "query": st.text(max_size=1200) | json_values,
        "k": st.integers(min_value=-5, max_value=2000) | json_values,
        "index": st.sampled_from(["col", "msr", "", "nope", "../col"]) | json_values,
    },
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies | json_values)
def test_fuzzed_json_bodies_never_5xx(client: TestClient, body: Any) -> None:
    r = client.post("/search", json=body)
    assert r.status_code in (200, 404, 422), (body, r.status_code, r.text)
    if r.status_code == 200:
        out = r.json()
        k_asked = body.get("k", 10) if isinstance(body, dict) else 10
        assert len(out["results"]) == out["k"] <= k_asked
    else:
        assert "error" in r.json()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(q=st.text(max_size=300), k=st.text(max_size=6), index=st.text(max_size=6))
def test_fuzzed_query_strings_never_5xx(client: TestClient, q: str, k: str, index: str) -> None:
    r = client.get("/search", params={"q": q, "k": k, "index": index})
    assert r.status_code in (200, 404, 422), (q, k, index, r.text)


def test_text_conditioned_collection_beside_a_pooled_one(
    tmp_path: Path, attack_setup: dict[str, Any], collection_dir: Path
) -> None:
    from vidret.retrieval.index_files import IndexSettings

    ad = save_adapter_for(tmp_path / "tc", "frozen", head="text_conditioned")
    model = vidret.load_adapter(load_backbone_spec(BACKBONE), ad).eval()
    settings = IndexSettings(num_frames=4, image_size=32)
    build_index(
        model, collection_dir, tmp_path / "tc-ix", settings=settings, backbone_spec=BACKBONE, adapter_path=str(ad)
    )
    service = open_service([f"pooled={attack_setup['index']}", f"frames={tmp_path / 'tc-ix'}"])
    with TestClient(create_app(service), base_url="http://localhost") as c:
        kinds = {i["name"]: i["kind"] for i in c.get("/indexes").json()["indexes"]}
        assert kinds == {"pooled": "pooled", "frames": "frames"}
        r = c.post("/search", json={"query": "a blue square", "index": "frames", "k": 5})
        assert r.status_code == 200 and len(r.json()["results"]) == 5
        # same ranking as the library search with the model's own head
        from vidret.backbone.tokenizer import tokenize
        from vidret.retrieval.index import VideoIndex

        idx = VideoIndex.load(tmp_path / "tc-ix")
        _, rows = idx.search_text(model, model.encode_text(tokenize(["a blue square"], 32)), 5)
        assert [h["video_id"] for h in r.json()["results"]] == [idx.records[i].video_id for i in rows[0].tolist()]
        assert c.get("/search", params={"q": "red", "index": "pooled"}).status_code == 200


def test_attacks_through_a_real_uvicorn_server(client: TestClient) -> None:
    """Traversal and size attacks as raw HTTP/1.1 through uvicorn's parser (http.client sends paths as is)."""
    import http.client

    with running_server(client.app) as port:
        paths = [f"/{route}/col/{vid}" for route in ("videos", "thumbnails") for vid in TRAVERSALS if vid.isprintable()]
        paths += [
            "/videos/col/%2E%2E/%2E%2E/secret.mp4",
            "/web/..%2f..%2fsecret.txt",
            "/search?q=%FF",
            "/search?k=0&q=a",
        ]
        for path in paths:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            conn.close()
            assert 400 <= r.status < 500 and SECRET not in body, (path, r.status)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/search", body=b"x" * (MAX_BODY_BYTES + 1), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 413 and json.loads(r.read())["error"] == "too_large"
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/search?q=red&k=2")
        r = conn.getresponse()
        assert r.status == 200 and len(json.loads(r.read())["results"]) == 2
        conn.close()
