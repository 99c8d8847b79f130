"""Frame cache: decode, sample and resize each video once; train, evaluate and index from uint8 frames.

What is stored: every 1 fps candidate frame of a video (``sampling.candidate_timestamps``, at most
``SamplingConfig.max_candidates``), resized and centre-cropped to the image size, as one uint8
``[N, S, S, 3]`` ``.npy`` file per video. Both eval (centre of each run) and train (random within each
run) subsampling to T frames then happen at load time from the cached candidates, so training keeps
its random-in-segment sampling and cached frames are exactly the frames direct decoding gives.
The price is disk: ~150 KB per candidate frame at 224 px (a 10 s clip ~1.5 MB, MSR-VTT's 10k clips
~20 GB); ``CacheReport.bytes_on_disk`` says what a run used.

Key: a hash of the file's content identity (size, mtime_ns, SHA-1 of its first and last 64 KiB), the
segment [start, end], the candidate rate and cap, the image size, the decoder and the format version.
A changed file, segment or setting therefore misses the cache and is rebuilt; nothing is overwritten.

Writes are atomic (a temp file in the same folder, then ``os.replace``), so an interrupted run leaves
at most stray ``*.tmp`` files, which are never read; running again resumes where it stopped. A video
that fails to decode leaves a small ``.bad`` marker with the reason, so a resumed run reports it again
without decoding it again (``retry_bad=True`` tries again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vidret.data.decode import BadVideoError, BadVideoReport, PyAVDecoder, VideoDecoder
from vidret.data.manifest import ManifestEntry
from vidret.data.sampling import SamplingConfig, candidate_timestamps
from vidret.data.transforms import resize_crop
from vidret.errors import VidretError
from vidret.procs import die_with_parent

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
_EDGE_BYTES = 64 * 1024  # bytes hashed at each end of a video file


def file_identity(path: str | os.PathLike[str]) -> str:
    """Content identity of a file: size, mtime_ns and SHA-1 of its first and last 64 KiB.

    Raises:
        BadVideoError: the file is missing or unreadable.
    """
    p = os.fspath(path)
    try:
        st = os.stat(p)
        h = hashlib.sha1()
        with open(p, "rb") as f:
            h.update(f.read(_EDGE_BYTES))
            if st.st_size > 2 * _EDGE_BYTES:
                f.seek(-_EDGE_BYTES, os.SEEK_END)
            h.update(f.read(_EDGE_BYTES))
    except FileNotFoundError as e:
        raise BadVideoError(p, "file not found") from e
    except IsADirectoryError as e:
        raise BadVideoError(p, "is a directory, not a video file") from e
    except OSError as e:
        raise BadVideoError(p, f"cannot read ({e})") from e
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}"


class FrameCache:
    """A folder of cached candidate frames.

    Args:
        root: Cache folder (created on first write).
        sampling: Sampling whose candidate rate (``fps``) and cap (``max_candidates``) define what is
            cached; ``num_frames`` and ``mode`` do not matter here (they apply at load time).
        image_size: Side S of the stored square frames.
        decoder: Decoder used to build missing entries (default PyAV).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        sampling: SamplingConfig | None = None,
        image_size: int = 224,
        decoder: VideoDecoder | None = None,
    ) -> None:
        if image_size < 1:
            raise VidretError(f"image_size must be >= 1, got {image_size}")
        self.root = Path(root)
        self.sampling = sampling or SamplingConfig()
        self.image_size = image_size
        self.decoder = decoder or PyAVDecoder()
        # path -> (size, mtime_ns, identity): hashing the file ends again only when it changed
        self._identities: dict[str, tuple[int, int, str]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_identities"] = {}  # a per-process memo; not worth shipping to workers
        return state

    def compatible_with(self, sampling: SamplingConfig, image_size: int) -> bool:
        """Whether frames for ``sampling`` at ``image_size`` can be taken from this cache."""
        return (
            sampling.fps == self.sampling.fps
            and sampling.max_candidates == self.sampling.max_candidates
            and image_size == self.image_size
        )

    # ------------------------------------------------------------------------------------------ keys

    def _identity(self, path: str) -> str:
        try:
            st = os.stat(path)
        except FileNotFoundError as e:
            raise BadVideoError(path, "file not found") from e
        except OSError as e:
            raise BadVideoError(path, f"cannot stat ({e})") from e
        memo = self._identities.get(path)
        if memo is not None and memo[0] == st.st_size and memo[1] == st.st_mtime_ns:
            return memo[2]
        ident = file_identity(path)
        self._identities[path] = (st.st_size, st.st_mtime_ns, ident)
        return ident

    def key(self, entry: ManifestEntry) -> str:
        """The cache key of an entry (raises BadVideoError if its file is missing)."""
        parts = {
            "v": CACHE_FORMAT_VERSION,
            "file": self._identity(entry.path),
            "start": entry.start,
            "end": entry.end,
            "fps": self.sampling.fps,
            "max_candidates": self.sampling.max_candidates,
            "size": self.image_size,
            "decoder": getattr(self.decoder, "name", type(self.decoder).__name__),
        }
        return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / key[:2] / f"{key}{suffix}"

    # -------------------------------------------------------------------------------------- read/write

    def _read(self, key: str) -> np.ndarray | None:
        p = self._path(key, ".npy")
        if not p.is_file():
            return None
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            logger.warning("ignoring unreadable cache file %s (%s); it will be rebuilt", p, e)
            return None
        s = self.image_size
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (s, s, 3) or arr.shape[0] < 1:
            logger.warning("ignoring cache file %s with unexpected shape %s", p, arr.shape)
            return None
        return arr

    def _read_bad(self, key: str) -> str | None:
        p = self._path(key, ".bad")
        if not p.is_file():
            return None
        try:
            return str(json.loads(p.read_text(encoding="utf-8"))["reason"])
        except (OSError, ValueError, KeyError):
            return "marked bad by an earlier run"

    def _write_atomic(self, final: Path, write: Callable[[Any], None]) -> int:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # the rename must never expose a file whose data is not on disk
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        return final.stat().st_size

    def load(self, entry: ManifestEntry) -> np.ndarray | None:
        """Cached candidate frames uint8 [N, S, S, 3] (memory-mapped), or None if not cached.

        Raises:
            BadVideoError: the file is missing, or an earlier build marked it bad.
        """
        key = self.key(entry)
        reason = self._read_bad(key)
        if reason is not None:
            raise BadVideoError(entry.path, reason)
        return self._read(key)

    def build(self, entry: ManifestEntry, key: str | None = None) -> np.ndarray:
        """Decode the entry's candidates, store them, return uint8 [N, S, S, 3].

        Raises:
            BadVideoError: the video cannot be decoded (a ``.bad`` marker records why).
        """
        key = key or self.key(entry)
        cfg = self.sampling
        try:
            try:
                _, frames = self.decoder.probe_and_decode(
                    entry.path,
                    lambda info: candidate_timestamps(
                        info.duration, cfg.fps, entry.start, entry.end, cfg.max_candidates
                    ),
                    frame_fn=lambda f: resize_crop(f, self.image_size),
                )
            except ValueError as e:  # segment outside the video
                raise BadVideoError(entry.path, str(e)) from e
        except BadVideoError as e:
            reason = e.reason
            self._write_atomic(self._path(key, ".bad"), lambda f: f.write(json.dumps({"reason": reason}).encode()))
            raise
        self._write_atomic(self._path(key, ".npy"), lambda f: np.save(f, frames, allow_pickle=False))
        return frames

    def get(self, entry: ManifestEntry) -> np.ndarray:
        """Cached frames, building (and storing) them first when missing. Raises BadVideoError."""
        key = self.key(entry)
        reason = self._read_bad(key)
        if reason is not None:
            raise BadVideoError(entry.path, reason)
        arr = self._read(key)
        return arr if arr is not None else self.build(entry, key)

    def bytes_on_disk(self) -> int:
        """Total size of the cached frame files under ``root``."""
        total = 0
        if self.root.is_dir():
            for sub in self.root.iterdir():
                if sub.is_dir():
                    total += sum(f.stat().st_size for f in sub.glob("*.npy"))
        return total


# ---------------------------------------------------------------------------------------- preprocessing


@dataclass
class CacheReport:
    """What ``preprocess`` did."""

    total: int = 0  # entries given
    built: int = 0  # decoded and stored by this run
    reused: int = 0  # already in the cache
    bad: BadVideoReport = field(default_factory=BadVideoReport)
    bytes_on_disk: int = 0  # size of the cache files of this run's good entries
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "built": self.built,
            "reused": self.reused,
            "bytes_on_disk": self.bytes_on_disk,
            "seconds": round(self.seconds, 3),
            "bad": self.bad.to_dict(),
        }

    def summary(self) -> str:
        return (
            f"{self.total} videos: {self.built} built, {self.reused} already cached, {self.bad.num_bad} bad; "
            f"{self.bytes_on_disk / 1e6:.1f} MB on disk; {self.seconds:.1f} s"
        )


