"""The files of an index folder, parsed and checked as untrusted data.

An index folder may come from a stranger, and its checksums live in the ``index.json`` they protect, so every
file is checked before it is used: ``index.json`` is schema-checked (:func:`parse_index_meta`), the
``videos-<h>.jsonl`` rows are type-checked (:meth:`VideoRecord.from_obj`) and every record with a file must
lie inside the collection ``root`` recorded at build time and carry the file identity media routes check
(:func:`check_records`), and the ``.npy`` headers are checked (dtype, shape against ``count``/``dim``) before
the data is read (:func:`read_npy`). The FAISS cross-check lives with the backend
(:meth:`vidret.retrieval.backends.FaissIndex.check`); the folder layout is described in
:mod:`vidret.retrieval.index`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import numpy as np

from vidret.data.sampling import FRAME_RULES, FrameRule, SamplingConfig
from vidret.errors import VidretError
from vidret.retrieval.moments import check_windowing

INDEX_FORMAT_VERSION = 1
INDEX_FILE = "index.json"
LEGACY_VIDEOS_FILE = "videos.jsonl"  # the videos file of indexes written before it was content-named
DATA_STEMS = ("features", "masks", "faiss", "videos")  # roles of the content-named data files
_IDENTITY_RE = re.compile(r"[0-9]+:[0-9]+:[0-9a-f]{40}\Z")  # vidret.data.cache.file_identity: size:mtime_ns:sha1
_SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")

IndexKind = Literal["pooled", "frames"]
Backend = Literal["exact", "faiss"]
StorageDtype = Literal["float16", "float32"]


# ------------------------------------------------------------------------------------------ metadata


class VideoRecord(NamedTuple):
    """One indexed video: what the media routes may serve and what ``--update`` compares.

    A NamedTuple rather than a frozen dataclass: a million of them are built when a large index loads.
    """

    video_id: str  # unique in the index
    path: str = ""  # absolute path of the video file as indexed ("" for synthetic rows)
    real_path: str = ""  # os.path.realpath at indexing time; media routes refuse a file that now resolves elsewhere
    duration: float | None = None  # seconds, from the container headers
    identity: str = ""  # vidret.data.cache.file_identity at indexing time ("" = unknown)
    start: float | None = None  # segment start (manifest entries), None = from the start
    end: float | None = None  # segment end, None = to the end
    captions: tuple[str, ...] = ()  # manifest captions, shown by the web page
    # the video a window row belongs to (``index --segment``); "" = the row is a whole video (or manifest
    # segment). Indexes written before windows existed have no such field: every row a whole video.
    parent: str = ""

    @property
    def group(self) -> str:
        """The video this row stands for in grouped results: its parent video, else itself."""
        return self.parent or self.video_id

    def to_json(self) -> str:
        # Built by hand: dataclasses.asdict deep-copies and dominated writing million-row indexes.
        d = {
            "video_id": self.video_id,
            "path": self.path,
            "real_path": self.real_path,
            "duration": self.duration,
            "identity": self.identity,
            "start": self.start,
            "end": self.end,
            "captions": list(self.captions),
        }
        if self.parent:
            d["parent"] = self.parent
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def from_obj(cls, d: Any) -> VideoRecord:
        """A record from its parsed JSON line, every field's type checked.

        Raises:
            ValueError: a field is missing or of the wrong type (the caller names the file and the row).
        """
        # `type(v) in` rather than isinstance: JSON gives exact types, and bool must not pass for a number.
        if type(d) is not dict:
            raise ValueError(f"a row must be a JSON object, got {type(d).__name__}")
        g = d.get
        vid, path, real_path, identity = g("video_id"), g("path", ""), g("real_path", ""), g("identity", "")
        if type(vid) is not str or not vid:
            raise ValueError(f"video_id must be a non-empty string, got {vid!r}")
        if not (type(path) is str and type(real_path) is str and type(identity) is str):
            raise ValueError(f"video {vid!r}: path, real_path and identity must be strings")
        duration, start, end, captions = g("duration"), g("start"), g("end"), g("captions", [])
        for v in (duration, start, end):
            if v is not None and (type(v) not in (float, int) or not math.isfinite(v)):
                raise ValueError(f"video {vid!r}: duration, start and end must be finite numbers or null, got {v!r}")
        if type(captions) is not list or not all(type(c) is str for c in captions):
            raise ValueError(f"video {vid!r}: captions must be a list of strings")
        parent = g("parent", "")
        if type(parent) is not str:
            raise ValueError(f"video {vid!r}: parent must be a string, got {parent!r}")
        if parent and (start is None or end is None or not end > start or start < 0):
            raise ValueError(f"window {vid!r} of {parent!r} needs 0 <= start < end, got start {start!r}, end {end!r}")
        return cls(
            vid,
            path,
            real_path,
            None if duration is None else float(duration),
            identity,
            None if start is None else float(start),
            None if end is None else float(end),
            tuple(captions),
            parent,
        )


def check_records(records: Iterable[VideoRecord], root: str, where: str = "the index") -> None:
    """Refuse records a media route must never serve: files outside ``root``, files without an identity.

    Every record that names a file needs both ``path`` and ``real_path`` (absolute, inside ``root`` unless
    ``root`` is "" for an index written before roots were recorded) and the file identity media routes
    compare before serving. Video ids must be unique.
    """
    prefix = root if root.endswith(os.sep) else root + os.sep
    escape = f"{os.sep}..{os.sep}"
    seen: set[str] = set()
    for r in records:
        if r.video_id in seen:
            raise VidretError(f"{where}: video id {r.video_id!r} appears twice; rebuild the index")
        seen.add(r.video_id)
        if not r.path and not r.real_path:
            continue  # a synthetic row: nothing to serve
        if not r.path or not r.real_path:
            raise VidretError(
                f"{where}: video {r.video_id!r} has path {r.path!r} but real_path {r.real_path!r} (both or neither); "
                "rebuild the index"
            )
        for p in (r.path, r.real_path):
            # Lexically inside the root: starts with "<root>/" and has no ".." component after it (the same as
            # os.path.commonpath on normalised paths, without normalising a million paths on load).
            inside = p.startswith(prefix) and escape not in p[len(prefix) - 1 :] + os.sep if root else os.path.isabs(p)
            if not inside:
                what = f"outside the collection root {root}" if root else "not an absolute path"
                raise VidretError(
                    f"{where}: video {r.video_id!r} points to {p}, {what}; refusing the index (crafted or "
                    "hand-edited?); rebuild it with `vidret index` from the videos folder"
                )
        if not _IDENTITY_RE.match(r.identity):
            raise VidretError(
                f"{where}: video {r.video_id!r} names the file {r.real_path} without a valid file identity "
                f"({r.identity!r}), so its media could not be checked against the file that was indexed; "
                "rebuild the index with `vidret index`"
            )


@dataclass(frozen=True)
class ModelIdentity:
    """Which backbone + adapter produced an index's vectors (and can therefore query it)."""

    backbone_name: str  # architecture name, e.g. "ViT-B-32"
    backbone_fingerprint: str  # vidret.backbone.clip.fingerprint of the backbone weights
    adapter_method: str  # registered method name
    adapter_fingerprint: str  # see adapter_fingerprint(): method + config + trained state
    backbone_spec: str = ""  # how to load the backbone again: a name, a path, or "random:<config>"
    adapter_path: str = ""  # the adapter folder the index was built with ("" = built from memory)

    def describe_backbone(self) -> str:
        return f"{self.backbone_name!r} (fingerprint {self.backbone_fingerprint})"

    def describe_adapter(self) -> str:
        where = f" from {self.adapter_path}" if self.adapter_path else ""
        return f"{self.adapter_method!r}{where} (fingerprint {self.adapter_fingerprint})"


