"""Frame cache: round trip, keys, atomic writes and resume, bad videos, parallel preprocessing, benchmark."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from vidret.bench.decode import format_decode_benchmark, run_decode_benchmark
from vidret.data.cache import FrameCache, file_identity, preprocess
from vidret.data.decode import BadVideoError, decode_frames
from vidret.data.manifest import ManifestEntry
from vidret.data.sampling import SamplingConfig, candidate_timestamps
from vidret.data.transforms import resize_crop
from vidret.errors import VidretError

MakeVideo = Callable[..., Path]
FrameIndex = Callable[..., int]
SIZE = 32  # small frames keep the tests fast
SAMPLING = SamplingConfig(num_frames=4, max_candidates=8)


def _entries(make_video: MakeVideo, lengths: list[int], fps: int = 10) -> list[ManifestEntry]:
    return [
        ManifestEntry(f"v{i}", str(make_video(f"v{i}.mp4", num_frames=n, fps=fps)), (f"caption {i}",))
        for i, n in enumerate(lengths)
    ]


def _cache(root: Path) -> FrameCache:
    return FrameCache(root, SAMPLING, image_size=SIZE)


def _bad_entries(tmp_path: Path, good: Path) -> list[ManifestEntry]:
    """Truncated, random bytes, wrong extension (text as .mkv), zero-byte and missing files."""
    data = good.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (bad / "random.mp4").write_bytes(np.random.default_rng(1).bytes(30_000))
    (bad / "notes.mkv").write_text("not a video at all\n" * 100)
    (bad / "empty.mp4").write_bytes(b"")
    names = ["truncated.mp4", "random.mp4", "notes.mkv", "empty.mp4", "missing.mp4"]
    return [ManifestEntry(f"bad_{n.split('.')[0]}", str(bad / n), ("x",)) for n in names]


def test_round_trip_equals_direct_decode(tmp_path: Path, make_video: MakeVideo, frame_index: FrameIndex) -> None:
    (entry,) = _entries(make_video, [57])  # 5.7 s: six candidates (last one in a partial bin)
    cache = _cache(tmp_path / "cache")
    assert cache.load(entry) is None
    built = cache.get(entry)
    loaded = cache.load(entry)
    assert loaded is not None and loaded.dtype == np.uint8 and loaded.shape == (6, SIZE, SIZE, 3)
    ts = candidate_timestamps(5.7, SAMPLING.fps, max_candidates=SAMPLING.max_candidates)
    direct = decode_frames(entry.path, ts, frame_fn=lambda f: resize_crop(f, SIZE))
    assert np.array_equal(np.asarray(loaded), direct) and np.array_equal(built, direct)
    assert [frame_index(f) for f in loaded] == [5, 15, 25, 35, 45, 53]  # frames at 0.5, 1.5, ..., 5.35 s
    assert cache.bytes_on_disk() == sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*.npy")) > 0


def test_long_video_capped_and_segment_clipped(tmp_path: Path, make_video: MakeVideo, frame_index: FrameIndex) -> None:
    path = str(make_video("long.mp4", num_frames=300, fps=10))  # 30 s
    cache = _cache(tmp_path / "cache")
    capped = cache.get(ManifestEntry("long", path, ("c",)))
    assert capped.shape[0] == SAMPLING.max_candidates  # 30 candidates capped to 8 wider bins
    seg = cache.get(ManifestEntry("seg", path, ("c",), start=10.0, end=13.0))
    assert [frame_index(f) for f in seg] == [105, 115, 125]


def test_key_tracks_content_segment_and_settings(tmp_path: Path, make_video: MakeVideo) -> None:
    (entry,) = _entries(make_video, [20])
    a, b = _cache(tmp_path / "c"), _cache(tmp_path / "c")
    key = a.key(entry)
    assert b.key(entry) == key  # stable across instances (and processes: no randomness)
    assert a.key(ManifestEntry("other_id", entry.path, ("y",))) == key  # ids and captions do not matter
    assert a.key(ManifestEntry("v0", entry.path, ("y",), start=0.5)) != key
    assert FrameCache(tmp_path / "c", SAMPLING, image_size=SIZE + 1).key(entry) != key
    assert FrameCache(tmp_path / "c", SamplingConfig(4, fps=2.0, max_candidates=8), SIZE).key(entry) != key
    assert FrameCache(tmp_path / "c", SamplingConfig(num_frames=8, max_candidates=8), SIZE).key(entry) == key
    ident = file_identity(entry.path)
    data = bytearray(Path(entry.path).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: the first/last 64 KiB may not see it, mtime does
    st = os.stat(entry.path)
    Path(entry.path).write_bytes(bytes(data))
    os.utime(entry.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert file_identity(entry.path) != ident and a.key(entry) != key
    with pytest.raises(BadVideoError, match="not found"):
        file_identity(tmp_path / "nope.mp4")


def test_resume_ignores_stray_tmp_and_interrupted_writes(
    tmp_path: Path, make_video: MakeVideo, frame_index: FrameIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = _entries(make_video, [20, 30, 40, 50])
    cache = _cache(tmp_path / "cache")
    first = preprocess(entries[:2], cache, progress=False)
    assert (first.built, first.reused) == (2, 0)
    # A killed run left a half-written temp file where entry 2's frames would go ...
    key2 = cache.key(entries[2])
    stray = tmp_path / "cache" / key2[:2] / f"{key2}.npy.12345.deadbeef.tmp"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"\x93NUMPY half a file")
    assert cache.load(entries[2]) is None  # ... which is never read as cached
    # ... and a write interrupted now leaves neither a final file nor a temp file behind.
    real_save = np.save

    def dying_save(f: object, arr: np.ndarray, allow_pickle: bool = False) -> None:
        f.write(b"\x93NUMPY partial")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cache.build(entries[3])
    monkeypatch.setattr(np, "save", real_save)
    key3 = cache.key(entries[3])
    assert not list((tmp_path / "cache" / key3[:2]).glob(f"{key3}*"))  # no .npy, no .tmp
    assert cache.load(entries[3]) is None
    again = preprocess(entries, cache, progress=False)
    assert (again.built, again.reused, again.bad.num_bad) == (2, 2, 0)
    for e, n in zip(entries, [20, 30, 40, 50]):
        got = cache.load(e)
        assert got is not None and [frame_index(f) for f in got] == list(range(5, n, 10))
    assert again.bytes_on_disk == cache.bytes_on_disk()


def test_bad_files_skipped_and_reported_good_files_load(
    tmp_path: Path, make_video: MakeVideo, frame_index: FrameIndex, caplog: pytest.LogCaptureFixture
) -> None:
    good = _entries(make_video, [20, 35, 48])
    # A real video under a misleading extension is still a good video (FFmpeg sniffs the content).
    renamed = Path(good[0].path).with_suffix(".avi")
    renamed.write_bytes(Path(good[0].path).read_bytes())
    good.append(ManifestEntry("renamed", str(renamed), ("c",)))
    bad = _bad_entries(tmp_path, Path(good[1].path))
    entries = [x for pair in zip(bad, good) for x in pair] + bad[len(good) :]
    cache = _cache(tmp_path / "cache")
    with caplog.at_level("WARNING"):
        report = preprocess(entries, cache, progress=False, max_bad_fraction=1.0)
    assert report.built == len(good) and report.bad.total == len(entries)
    assert sorted(v for v, _, _ in report.bad.items) == sorted(e.video_id for e in bad)
    assert all(reason for _, _, reason in report.bad.items)
    for e in bad:  # one warning per bad file
        assert sum(e.video_id in r.getMessage() for r in caplog.records) == 1
    for e in good:
        got = cache.load(e)
        assert got is not None and frame_index(got[0]) == 5
    # A resumed run reports the same bad files from their markers; missing files stay bad.
    again = preprocess(entries, cache, progress=False, max_bad_fraction=1.0)
    assert (again.reused, again.built) == (len(good), 0)
    assert [v for v, _, _ in again.bad.items] == [v for v, _, _ in report.bad.items]
    with pytest.raises(BadVideoError):
        cache.load(bad[0])  # the truncated file's marker


def test_too_many_bad_videos_stop_the_run(tmp_path: Path, make_video: MakeVideo) -> None:
    good = _entries(make_video, [20, 20])
    bad = _bad_entries(tmp_path, Path(good[0].path))
    with pytest.raises(VidretError, match=r"videos are bad .*max_bad_fraction"):
        preprocess(good + bad, _cache(tmp_path / "cache"), progress=False, max_bad_fraction=0.05)
    with pytest.raises(VidretError, match="max_bad_fraction"):
        preprocess(good, _cache(tmp_path / "cache"), progress=False, max_bad_fraction=1.5)


@pytest.mark.parametrize(
    "mp_context",
    ["fork", pytest.param("spawn", marks=pytest.mark.slow)],  # spawn: each worker imports torch (~5-15 s)
)
def test_parallel_workers_match_serial(tmp_path: Path, make_video: MakeVideo, mp_context: str) -> None:
    entries = _entries(make_video, [15, 25, 35, 45, 55])
    bad = _bad_entries(tmp_path, Path(entries[0].path))[:2]
    serial, parallel = _cache(tmp_path / "serial"), _cache(tmp_path / "parallel")
    r1 = preprocess(entries + bad, serial, num_workers=0, progress=False, max_bad_fraction=1.0)
    r2 = preprocess(entries + bad, parallel, num_workers=2, progress=True, max_bad_fraction=1.0, mp_context=mp_context)
    assert (r2.built, r2.bad.num_bad) == (r1.built, r1.bad.num_bad) == (5, 2)
    assert sorted(r2.bad.items) == sorted(r1.bad.items)
    assert r2.bytes_on_disk == r1.bytes_on_disk
    for e in entries:
        a, b = serial.load(e), parallel.load(e)
        assert a is not None and b is not None and np.array_equal(a, b)


def test_cache_settings_validated(tmp_path: Path) -> None:
    with pytest.raises(VidretError, match="image_size"):
        FrameCache(tmp_path, image_size=0)


def test_decode_benchmark_smoke(tmp_path: Path) -> None:
    result = run_decode_benchmark(
        num_clips=2,
        workers=(0,),
        num_frames=4,
        image_size=32,
        batch_size=2,
        clip_seconds=1.0,
        min_seconds=0.0,
        work_dir=tmp_path,
    )
    assert [(r["path"], r["workers"]) for r in result["results"]] == [("raw", 0), ("cache", 0)]
    assert all(r["clips_per_s"] > 0 for r in result["results"])
    assert result["preprocess"]["built"] == 2 and result["preprocess"]["bytes_on_disk"] > 0
    text = format_decode_benchmark(result)
    assert "cache speed-up over raw decoding" in text and result["machine"]["cores"] == os.cpu_count()
