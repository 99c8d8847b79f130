"""``vidret data check``: what a manifest holds and which of its videos cannot be used.

Counts videos and captions, finds missing files, opens the files with the project's decoder
(``vidret.data.decode``: PyAV) to find unreadable ones and collect duration statistics, and decodes
the first frame of each unless ``decode=False`` (then only the headers are read, which is much faster).
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from vidret.data.decode import BadVideoError, PyAVDecoder, VideoInfo
from vidret.data.manifest import read_manifest
from vidret.errors import VidretError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckReport:
    """The result of :func:`check_manifest`; ``format_report()`` is the human summary."""

    manifest: str
    videos: int  # manifest entries
    captions: int
    captions_per_video: tuple[int, float, int]  # min, mean, max (zeros for an empty manifest)
    files: int  # distinct video files referenced (segments may share one)
    missing: tuple[str, ...]  # distinct paths that do not exist
    unreadable: tuple[tuple[str, str], ...]  # (path, reason) for files the decoder rejected
    probed: int  # files opened with the decoder (all present files, or a sample of max_videos)
    decoded: bool  # whether the first frame of each probed file was decoded
    durations: tuple[float, float, float] | None  # min, median, max seconds of readable probed files
    no_captions: tuple[str, ...] = ()  # video ids with an empty caption list
    segments_past_end: tuple[str, ...] = ()  # video ids whose segment starts at or after the file's end

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unreadable or inconsistent."""
        return not (self.missing or self.unreadable or self.no_captions or self.segments_past_end)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def format_report(self, max_items: int = 10) -> str:
        """A short text summary listing the first ``max_items`` problems of each kind."""
        lo, mean, hi = self.captions_per_video
        lines = [
            f"manifest: {self.manifest}",
            f"videos: {self.videos} ({self.files} files), captions: {self.captions} "
            f"(per video min {lo}, mean {mean:.2f}, max {hi})",
        ]
        how = "opened and first frame decoded" if self.decoded else "opened (headers only, no decode)"
        present = self.files - len(self.missing)
        lines.append(f"files {how}: {self.probed} of {present} present")
        if self.durations is not None:
            d0, d1, d2 = self.durations
            lines.append(f"duration (s): min {d0:.2f}, median {d1:.2f}, max {d2:.2f}")
        problems: list[tuple[str, list[str]]] = [
            ("missing files", list(self.missing)),
            ("unreadable videos", [f"{p}: {r}" for p, r in self.unreadable]),
            ("videos without captions", list(self.no_captions)),
            ("segments starting after the end of their file", list(self.segments_past_end)),
        ]
        for title, items in problems:
            if items:
                lines.append(f"{title}: {len(items)}")
                lines += [f"  {x}" for x in items[:max_items]]
                if len(items) > max_items:
                    lines.append(f"  ... and {len(items) - max_items} more")
        lines.append("OK" if self.ok else "PROBLEMS FOUND")
        return "\n".join(lines)


def _probe(decoder: PyAVDecoder, path: str, decode: bool) -> VideoInfo | str:
    """The file's metadata, or the reason it cannot be used."""
    try:
        if decode:
            return decoder.probe_and_decode(path, lambda info: [0.0])[0]
        return decoder.probe(path)
    except BadVideoError as e:
        return e.reason
    except Exception as e:  # a checker reports every bad file and keeps going
        logger.debug("unexpected error probing %s", path, exc_info=True)
        return f"unexpected error ({type(e).__name__}: {e})"


def _sample(items: Sequence[str], k: int | None) -> list[str]:
    """``k`` items spread evenly over the list (a first-k sample would miss problems in later folders)."""
    if k is None or k >= len(items):
        return list(items)
    if k <= 0:
        return []
    return [items[(i * len(items)) // k] for i in range(k)]


def check_manifest(
    path: str | os.PathLike[str], decode: bool = True, max_videos: int | None = None, workers: int = 2
) -> CheckReport:
    """Check a manifest: counts, missing files, unreadable videos, duration statistics.

    Args:
        path: a JSONL manifest (``vidret data convert`` writes them).
        decode: also decode the first frame of each file; False reads only the headers.
        max_videos: open at most this many files (spread evenly over the manifest); counts and
            missing files always cover every entry.
        workers: threads opening files in parallel (FFmpeg releases the GIL while it works).

    Raises:
        VidretError: the manifest is missing or malformed, or an argument is out of range.
    """
    if max_videos is not None and max_videos < 0:
        raise VidretError(f"max_videos must be >= 0 or None, got {max_videos}")
    if workers < 1:
        raise VidretError(f"workers must be >= 1, got {workers}")
    entries = read_manifest(path)
    counts = [len(e.captions) for e in entries]
    files = list(dict.fromkeys(e.path for e in entries))  # distinct, in manifest order
    exists = {p: os.path.isfile(p) for p in files}
    present = [p for p in files if exists[p]]
    missing = [p for p in files if not exists[p]]
    to_probe = _sample(present, max_videos)
    decoder = PyAVDecoder(threads=1 if workers > 1 else 0)  # parallel across files, not within one
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(zip(to_probe, pool.map(lambda p: _probe(decoder, p, decode), to_probe)))
    unreadable = [(p, r) for p, r in results.items() if isinstance(r, str)]
    infos = {p: r for p, r in results.items() if isinstance(r, VideoInfo)}
    durations = sorted(i.duration for i in infos.values())
    past_end = [
        e.video_id for e in entries if e.start is not None and e.path in infos and e.start >= infos[e.path].duration
    ]
    return CheckReport(
        manifest=os.path.normpath(path),
        videos=len(entries),
        captions=sum(counts),
        captions_per_video=(min(counts), sum(counts) / len(counts), max(counts)) if counts else (0, 0.0, 0),
        files=len(files),
        missing=tuple(missing),
        unreadable=tuple(unreadable),
        probed=len(to_probe),
        decoded=decode,
        durations=(durations[0], statistics.median(durations), durations[-1]) if durations else None,
        no_captions=tuple(e.video_id for e in entries if not e.captions),
        segments_past_end=tuple(past_end),
    )
