"""Building and updating an index from a folder of videos or a manifest, and encoding query videos.

Every video is encoded once through the frame cache (``<index>/cache`` by default). Bad videos are skipped
and reported, never fatal unless more than ``max_bad_fraction`` of the collection is bad. ``update=True``
compares each file's content identity (``vidret.data.cache.file_identity``) with the one recorded: unchanged
videos keep their vectors, changed ones are re-encoded, new ones added, vanished ones removed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vidret.data.cache import FrameCache, file_identity
from vidret.data.dataset import EvalVideoDataset, collate
from vidret.data.decode import BadVideoError, BadVideoReport, PyAVDecoder
from vidret.data.manifest import ManifestEntry, read_manifest
from vidret.errors import VidretError
from vidret.heads import VideoFeatures
from vidret.retrieval.backends import mean_pool
from vidret.retrieval.index import VideoIndex, check_identity, model_identity
from vidret.retrieval.index_files import INDEX_FILE, IndexSettings, VideoRecord
from vidret.retrieval.moments import plan_windows, window_id
from vidret.retrieval.shards import Sharding, ShardStore, encode_sharded

logger = logging.getLogger(__name__)

# Container extensions picked up when indexing a folder (case-insensitive).
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".flv", ".wmv", ".3gp", ".ogv"}
)
REPORT_FILE = "build_report.json"


@dataclass
class IndexReport:
    """What ``build_index`` did."""

    path: str = ""  # the index folder
    total: int = 0  # videos in the source (folder scan or manifest)
    indexed: int = 0  # videos in the index now
    added: int = 0  # encoded for the first time
    updated: int = 0  # re-encoded because the file changed
    kept: int = 0  # reused from the previous index (update)
    removed: int = 0  # dropped because they left the source (update)
    windows: int = 0  # rows of the index with --segment (windows of the indexed videos), else 0
    bad: BadVideoReport = field(default_factory=BadVideoReport)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "bad"}
        d["bad"] = self.bad.to_dict()
        d["seconds"] = round(self.seconds, 3)
        return d

    def summary(self) -> str:
        windows = f" ({self.windows} windows)" if self.windows else ""
        return (
            f"{self.indexed} videos{windows} indexed in {self.path} ({self.added} added, {self.updated} re-encoded, "
            f"{self.kept} kept, {self.removed} removed, {self.bad.num_bad} bad skipped) in {self.seconds:.1f} s"
        )


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def collect_videos(folder: str | os.PathLike[str]) -> tuple[list[ManifestEntry], list[tuple[str, str, str]]]:
    """A manifest made on the fly from a folder of videos (recursive).

    ``video_id`` is the path relative to the folder without its extension (``a/b/clip.mp4`` -> ``a/b/clip``;
    a clash such as ``clip.mp4`` + ``clip.webm`` keeps the extension on the later one). Hidden files and
    folders are skipped; symlinked folders are not followed; a symlinked file is kept only if it resolves
    inside the folder.

    Returns:
        (entries with absolute paths under the folder's real path, which becomes the index's collection root;
        skipped as (video_id, path, reason)).
    """
    if not Path(folder).is_dir():
        raise VidretError(f"videos folder not found: {folder}")
    real_root = os.path.realpath(folder)
    root = Path(real_root)
    entries: list[ManifestEntry] = []
    skipped: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith(".") or p.suffix.lower() not in VIDEO_EXTENSIONS:
                continue
            rel = p.relative_to(root)
            vid = rel.with_suffix("").as_posix()
            if vid in seen:
                vid = rel.as_posix()
            if not _within(os.path.realpath(p), real_root):
                skipped.append((vid, str(p), "symlink pointing outside the videos folder"))
                continue
            seen.add(vid)
            entries.append(ManifestEntry(video_id=vid, path=str(p)))
    return entries, skipped


def _entries_from(source: str | os.PathLike[str] | Sequence[ManifestEntry]) -> tuple[list[ManifestEntry], list]:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            return collect_videos(p)  # every path under the folder's real path: the index's root
        if p.is_file():
            entries = read_manifest(p)
            return [ManifestEntry(e.video_id, os.path.abspath(e.path), e.captions, e.start, e.end) for e in entries], []
        raise VidretError(f"{p} is neither a folder of videos nor a manifest file")
    entries = list(source)
    ids = [e.video_id for e in entries]
    if len(set(ids)) != len(ids):
        raise VidretError("video ids must be unique")
    return [ManifestEntry(e.video_id, os.path.abspath(e.path), e.captions, e.start, e.end) for e in entries], []


def _collection_root(records: list[VideoRecord], folder_root: str, old: VideoIndex | None, out: Path) -> str:
    """The root every record's file must lie in: the videos folder's real path, else the files' common parent.

    An update keeps the root of the index it updates (refusing files outside it); an index written before
    roots were recorded gets one now.
    """
    dirs = [os.path.dirname(p) for r in records for p in (r.path, r.real_path) if p]
    root = folder_root or (os.path.commonpath(dirs) if dirs else "")
    if old is None or not old.root:
        return root
    for r in records:
        if r.path and not (_within(r.path, old.root) and _within(r.real_path, old.root)):
            raise VidretError(
                f"the index in {out} covers the videos under {old.root}, but {r.video_id!r} ({r.path}) is outside "
                "it; update it from that folder (or a manifest of files under it), or build a new index with "
                "another --out"
            )
    return old.root


def _check_finite(feats: dict[str, tuple[Tensor, Tensor | None]]) -> None:
    bad = sorted(vid for vid, (v, _) in feats.items() if not bool(torch.isfinite(v).all()))
    if bad:
        shown = ", ".join(repr(v) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise VidretError(
            f"the model gave NaN/Inf vectors for {len(bad)} of {len(feats)} videos ({shown}): its adapter or "
            "backbone weights hold NaN/Inf (a damaged or diverged checkpoint); nothing was written: index with "
            "another adapter"
        )


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _is_text_conditioned(model: Any) -> bool:
    e = model.clip.config.embed_dim
    device = _model_device(model)
    probe = VideoFeatures(torch.ones(1, 1, e, device=device), torch.ones(1, 1, dtype=torch.bool, device=device))
    return model.pool_video(probe) is None


def build_index(
    model: Any,
    source: str | os.PathLike[str] | Sequence[ManifestEntry],
    out: str | os.PathLike[str],
    *,
    settings: IndexSettings | None = None,
    backbone_spec: str = "",
    adapter_path: str = "",
    update: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    max_bad_fraction: float = 0.25,
    progress: bool = False,
    sharding: Sharding | None = None,
) -> IndexReport:
    """Encode a collection into the index folder ``out``.

    Args:
        model: a VideoTextModel in eval mode (its device is used).
        source: a folder of videos (searched recursively), a JSONL manifest, or manifest entries.
        out: the index folder; it must not hold an index unless ``update``.
        settings: frame sampling and storage; default: the backbone's image size, 12 frames, segment centres,
            float16, exact; with ``update`` the existing index's settings (sampling settings must not change).
        backbone_spec: how ``vidret search``/``serve`` load the backbone again (name, path, "random:<cfg>").
        adapter_path: the adapter folder ``model`` came from (recorded so the index can be searched).
        update: refresh an existing index: add new, re-encode changed, remove vanished videos.
        cache_dir: frame cache folder (default ``out/cache``).
        batch_size: videos per forward pass.
        num_workers: DataLoader worker processes decoding videos.
        max_bad_fraction: stop with VidretError when more than this share of the videos is bad.
        progress: show a progress bar.
        sharding: this process's rank under ``torchrun`` (:mod:`vidret.retrieval.shards`): each rank encodes its
            share into a shard file, rank 0 assembles the index; None = one process does everything.

    Returns:
        IndexReport (bad videos listed in ``report.bad``); on ranks other than 0 only the planning counts.
    """
    t0 = time.perf_counter()
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise VidretError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    out = Path(out)
    ident = model_identity(model, backbone_spec, os.path.abspath(adapter_path) if adapter_path else "")
    image_size = model.clip.config.vision.image_size
    old: VideoIndex | None = None
    if (out / INDEX_FILE).exists():
        if not update:
            raise VidretError(f"{out} already holds an index; pass --update to refresh it, or choose another --out")
        old = VideoIndex.load(out, backend="exact")
        check_identity(old.identity, ident, f"the index in {out}")
        if settings is None:
            settings = old.settings
        enc = ("num_frames", "fps", "max_candidates", "sampling", "image_size", "max_words", "segment", "stride")
        changed = [f for f in enc if getattr(settings, f) != getattr(old.settings, f)]
        if changed:
            raise VidretError(
                f"the index in {out} was built with "
                + ", ".join(f"{f}={getattr(old.settings, f)}" for f in changed)
                + "; pass the same settings to --update, or build a new index"
            )
    settings = settings or IndexSettings(image_size=image_size)
    if settings.image_size != image_size:
        raise VidretError(f"image_size {settings.image_size} does not match the backbone's input size {image_size}")

    entries, skipped = _entries_from(source)
    folder_root = os.path.realpath(source) if isinstance(source, (str, os.PathLike)) and Path(source).is_dir() else ""
    report = IndexReport(path=str(out), total=len(entries) + len(skipped))
    report.bad = BadVideoReport(total=report.total)
    for vid, path, reason in skipped:
        report.bad.add(vid, path, reason)
    if report.total == 0:
        exts = ", ".join(sorted(VIDEO_EXTENSIONS))
        raise VidretError(f"no videos found in {source} (looked for {exts})")

    text_conditioned = _is_text_conditioned(model)
    if old is not None and (old.kind == "frames") != text_conditioned:
        raise VidretError(f"the index in {out} is of kind {old.kind!r}, which this model cannot extend; rebuild it")

    # Which rows need encoding (one per video, or its windows with --segment); identities read once here.
    segmented = settings.segment > 0
    old_rows: dict[str, list[int]] = {}  # video id -> its rows in the old index
    if old is not None:
        for i, r in enumerate(old.records):
            old_rows.setdefault(r.group, []).append(i)
    records: dict[str, VideoRecord] = {}  # row id -> record
    rows_of: dict[str, list[str]] = {}  # video id -> its row ids, in time order
    todo: list[ManifestEntry] = []  # rows to encode (row id as video_id, the row's time span)
    kept_rows: dict[str, int] = {}  # row id -> its row in the old index
    decoder = PyAVDecoder()
    for e in entries:
        try:
            identity = file_identity(e.path)
        except BadVideoError as err:
            report.bad.add(e.video_id, e.path, err.reason)
            continue
        prev = [old.records[i] for i in old_rows.get(e.video_id, [])] if old is not None else []
        if prev and all(p.identity == identity and p.path == e.path for p in prev):
            spans = [(p.start, p.end) for p in prev]
            planned = (
                plan_windows(prev[0].duration or 0.0, settings.segment, settings.stride, e.start, e.end)
                if segmented
                else [(e.start, e.end)]
            )
            if spans == planned:
                for p, i in zip(prev, old_rows[e.video_id]):
                    kept_rows[p.video_id] = i
                    records[p.video_id] = p._replace(captions=e.captions)
                rows_of[e.video_id] = [p.video_id for p in prev]
                continue
        try:
            duration = decoder.probe(e.path).duration
        except BadVideoError as err:
            report.bad.add(e.video_id, e.path, err.reason)
            continue
        real = os.path.realpath(e.path)
        if segmented:
            windows = plan_windows(duration, settings.segment, settings.stride, e.start, e.end)
            if not windows:
                report.bad.add(e.video_id, e.path, f"no time to index in [{e.start}, {e.end}] of {duration:.2f} s")
                continue
            rows = [
                VideoRecord(window_id(e.video_id, a, b), e.path, real, duration, identity, a, b, e.captions, e.video_id)
                for a, b in windows
            ]
        else:
            rows = [VideoRecord(e.video_id, e.path, real, duration, identity, e.start, e.end, e.captions)]
        for r in rows:
            records[r.video_id] = r
            todo.append(ManifestEntry(r.video_id, e.path, e.captions, r.start, r.end))
        rows_of[e.video_id] = [r.video_id for r in rows]
    if old is not None:
        report.removed = sum(1 for v in old_rows if v not in rows_of)
    report.kept = sum(1 for rids in rows_of.values() if rids[0] in kept_rows)
    root = _collection_root(list(records.values()), folder_root, old, out)

    def encode(part: list[ManifestEntry]) -> tuple[dict[str, tuple[Tensor, Tensor | None]], list]:
        bad = BadVideoReport()
        feats = _encode_entries(
            model, part, settings, cache_dir or out / "cache", batch_size, num_workers, bad, progress, records
        )
        return feats, bad.items

    if sharding is not None and sharding.world_size > 1:
        gathered = encode_sharded(encode, todo, records, ident, settings, out, sharding)
        if gathered is None:  # not rank 0: its shard is written, rank 0 assembles the index
            report.seconds = time.perf_counter() - t0
            return report
        new_feats, bad_rows = gathered
    else:
        new_feats, bad_rows = encode(todo)
    for vid, path, reason in bad_rows:
        report.bad.add(vid, path, reason)
    report.bad.check(max_bad_fraction)
    _check_finite(new_feats)

    # Assemble rows in source order: kept rows from the old index, new rows from this run.
    order = [rid for e in entries for rid in rows_of.get(e.video_id, ()) if rid in kept_rows or rid in new_feats]
    if not order:
        raise VidretError(f"none of the {report.total} videos could be indexed; see the bad videos listed above")
    final = [records[v] for v in order]
    encoded = {records[rid].group for rid in order if rid in new_feats}
    report.added = sum(1 for v in encoded if v not in old_rows)
    report.updated = len(encoded) - report.added

    def features_of(vid: str) -> tuple[Tensor, Tensor | None]:
        if vid in new_feats:
            return new_feats[vid]
        assert old is not None
        r = kept_rows[vid]
        if old.kind == "pooled":
            assert old.vectors is not None
            return old.vectors[r], None
        assert old.frames is not None and old.masks is not None
        return old.frames[r], old.masks[r]

    feats_rows = [features_of(v) for v in order]
    if text_conditioned:
        if settings.backend == "faiss":
            logger.warning("text-conditioned head (no single vector per video): exact search, --backend faiss ignored")
        index = VideoIndex(
            final,
            ident,
            settings,
            frames=torch.stack([r[0] for r in feats_rows]),
            masks=torch.stack([r[1] for r in feats_rows if r[1] is not None]),
            backend_name="exact",
            root=root,
        )
    else:
        index = VideoIndex(
            final,
            ident,
            settings,
            vectors=torch.stack([r[0] for r in feats_rows]),
            backend_name=settings.backend,
            root=root,
        )
    index.save(out)
    if sharding is not None and sharding.world_size > 1:
        ShardStore(out, sharding.world_size).remove()  # the index holds them now
    report.indexed = len({r.group for r in final})
    report.windows = len(index) if segmented else 0
    report.seconds = time.perf_counter() - t0
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    return report


@torch.no_grad()
def _encode_entries(
    model: Any,
    entries: list[ManifestEntry],
    settings: IndexSettings,
    cache_dir: str | os.PathLike[str],
    batch_size: int,
    num_workers: int,
    bad: BadVideoReport,
    progress: bool = False,
    records: dict[str, VideoRecord] | None = None,
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """row id -> (pooled [E], None) or (frames [T, E], mask [T]) for the entries that decode.

    A window that does not decode is reported under its video's id (``records`` maps rows to videos).
    """
    if not entries:
        return {}
    from tqdm.auto import tqdm

    sampling = settings.frame_sampling()
    cache = FrameCache(cache_dir, sampling, settings.image_size)
    ds = EvalVideoDataset(entries, sampling, cache=cache, image_size=settings.image_size)
    from vidret.procs import dataloader_worker_init

    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=num_workers,
        worker_init_fn=dataloader_worker_init(),  # workers die with this process
    )
    device = _model_device(model)
    out: dict[str, tuple[Tensor, Tensor | None]] = {}
    for batch in tqdm(loader, disable=not (progress and report_progress()), desc="index", unit="batch"):
        for vid, path, reason in batch.get("bad_reasons", []):
            rec = records.get(vid) if records else None
            bad.add(rec.group if rec is not None else vid, path, reason)
        if batch["frames"].shape[0] == 0:
            continue
        v = model.encode_video(batch["frames"].to(device), batch["frame_mask"].to(device))
        pooled = model.pool_video(v)
        for j, vid in enumerate(batch["video_ids"]):
            if pooled is not None:
                out[vid] = (pooled[j].float().cpu(), None)
            else:
                out[vid] = (v.frames[j].float().cpu(), v.mask[j].cpu())
    return out


def report_progress() -> bool:
    """Progress bars only on an interactive terminal (never in tests or logs)."""
    import sys

    return sys.stderr.isatty()


# ------------------------------------------------------------------------------------------ queries


@torch.no_grad()
def encode_video_file(model: Any, path: str | os.PathLike[str], settings: IndexSettings) -> VideoFeatures:
    """Per-frame features [1, T, E] of one video file, sampled as the index's videos were."""
    sampling = settings.frame_sampling()
    ds = EvalVideoDataset([ManifestEntry("query", os.fspath(path))], sampling, image_size=settings.image_size)
    batch = collate([ds[0]])
    if batch["frames"].shape[0] == 0:
        _, p, reason = batch["bad_reasons"][0]
        raise BadVideoError(p, reason)
    device = _model_device(model)
    return model.encode_video(batch["frames"].to(device), batch["frame_mask"].to(device))


