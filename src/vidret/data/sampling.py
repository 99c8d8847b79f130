"""Which frames a video contributes: 1 fps candidates, then T frames chosen uniformly among them.

Candidates are the centres of consecutive 1/fps-second bins over the video (or over its [start, end]
segment, for LSMDC-style entries), at most ``max_candidates`` of them (longer videos get wider bins).
From N candidates T frames are chosen by splitting the candidates into T equal runs: eval takes the
centre of each run (deterministic), train a random member of each run (from the generator passed in).
With N < T every candidate is kept, the rest of the T slots are padding and the mask says which.

The frame cache stores all candidates, so both choices happen at load time and cached and decoded
frames are the same frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from vidret.errors import VidretError

SamplingMode = Literal["eval", "train"]


@dataclass(frozen=True)
class SamplingConfig:
    """How frames are sampled from a video."""

    num_frames: int = 12  # T: frames per video fed to the model
    fps: float = 1.0  # candidate rate before subsampling to T
    mode: SamplingMode = "eval"  # eval: centre of each of T runs; train: random within each run
    max_candidates: int = 64  # cap on candidates per video (long videos: wider bins); also the cache's cap

    def __post_init__(self) -> None:
        if isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise VidretError(f"sampling.num_frames must be an int >= 1, got {self.num_frames!r}")
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise VidretError(f"sampling.fps must be a positive number, got {self.fps!r}")
        if self.mode not in ("eval", "train"):
            raise VidretError(f"sampling.mode must be 'eval' or 'train', got {self.mode!r}")
        if not isinstance(self.max_candidates, int) or self.max_candidates < self.num_frames:
            raise VidretError(
                f"sampling.max_candidates must be an int >= num_frames ({self.num_frames}), got {self.max_candidates!r}"
            )

    def with_mode(self, mode: SamplingMode) -> SamplingConfig:
        """The same sampling with another mode."""
        return SamplingConfig(self.num_frames, self.fps, mode, self.max_candidates)


def segment_bounds(duration: float, start: float | None = None, end: float | None = None) -> tuple[float, float]:
    """The [start, end] seconds to sample, clipped to the video.

    Raises:
        ValueError: when the segment lies entirely outside the video (callers treat it as a bad video).
    """
    if not (math.isfinite(duration) and duration >= 0):
        raise ValueError(f"invalid video duration {duration}")
    s = 0.0 if start is None else max(0.0, float(start))
    e = duration if end is None else min(duration, float(end))
    if s >= duration and duration > 0:
        raise ValueError(f"segment start {s:.2f} s is after the end of the video ({duration:.2f} s)")
    if e <= s:
        # A zero-length video or segment still gets its frame at `s`.
        e = s
    return s, e


def candidate_timestamps(
    duration: float,
    fps: float = 1.0,
    start: float | None = None,
    end: float | None = None,
    max_candidates: int = 64,
) -> np.ndarray:
    """Candidate times (seconds, float64 [N], N >= 1): centres of 1/fps-second bins over the segment.

    A segment shorter than one bin (a sub-second video) still yields one candidate, its midpoint.
    """
    s, e = segment_bounds(duration, start, end)
    length = e - s
    n = max(1, math.ceil(length * fps - 1e-6))
    if n > max_candidates:
        n = max_candidates
    width = length / n if n / fps < length else 1.0 / fps  # capped: wider bins
    lo = s + np.arange(n) * width  # [N]
    hi = np.minimum(lo + width, e)  # the last bin may be partial
    return (lo + hi) / 2


def select_indices(
    num_candidates: int,
    num_frames: int,
    mode: SamplingMode = "eval",
    generator: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose T of N candidates.

    Returns:
        (indices int64 [T], mask bool [T]): ``indices[i]`` is a candidate index where ``mask[i]``;
        padded slots (N < T) hold -1 and ``mask`` False. Indices are increasing over the valid slots.
    """
    if num_candidates < 1:
        raise ValueError("num_candidates must be >= 1")
    t = num_frames
    if num_candidates <= t:
        idx = np.full(t, -1, dtype=np.int64)
        idx[:num_candidates] = np.arange(num_candidates)
        mask = np.zeros(t, dtype=bool)
        mask[:num_candidates] = True
        return idx, mask
    # Run i covers candidates [lo_i, hi_i); each run is non-empty because N > T.
    edges = np.floor(np.arange(t + 1) * num_candidates / t).astype(np.int64)
    lo, hi = edges[:-1], edges[1:]
    if mode == "eval":
        idx = (lo + hi - 1) // 2
    elif mode == "train":
        if generator is None:
            raise ValueError("train-mode sampling needs a seeded np.random.Generator")
        idx = lo + np.floor(generator.random(t) * (hi - lo)).astype(np.int64)
    else:
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    return idx, np.ones(t, dtype=bool)


def sample_timestamps(
    duration: float,
    config: SamplingConfig,
    start: float | None = None,
    end: float | None = None,
    generator: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Times to decode for one video: (times float64 [T'] for the valid slots, mask bool [T])."""
    cands = candidate_timestamps(duration, config.fps, start, end, config.max_candidates)
    idx, mask = select_indices(len(cands), config.num_frames, config.mode, generator)
    return cands[idx[mask]], mask


__all__ = [
    "SamplingConfig",
    "SamplingMode",
    "candidate_timestamps",
    "sample_timestamps",
    "segment_bounds",
    "select_indices",
]