_WORKER_CACHE: FrameCache | None = None  # set in each worker process by _init_worker


def _init_worker(cache: FrameCache, parent_pid: int) -> None:
    global _WORKER_CACHE
    import torch

    die_with_parent(parent_pid)  # a kill -9 of the parent must not leave workers blocked on the task queue
    torch.set_num_threads(1)  # one process per core already; resizes are small
    _WORKER_CACHE = cache


def _preprocess_one(cache: FrameCache, entry: ManifestEntry, retry_bad: bool) -> tuple[str, str, int]:
    """(status "built" | "reused" | "bad", reason, bytes) for one entry; never raises on a bad video."""
    try:
        key = cache.key(entry)
        if not retry_bad:
            reason = cache._read_bad(key)
            if reason is not None:
                return "bad", reason, 0
        p = cache._path(key, ".npy")
        if cache._read(key) is not None:
            return "reused", "", p.stat().st_size
        cache.build(entry, key)
        return "built", "", p.stat().st_size
    except BadVideoError as e:
        return "bad", e.reason, 0


def _preprocess_in_worker(entry: ManifestEntry, retry_bad: bool) -> tuple[str, str, int]:
    assert _WORKER_CACHE is not None
    return _preprocess_one(_WORKER_CACHE, entry, retry_bad)


