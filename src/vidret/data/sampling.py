"""Which frames a video contributes: 1 fps candidates, then T frames chosen uniformly among them.

Candidates are the centres of consecutive 1/fps-second bins over the video (or over its [start, end]
segment, for LSMDC-style entries), at most ``max_candidates`` of them (longer videos get wider bins).
From N > T candidates a rule (``FrameRule``; one for training, one for evaluation) chooses T:

- ``segment_random``: split the candidates into T equal runs, a random member of each run (the project's
  training default; from the generator passed in);
- ``segment_centre``: the centre of each run (the project's evaluation default);
- ``mvadapter_floor``: candidate ``floor(i * N / T)``, i = 0..T-1 (official MV-Adapter,
  ``dataloaders/retrieval_dt.py``, for training and testing alike);
- ``cma_linspace``: ``np.linspace(0, N - 1, T, dtype=int)``, i.e. truncated, not rounded (official
  Cross-Modal Adapter ``dataloaders_drl/dataloader_retrieval_images.py`` and CLIP4Clip's
  ``slice_framepos=2``, training and testing alike).

With N <= T every candidate is kept, the rest of the T slots are padding and the mask says which (all rules).

The frame cache stores all candidates, so both choices happen at load time and cached and decoded
frames are the same frames.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from vidret.errors import VidretError

SamplingMode = Literal["eval", "train"]
FrameRule = Literal["segment_random", "segment_centre", "mvadapter_floor", "cma_linspace"]
FRAME_RULES: tuple[FrameRule, ...] = get_args(FrameRule)


@dataclass(frozen=True)
class SamplingConfig:
    """How frames are sampled from a video."""

    num_frames: int = 12  # T: frames per video fed to the model
    fps: float = 1.0  # candidate rate before subsampling to T
    mode: SamplingMode = "eval"  # which of the two rules below applies
    max_candidates: int = 64  # cap on candidates per video (long videos: wider bins); also the cache's cap
    train_sampling: FrameRule = "segment_random"  # how train mode picks T of the N candidates
    eval_sampling: FrameRule = "segment_centre"  # how eval mode picks them (a deterministic rule)

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
        for name in ("train_sampling", "eval_sampling"):
            if getattr(self, name) not in FRAME_RULES:
                raise VidretError(f"sampling.{name} must be one of {list(FRAME_RULES)}, got {getattr(self, name)!r}")
        if self.eval_sampling == "segment_random":
            raise VidretError("sampling.eval_sampling must be deterministic: not 'segment_random'")

    @property
    def rule(self) -> FrameRule:
        """The frame rule of the current mode."""
        return self.train_sampling if self.mode == "train" else self.eval_sampling

    def with_mode(self, mode: SamplingMode) -> SamplingConfig:
        """The same sampling with another mode."""
        return dataclasses.replace(self, mode=mode)


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
    rule: FrameRule = "segment_centre",
    generator: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose T of N candidates by ``rule`` (see the module docstring).

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
    if rule == "segment_centre":
        idx = (lo + hi - 1) // 2
    elif rule == "segment_random":
        if generator is None:
            raise ValueError("segment_random sampling needs a seeded np.random.Generator")
        idx = lo + np.floor(generator.random(t) * (hi - lo)).astype(np.int64)
    elif rule == "mvadapter_floor":
        idx = (np.arange(t, dtype=np.int64) * num_candidates) // t  # floor(i * N / T): each run's first member
    elif rule == "cma_linspace":
        # numpy's float linspace cast to int (truncation), exactly as the official code computes it
        idx = np.linspace(0, num_candidates - 1, num=t, dtype=int).astype(np.int64)
    else:
        raise ValueError(f"rule must be one of {list(FRAME_RULES)}, got {rule!r}")
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
    idx, mask = select_indices(len(cands), config.num_frames, config.rule, generator)
    return cands[idx[mask]], mask


__all__ = [
    "FRAME_RULES",
    "FrameRule",
    "SamplingConfig",
    "SamplingMode",
    "candidate_timestamps",
    "sample_timestamps",
    "segment_bounds",
    "select_indices",
]