@dataclass(frozen=True)
class IndexSettings:
    """How videos became vectors, and how the vectors are stored and searched."""

    num_frames: int = 12  # T frames per video
    fps: float = 1.0  # candidate frame rate before uniform subsampling to T
    max_candidates: int = 64  # cap on candidates per video (the frame cache's cap)
    image_size: int = 224  # must equal the backbone's input size
    max_words: int = 32  # query length in tokens
    # which T of the N candidates each video contributes (the adapter's data.eval_sampling); indexes written
    # before it was recorded took segment centres
    sampling: FrameRule = "segment_centre"
    dtype: StorageDtype = "float16"  # storage dtype of the feature file (search always runs in float32)
    backend: Backend = "exact"  # default search backend when the index is loaded
    # FAISS IVF lists; 0 = chosen from the collection size (backends.default_nlist: 4 sqrt(N), at most 1024)
    nlist: int = 0
    # FAISS lists visited per query, the recall-vs-speed knob; 0 = chosen from the size and nlist for recall@10
    # >= 0.95 on clustered vectors (backends.default_nprobe). Indexes written before recorded 16 (kept).
    nprobe: int = 0
    # moments (``index --segment``): window length in seconds, 0 = one row per video (indexes written before
    # windows existed); and seconds between window starts, in (0, segment]
    segment: float = 0.0
    stride: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_frames", "max_candidates", "image_size", "max_words"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise VidretError(f"index setting {name} must be an int >= 1, got {v!r}")
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise VidretError(f"index setting fps must be a positive number, got {self.fps!r}")
        if self.max_candidates < self.num_frames:
            raise VidretError(f"max_candidates ({self.max_candidates}) must be >= num_frames ({self.num_frames})")
        if self.sampling not in FRAME_RULES or self.sampling == "segment_random":
            rules = [r for r in FRAME_RULES if r != "segment_random"]
            raise VidretError(f"index setting sampling must be one of {rules}, got {self.sampling!r}")
        if self.dtype not in ("float16", "float32"):
            raise VidretError(f"index dtype must be 'float16' or 'float32', got {self.dtype!r}")
        if self.backend not in ("exact", "faiss"):
            raise VidretError(f"index backend must be 'exact' or 'faiss', got {self.backend!r}")
        for name in ("nlist", "nprobe"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise VidretError(f"{name} must be an int >= 0 (0 = chosen from the collection size), got {v!r}")
        check_windowing(self.segment, self.stride)

    def frame_sampling(self) -> SamplingConfig:
        """How every video of the index (and a ``search --video`` query) is sampled."""
        return SamplingConfig(
            num_frames=self.num_frames,
            fps=self.fps,
            mode="eval",
            max_candidates=self.max_candidates,
            eval_sampling=self.sampling,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexSettings:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


# ------------------------------------------------------------------------------------------ index.json and data files


def _is_bare_name(v: Any) -> bool:
    return isinstance(v, str) and v not in ("", ".", "..") and not any(c in v for c in ("/", "\\", "\0", os.sep))


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass(frozen=True)
class IndexMeta:
    """A schema-checked ``index.json``."""

    kind: IndexKind
    count: int  # rows (records = feature rows)
    dim: int  # E, the vector size
    backend: Backend  # the stored default backend
    settings: IndexSettings
    identity: ModelIdentity
    files: dict[str, dict[str, str]]  # role -> {"file": bare name, "sha256": hex[, "nlist": str]}
    root: str  # the collection root ("" = written before roots were recorded)


_MODEL_REQUIRED = ("backbone_name", "backbone_fingerprint", "adapter_method", "adapter_fingerprint")
_MODEL_OPTIONAL = ("backbone_spec", "adapter_path")


def parse_index_meta(meta: Any, where: str | os.PathLike[str]) -> IndexMeta:
    """Schema-check a parsed ``index.json``: one VidretError naming the first problem, never a KeyError.

    Every field's type is checked; ``count``/``dim`` are ints >= 0; data file names are bare names inside the
    index folder; ``root`` is "" or an absolute normalised path.
    """

    def fail(problem: str) -> VidretError:
        return VidretError(f"{where} is not a valid vidret index: {problem}; rebuild the index with `vidret index`")

    if not isinstance(meta, dict):
        raise fail(f"it holds a JSON {type(meta).__name__}, not an object")
    version = meta.get("format_version")
    if isinstance(version, bool) or version != INDEX_FORMAT_VERSION:
        raise VidretError(
            f"{where}: index format version {version!r}, this vidret reads {INDEX_FORMAT_VERSION}; rebuild the "
            "index with this version"
        )
    kind, backend = meta.get("kind"), meta.get("backend", "exact")
    if not isinstance(kind, str) or kind not in ("pooled", "frames"):
        raise fail(f"kind must be 'pooled' or 'frames', got {kind!r}")
    if not isinstance(backend, str) or backend not in ("exact", "faiss"):
        raise fail(f"backend must be 'exact' or 'faiss', got {backend!r}")
    for key in ("count", "dim"):
        if not _is_count(meta.get(key)):
            raise fail(f"{key} must be an int >= 0, got {meta.get(key)!r}")
    root = meta.get("root", "")
    if not isinstance(root, str) or (root and (not os.path.isabs(root) or os.path.normpath(root) != root)):
        raise fail(f"root must be an absolute, normalised folder path, got {root!r}")

    model = meta.get("model")
    if not isinstance(model, dict):
        raise fail(f"model must be an object, got {type(model).__name__}")
    unknown = sorted(set(model) - set(_MODEL_REQUIRED) - set(_MODEL_OPTIONAL))
    missing = [k for k in _MODEL_REQUIRED if k not in model]
    if unknown or missing:
        raise fail(f"model has unknown fields {unknown} or lacks {missing}")
    wrong = [k for k, v in model.items() if not isinstance(v, str)]
    if wrong:
        raise fail(f"model fields {wrong} must be strings")

    settings = meta.get("settings")
    if not isinstance(settings, dict):
        raise fail(f"settings must be an object, got {type(settings).__name__}")
    try:
        parsed_settings = IndexSettings.from_dict(settings)
    except VidretError as e:
        raise fail(str(e)) from e

    files = meta.get("files")
    if not isinstance(files, dict):
        raise fail(f"files must be an object, got {type(files).__name__}")
    need = {"features", "videos"} | ({"masks"} if kind == "frames" else set())
    allowed = need | ({"faiss"} if kind == "pooled" else set())
    if not need <= set(files) <= allowed:
        raise fail(f"a {kind} index names the data files {sorted(need)} (and optionally faiss), got {sorted(files)}")
    for role, entry in files.items():
        if not isinstance(entry, dict) or not set(entry) <= {"file", "sha256", "nlist"}:
            raise fail(f"files.{role} must be an object with file and sha256, got {entry!r}")
        if not _is_bare_name(entry.get("file")):
            raise fail(f"files.{role}.file must be a bare file name inside the index folder, got {entry.get('file')!r}")
        if not isinstance(entry.get("sha256"), str) or not _SHA256_RE.match(entry["sha256"]):
            raise fail(f"files.{role}.sha256 must be 64 hex digits, got {entry.get('sha256')!r}")
        if "nlist" in entry and not (isinstance(entry["nlist"], str) and entry["nlist"].isdigit()):
            raise fail(f"files.{role}.nlist must be a string of digits, got {entry['nlist']!r}")
    return IndexMeta(
        kind=kind,  # type: ignore[arg-type]
        count=meta["count"],
        dim=meta["dim"],
        backend=backend,  # type: ignore[arg-type]
        settings=parsed_settings,
        identity=ModelIdentity(**model),
        files=files,
        root=root,
    )


def write_npy(f: IO[bytes], arr: np.ndarray) -> None:
    """Write an array as ``.npy`` into an open binary file, never as a pickle (what :func:`read_npy` reads back)."""
    np.save(f, arr, allow_pickle=False)


def read_npy(
    path: Path, role: str, dtypes: tuple[str, ...], shape_ok: Callable[[tuple[int, ...]], bool], want: str
) -> np.ndarray:
    """A ``.npy`` data file, its header (dtype, shape) checked before the data is read; never a pickle."""

    def fail(problem: str) -> VidretError:
        return VidretError(f"index file {path} ({role}) {problem}; rebuild the index")

    fmt = np.lib.format
    try:
        with path.open("rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:
                raise fail(f"has .npy format version {version}, not 1.0 or 2.0")
            if dtype.hasobject or dtype not in [np.dtype(d) for d in dtypes]:
                raise fail(f"holds {dtype.str} values, expected {' or '.join(dtypes)}")
            if not shape_ok(tuple(shape)):
                raise fail(f"has shape {tuple(shape)}, expected {want}")
            f.seek(0)
            arr = np.load(f, allow_pickle=False)
    except VidretError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise fail(f"is not a readable .npy file ({e})") from e
    return arr


def read_index_json(folder: Path) -> Any:
    p = folder / INDEX_FILE
    if not p.is_file():
        raise VidretError(f"{folder} is not a vidret index (no {INDEX_FILE}); build one with `vidret index`")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise VidretError(f"{p} is not valid JSON ({e}); rebuild the index") from e


def read_records(path: Path) -> list[VideoRecord]:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise VidretError(f"{path} is not UTF-8 text ({e}); rebuild the index") from e
    try:
        objs = json.loads("[" + ",".join(lines) + "]")  # one parse: ~3x faster than a loads per line
    except (json.JSONDecodeError, RecursionError) as e:
        raise VidretError(f"{path} is damaged ({e}); rebuild the index") from e
    records = []
    for i, o in enumerate(objs):
        try:
            records.append(VideoRecord.from_obj(o))
        except ValueError as e:
            raise VidretError(f"{path}, row {i + 1}: {e}; rebuild the index") from e
    return records


def read_index_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The schema-checked ``index.json`` of an index folder, as a dict (no data files read)."""
    meta = read_index_json(Path(folder))
    parse_index_meta(meta, Path(folder) / INDEX_FILE)
    return dict(meta)


__all__ = [
    "DATA_STEMS",
    "INDEX_FILE",
    "INDEX_FORMAT_VERSION",
    "LEGACY_VIDEOS_FILE",
    "Backend",
    "IndexKind",
    "IndexMeta",
    "IndexSettings",
    "ModelIdentity",
    "StorageDtype",
    "VideoRecord",
    "check_records",
    "parse_index_meta",
    "read_index_json",
    "read_index_meta",
    "read_npy",
    "read_records",
]
