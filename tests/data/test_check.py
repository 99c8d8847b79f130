"""check_manifest on generated h264 clips, corrupt / truncated / empty / missing files, and the real clips."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest

from vidret.data.check import check_manifest
from vidret.data.manifest import ManifestEntry, write_manifest
from vidret.errors import VidretError


def _write_video(path: Path, frames: int = 16, size: int = 64, fps: int = 8) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream("h264", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), (i * 15) % 256, np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    """2 good clips (2 s and 3 s), random bytes, a truncated mp4, an empty file, a missing file."""
    vids = tmp_path / "videos"
    vids.mkdir()
    _write_video(vids / "a.mp4", frames=16)  # 2.0 s at 8 fps
    _write_video(vids / "b.mp4", frames=24)  # 3.0 s
    (vids / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    good = (vids / "b.mp4").read_bytes()
    (vids / "cut.mp4").write_bytes(good[: len(good) // 2])  # moov atom is at the end: cut off
    (vids / "empty.mp4").write_bytes(b"")
    entries = [
        ManifestEntry("a", "videos/a.mp4", ("a cat", "a small cat", "a kitten")),
        ManifestEntry("b", "videos/b.mp4", ("a dog",)),
        ManifestEntry("b_seg", "videos/b.mp4", ("late part",), start=5.0, end=6.0),  # b is only 3 s long
        ManifestEntry("noise", "videos/noise.mp4", ("noise",)),
        ManifestEntry("cut", "videos/cut.mp4", ("cut",)),
        ManifestEntry("empty", "videos/empty.mp4", ("empty",)),
        ManifestEntry("gone", "videos/gone.mp4", ("gone", "really gone")),
        ManifestEntry("silent", str(vids / "a.mp4"), ()),  # absolute path, no captions
    ]
    write_manifest(tmp_path / "test.jsonl", entries)
    return tmp_path / "test.jsonl"


def test_check_finds_every_problem(corpus: Path) -> None:
    r = check_manifest(corpus)
    vids = corpus.parent / "videos"
    assert r.videos == 8 and r.captions == 10
    assert r.captions_per_video == (0, 10 / 8, 3)
    assert r.files == 6  # b.mp4 shared by two entries; a.mp4 referenced relatively and absolutely
    assert r.missing == (str(vids / "gone.mp4"),)
    assert {Path(p).name for p, _ in r.unreadable} == {"noise.mp4", "cut.mp4", "empty.mp4"}
    assert all(reason for _, reason in r.unreadable)
    assert r.probed == 5 and r.decoded
    assert r.durations == pytest.approx((2.0, 2.5, 3.0))
    assert r.no_captions == ("silent",)
    assert r.segments_past_end == ("b_seg",)
    assert not r.ok
    text = r.format_report()
    for needle in ("videos: 8 (6 files)", "captions: 10", "missing files: 1", "gone.mp4", "unreadable videos: 3",
                   "noise.mp4", "median 2.50", "b_seg", "PROBLEMS FOUND"):  # fmt: skip
        assert needle in text, needle


def test_check_without_decode_and_sampled(corpus: Path) -> None:
    r = check_manifest(corpus, decode=False)
    assert not r.decoded and r.probed == 5
    # the headers alone already reject these three
    assert {Path(p).name for p, _ in r.unreadable} == {"noise.mp4", "cut.mp4", "empty.mp4"}
    assert "headers only" in r.format_report()

    one = check_manifest(corpus, max_videos=1, workers=1)
    assert one.probed == 1 and one.videos == 8 and len(one.missing) == 1  # counts still cover everything
    none = check_manifest(corpus, max_videos=0)
    assert none.probed == 0 and none.durations is None and none.unreadable == ()


def test_check_clean_manifest_is_ok(tmp_path: Path) -> None:
    _write_video(tmp_path / "x.mp4")
    write_manifest(tmp_path / "m.jsonl", [ManifestEntry("x", "x.mp4", ("caption",), start=0.5, end=1.5)])
    r = check_manifest(tmp_path / "m.jsonl")
    assert r.ok and r.unreadable == () and r.missing == () and r.durations == pytest.approx((2.0, 2.0, 2.0))
    assert r.format_report().endswith("OK")
    assert r.to_dict()["ok"] is True


def test_check_errors(tmp_path: Path) -> None:
    with pytest.raises(VidretError, match="not found"):
        check_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"video_id": "a", "path": "a.mp4", "captions": ["x"]}\n{oops\n')
    with pytest.raises(VidretError, match=r"bad\.jsonl:2"):
        check_manifest(tmp_path / "bad.jsonl")
    (tmp_path / "ok.jsonl").write_text("")
    with pytest.raises(VidretError, match="max_videos"):
        check_manifest(tmp_path / "ok.jsonl", max_videos=-1)


def _testdata() -> Path:
    env = os.environ.get("VIDRET_TESTDATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "testdata"


def test_check_real_msrvtt_clips(tmp_path: Path) -> None:
    root = _testdata() / "msrvtt-samples"
    clips = sorted(root.glob("*/*.mp4")) if root.is_dir() else []
    if not clips:
        pytest.skip(f"real test clips not found in {root}")
    entries = [ManifestEntry(c.stem, str(c), ((c.parent / "caption.txt").read_text().strip(),)) for c in clips]
    write_manifest(tmp_path / "real.jsonl", entries)
    r = check_manifest(tmp_path / "real.jsonl")
    assert r.ok, r.format_report()
    assert r.probed == len(clips) == r.videos
    assert r.durations is not None and 10.0 < r.durations[0] <= r.durations[2] < 31.0  # clips are 11-30 s


def test_check_command_exit_code_tells_scripts_about_problems(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vidret.cli import main

    assert main(["data", "check", str(corpus), "--no-decode"]) == 1
    assert "PROBLEMS FOUND" in capsys.readouterr().out
    _write_video(tmp_path / "x.mp4")
    write_manifest(tmp_path / "ok.jsonl", [ManifestEntry("x", "x.mp4", ("caption",))])
    assert main(["data", "check", str(tmp_path / "ok.jsonl")]) == 0