def video_query_vector(model: Any, path: str | os.PathLike[str], settings: IndexSettings) -> Tensor:
    """A normalised [1, E] query vector for video-to-video search (meanP for text-conditioned heads)."""
    v = encode_video_file(model, path, settings)
    pooled = model.pool_video(v)
    return (pooled if pooled is not None else mean_pool(v.frames, v.mask)).float().cpu()


# ------------------------------------------------------------------------------------------ loading


def load_backbone_spec(spec: str) -> Any:
    """A CLIP backbone from a spec: ``random:<config>`` (seed 0; tests, benchmarks), a name or a checkpoint path."""
    from vidret.backbone.clip import create_backbone
    from vidret.backbone.pretrained import load_backbone

    if spec.startswith("random:"):
        return create_backbone(spec[len("random:") :], seed=0).eval()
    return load_backbone(spec)


def backbone_spec_for(spec: str) -> str:
    """The spec to record in an index: paths made absolute so the index works from any folder."""
    if spec.startswith("random:") or not os.path.exists(spec):
        return spec
    return os.path.abspath(spec)


def loads_no_file(spec: str) -> bool:
    """Whether a backbone spec read from a file may be followed without the user's say.

    Only a pretrained name (downloaded from its pinned URL, sha256-checked), a Hugging Face Hub repo id (its
    ``config.json`` and weights fetched by name and read as data, like any checkpoint) or
    ``random:<bundled config>`` qualifies; a path could name any local file, e.g. a TorchScript archive shipped
    with a shared index. A name that is also a file here would be loaded as that file, so it does not qualify
    either.
    """
    from vidret.backbone.clip import list_configs
    from vidret.backbone.hub import is_hub_id
    from vidret.backbone.pretrained import PRETRAINED

    if spec.startswith("random:"):
        return spec[len("random:") :] in list_configs()
    return (spec in PRETRAINED or is_hub_id(spec)) and not os.path.lexists(spec)


