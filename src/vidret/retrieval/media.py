"""The video files behind the media routes: opened once, checked on the descriptor, and thumbnail strips.

The rules are the service's (see :mod:`vidret.retrieval.service`): :func:`open_recorded` opens the file an
index records for a video (last component not followed, non-blocking so a FIFO cannot stall a worker) and
checks that open file: a regular file whose real path is the recorded one, inside the collection root, with
the recorded size and mtime. Everything sent or decoded afterwards reads that descriptor only
(:class:`MediaFile`).
"""

from __future__ import annotations

import contextlib
import errno
import mimetypes
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from vidret.errors import VidretError
from vidret.retrieval.http import ApiError
from vidret.retrieval.index_files import VideoRecord

THUMB_SIZE = 96  # side of each square thumbnail frame, pixels


@dataclass
class MediaFile:
    """A recorded video file, opened once and checked: the media routes read only this descriptor."""

    record: VideoRecord
    fd: int  # read-only descriptor; -1 once closed
    path: str  # the real path the descriptor resolves to (inside the collection root)
    size: int
    mtime_ns: int

    @property
    def media_type(self) -> str:
        kind = mimetypes.guess_type(self.path)[0] or ""
        return kind if kind.startswith("video/") else "application/octet-stream"

    def read_path(self) -> str:
        """A path that opens this very file (not the recorded path), for decoders that take a path."""
        for base in ("/proc/self/fd", "/dev/fd"):  # Linux; macOS and the BSDs
            if os.path.isdir(base):
                return f"{base}/{self.fd}"
        raise ApiError(404, "thumbnails need /proc or /dev/fd on this system")

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _inside(path: str, roots: Sequence[str]) -> bool:
    """Whether absolute ``path`` lies inside one of the (real, absolute) ``roots``."""
    return any(os.path.commonpath([path, root]) == root for root in roots)


def _descriptor_path(fd: int, st: os.stat_result, recorded: str) -> str | None:
    """The real path of an open descriptor: the kernel's name for it (Linux), else ``recorded`` if that path
    still resolves to itself and names the same inode; None when it does not."""
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/self/fd/{fd}")
    try:
        now = os.stat(recorded)
    except OSError:
        return None
    if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and os.path.realpath(recorded) == recorded:
        return recorded
    return None


def open_recorded(rec: VideoRecord, roots: Sequence[str]) -> MediaFile:
    """Open the recorded file of ``rec`` once and check the open file; the caller closes it.

    Args:
        rec: a record with a file (``path`` and ``real_path`` set).
        roots: the (real, absolute) folders the file must lie in; not empty.

    Raises:
        ApiError: 404 file gone; 403 outside ``roots``; 409 the file is not the one indexed (replaced, a
            symlink, changed, no recorded identity).
    """
    recorded = rec.real_path
    if not os.path.isabs(recorded) or not _inside(os.path.normpath(recorded), roots):
        raise ApiError(403, "the video file lies outside the collection folder")
    changed = "the video file changed since indexing; run `vidret index --update`"
    if not rec.identity:
        raise ApiError(409, changed)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(recorded, flags)
    except FileNotFoundError:
        raise ApiError(404, "the video file is gone; run `vidret index --update`") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):  # the last component is now a symlink (EMLINK: BSDs)
            raise ApiError(409, changed) from None
        raise ApiError(404, "the video file cannot be read") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ApiError(409, changed)
        real = _descriptor_path(fd, st, recorded)
        if real != recorded:  # a folder on the way was swapped, or the file was replaced and deleted
            raise ApiError(409, changed)
        if not _inside(real, roots):
            raise ApiError(403, "the video file lies outside the collection folder")
        if rec.identity.split(":")[:2] != [str(st.st_size), str(st.st_mtime_ns)]:
            raise ApiError(409, changed)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return MediaFile(rec, fd, real, st.st_size, st.st_mtime_ns)


# ------------------------------------------------------------------------------------------ thumbnails


def encode_jpeg(rgb: np.ndarray, quality: int = 4) -> bytes:
    """uint8 [H, W, 3] RGB -> JPEG bytes, with FFmpeg's mjpeg encoder (no imaging library needed)."""
    import av

    h, w = rgb.shape[:2]
    h2, w2 = h - h % 2, w - w % 2  # 4:2:0 chroma needs even sides
    rgb = np.ascontiguousarray(rgb[:h2, :w2])
    ctx = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height = w2, h2
    ctx.pix_fmt = "yuvj420p"
    ctx.time_base = Fraction(1, 25)
    ctx.options = {"qmin": str(quality), "qmax": str(quality)}
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
    packets = list(ctx.encode(frame)) + list(ctx.encode(None))
    return b"".join(bytes(p) for p in packets)


def thumbnail_strip(rec: VideoRecord, path: str, n: int, size: int = THUMB_SIZE) -> bytes:
    """A JPEG of ``n`` frames side by side, taken at the centres of n equal parts of the video (or segment)."""
    from vidret.data.decode import PyAVDecoder
    from vidret.data.sampling import segment_bounds
    from vidret.data.transforms import resize_crop

    def plan(info: Any) -> list[float]:
        s, e = segment_bounds(info.duration, rec.start, rec.end)
        return [s + (e - s) * (i + 0.5) / n for i in range(n)]

    _, frames = PyAVDecoder().probe_and_decode(path, plan, frame_fn=lambda f: resize_crop(f, size))
    frames[:, :, -2:] = 24  # a dark 2-pixel gap between neighbouring frames
    strip = np.concatenate(list(frames), axis=1)  # [n, S, S, 3] -> [S, n*S, 3]
    return encode_jpeg(strip[:, :-2])


class ThumbnailCache:
    """Thumbnail strips by (index, id, n), least recently used out; at most two decodes at a time."""

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str, int], bytes | str] = OrderedDict()
        self._lock = threading.Lock()
        self._decoders = threading.Semaphore(2)

    def get(self, key: tuple[str, str, int], make: Callable[[], bytes]) -> bytes:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
        if hit is None:
            with self._decoders:
                try:
                    hit = make()
                except (VidretError, ValueError) as e:
                    hit = f"no thumbnail: {getattr(e, 'reason', None) or e}"
            with self._lock:
                self._items[key] = hit
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        if isinstance(hit, str):
            raise ApiError(404, hit)
        return hit


__all__ = [
    "THUMB_SIZE",
    "MediaFile",
    "ThumbnailCache",
    "encode_jpeg",
    "open_recorded",
    "thumbnail_strip",
]
