"""Decoding (PyAV backend), frame sampling and the CLIP transforms."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import psutil
import pytest
import torch

from vidret.data.decode import (
    BadVideoError,
    BadVideoReport,
    PyAVDecoder,
    VideoInfo,
    decode_frames,
    get_decoder,
    probe,
)
from vidret.data.sampling import (
    SamplingConfig,
    candidate_timestamps,
    sample_timestamps,
    segment_bounds,
    select_indices,
)
from vidret.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, preprocess_frames, resize_crop
from vidret.errors import VidretError

MakeVideo = Callable[..., Path]
FrameIndex = Callable[..., int]
STRATEGIES = [PyAVDecoder("auto"), PyAVDecoder("sequential")]


def _expected_cfr(ts: list[float], fps: float, n: int) -> list[int]:
    """Index of the last frame with time <= t in a constant-rate video (first / last beyond the ends)."""
    return [min(n - 1, max(0, math.floor(t * fps + 1e-6))) for t in ts]


# ------------------------------------------------------------------------------------------------ probe


def test_probe_generated_mp4(make_video: MakeVideo) -> None:
    path = make_video("a.mp4", num_frames=45, fps=15)
    info = probe(path)
    assert isinstance(info, VideoInfo)
    assert info.num_frames == 45
    assert info.fps == pytest.approx(15.0)
    assert info.duration == pytest.approx(3.0, abs=1e-3)
    assert (info.width, info.height) == (80, 80)


def test_probe_without_duration_counts_packets(make_video: MakeVideo) -> None:
    # A raw h264 elementary stream stores neither duration, frame count nor timestamps.
    path = make_video("raw.h264", num_frames=50, fps=25, fmt="h264")
    with av.open(str(path)) as c:
        assert c.streams.video[0].duration is None and c.duration is None
    info = probe(path)
    assert info.num_frames == 50
    assert info.duration == pytest.approx(2.0, abs=1e-3)


def test_decode_raw_stream_without_timestamps(make_video: MakeVideo, frame_index: FrameIndex) -> None:
    path = make_video("raw.h264", num_frames=50, fps=25, fmt="h264")
    ts = [0.0, 0.5, 1.01, 1.99, 5.0]
    for dec in STRATEGIES:
        got = [frame_index(f) for f in dec.decode_frames(path, ts)]
        assert got == _expected_cfr(ts, 25, 50)


# ----------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("gop", [None, 4])
@pytest.mark.parametrize("dec", STRATEGIES, ids=lambda d: d.strategy)
def test_decode_hits_requested_frames(
    make_video: MakeVideo, frame_index: FrameIndex, gop: int | None, dec: PyAVDecoder
) -> None:
    path = make_video("a.mp4", num_frames=95, fps=30, gop=gop)
    rng = np.random.default_rng(0)
    ts = [*rng.uniform(0, 3.2, 25).tolist(), 0.0, 1 / 30, 2 / 30 - 1e-3, 3.1, 3.5, -0.2]
    frames = dec.decode_frames(path, ts)
    assert frames.dtype == np.uint8 and frames.shape == (len(ts), 80, 80, 3)
    assert [frame_index(f) for f in frames] == _expected_cfr(ts, 30, 95)


def test_decode_keeps_order_and_repeats(make_video: MakeVideo, frame_index: FrameIndex) -> None:
    path = make_video("a.mp4", num_frames=60, fps=30)
    ts = [1.5, 0.1, 1.5, 0.0, 0.1]
    assert [frame_index(f) for f in decode_frames(path, ts)] == [45, 3, 45, 0, 3]


@pytest.mark.parametrize(("name", "b_frames"), [("vfr.mkv", True), ("vfr.mp4", False)])
def test_variable_frame_rate(make_video: MakeVideo, frame_index: FrameIndex, name: str, b_frames: bool) -> None:
    pts_ms = [0, 100, 150, 700, 800, 1900]
    path = make_video(name, num_frames=6, pts_ms=pts_ms, b_frames=b_frames)
    ts = [0.0, 0.05, 0.1, 0.12, 0.5, 0.75, 0.8, 1.0, 1.9, 2.5]
    for dec in STRATEGIES:
        assert [frame_index(f) for f in dec.decode_frames(path, ts)] == [0, 0, 1, 1, 2, 3, 4, 4, 5, 5]


def test_gop_skipping_and_seeking_decode_less(
    make_video: MakeVideo, frame_index: FrameIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 40 s at 10 fps with a keyframe every second: few requested frames need few GOPs decoded.
    path = make_video("long.mp4", num_frames=400, fps=10, gop=10)
    auto, seq = PyAVDecoder("auto", seek_gap_s=10.0), PyAVDecoder("sequential")
    cases = (([2.05, 3.3, 9.0, 15.0, 24.95], 0), ([1.0, 20.0, 39.9], 2), ([25.0], 1), ([35.0, 39.99], 1))
    for ts, seeks in cases:  # seek over gaps > 10 s
        want = _expected_cfr(ts, 10, 400)
        assert [frame_index(f) for f in auto.decode_frames(path, ts)] == want
        assert [frame_index(f) for f in seq.decode_frames(path, ts)] == want
        assert auto.last_frames_decoded < seq.last_frames_decoded / 4
        assert auto.last_seeks == seeks
    # A seek that goes wrong (here: does nothing) is caught and the call decodes sequentially.
    with av.open(str(path)) as c:
        monkeypatch.setattr(type(c), "seek", lambda self, *a, **k: None)
    assert [frame_index(f) for f in auto.decode_frames(path, [1.0, 20.0, 39.9])] == [10, 200, 399]
    assert auto.last_seeks == 1 and auto.last_frames_decoded > 300  # tried once, then sequential
    monkeypatch.undo()
    # Sparse keyframes (one GOP): seeking would land on the same keyframe, so it does not seek.
    one_gop = make_video("one_gop.mp4", num_frames=300, fps=10, gop=300, scenecut=False)
    with av.open(str(one_gop)) as c:
        assert sum(e.is_keyframe for e in c.streams.video[0].index_entries) == 1
    assert [frame_index(f) for f in auto.decode_frames(one_gop, [0.0, 29.0])] == [0, 290]
    assert auto.last_seeks == 0


def test_frame_fn_applied_to_each_frame(make_video: MakeVideo, frame_index: FrameIndex) -> None:
    path = make_video("a.mp4", num_frames=30, fps=30)
    out = decode_frames(path, [0.0, 0.5], frame_fn=lambda f: resize_crop(f, 32))
    assert out.shape == (2, 32, 32, 3)
    assert [frame_index(f) for f in out] == [0, 15]


def test_get_decoder() -> None:
    assert isinstance(get_decoder("pyav"), PyAVDecoder)
    with pytest.raises(VidretError, match="unknown video decoder"):
        get_decoder("nope")
    with pytest.raises(ValueError):
        PyAVDecoder("fast")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- bad videos


def _bad_files(tmp_path: Path, make_video: MakeVideo) -> dict[str, Path]:
    good = make_video("good.mp4", num_frames=60, fps=30)
    data = good.read_bytes()
    files = {
        "missing": tmp_path / "missing.mp4",
        "zero_byte": tmp_path / "empty.mp4",
        "random_bytes": tmp_path / "random.mp4",
        "truncated": tmp_path / "truncated.mp4",
        "text": tmp_path / "notes.mp4",
        "directory": tmp_path / "dir.mp4",
    }
    files["zero_byte"].write_bytes(b"")
    files["random_bytes"].write_bytes(np.random.default_rng(0).bytes(20_000))
    files["truncated"].write_bytes(data[: len(data) // 2])  # moov atom (at the end) is lost
    files["text"].write_text("this is not a video\n" * 50)
    files["directory"].mkdir()
    audio = tmp_path / "audio_only.mp4"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    files["audio_only"] = audio
    return files


def test_bad_files_raise_bad_video_error(tmp_path: Path, make_video: MakeVideo) -> None:
    for kind, path in _bad_files(tmp_path, make_video).items():
        for call in (lambda p: probe(p), lambda p: decode_frames(p, [0.0, 1.0])):
            with pytest.raises(BadVideoError) as err:
                call(path)
            assert isinstance(err.value, VidretError), kind
            assert err.value.path == str(path) and err.value.reason, kind
            assert str(path) in str(err.value), kind


def test_fuzzed_files_decode_or_raise_bad_video_error(tmp_path: Path) -> None:
    # Damaged bytes (in the index or in the frames) and cuts at random points: each call either
    # returns frames of the right shape or raises BadVideoError, never anything else.
    data = _noise_video(tmp_path / "good.mp4", frames=40, gop=8).read_bytes()
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "bad": 0}
    for k in range(30):
        buf = bytearray(data)
        if k % 3 == 2:
            buf = buf[: int(rng.integers(1, len(buf)))]
        else:
            lo = 0 if k % 3 == 0 else len(buf) // 5  # k % 3 == 1: frames only, the index survives
            for _ in range(int(rng.integers(1, 4))):
                at, n = int(rng.integers(lo, len(buf))), int(rng.integers(1, 64))
                buf[at : at + n] = rng.bytes(len(buf[at : at + n]))
        path = tmp_path / f"fuzz{k}.mp4"
        path.write_bytes(bytes(buf))
        for dec in STRATEGIES:
            try:
                out = dec.decode_frames(path, [0.0, 1.5, 3.9])
            except BadVideoError as e:
                assert e.reason
                outcomes["bad"] += 1
            else:
                assert out.shape == (3, 64, 64, 3) and out.dtype == np.uint8
                outcomes["ok"] += 1
    assert outcomes["ok"] > 0 and outcomes["bad"] > 0, outcomes  # the fuzzing reached both outcomes


def _noise_video(path: Path, frames: int = 100, fps: int = 10, gop: int = 250) -> Path:
    """An h264 MP4 of random noise with its index in front ("faststart"): every frame carries bytes."""
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        s.codec_context.gop_size = gop
        rng = np.random.default_rng(0)
        for _ in range(frames):
            img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_video_stream_without_frames_is_bad(tmp_path: Path) -> None:
    path = tmp_path / "zero_frames.mkv"  # a video track with no packets next to an audio track
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=10)
        v.width = v.height = 64
        v.pix_fmt = "yuv420p"
        a = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in [*a.encode(frame), *a.encode()]:
            c.mux(p)
    with av.open(str(path)) as c:
        assert len(c.streams.video) == 1
    with pytest.raises(BadVideoError, match="no decodable video frames"):
        decode_frames(path, [0.0])


def test_truncated_faststart_file_is_bad(tmp_path: Path) -> None:
    # With the index at the front the file opens, but its frames stop a third of the way through.
    path = _noise_video(tmp_path / "faststart.mp4")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    assert probe(path).duration == pytest.approx(10.0)  # the header still claims 10 s
    assert decode_frames(path, [0.5]).shape[0] == 1  # the surviving start decodes
    with pytest.raises(BadVideoError, match="truncated"):
        decode_frames(path, [0.5, 9.5])


def test_bad_video_error_pickles() -> None:
    e = pickle.loads(pickle.dumps(BadVideoError("/x/y.mp4", "file not found")))
    assert isinstance(e, BadVideoError) and e.path == "/x/y.mp4" and e.reason == "file not found"


def test_bad_video_report_counts_once_and_checks(caplog: pytest.LogCaptureFixture) -> None:
    rep = BadVideoReport(total=40)
    with caplog.at_level("WARNING"):
        assert rep.add("v1", "/a/v1.mp4", "file not found")
        assert not rep.add("v1", "/a/v1.mp4", "file not found")
        rep.update({"bad_reasons": [("v2", "/a/v2.mp4", "truncated")]})
    assert rep.num_bad == 2 and rep.fraction == pytest.approx(0.05)
    assert sum("v1" in r.getMessage() for r in caplog.records) == 1
    rep.check(0.05)  # at the limit: fine
    rep.add("v3", "/a/v3.mp4", "zero frames")
    with pytest.raises(VidretError, match=r"3 of 40 videos are bad.*v1.*v3"):
        rep.check(0.05)
    assert rep.to_dict()["bad"][2] == {"video_id": "v3", "path": "/a/v3.mp4", "reason": "zero frames"}


# ------------------------------------------------------------------------------------- real MSR-VTT clips


def test_real_msrvtt_clips_decode_like_reference(msrvtt_samples: Path) -> None:
    clips = sorted(msrvtt_samples.glob("*/*.mp4"))
    assert len(clips) == 4
    dec = PyAVDecoder()
    for clip in clips:
        # Reference: container metadata and a plain full decode, straight from PyAV.
        with av.open(str(clip)) as c:
            s = c.streams.video[0]
            ref_frames, ref_fps = s.frames, float(s.average_rate)
            ref_duration = float(s.duration * s.time_base)
            start = s.start_time or 0
            ref_times, ref_imgs = [], []
            for f in c.decode(s):
                ref_times.append(float((f.pts - start) * s.time_base))
                ref_imgs.append(f.to_ndarray(format="rgb24"))
        assert len(ref_imgs) == ref_frames  # every frame the header counts decodes
        info = dec.probe(clip)
        assert info.num_frames == ref_frames
        assert info.fps == pytest.approx(ref_fps)
        assert info.duration == pytest.approx(ref_duration)
        assert (info.width, info.height) == (320, 240)
        ts = candidate_timestamps(info.duration).tolist()  # the 1 fps candidates
        assert len(ts) == math.ceil(ref_duration - 1e-6)
        got = dec.decode_frames(clip, ts)
        for t, img in zip(ts, got):
            k = int(np.searchsorted(ref_times, t + 1e-6, side="right")) - 1
            assert np.array_equal(img, ref_imgs[k]), (clip.name, t)


# ----------------------------------------------------------------------------------------------- memory


def test_memory_stays_flat_over_many_decodes(make_video: MakeVideo) -> None:
    path = make_video("m.mp4", num_frames=30, fps=30)
    dec = PyAVDecoder()
    proc = psutil.Process()

    def run(n: int) -> None:
        for _ in range(n):
            dec.decode_frames(path, [0.1, 0.5, 0.9], frame_fn=lambda f: resize_crop(f, 64))

    run(30)  # warm-up: codec tables, allocator pools
    before = proc.memory_info().rss
    run(300)
    growth = proc.memory_info().rss - before
    assert growth < 20 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 300 decodes"


# --------------------------------------------------------------------------------------------- sampling


def test_sampling_config_validation() -> None:
    with pytest.raises(VidretError):
        SamplingConfig(num_frames=0)
    with pytest.raises(VidretError):
        SamplingConfig(fps=0.0)
    with pytest.raises(VidretError):
        SamplingConfig(mode="test")  # type: ignore[arg-type]
    with pytest.raises(VidretError):
        SamplingConfig(num_frames=12, max_candidates=8)
    assert SamplingConfig(mode="train").with_mode("eval") == SamplingConfig()


def test_candidates_are_bin_centres_clipped_to_segment() -> None:
    np.testing.assert_allclose(candidate_timestamps(10.0), np.arange(10) + 0.5)
    np.testing.assert_allclose(candidate_timestamps(3.2), [0.5, 1.5, 2.5, 3.1])
    np.testing.assert_allclose(candidate_timestamps(0.4), [0.2])  # sub-second video: one frame
    np.testing.assert_allclose(candidate_timestamps(0.0), [0.0])
    np.testing.assert_allclose(candidate_timestamps(30.0, start=5.5, end=9.0), [6.0, 7.0, 8.0, 8.75])
    np.testing.assert_allclose(candidate_timestamps(10.0, fps=2.0, end=2.0), [0.25, 0.75, 1.25, 1.75])
    capped = candidate_timestamps(640.0, max_candidates=64)  # long video: 64 bins of 10 s
    np.testing.assert_allclose(capped, np.arange(64) * 10 + 5)
    assert segment_bounds(10.0, 2.0, 50.0) == (2.0, 10.0)  # end clipped to the video
    with pytest.raises(ValueError, match="after the end"):
        segment_bounds(10.0, 12.0, 15.0)


def test_select_eval_centres_are_deterministic() -> None:
    idx, mask = select_indices(24, 12, "segment_centre")
    assert idx.tolist() == list(range(0, 24, 2)) and mask.all()
    idx, _ = select_indices(10, 4, "segment_centre")
    assert idx.tolist() == [0, 3, 5, 8]  # runs [0,2) [2,5) [5,7) [7,10)
    assert np.array_equal(select_indices(100, 12)[0], select_indices(100, 12)[0])


def test_select_train_random_within_runs() -> None:
    n, t = 50, 12
    edges = np.floor(np.arange(t + 1) * n / t).astype(int)
    draws = np.stack([select_indices(n, t, "segment_random", np.random.default_rng(s))[0] for s in range(300)])
    assert ((draws >= edges[:-1]) & (draws < edges[1:])).all()  # each stays in its run
    for i in range(t):  # and covers its run
        assert set(draws[:, i].tolist()) == set(range(edges[i], edges[i + 1]))
    a = select_indices(n, t, "segment_random", np.random.default_rng(7))[0]
    b = select_indices(n, t, "segment_random", np.random.default_rng(7))[0]
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="Generator"):
        select_indices(n, t, "segment_random")


def test_short_videos_are_padded_and_masked() -> None:
    idx, mask = select_indices(5, 12, "segment_random", np.random.default_rng(0))
    assert idx.tolist() == [0, 1, 2, 3, 4] + [-1] * 7
    assert mask.tolist() == [True] * 5 + [False] * 7
    times, mask = sample_timestamps(0.3, SamplingConfig(num_frames=12))
    assert times.tolist() == [0.15] and mask.sum() == 1 and mask[0]


# ------------------------------------------------------------------------------------------- transforms


def test_resize_crop_shapes_and_centre() -> None:
    img = np.zeros((240, 320, 3), np.uint8)
    img[:, 160:] = 200  # right half bright
    out = resize_crop(np.stack([img, img]), 224)
    assert out.shape == (2, 224, 224, 3) and out.dtype == np.uint8
    # 240x320 -> 224x298, crop columns 37..261: the bright edge lands at column 149 - 37 = 112
    assert out[0, :, :100].max() == 0 and out[0, :, 125:].min() == 200
    assert resize_crop(img, 224).shape == (224, 224, 3)
    tall = resize_crop(np.zeros((300, 100, 3), np.uint8), 50)
    assert tall.shape == (50, 50, 3)
    same = np.random.default_rng(0).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(resize_crop(same, 32), same)  # already the right size: untouched
    with pytest.raises(ValueError):
        resize_crop(np.zeros((4, 4, 3), np.float32), 2)


def test_resize_is_antialiased_bicubic_and_clamped() -> None:
    # A 1-pixel checkerboard shrunk 4x averages to grey with antialiasing (plain bicubic would alias).
    board = ((np.indices((96, 96)).sum(0) % 2) * 255).astype(np.uint8)
    out = resize_crop(np.repeat(board[..., None], 3, -1), 24)
    assert abs(float(out.mean()) - 127.5) < 3 and out.std() < 3
    # Sharp edges ring with bicubic; values stay in 0..255 (clamped, no wrap-around).
    edge = np.zeros((64, 64, 3), np.uint8)
    edge[:, 32:] = 255
    up = resize_crop(edge, 200)
    assert up[:, :20].max() == 0 and up[:, -20:].min() == 255


def test_normalize_uses_clip_mean_std() -> None:
    x = np.zeros((2, 4, 4, 3), np.uint8)
    x[1] = 255
    y = normalize(x)
    assert y.shape == (2, 3, 4, 4) and y.dtype == torch.float32
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(y[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(y[1, :, 0, 0], (1 - mean) / std)
    full = preprocess_frames(np.zeros((3, 240, 320, 3), np.uint8), 224)
    assert full.shape == (3, 3, 224, 224)
