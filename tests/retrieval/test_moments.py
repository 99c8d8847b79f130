"""Moments: window planning, windowed indexes (build, round trip, update, grouping), ``/search`` start/end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.retrieval.helpers import BACKBONE, COLOURS, write_clip, write_parts
from vidret.errors import VidretError
from vidret.retrieval.build import build_index, video_query_vector
from vidret.retrieval.index import VideoIndex
from vidret.retrieval.index_files import INDEX_FILE, IndexSettings, VideoRecord, read_records
from vidret.retrieval.moments import grouped_topk, iou, plan_windows, window_id

STITCHED = ["red", "green", "blue", "yellow"]  # 2 s each: red 0-2, green 2-4, blue 4-6, yellow 6-8


def write_stitched(path: Path, names: list[str], seconds: float = 2.0) -> Path:
    """One h264 video made of the named flat colours, ``seconds`` each."""
    return write_parts(path, [COLOURS[n] for n in names], seconds)


# ------------------------------------------------------------------------------------------ planning


def test_windows_cover_the_video_with_full_length_windows() -> None:
    assert plan_windows(10.0, 4.0, 2.0) == [(0.0, 4.0), (2.0, 6.0), (4.0, 8.0), (6.0, 10.0)]
    # stride == segment: the last window is shifted back to end at the end (no short tail)
    assert plan_windows(10.0, 4.0, 4.0) == [(0.0, 4.0), (4.0, 8.0), (6.0, 10.0)]
    # a stride that divides the length exactly adds no duplicate last window
    assert plan_windows(8.0, 4.0, 2.0) == [(0.0, 4.0), (2.0, 6.0), (4.0, 8.0)]
    for duration, seg, stride in [(37.3, 5.0, 1.5), (100.0, 8.0, 8.0), (9.01, 3.0, 2.9)]:
        w = plan_windows(duration, seg, stride)
        assert w[0][0] == 0.0 and w[-1][1] == round(duration, 3)
        assert all(abs((b - a) - seg) < 1e-3 for a, b in w)
        assert all(w[i + 1][0] <= w[i][1] for i in range(len(w) - 1))  # no gap
        assert all(w[i + 1][0] > w[i][0] for i in range(len(w) - 1))


def test_short_videos_and_manifest_segments() -> None:
    assert plan_windows(3.0, 4.0, 2.0) == [(0.0, 3.0)]  # shorter than a window: all of it
    assert plan_windows(4.0, 4.0, 2.0) == [(0.0, 4.0)]
    # windows stay inside a manifest segment [5, 13]
    assert plan_windows(20.0, 4.0, 3.0, start=5.0, end=13.0) == [(5.0, 9.0), (8.0, 12.0), (9.0, 13.0)]
    assert plan_windows(20.0, 4.0, 3.0, start=18.5) == [(18.5, 20.0)]
    assert plan_windows(10.0, 4.0, 2.0, start=12.0) == []  # the segment starts after the end


@pytest.mark.parametrize(("segment", "stride"), [(4.0, 5.0), (4.0, 0.0), (-1.0, 1.0), (float("nan"), 1.0), (0.0, 2.0)])
def test_bad_window_plans_are_refused(segment: float, stride: float) -> None:
    with pytest.raises(VidretError):
        IndexSettings(segment=segment, stride=stride)


def test_window_ids_and_iou() -> None:
    assert window_id("a/clip", 12.5, 16.0) == "a/clip#12.5-16"
    assert window_id("x", 0.1234, 1.0) == "x#0.123-1"
    assert iou((0, 4), (2, 6)) == pytest.approx(2 / 6)
    assert iou((0, 1), (2, 3)) == 0.0


def test_grouped_topk_keeps_the_best_window_per_video_and_asks_for_more_rows() -> None:
    asked: list[int] = []

    def searcher(scores: torch.Tensor):
        def search(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            asked.append(n)
            return scores.topk(n, dim=1)

        return search

    groups = ["a", "a", "a", "a", "b", "b", "c"]
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]]).repeat(2, 1)
    hits = grouped_topk(searcher(scores), groups, [3, 3], [True, False])
    assert [r for r, _ in hits[0]] == [0, 4, 6]  # best of a, best of b, c
    assert [r for r, _ in hits[1]] == [0, 1, 2]  # ungrouped: every row
    assert asked == [7]  # 3 * 4, clipped to the 7 rows
    # 70 rows: video a's 40 windows score highest, so the first ask (8 rows) finds one video only
    asked.clear()
    groups = ["a"] * 40 + ["b"] * 20 + ["c"] * 10
    scores = torch.linspace(1, 0, 70)[None]
    hits = grouped_topk(searcher(scores), groups, [2], [True])
    assert [groups[r] for r, _ in hits[0]] == ["a", "b"]
    assert asked == [8, 16, 32, 64]
    assert grouped_topk(searcher(scores), groups, [5], [True])[0][-1][0] == 60  # only 3 videos: all rows seen


# ------------------------------------------------------------------------------------------ windowed indexes


@pytest.fixture(scope="module")
def stitched_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("long") / "videos"
    write_stitched(d / "long.mp4", STITCHED)
    write_clip(d / "short.mp4", COLOURS["magenta"], seconds=1.5)
    return d


@pytest.fixture(scope="module")
def windowed_index(
    tmp_path_factory: pytest.TempPathFactory, stitched_dir: Path, lora_model, lora_adapter: Path
) -> Path:
    out = tmp_path_factory.mktemp("idx") / "windows"
    build_index(
        lora_model,
        stitched_dir,
        out,
        settings=IndexSettings(image_size=32, num_frames=4, dtype="float32", segment=2.0, stride=1.0),
        backbone_spec=BACKBONE,
        adapter_path=str(lora_adapter),
    )
    return out


def test_windowed_index_rows_round_trip(windowed_index: Path, stitched_dir: Path) -> None:
    index = VideoIndex.load(windowed_index)
    assert index.segmented and index.settings.segment == 2.0 and index.settings.stride == 1.0
    long = [r for r in index.records if r.parent == "long"]
    assert [(r.start, r.end) for r in long] == [(float(a), float(a + 2)) for a in range(7)]
    assert [r.video_id for r in long][:2] == ["long#0-2", "long#1-3"]
    assert all(r.path == str(stitched_dir / "long.mp4") for r in long)
    short = [r for r in index.records if r.parent == "short"]
    assert len(short) == 1 and short[0].start == 0.0 and short[0].end == pytest.approx(1.5, abs=0.11)
    assert index.group_keys().count("long") == 7
    # the windows of one video hold different vectors (each encodes its own frames)
    assert index.vectors is not None
    assert not torch.allclose(index.vectors[0], index.vectors[4], atol=1e-3)
    report = json.loads((windowed_index / "build_report.json").read_text())
    assert report["indexed"] == 2 and report["windows"] == 8


def test_a_video_query_finds_its_window_and_grouping_returns_one_per_video(
    windowed_index: Path, stitched_dir: Path, lora_model, tmp_path: Path
) -> None:
    index = VideoIndex.load(windowed_index)
    truth = {"red": (0.0, 2.0), "green": (2.0, 4.0), "blue": (4.0, 6.0), "yellow": (6.0, 8.0)}
    for colour, span in truth.items():
        q = video_query_vector(lora_model, write_clip(tmp_path / f"{colour}.mp4", COLOURS[colour]), index.settings)
        best = index.top_hits(lambda n, q=q: index.search(q, n), [2], ["video"])[0]
        top = index.records[best[0][0]]
        assert top.parent == "long" and (top.start, top.end) == span, (colour, top)
        assert [index.records[r].group for r, _ in best] == ["long", "short"]  # one hit per video
        every = index.top_hits(lambda n, q=q: index.search(q, n), [4], ["segment"])[0]
        _, raw = index.search(q, 4)
        assert [r for r, _ in every] == raw[0].tolist()  # windows ranked on their own, several per video
        assert sum(index.records[r].parent == "long" for r, _ in every) >= 3


def test_update_keeps_unchanged_windows_and_refuses_new_window_settings(
    windowed_index: Path, stitched_dir: Path, lora_model, lora_adapter: Path, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "ix"
    shutil.copytree(windowed_index, copy)
    before = VideoIndex.load(copy)
    report = build_index(lora_model, stitched_dir, copy, update=True, adapter_path=str(lora_adapter))
    assert (report.kept, report.added, report.updated, report.windows) == (2, 0, 0, 8)
    after = VideoIndex.load(copy)
    assert after.records == before.records
    assert after.vectors is not None and before.vectors is not None
    assert torch.equal(after.vectors, before.vectors)
    s = IndexSettings(image_size=32, num_frames=4, dtype="float32", segment=4.0, stride=2.0)
    with pytest.raises(VidretError, match="segment=2.0"):
        build_index(lora_model, stitched_dir, copy, settings=s, update=True, adapter_path=str(lora_adapter))


def test_indexes_without_windows_still_load(built_index: Path) -> None:
    meta = json.loads((built_index / INDEX_FILE).read_text())
    assert "segment" not in json.dumps(read_records(built_index / meta["files"]["videos"]["file"])[0])
    index = VideoIndex.load(built_index)
    assert not index.segmented and all(r.parent == "" and r.group == r.video_id for r in index.records)
    # a record from before windows existed (no "parent" field) reads as a whole video
    rec = VideoRecord.from_obj({"video_id": "v", "start": None, "end": None})
    assert rec.parent == "" and rec.group == "v"


@pytest.mark.parametrize(
    "row",
    [
        {"video_id": "v#0-2", "parent": 3, "start": 0, "end": 2},
        {"video_id": "v#0-2", "parent": "v", "start": None, "end": 2},
        {"video_id": "v#0-2", "parent": "v", "start": 2, "end": 2},
        {"video_id": "v#0-2", "parent": "v", "start": -1, "end": 2},
    ],
)
def test_malformed_window_rows_are_refused(row: dict) -> None:
    with pytest.raises(ValueError):
        VideoRecord.from_obj(row)


def test_a_crafted_window_row_fails_loading_with_one_error(windowed_index: Path, tmp_path: Path) -> None:
    import shutil

    from vidret.atomic import sha256_file

    copy = tmp_path / "ix"
    shutil.copytree(windowed_index, copy)
    meta = json.loads((copy / INDEX_FILE).read_text())
    vp = copy / meta["files"]["videos"]["file"]
    lines = vp.read_text().splitlines()
    row = json.loads(lines[0])
    row["end"] = None
    lines[0] = json.dumps(row)
    vp.write_text("\n".join(lines) + "\n")
    meta["files"]["videos"]["sha256"] = sha256_file(vp)  # checksums are no signature: the row check must catch it
    (copy / INDEX_FILE).write_text(json.dumps(meta))
    with pytest.raises(VidretError, match="row 1.*needs 0 <= start < end"):
        VideoIndex.load(copy)


def test_search_api_returns_start_and_end_per_hit(windowed_index: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vidret.retrieval.service import create_app, open_service

    service = open_service([f"w={windowed_index}"])
    with TestClient(create_app(service), base_url="http://127.0.0.1") as client:
        body = client.get("/search", params={"q": "red", "k": 5}).json()
        hits = body["results"]
        assert len(hits) == 2  # two videos: the best window of each
        assert {h["parent"] for h in hits} == {"long", "short"}
        for h in hits:
            assert 0 <= h["start"] < h["end"]
            assert h["video_id"] == window_id(h["parent"], h["start"], h["end"])
            assert h["thumbnail_url"].startswith("/thumbnails/w/")
        seg = client.post("/search", json={"query": "red", "k": 5, "group": "segment"}).json()["results"]
        assert len(seg) == 5 and all("start" in h and "end" in h for h in seg)
        assert seg[0]["score"] >= seg[-1]["score"]
        assert client.get("/search", params={"q": "red", "group": "nope"}).status_code == 422
        # the window's thumbnail comes from the window's frames; the video route serves the parent file
        assert client.get(hits[0]["thumbnail_url"]).headers["content-type"] == "image/jpeg"
        assert client.get(hits[0]["video_url"]).status_code == 200


def test_cli_index_segment_and_search_group(
    stitched_dir: Path, lora_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vidret.cli import main

    out = tmp_path / "ix"
    common = ["--adapter", str(lora_adapter), "--backbone", BACKBONE, "--workers", "0", "--device", "cpu"]
    assert main(["index", *common, "--videos", str(stitched_dir), "--out", str(out), "--segment", "4"]) == 0
    assert "2 videos (4 windows) indexed" in capsys.readouterr().out  # stride defaults to half the segment
    index = VideoIndex.load(out)
    assert index.settings.stride == 2.0
    assert [(r.start, r.end) for r in index.records if r.parent == "long"] == [(0.0, 4.0), (2.0, 6.0), (4.0, 8.0)]
    assert main(["search", str(out), "red", "-k", "5", "--json", "--backbone", BACKBONE]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert sorted(h["parent"] for h in hits) == ["long", "short"]
    assert all(h["end"] > h["start"] for h in hits)
    assert main(["search", str(out), "red", "-k", "5", "--group", "segment", "--backbone", BACKBONE]) == 0
    table = capsys.readouterr().out
    assert "time" in table and "0.0-4.0s" in table and table.count("long#") == 3
    assert main(["index", *common, "--videos", str(stitched_dir), "--out", str(tmp_path / "b"), "--stride", "2"]) == 1
    assert "--stride needs --segment" in capsys.readouterr().err


def test_stitch_concatenates_clips(tmp_path: Path) -> None:
    from vidret.bench.moments import stitch
    from vidret.data.decode import PyAVDecoder

    clips = [write_clip(tmp_path / f"{c}.mp4", COLOURS[c], seconds=1.0) for c in ("red", "blue", "green")]
    assert stitch(clips, tmp_path / "long.mp4") == pytest.approx(1.0)
    assert PyAVDecoder().probe(str(tmp_path / "long.mp4")).duration == pytest.approx(3.0, abs=0.15)
