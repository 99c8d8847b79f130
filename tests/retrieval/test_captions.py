"""Video -> text in the service: ``serve --captions BANK`` and ``GET /captions`` (issue 15 item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.retrieval.helpers import BACKBONE, save_adapter_for

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import vidret  # noqa: E402
from vidret.backbone.tokenizer import tokenize  # noqa: E402
from vidret.retrieval.build import build_index, load_backbone_spec  # noqa: E402
from vidret.retrieval.index import VideoIndex  # noqa: E402
from vidret.retrieval.index_files import IndexSettings, VideoRecord  # noqa: E402
from vidret.retrieval.service import Collection, SearchService, create_app, open_service  # noqa: E402

CAPTIONS = [
    "a red square",
    "a green field",
    "a blue sky",
    "a yellow taxi",
    "magenta flowers",
    "the cyan sea",
    "white snow",
    "a black cat",
    "a grey square moves",
    "a dog catches a frisbee",
]


@pytest.fixture(scope="module")
def bank_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("bank") / "bank.jsonl"
    lines = [json.dumps({"caption": c}) if i % 2 else json.dumps(c) for i, c in enumerate(CAPTIONS)]
    p.write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def service(built_index: Path, bank_file: Path) -> SearchService:
    return open_service([f"col={built_index}"], captions=str(bank_file))


@pytest.fixture(scope="module")
def client(service: SearchService):
    with TestClient(create_app(service), base_url="http://localhost") as c:
        yield c


def _expected(model, index: VideoIndex, row: int, k: int) -> tuple[list[int], list[float]]:
    """Brute force: cosine of every caption's text embedding with the stored video vector."""
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenize(CAPTIONS, index.settings.max_words)).float(), dim=-1)
    assert index.vectors is not None
    s = text @ index.vectors[row].float()
    v, i = s.topk(k)
    return i.tolist(), v.tolist()