def resolve_backbone(
    backbone: str | None,
    adapter_meta: dict[str, Any],
    recorded: str = "",
    where: str = "the index",
    adapter: str | os.PathLike[str] = "",
) -> str:
    """The backbone spec to use: explicit, else recorded in the index, else the adapter's ``backbone_source``.

    A recorded spec (index or adapter, both files a user may have been handed) is followed only when
    :func:`loads_no_file`; a recorded path needs the user's explicit ``backbone``. ``vidret index``, ``search``,
    ``serve`` and ``eval`` all decide by this rule.

    Args:
        backbone: the user's ``--backbone`` (always followed).
        adapter_meta: the adapter's ``adapter.json``.
        recorded: the spec recorded in the index (``ModelIdentity.backbone_spec``).
        where: names the index in messages, e.g. ``"index ./ix"``.
        adapter: the adapter folder, named in messages about the backbone its ``adapter.json`` records.
    """
    if backbone:
        return str(backbone)
    extra = adapter_meta.get("extra") if isinstance(adapter_meta, dict) else None
    source = extra.get("backbone_source") if isinstance(extra, dict) else None
    adapter_origin = f"the adapter ({Path(adapter) / 'adapter.json'})" if adapter else "the adapter"
    for spec, origin, verb in ((recorded, where, "built"), (source, adapter_origin, "trained")):
        if not spec or not isinstance(spec, str):
            continue
        if loads_no_file(spec):
            return spec
        if spec.startswith("random:") or os.path.exists(os.path.expanduser(spec)):
            how = f"pass --backbone {spec} (or another copy) to load it"
        else:
            bb = adapter_meta.get("backbone") if isinstance(adapter_meta, dict) else None
            which = f" ({bb.get('name')!r}, fingerprint {bb.get('fingerprint')})" if isinstance(bb, dict) else ""
            how = (
                f"it is not there now: put it back and pass --backbone {spec}, or pass --backbone PATH naming "
                f"a copy of it{which}"
            )
        raise VidretError(
            f"{origin} was {verb} with backbone file {spec}; {how} (vidret reads a local backbone file only when "
            "you name it: a shared index or adapter could name any file)"
        )
    backbone_meta = adapter_meta.get("backbone") if isinstance(adapter_meta, dict) else None
    name = backbone_meta.get("name", "?") if isinstance(backbone_meta, dict) else "?"
    raise VidretError(f"which backbone? pass --backbone NAME|PATH (the adapter was trained on a {name!r} backbone)")


