"""Video decoding: a small backend interface, PyAV as the default backend, and the bad-video policy.

Times are seconds from the start of the video stream (its first timestamp), so a clip that starts at a
non-zero container time (MPEG-TS, edited MP4) still starts at 0. For each requested time the decoder
returns the frame shown at that time: the last frame whose timestamp is <= t (the first frame for t
before it, the last frame for t after the end).

Decoding strategy of the PyAV backend (``strategy="auto"``): packets are read in order and only the
GOPs (keyframe-to-keyframe runs) that contain a requested time are sent to the decoder. When keyframes
are sparse (the usual 8-10 s GOP of web video) every GOP holds a requested time and this is a plain
sequential decode; when keyframes are dense or few frames are requested it skips whole GOPs, which is
what seeking to the keyframe before each time would decode, without the cost of a seek per frame.
Reading packets is cheap (~10 us each, a few % of decoding them), but when the next requested time is
more than ``seek_gap_s`` seconds ahead a real container seek skips reading the packets in between
(long videos, few frames). ``strategy="sequential"`` decodes every frame up to the last requested time;
``auto`` falls back to it if anything goes wrong, and that fallback failing makes the video bad.

Every failure (missing, empty, truncated, not a video, no decodable frame) raises ``BadVideoError``.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import numpy as np

from vidret.errors import VidretError

logger = logging.getLogger(__name__)

DecodeStrategy = Literal["auto", "sequential"]
FrameFn = Callable[[np.ndarray], np.ndarray]  # applied to each returned [H, W, 3] uint8 frame
Timestamps = Sequence[float] | np.ndarray  # seconds, [T]

_EPS = 1e-6  # seconds: a frame exactly at a requested time counts as "at or before" it


class BadVideoError(VidretError):
    """A video that cannot be used (missing, empty, truncated, not a video, undecodable)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"bad video {self.path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the (path, reason) constructor when the error crosses a process boundary.
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class VideoInfo:
    """What a video stream's headers (or, when they are missing, its packets) say about it."""

    duration: float  # seconds of video
    fps: float  # average frame rate (nominal for variable frame rate)
    num_frames: int  # frame count; estimated as duration * fps when the container does not store it
    width: int
    height: int


@dataclass
class BadVideoReport:
    """Bad videos met during a run: counted, one warning each, listed in the run's report.

    With a DataLoader: ``report = BadVideoReport(total=len(dataset.entries))``, then
    ``report.update(batch)`` for every batch and ``report.check(max_bad_fraction)`` when it suits.
    """

    total: int = 0  # videos in the run (the denominator of ``fraction``)
    items: list[tuple[str, str, str]] = field(default_factory=list)  # (video_id, path, reason)
    _seen: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    @property
    def num_bad(self) -> int:
        return len(self.items)

    @property
    def fraction(self) -> float:
        return self.num_bad / self.total if self.total else 0.0

    def add(self, video_id: str, path: str, reason: str) -> bool:
        """Record a bad video once (warning once); returns False if it was already recorded."""
        if not self._seen and self.items:  # items given to the constructor
            self._seen.update(v for v, _, _ in self.items)
        if video_id in self._seen:
            return False
        self._seen.add(video_id)
        self.items.append((video_id, path, reason))
        logger.warning("skipping bad video %s (%s): %s", video_id, path, reason)
        return True

    def update(self, batch: dict[str, Any]) -> None:
        """Record the bad samples of a collated batch (``batch["bad_reasons"]``); see ``dataset.collate``."""
        for video_id, path, reason in batch.get("bad_reasons", []):
            self.add(video_id, path, reason)

    def check(self, max_bad_fraction: float) -> None:
        """Raise VidretError when more than ``max_bad_fraction`` of the videos were bad."""
        if self.total and self.fraction > max_bad_fraction:
            shown = "; ".join(f"{v} ({p}): {r}" for v, p, r in self.items[:5])
            more = f" and {self.num_bad - 5} more" if self.num_bad > 5 else ""
            raise VidretError(
                f"{self.num_bad} of {self.total} videos are bad ({self.fraction:.1%} > max_bad_fraction="
                f"{max_bad_fraction:.1%}): {shown}{more}. Fix or remove them from the manifest "
                "(`vidret data check MANIFEST` lists them), or raise max_bad_fraction."
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "num_bad": self.num_bad,
            "fraction": self.fraction,
            "bad": [{"video_id": v, "path": p, "reason": r} for v, p, r in self.items],
        }