def test_captions_rank_the_bank_for_an_indexed_video(client: TestClient, built_index: Path, lora_model) -> None:
    index = VideoIndex.load(built_index)
    vid = index.records[2].video_id
    r = client.get("/captions", params={"index": "col", "video_id": vid, "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["index"] == "col" and body["video_id"] == vid and body["k"] == 4
    ids, scores = _expected(lora_model, index, 2, 4)
    assert [h["caption_id"] for h in body["results"]] == ids
    assert [h["caption"] for h in body["results"]] == [CAPTIONS[i] for i in ids]
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4]
    assert [h["score"] for h in body["results"]] == pytest.approx(scores, abs=1e-4)
    assert all("start" not in h for h in body["results"])  # whole videos: no window
    # the default index, and another video ranks the bank differently
    other = client.get("/captions", params={"video_id": index.records[0].video_id, "k": 10}).json()
    assert other["index"] == "col" and len(other["results"]) == 10
    assert [h["caption_id"] for h in other["results"]] == _expected(lora_model, index, 0, 10)[0]


def test_k_is_clamped_to_the_bank_size(client: TestClient, service: SearchService) -> None:
    vid = next(iter(service.collections.values())).index.records[0].video_id
    body = client.get("/captions", params={"video_id": vid, "k": 1000}).json()
    assert body["k"] == len(CAPTIONS) and len(body["results"]) == len(CAPTIONS)
    assert sorted(h["caption_id"] for h in body["results"]) == list(range(len(CAPTIONS)))


@pytest.mark.parametrize("k", ["0", "-1", "1001", "x", "1.5", ""])
def test_bad_k_is_422(client: TestClient, service: SearchService, k: str) -> None:
    vid = next(iter(service.collections.values())).index.records[0].video_id
    r = client.get("/captions", params={"video_id": vid, "k": k})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"


def test_unknown_ids_and_indexes_are_404_and_missing_ids_422(client: TestClient, service: SearchService) -> None:
    vid = next(iter(service.collections.values())).index.records[0].video_id
    r = client.get("/captions", params={"video_id": "no-such-video"})
    assert r.status_code == 404 and r.json() == {"error": "not_found", "detail": "unknown video id"}
    assert client.get("/captions", params={"video_id": vid, "index": "nope"}).status_code == 404
    assert client.get("/captions", params={"video_id": vid[:-1]}).status_code == 404  # exact ids only
    assert client.get("/captions").status_code == 422
    assert client.get("/captions", params={"video_id": ""}).status_code == 422
    assert client.get("/captions", params={"video_id": "x" * 1001}).status_code == 422
    r = client.get("/captions?video_id=%ff%fe")  # not UTF-8
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert client.post("/captions", json={"video_id": vid}).status_code == 405
    # the route is in the API schema
    assert "/captions" in client.get("/openapi.json").json()["paths"]


def test_without_a_bank_the_route_says_how_to_get_one(service: SearchService) -> None:
    bare = SearchService(service.bank, list(service.collections.values()))
    vid = next(iter(bare.collections.values())).index.records[0].video_id
    with TestClient(create_app(bare), base_url="http://localhost") as c:
        r = c.get("/captions", params={"video_id": vid})
        assert r.status_code == 404 and "--captions BANK" in r.json()["detail"]
        assert c.get("/captions", params={"video_id": vid}, headers={"host": "evil.example"}).status_code == 400


def test_windowed_videos_score_each_caption_by_its_best_window(service: SearchService) -> None:
    """A video id of a windowed index stands for all its windows; a window id for itself."""
    col = next(iter(service.collections.values()))
    e = col.index.dim
    g = torch.Generator().manual_seed(0)
    vectors = F.normalize(torch.randn(5, e, generator=g), dim=-1)
    records = [
        VideoRecord("long#0-2", start=0.0, end=2.0, parent="long"),
        VideoRecord("long#1-3", start=1.0, end=3.0, parent="long"),
        VideoRecord("long#2-4", start=2.0, end=4.0, parent="long"),
        VideoRecord("short#0-1", start=0.0, end=1.0, parent="short"),
        VideoRecord("solo"),
    ]
    settings = IndexSettings(image_size=32, segment=2.0, stride=1.0)
    windowed = VideoIndex(records, col.index.identity, settings, vectors=vectors)
    svc = SearchService(service.bank, [Collection("w", windowed, col.adapter)], captions=service.captions)
    assert service.captions is not None
    text = F.normalize(service.captions._raw[svc._text_key(svc.collections["w"])], dim=-1)
    with TestClient(create_app(svc), base_url="http://localhost") as c:
        body = c.get("/captions", params={"video_id": "long", "k": 10}).json()
        s = text @ vectors[:3].T  # [B, 3 windows]
        best, which = s.max(dim=1)
        order = best.argsort(descending=True).tolist()
        assert [h["caption_id"] for h in body["results"]] == order
        for h in body["results"]:
            w = records[int(which[h["caption_id"]])]
            assert (h["start"], h["end"]) == (w.start, w.end)
            assert h["score"] == pytest.approx(float(best[h["caption_id"]]), abs=1e-5)
        one = c.get("/captions", params={"video_id": "long#1-3", "k": 3}).json()["results"]
        assert [h["caption_id"] for h in one] == (text @ vectors[1]).topk(3).indices.tolist()
        assert all((h["start"], h["end"]) == (1.0, 3.0) for h in one)
        assert c.get("/captions", params={"video_id": "solo"}).status_code == 200
        assert c.get("/captions", params={"video_id": "missing"}).status_code == 404


def test_text_conditioned_index_ranks_captions_with_its_head(
    tmp_path: Path, collection_dir: Path, bank_file: Path
) -> None:
    ad = save_adapter_for(tmp_path / "tc", "frozen", head="text_conditioned")
    model = vidret.load_adapter(load_backbone_spec(BACKBONE), ad).eval()
    out = tmp_path / "tc-ix"
    build_index(
        model,
        collection_dir,
        out,
        settings=IndexSettings(num_frames=4, image_size=32),
        backbone_spec=BACKBONE,
        adapter_path=str(ad),
    )
    svc = open_service([f"frames={out}"], captions=str(bank_file))
    index = VideoIndex.load(out)
    assert index.kind == "frames"
    from vidret.heads import VideoFeatures

    with torch.no_grad():
        text = model.encode_text(tokenize(CAPTIONS, index.settings.max_words))
        assert index.frames is not None and index.masks is not None
        video = VideoFeatures(index.frames[1:2], index.masks[1:2])
        want = (model.similarity(text, video).float() / model.logit_scale().float())[:, 0]
    with TestClient(create_app(svc), base_url="http://localhost") as c:
        body = c.get("/captions", params={"video_id": index.records[1].video_id, "k": 5}).json()
    assert [h["caption_id"] for h in body["results"]] == want.topk(5).indices.tolist()
    assert [h["score"] for h in body["results"]] == pytest.approx(want.topk(5).values.tolist(), abs=1e-4)


def test_serve_has_a_captions_option_and_a_bad_bank_is_one_error(tmp_path: Path, built_index: Path) -> None:
    from vidret.cli import build_parser
    from vidret.errors import VidretError

    args = build_parser().parse_args(["serve", str(built_index), "--captions", "bank.txt"])
    assert args.captions == "bank.txt"
    assert build_parser().parse_args(["serve", str(built_index)]).captions is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": 3}\n', encoding="utf-8")
    with pytest.raises(VidretError, match="bad.jsonl:1"):
        open_service([str(built_index)], captions=str(bad))
    with pytest.raises(VidretError, match="not a file"):
        open_service([str(built_index)], captions=str(tmp_path / "missing.txt"))