def preprocess(
    entries: Sequence[ManifestEntry],
    cache: FrameCache,
    num_workers: int = 0,
    progress: bool = True,
    max_bad_fraction: float = 0.05,
    retry_bad: bool = False,
    mp_context: str | None = None,
) -> CacheReport:
    """Fill ``cache`` for ``entries``: resumable, parallel across processes, bad videos skipped.

    Args:
        entries: Manifest entries (paths already resolved, as ``read_manifest`` returns them).
        cache: The cache to fill.
        num_workers: Worker processes; 0 works in this process.
        progress: Show a tqdm progress bar.
        max_bad_fraction: Stop with VidretError once more than this fraction of entries is bad.
        retry_bad: Decode again videos an earlier run marked bad.
        mp_context: multiprocessing start method ("spawn", "forkserver", "fork"); None = the platform's.

    Returns:
        CacheReport (bad videos listed in ``report.bad``, one warning each).

    Raises:
        VidretError: more than ``max_bad_fraction`` of the entries are bad.
    """
    from tqdm.auto import tqdm

    if not 0.0 <= max_bad_fraction <= 1.0:
        raise VidretError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    t0 = time.perf_counter()
    report = CacheReport(total=len(entries), bad=BadVideoReport(total=len(entries)))
    bar = tqdm(total=len(entries), disable=not progress, desc="preprocess", unit="video")

    def record(entry: ManifestEntry, result: tuple[str, str, int]) -> None:
        status, reason, nbytes = result
        if status == "bad":
            report.bad.add(entry.video_id, entry.path, reason)
        elif status == "built":
            report.built += 1
        else:
            report.reused += 1
        report.bytes_on_disk += nbytes
        bar.update(1)
        if report.bad.num_bad > max_bad_fraction * len(entries):
            report.seconds = time.perf_counter() - t0
            report.bad.check(max_bad_fraction)  # raises: the final fraction can only be higher

    try:
        if num_workers <= 0:
            for entry in entries:
                record(entry, _preprocess_one(cache, entry, retry_bad))
        else:
            import multiprocessing as mp

            ctx = mp.get_context(mp_context) if mp_context else None
            with ProcessPoolExecutor(
                max_workers=num_workers, mp_context=ctx, initializer=_init_worker, initargs=(cache, os.getpid())
            ) as pool:
                pending: dict[Future[tuple[str, str, int]], ManifestEntry] = {}
                it = iter(entries)
                try:
                    # Keep a bounded number of tasks in flight so a stop does not wait for the rest.
                    while True:
                        while len(pending) < 4 * num_workers:
                            nxt = next(it, None)
                            if nxt is None:
                                break
                            pending[pool.submit(_preprocess_in_worker, nxt, retry_bad)] = nxt
                        if not pending:
                            break
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in done:
                            record(pending.pop(fut), fut.result())
                except BaseException:
                    for fut in pending:
                        fut.cancel()
                    raise
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["CACHE_FORMAT_VERSION", "CacheReport", "FrameCache", "file_identity", "preprocess"]