class VideoDecoder(ABC):
    """A decoding backend: probe a file, and return the frames shown at given times."""

    name: str = "base"

    @abstractmethod
    def probe(self, path: str | os.PathLike[str]) -> VideoInfo:
        """Read the stream's metadata; raises BadVideoError."""

    @abstractmethod
    def decode_frames(
        self, path: str | os.PathLike[str], timestamps: Timestamps, frame_fn: FrameFn | None = None
    ) -> np.ndarray:
        """Frames shown at ``timestamps`` (seconds, any order, repeats allowed).

        Args:
            path: Video file.
            timestamps: Times in seconds from the start of the video stream.
            frame_fn: Optional per-frame map (e.g. resize + crop) applied as each frame is picked,
                so full-size frames of a long video are never all held at once.

        Returns:
            uint8 array [T, H, W, 3] (RGB), T = len(timestamps); H, W after ``frame_fn``.
        """

    def probe_and_decode(
        self,
        path: str | os.PathLike[str],
        plan: Callable[[VideoInfo], Timestamps],
        frame_fn: FrameFn | None = None,
    ) -> tuple[VideoInfo, np.ndarray]:
        """Probe, choose times from the probe (``plan``), decode them; backends may open the file once."""
        info = self.probe(path)
        return info, self.decode_frames(path, plan(info), frame_fn)


