"""`vidret index` / `vidret search` end to end through the CLI, on generated clips and the real MSR-VTT samples."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.retrieval.helpers import BACKBONE, COLOURS, write_clip
from vidret.cli import main
from vidret.retrieval.backends import faiss_available
from vidret.retrieval.index import VideoIndex


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_index_then_search_text_and_video(
    tmp_path: Path, collection_dir: Path, lora_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ix"
    argv = ["index", "--adapter", str(lora_adapter), "--backbone", BACKBONE, "--videos", str(collection_dir)]
    rep = run_json(capsys, [*argv, "--out", str(out), "--workers", "0", "--json"])
    assert rep["indexed"] == len(COLOURS) and rep["added"] == len(COLOURS)
    meta = json.loads((out / "index.json").read_text())
    assert meta["model"]["backbone_spec"] == BACKBONE
    assert meta["model"]["adapter_path"] == str(lora_adapter.absolute())

    res = run_json(capsys, ["search", str(out), "a dog catches a frisbee", "-k", "3", "--json"])
    assert res["text"] == "a dog catches a frisbee" and res["k"] == 3
    assert [r["rank"] for r in res["results"]] == [1, 2, 3]
    scores = [r["score"] for r in res["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(Path(r["path"]).is_file() for r in res["results"])

    res = run_json(capsys, ["search", str(out), "--video", str(collection_dir / "cyan.mp4"), "-k", "100", "--json"])
    assert res["results"][0]["video_id"] == "cyan" and res["results"][0]["score"] > 0.99
    assert len(res["results"]) == len(COLOURS)  # k clamped to the index size

    capsys.readouterr()
    assert main(["search", str(out), "red", "-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["rank", "score", "video_id"] and len(table) == 3


def test_update_from_the_cli(tmp_path: Path, lora_adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    videos = tmp_path / "videos"
    for name in ("red", "green", "blue"):
        write_clip(videos / f"{name}.mp4", COLOURS[name])
    base = ["index", "--adapter", str(lora_adapter), "--videos", str(videos), "--out", str(tmp_path / "ix")]
    base += ["--workers", "0", "--json"]
    run_json(capsys, [*base, "--backbone", BACKBONE, "--frames", "4"])
    (videos / "green.mp4").unlink()
    write_clip(videos / "sub" / "magenta.mp4", COLOURS["magenta"])
    rep = run_json(capsys, [*base, "--update"])  # backbone and frames come from the index
    assert (rep["added"], rep["removed"], rep["kept"], rep["indexed"]) == (1, 1, 2, 3)
    idx = VideoIndex.load(tmp_path / "ix")
    assert sorted(idx.ids) == ["blue", "red", "sub/magenta"] and idx.settings.num_frames == 4
    # changing the sampling on update is refused
    assert main([*base, "--update", "--frames", "8"]) == 1
    assert "num_frames=4" in capsys.readouterr().err


def test_search_refuses_mismatched_adapter_and_backbone(
    built_index: Path, other_lora_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["search", str(built_index), "red", "--adapter", str(other_lora_adapter)]) == 1
    err = capsys.readouterr().err
    assert "built with adapter" in err and "lora2" in err and "vidret: error" in err
    assert main(["search", str(built_index), "red", "--backbone", "random:pocket-small"]) == 1
    err = capsys.readouterr().err
    assert "pocket-tiny" in err and "pocket-small" in err


def test_search_needs_exactly_one_query(built_index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", str(built_index)]) == 1
    assert main(["search", str(built_index), "   "]) == 1
    assert main(["search", str(built_index), "red", "--video", "x.mp4"]) == 1
    assert main(["search", str(built_index), "red", "-k", "0"]) == 1
    assert main(["search", str(built_index), "--video", str(built_index / "index.json")]) == 1
    assert "bad video" in capsys.readouterr().err


def test_index_reports_missing_adapter_folder(tmp_path: Path, built_index: Path, capsys) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(built_index, copy)
    meta = json.loads((copy / "index.json").read_text())
    meta["model"]["adapter_path"] = str(tmp_path / "gone")
    (copy / "index.json").write_text(json.dumps(meta))
    assert main(["search", str(copy), "red"]) == 1
    assert "is gone; pass --adapter" in capsys.readouterr().err


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed (the [ann] extra)")
def test_faiss_backend_from_the_cli(
    tmp_path: Path, collection_dir: Path, lora_adapter: Path, built_index: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ixf"
    argv = ["index", "--adapter", str(lora_adapter), "--backbone", BACKBONE, "--videos", str(collection_dir)]
    run_json(capsys, [*argv, "--out", str(out), "--workers", "0", "--backend", "faiss", "--json"])
    assert any(p.name.startswith("faiss-") for p in out.iterdir())
    approx = run_json(capsys, ["search", str(out), "green", "-k", "8", "--json"])
    exact = run_json(capsys, ["search", str(built_index), "green", "-k", "8", "--json"])
    # 8 videos -> one IVF list, so FAISS recall@8 against exact search is 1
    assert [r["video_id"] for r in approx["results"]] == [r["video_id"] for r in exact["results"]]


def test_msrvtt_samples_index_and_search(
    tmp_path: Path, msrvtt_dir: Path, frozen_adapter: Path, msrvtt_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "msr"
    argv = ["index", "--adapter", str(frozen_adapter), "--backbone", BACKBONE, "--videos", str(msrvtt_dir)]
    rep = run_json(capsys, [*argv, "--out", str(out), "--workers", "0", "--cache", str(msrvtt_cache), "--json"])
    clips = sorted(msrvtt_dir.rglob("*.mp4"))
    assert rep["indexed"] == len(clips) and rep["bad"]["num_bad"] == 0
    idx = VideoIndex.load(out)
    assert all(r.duration and r.duration > 1.0 for r in idx.records)
    caption = (clips[0].parent / "caption.txt").read_text().strip() or "a video"
    res = run_json(capsys, ["search", str(out), caption, "-k", "10", "--json"])
    assert len(res["results"]) == len(clips)
    res = run_json(capsys, ["search", str(out), "--video", str(clips[1]), "-k", "2", "--json"])
    # the index records files under the collection folder's real path (its root check compares real paths)
    assert res["results"][0]["path"] == os.path.realpath(clips[1]) and res["results"][0]["score"] > 0.99


def test_serve_command_builds_the_app_on_loopback(
    built_index: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    uvicorn = pytest.importorskip("uvicorn")
    from fastapi.testclient import TestClient

    seen: dict = {}

    def fake_run(self: Any, sockets: list | None = None) -> None:  # the bound socket, without serving on it
        seen.update(app=self.config.app, sockname=sockets[0].getsockname() if sockets else None)

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    assert main(["serve", f"colours={built_index}", "--port", "0"]) == 0
    host, port = seen["sockname"]
    assert host == "127.0.0.1" and port > 0  # loopback unless asked otherwise
    assert "colours (8 videos)" in capsys.readouterr().out
    with TestClient(seen["app"], base_url="http://localhost") as c:
        assert c.get("/search", params={"q": "red", "k": 3}).json()["index"] == "colours"
    assert main(["serve", str(built_index.parent / "missing")]) == 1
    assert "not a vidret index" in capsys.readouterr().err