def index_adapter(index: VideoIndex, adapter: str | None) -> tuple[str, str]:
    """(how messages name the index, the adapter folder to load): ``adapter`` if given, else the recorded one."""
    where = f"index {index.folder}" if index.folder else "the index"
    adapter_path = adapter or index.identity.adapter_path
    if not adapter_path:
        raise VidretError(f"{where} does not record its adapter folder; pass --adapter DIR")
    if not Path(adapter_path).is_dir():
        raise VidretError(f"adapter folder {adapter_path} (recorded in {where}) is gone; pass --adapter DIR")
    return where, adapter_path


def open_model_for_index(
    index: VideoIndex, backbone: str | None = None, adapter: str | None = None, device: str = "cpu"
) -> Any:
    """Rebuild the model an index was built with (recorded adapter folder + backbone spec, or overrides).

    The recorded adapter folder is loaded as data only (``adapter.safetensors`` + ``adapter.json``); a
    recorded backbone is followed only by name, pretrained or Hub (see :func:`resolve_backbone`).
    """
    from vidret.adapters.io import load_adapter, read_adapter_meta

    where, adapter_path = index_adapter(index, adapter)
    meta = read_adapter_meta(adapter_path)  # the tensors are read (and checked) once, by load_adapter
    spec = resolve_backbone(backbone, meta, index.identity.backbone_spec, where=where, adapter=adapter_path)
    clip = load_backbone_spec(spec)
    model = load_adapter(clip, adapter_path)
    model.eval().to(device)
    index.check_model(model, adapter_path=str(Path(adapter_path).absolute()))
    return model


__all__ = [
    "VIDEO_EXTENSIONS",
    "IndexReport",
    "backbone_spec_for",
    "build_index",
    "collect_videos",
    "encode_video_file",
    "load_backbone_spec",
    "loads_no_file",
    "open_model_for_index",
    "resolve_backbone",
    "video_query_vector",
]