# ----------------------------------------------------------------------------------------- PyAV backend


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise BadVideoError(path, "file not found")
    if os.path.isdir(path):
        raise BadVideoError(path, "is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise BadVideoError(path, "file is empty (0 bytes)")


def _av() -> Any:
    import av  # imported lazily: importing vidret.data must stay cheap

    return av


# Errors PyAV / FFmpeg raise on broken input (av.error.FFmpegError derives from these builtins too).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, RuntimeError, MemoryError)


def _decode_errors() -> tuple[type[BaseException], ...]:
    return (*_DECODE_ERRORS, _av().error.FFmpegError)


def _why(e: BaseException) -> str:
    """A short reason: FFmpeg's message without the file name it repeats."""
    msg = getattr(e, "strerror", None) or str(e)
    return f"{type(e).__name__}: {msg}"


class _Stream:
    """An open container + video stream with the facts the strategies need."""

    def __init__(self, path: str, threads: int) -> None:
        av = _av()
        self.path = path
        self.threads = threads
        try:
            self.container = av.open(path, metadata_errors="ignore")
        except _decode_errors() as e:
            raise BadVideoError(path, f"cannot open as a video ({_why(e)})") from e
        try:
            if not self.container.streams.video:
                raise BadVideoError(path, "no video stream (audio-only or not a video)")
            self.stream = self.container.streams.video[0]
            ctx = self.stream.codec_context
            if ctx is None:
                raise BadVideoError(path, "no decoder for the video stream (unknown or damaged codec header)")
            ctx.thread_type = "AUTO"  # frame + slice threads: ~10-15% faster on 2 cores
            ctx.thread_count = threads
            self.time_base: Fraction | None = self.stream.time_base
            st = self.stream.start_time
            self.start_pts: int = int(st) if st is not None else 0
            self.width = int(ctx.width or 0)
            self.height = int(ctx.height or 0)
            self.header_duration: float | None = None  # from the video stream header only
            if self.stream.duration is not None and self.time_base is not None and self.stream.duration > 0:
                self.header_duration = float(self.stream.duration * self.time_base)
        except BaseException:
            self.container.close()
            raise

    def close(self) -> None:
        self.container.close()

    def rate(self) -> float | None:
        for r in (self.stream.average_rate, self.stream.guessed_rate, self.stream.base_rate):
            if r is not None and float(r) > 0 and math.isfinite(float(r)):
                return float(r)
        return None

    def probe(self) -> VideoInfo:
        fps = self.rate()
        duration = self.header_duration
        if duration is None and self.container.duration is not None and self.container.duration > 0:
            duration = float(self.container.duration) / 1_000_000  # AV_TIME_BASE
        num_frames = int(self.stream.frames or 0)
        if duration is None or (num_frames <= 0 and fps is None):
            # No duration in the headers (raw streams, some WebM/MKV): count packets instead.
            count, end = self._scan_packets()
            if count == 0:
                raise BadVideoError(self.path, "no video packets (zero frames)")
            fps = fps or (count / end if end else None)
            if fps is None:
                raise BadVideoError(self.path, "neither timestamps nor a frame rate")
            duration = end if end else count / fps
            num_frames = count
        if fps is None:
            fps = num_frames / duration if duration > 0 else 0.0
        if num_frames <= 0:
            num_frames = max(1, round(duration * fps))
        if self.width <= 0 or self.height <= 0:
            raise BadVideoError(self.path, f"invalid frame size {self.width}x{self.height}")
        return VideoInfo(duration=duration, fps=fps, num_frames=num_frames, width=self.width, height=self.height)

    def _scan_packets(self) -> tuple[int, float]:
        """(packet count, end time in s or 0.0 if packets carry no timestamps); rewinds afterwards."""
        count, end = 0, 0.0
        tb = self.time_base
        try:
            for pkt in self.container.demux(self.stream):
                if pkt.size == 0:
                    continue
                count += 1
                ts = pkt.pts if pkt.pts is not None else pkt.dts
                if ts is not None and tb is not None:
                    end = max(end, float((ts - self.start_pts + (pkt.duration or 0)) * tb))
        except _decode_errors() as e:
            raise BadVideoError(self.path, f"cannot read packets ({_why(e)})") from e
        self.reopen()
        return count, end

    def reopen(self) -> None:
        """Start again from the beginning (re-opening is more reliable than seeking to 0 everywhere)."""
        self.close()
        fresh = _Stream(self.path, self.threads)
        self.__dict__.update(fresh.__dict__)

    def has_timestamps(self) -> bool:
        return self.time_base is not None and self.container.format.name not in ("h264", "hevc", "mjpeg")


class _Picker:
    """Assigns decoded frames (in display order) to sorted target times: last frame with time <= t."""

    def __init__(self, targets: Sequence[float], frame_fn: FrameFn | None) -> None:
        self.targets = list(targets)  # sorted, unique
        self.out: list[np.ndarray | None] = [None] * len(self.targets)
        self.next = 0  # first target not yet assigned
        self.frame_fn = frame_fn
        self.prev: Any = None  # last decoded av.VideoFrame, converted only if picked
        self.prev_time = -math.inf
        self.last_time: float | None = None  # time of the latest frame decoded
        self.num_decoded = 0
        self.size: tuple[int, int] | None = None  # (width, height) of the first picked frame

    @property
    def done(self) -> bool:
        return self.next >= len(self.targets)

    def _convert(self, frame: Any) -> np.ndarray:
        if self.size is None:
            self.size = (frame.width, frame.height)
        elif (frame.width, frame.height) != self.size:
            # The frame size changed mid-stream: keep one size so the frames stack.
            frame = frame.reformat(width=self.size[0], height=self.size[1])
        arr = frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
        return self.frame_fn(arr) if self.frame_fn is not None else arr

    def push(self, frame: Any, time: float) -> None:
        self.num_decoded += 1
        self.last_time = time if self.last_time is None else max(self.last_time, time)
        if time + _EPS < self.prev_time:
            return  # out-of-order frame (broken timestamps): keep display order monotonic
        if self.next < len(self.targets) and time > self.targets[self.next] + _EPS:
            # `frame` is past the target: the previous frame was shown at it (or, before the first
            # frame, the first frame is the nearest).
            picked = self._convert(self.prev if self.prev is not None else frame)
            while self.next < len(self.targets) and time > self.targets[self.next] + _EPS:
                self.out[self.next] = picked
                self.next += 1
        self.prev, self.prev_time = frame, time

    def finish(self) -> None:
        if self.next < len(self.targets) and self.prev is not None:
            picked = self._convert(self.prev)
            for i in range(self.next, len(self.targets)):
                self.out[i] = picked
            self.next = len(self.targets)
        self.prev = None


class PyAVDecoder(VideoDecoder):
    """PyAV (bundled FFmpeg) backend; the default.

    Args:
        strategy: "auto" (skip GOPs without requested times, seek over long gaps) or "sequential".
        seek_gap_s: In "auto", seek when the next requested time is more than this far ahead.
        threads: FFmpeg decoder threads; 0 = one per core.
    """

    name = "pyav"

    def __init__(self, strategy: DecodeStrategy = "auto", seek_gap_s: float = 10.0, threads: int = 0) -> None:
        if strategy not in ("auto", "sequential"):
            raise ValueError(f"strategy must be 'auto' or 'sequential', got {strategy!r}")
        if seek_gap_s <= 0:
            raise ValueError(f"seek_gap_s must be > 0, got {seek_gap_s}")
        self.strategy: DecodeStrategy = strategy
        self.seek_gap_s = seek_gap_s
        self.threads = threads
        self.last_frames_decoded = 0  # informational: frames decoded by the latest call
        self.last_seeks = 0  # informational: container seeks made by the latest call

    def _open(self, path: str | os.PathLike[str]) -> _Stream:
        p = os.fspath(path)
        _check_file(p)
        return _Stream(p, self.threads)

    def probe(self, path: str | os.PathLike[str]) -> VideoInfo:
        s = self._open(path)
        try:
            return s.probe()
        finally:
            s.close()

    def decode_frames(
        self, path: str | os.PathLike[str], timestamps: Timestamps, frame_fn: FrameFn | None = None
    ) -> np.ndarray:
        s = self._open(path)
        try:
            return self._decode(s, s.header_duration, timestamps, frame_fn)
        finally:
            s.close()

    def probe_and_decode(
        self,
        path: str | os.PathLike[str],
        plan: Callable[[VideoInfo], Timestamps],
        frame_fn: FrameFn | None = None,
    ) -> tuple[VideoInfo, np.ndarray]:
        s = self._open(path)
        try:
            info = s.probe()
            return info, self._decode(s, s.header_duration, plan(info), frame_fn)
        finally:
            s.close()

    # ---------------------------------------------------------------------------------------- internals

    def _decode(
        self, s: _Stream, header_duration: float | None, timestamps: Timestamps, frame_fn: FrameFn | None
    ) -> np.ndarray:
        if len(timestamps) == 0:
            raise ValueError("timestamps must not be empty")
        ts = np.asarray(timestamps, dtype=np.float64)
        if not np.all(np.isfinite(ts)):
            raise ValueError(f"timestamps must be finite, got {timestamps}")
        targets = sorted(set(ts.tolist()))
        picker: _Picker | None = None
        self.last_seeks = 0
        if self.strategy == "auto" and s.has_timestamps():
            try:
                picker = self._run_auto(s, targets, frame_fn)
            except _decode_errors() as e:
                logger.debug("%s: GOP-skipping decode failed (%s); decoding sequentially", s.path, e)
                picker = None
            if picker is not None and not picker.done:
                picker = None
            if picker is None:
                s.reopen()
        if picker is None:
            picker = self._run_sequential(s, targets, frame_fn)
        self.last_frames_decoded = picker.num_decoded
        if picker.num_decoded == 0 or not picker.done:
            raise BadVideoError(s.path, "no decodable video frames")
        if header_duration is not None and picker.last_time is not None:
            _check_truncated(s.path, header_duration, targets[-1], picker.last_time)
        by_time = dict(zip(targets, picker.out))
        return np.stack([by_time[t] for t in ts.tolist()])  # [T, H, W, 3]

    def _frame_time(self, s: _Stream, frame: Any, index: int, fps: float | None) -> float:
        if frame.pts is not None and s.time_base is not None and s.has_timestamps():
            return float((frame.pts - s.start_pts) * s.time_base)
        if fps is None:
            raise BadVideoError(s.path, "frames carry no timestamps and the stream has no frame rate")
        return index / fps

    def _run_sequential(self, s: _Stream, targets: list[float], frame_fn: FrameFn | None) -> _Picker:
        picker = _Picker(targets, frame_fn)
        fps = s.rate()
        try:
            for i, frame in enumerate(s.container.decode(s.stream)):
                picker.push(frame, self._frame_time(s, frame, i, fps))
                if picker.done:
                    break
        except _decode_errors() as e:
            raise BadVideoError(s.path, f"decoding failed ({_why(e)})") from e
        picker.finish()
        return picker

    def _run_auto(self, s: _Stream, targets: list[float], frame_fn: FrameFn | None) -> _Picker:
        """One pass over the packets; decode only GOPs holding a target; seek across long gaps."""
        picker = _Picker(targets, frame_fn)
        ctx = s.stream.codec_context
        tb = s.time_base
        assert tb is not None
        plan = 0  # first target not yet covered by an active GOP
        gop: list[Any] = []  # packets of the current GOP while it is inactive
        active = False
        keyframes: list[float] | None = None  # keyframe times from the container index, read lazily
        seeked_for = -1  # the `plan` of the latest seek: one seek per target at most
        landing = False  # just seeked: the next packet must not be past the target

        def feed(pkt: Any) -> None:
            for frame in ctx.decode(pkt):
                if frame.pts is None:
                    raise ValueError("frame without timestamp")
                picker.push(frame, float((frame.pts - s.start_pts) * tb))

        def pkt_time(pkt: Any) -> float | None:
            ts = pkt.pts if pkt.pts is not None else pkt.dts
            return None if ts is None else float((ts - s.start_pts) * tb)

        def packets() -> Iterator[Any]:
            for pkt in s.container.demux(s.stream):
                if pkt.size > 0:
                    yield pkt

        it = packets()
        while True:
            pkt = next(it, None)
            if pkt is None:
                break
            t = pkt_time(pkt)
            if landing:
                landing = False
                if t is None or t > targets[plan] + _EPS or not pkt.is_keyframe:
                    raise _SeekMissed(f"seek for {targets[plan]:.3f} s landed at {t} s")
            if pkt.is_keyframe:
                # A new GOP starts at time t: targets before t belong to the GOP that just ended.
                if t is not None and plan < len(targets) and targets[plan] < t - _EPS:
                    if not active:
                        for p in gop:
                            feed(p)
                    while plan < len(targets) and targets[plan] < t - _EPS:
                        plan += 1
                gop, active = [], False
                if plan >= len(targets):
                    break  # every target lies in GOPs already sent to the decoder
                if t is not None and targets[plan] - t > self.seek_gap_s and seeked_for != plan:
                    if keyframes is None:
                        keyframes = _index_keyframe_times(s)
                    # Seek only if the index has a keyframe well past this one before the target;
                    # otherwise the seek would land here again (sparse keyframes).
                    k = bisect.bisect_right(keyframes, targets[plan] + _EPS) - 1
                    if k >= 0 and keyframes[k] > t + self.seek_gap_s / 2:
                        feed(None)  # drain: targets still pending get the last frame decoded so far
                        target_pts = round(targets[plan] / tb) + s.start_pts
                        s.container.seek(target_pts, backward=True, any_frame=False, stream=s.stream)
                        self.last_seeks += 1
                        seeked_for, landing = plan, True
                        it = packets()
                        continue
            if active:
                feed(pkt)
                continue
            gop.append(pkt)
            if t is not None and plan < len(targets) and t > targets[plan] + _EPS:
                # A frame of this GOP is shown after the next target, so the target is in this GOP
                # (or before it, for a target before the first frame).
                active = True
                for p in gop:
                    feed(p)
                gop = []
        if not active and gop and plan < len(targets):
            for p in gop:  # targets after the last keyframe's first frames
                feed(p)
        feed(None)  # drain delayed frames
        picker.finish()
        return picker


class _SeekMissed(RuntimeError):
    """A seek landed after its time or off a keyframe (a bad index): decode sequentially instead."""


def _index_keyframe_times(s: _Stream) -> list[float]:
    """Sorted keyframe times from the container's index (MP4/MOV, cued MKV); [] when there is none."""
    tb = s.time_base
    if tb is None:
        return []
    times = [float((e.timestamp - s.start_pts) * tb) for e in s.stream.index_entries if e.is_keyframe]
    return sorted(times)


def _check_truncated(path: str, duration: float, last_target: float, last_time: float) -> None:
    """A file whose frames stop well before its header's duration lost its end (a cut-off download)."""
    slack = max(1.0, 0.1 * duration)
    if last_target > last_time + slack and last_time + slack < duration:
        raise BadVideoError(
            path, f"truncated: frames stop at {last_time:.2f} s but the stream header says {duration:.2f} s"
        )


# ------------------------------------------------------------------------------------------- registry

_BACKENDS: dict[str, Callable[[], VideoDecoder]] = {"pyav": PyAVDecoder}


def available_backends() -> list[str]:
    """Names accepted by ``get_decoder`` on this machine."""
    return sorted(_BACKENDS)


def get_decoder(name: str = "pyav") -> VideoDecoder:
    """A decoder by backend name ("pyav"; optional OpenCV / torchcodec backends are not bundled yet)."""
    if name not in _BACKENDS:
        raise VidretError(f"unknown video decoder backend {name!r}; available: {available_backends()}")
    return _BACKENDS[name]()


def probe(path: str | os.PathLike[str], decoder: VideoDecoder | None = None) -> VideoInfo:
    """Metadata of a video; raises BadVideoError."""
    return (decoder or PyAVDecoder()).probe(path)


def decode_frames(
    path: str | os.PathLike[str],
    timestamps: Timestamps,
    decoder: VideoDecoder | None = None,
    frame_fn: FrameFn | None = None,
) -> np.ndarray:
    """uint8 [T, H, W, 3] frames shown at ``timestamps`` (seconds); raises BadVideoError."""
    return (decoder or PyAVDecoder()).decode_frames(path, timestamps, frame_fn)


__all__ = [
    "BadVideoError",
    "BadVideoReport",
    "DecodeStrategy",
    "PyAVDecoder",
    "VideoDecoder",
    "VideoInfo",
    "available_backends",
    "decode_frames",
    "get_decoder",
    "probe",
]
