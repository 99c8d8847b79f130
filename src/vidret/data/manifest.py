"""The project's one manifest format: JSON Lines, one video per line.

Each line: ``{"video_id": str, "path": str, "captions": [str, ...], "start": float|null, "end": float|null}``.
A manifest file holds one split (``train.jsonl``, ``test.jsonl``, ...). Relative paths are resolved
against the manifest's own folder, so a dataset folder can be moved as a whole.
Benchmark converters (``vidret.data.converters``) write this format; everything else reads only it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vidret.errors import VidretError


@dataclass(frozen=True)
class ManifestEntry:
    """One video and its captions."""

    video_id: str  # unique within the manifest
    path: str  # video file; relative paths are relative to the manifest's folder
    captions: tuple[str, ...] = field(default_factory=tuple)  # one or more; paragraphs are one string
    start: float | None = None  # segment start in seconds (LSMDC-style clips), None = from the start
    end: float | None = None  # segment end in seconds, None = to the end

    def __post_init__(self) -> None:
        if not self.video_id:
            raise ValueError("video_id must be a non-empty string")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"{self.video_id}: end ({self.end}) must be after start ({self.start})")

    def to_json(self) -> str:
        # Built by hand: dataclasses.asdict deep-copies and dominated writing large manifests.
        d = {
            "video_id": self.video_id,
            "path": self.path,
            "captions": list(self.captions),
            "start": self.start,
            "end": self.end,
        }
        return json.dumps(d, ensure_ascii=False)


def _entry_from_obj(obj: object, where: str) -> ManifestEntry:
    if not isinstance(obj, dict):
        raise VidretError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("video_id", "path", "captions") if k not in obj]
    if missing:
        raise VidretError(f"{where}: missing field(s) {missing}")
    captions = obj["captions"]
    if isinstance(captions, str) or not isinstance(captions, list):
        raise VidretError(f"{where}: 'captions' must be a list of strings")
    try:
        return ManifestEntry(
            video_id=str(obj["video_id"]),
            path=str(obj["path"]),
            captions=tuple(str(c) for c in captions),
            start=None if obj.get("start") is None else float(obj["start"]),
            end=None if obj.get("end") is None else float(obj["end"]),
        )
    except (TypeError, ValueError) as e:
        raise VidretError(f"{where}: {e}") from e


def read_manifest(path: str | os.PathLike[str], resolve_paths: bool = True) -> list[ManifestEntry]:
    """Read a JSONL manifest; a malformed line raises VidretError naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise VidretError(f"manifest not found: {p} (write one with `vidret data convert`)")
    entries: list[ManifestEntry] = []
    seen: set[str] = set()
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise VidretError(f"{where}: not valid JSON ({e.msg})") from e
            entry = _entry_from_obj(obj, where)
            if entry.video_id in seen:
                raise VidretError(f"{where}: duplicate video_id {entry.video_id!r}")
            seen.add(entry.video_id)
            if resolve_paths and not os.path.isabs(entry.path):
                resolved = os.path.normpath(p.parent / entry.path)  # printed and compared without a/../
                entry = ManifestEntry(entry.video_id, resolved, entry.captions, entry.start, entry.end)
            entries.append(entry)
    return entries


def write_manifest(path: str | os.PathLike[str], entries: Iterable[ManifestEntry]) -> int:
    """Write entries atomically (temp file + rename); returns the number written."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for e in entries:
            f.write(e.to_json() + "\n")
            n += 1
    os.replace(tmp, p)
    return n


def iter_captions(entries: Iterable[ManifestEntry]) -> Iterator[tuple[int, str]]:
    """Yield (video_index, caption) for every caption: the multi-caption evaluation order."""
    for i, e in enumerate(entries):
        for c in e.captions:
            yield i, c
