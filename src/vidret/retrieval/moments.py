"""Moments: windows of long videos as index rows, and search results grouped back per video.

``vidret index --segment S --stride D`` plans windows ``[t, t + S]`` every ``D`` seconds over each video (the
last one aligned to the video's end, so the tail is covered); each window is one row of the index, with the
window's ``start``/``end`` and the ``parent`` video id. Its ``video_id`` is ``"<parent>#<start>-<end>"``, unique
in the index. Search then asks for more rows than wanted and keeps the best window per video
(``group="video"``) or every window (``group="segment"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor

from vidret.errors import VidretError

Group = Literal["video", "segment"]
GROUPS: tuple[Group, ...] = ("video", "segment")


def _fmt(t: float) -> str:
    """Seconds as a short, exact-enough string: 12.5 -> "12.5", 3.0 -> "3"."""
    return f"{t:.3f}".rstrip("0").rstrip(".")


def window_id(video_id: str, start: float, end: float) -> str:
    """The row id of a window: ``"<video_id>#<start>-<end>"`` (seconds, up to milliseconds)."""
    return f"{video_id}#{_fmt(start)}-{_fmt(end)}"


def check_windowing(segment: float, stride: float) -> None:
    """Refuse a window plan that cannot work (raises VidretError naming the option)."""
    for name, v in (("segment", segment), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise VidretError(f"--{name} must be a number of seconds >= 0, got {v!r}")
    if segment == 0:
        if stride != 0:
            raise VidretError("--stride needs --segment SECONDS (the window length)")
        return
    if not 0 < stride <= segment:
        raise VidretError(
            f"--stride must be in (0, --segment] so that windows cover the whole video; got stride {stride} with "
            f"segment {segment} (e.g. --segment 8 --stride 4)"
        )


def plan_windows(
    duration: float, segment: float, stride: float, start: float | None = None, end: float | None = None
) -> list[tuple[float, float]]:
    """The windows ``[(start, end), ...]`` of one video, in time order.

    Windows start every ``stride`` seconds from the video's (or its manifest segment's) start; the last one
    ends at the end, shifted back so it keeps the full ``segment`` length (no short tail window). A video no
    longer than ``segment`` is one window over all of it. Times are rounded to milliseconds.

    Args:
        duration: the video's length in seconds (container headers).
        segment: window length in seconds (> 0).
        stride: seconds between window starts, in (0, segment].
        start: the manifest segment's start (None = 0).
        end: the manifest segment's end (None = the video's end).
    """
    check_windowing(segment, stride)
    if segment <= 0:
        raise VidretError("plan_windows needs segment > 0")
    s0 = 0.0 if start is None else max(0.0, float(start))
    e0 = float(duration) if end is None else min(float(duration), float(end))
    if not e0 > s0:
        return []
    if e0 - s0 <= segment + 1e-6:
        return [(round(s0, 3), round(e0, 3))]
    out: list[tuple[float, float]] = []
    i = 0
    while True:
        t = s0 + i * stride
        if t + segment >= e0 - 1e-6:
            break
        out.append((round(t, 3), round(t + segment, 3)))
        i += 1
    last = (round(e0 - segment, 3), round(e0, 3))
    if out[-1] != last:
        out.append(last)
    return out


def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal intersection over union of two [start, end] intervals."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def grouped_topk(
    search: Callable[[int], tuple[Tensor, Tensor]],
    groups: Sequence[str],
    ks: Sequence[int],
    per_group: Sequence[bool],
) -> list[list[tuple[int, float]]]:
    """Top hits per query, keeping only the best row of each group where asked.

    ``search(n)`` returns (scores [Q, n'], rows [Q, n']) best first for the batch's Q queries. Grouped queries
    need more rows than ``k``: the request doubles until each has ``k`` groups, every row was seen, or it
    reached ``max(64 k, 8192)`` rows (an ANN backend may return fewer rows than asked).

    Args:
        search: the index search of the whole batch for a given row count.
        groups: row -> group key (the parent video id of a window; the row's own id otherwise).
        ks: hits wanted per query.
        per_group: per query, True = one hit per group (the best window of each video).

    Returns:
        per query, [(row, score), ...] best first.
    """
    n = len(groups)
    k_max = max(ks, default=0)
    want = min(n, k_max * (4 if any(per_group) else 1))
    cap = min(n, max(64 * k_max, 8192))
    while True:
        scores, rows = search(want)
        s, r = scores.tolist(), rows.tolist()
        out: list[list[tuple[int, float]]] = []
        short = False
        for qi, (k, grouped) in enumerate(zip(ks, per_group)):
            hits: list[tuple[int, float]] = []
            seen: set[str] = set()
            for row, sc in zip(r[qi], s[qi]):
                if row < 0:
                    continue
                if grouped:
                    g = groups[row]
                    if g in seen:
                        continue
                    seen.add(g)
                hits.append((row, sc))
                if len(hits) == k:
                    break
            short |= len(hits) < min(k, n) and grouped
            out.append(hits)
        if not short or want >= cap:
            return out
        want = min(cap, want * 2)


__all__ = ["GROUPS", "Group", "check_windowing", "grouped_topk", "iou", "plan_windows", "window_id"]
