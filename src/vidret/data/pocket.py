"""The pocket world: a procedurally generated stand-in for CLIP pretraining and video-text transfer.

``generate_pocket_world(out_dir, config)`` writes, deterministically from ``config.seed``:

- ``pretrain_images.npy`` (uint8 ``[N, S, S, 3]``) + ``pretrain.jsonl`` (``{"image": i, "caption": ...,
  "objects": [...]}``): static scenes of 1-2 coloured shapes with size and 3x3-grid position captions.
- ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl`` / ``probe.jsonl``: vidret manifests of real h264
  ``.mp4`` clips under ``videos/<split>/``. In a clip one or two objects move, grow, shrink, appear,
  disappear or change colour, one or two events in sequence. Objects start near the centre of a 3x3 grid
  cell, as in the pretraining images, and a move takes an object exactly one cell along.
  Every caption is a STATIC clause + an EVENT clause: the static clause describes the first frame (size,
  colour, shape and grid cell of each visible object) with the pretraining captions' own generator, so
  every static word is in the pretraining vocabulary and a strong frozen CLIP can match it; the event
  clause says what happens in which order, with several templates and synonyms (some put the later
  event first: "B after A"), and is what adaptation must learn: "a big red circle in the top left and
  a small blue square in the centre; the square moves right, then the red circle turns green". Every
  caption fits in ``pocket_scenes.CAPTION_TOKENS`` tokens (redrawn otherwise), so nothing is truncated.
  ``probe`` holds static clips with pretraining-style captions (a zero-shot sanity check).
- ``test_pairs.json``: the time-reversed hard negatives. For a share of the test clips the same frames
  in reverse order are a second video (``<id>_rev``) whose caption describes the reversed events.
- ``<split>_events.jsonl``: the symbolic scene of every clip (for per-event analysis): its objects, events,
  ``first_frame`` (what the static clause describes, symbolically) and ``static_clauses`` (of each caption).
- ``pocket_world.json`` (written LAST, so its presence marks a complete world): config, counts, version.

Why reversal pairs are hard negatives that only temporal models can separate: every frame is coded
as an intra frame with a constant quantiser, so a frame's decoded pixels do not depend on its
neighbours and the reversed twin decodes to exactly the same multiset of frames (tested). Any
order-blind pooling (meanP) therefore gives both videos the same embedding. This holds when the
sampler takes all ``config.frames`` frames: clips are written at ``config.fps`` (1 by default), so
the usual "1 fps, then uniform subsample to T" sampling with ``T = config.frames`` returns each
frame once. The event grammar is reversal-symmetric (each symbolic scene is replaced by its reversal
with probability 1/2, and palindromic scenes are rejected; so are scenes whose first or last frame is
empty, and placements are symmetric too), so a twin is as likely as its original. A twin's caption
describes ITS first frame (the original's last) and its own order of events.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from vidret.data.manifest import ManifestEntry, write_manifest
from vidret.data.pocket_scenes import (
    COLS,
    ROWS,
    Event,
    Obj,
    cell_of,
    draw_captions,
    object_sizes,
    render,
    render_clip,
    reverse_scene,
    sample_scene,
    sample_static,
    static_caption,
    video_caption,
)
from vidret.errors import VidretError

logger = logging.getLogger(__name__)

# bump whenever the output for a given config changes. 2: objects sit on the 3x3 grid and move one cell; every
# video caption is a static clause (the first frame, in the pretraining's words) + the event clause.
GENERATOR_VERSION = 2
PocketSize = Literal["tiny", "small", "default"]
Split = Literal["train", "val", "test", "probe"]
_SPLIT_IDS = {"pretrain": 0, "train": 1, "val": 2, "test": 3, "probe": 4}  # part of every item's seed
_INFO = "pocket_world.json"
_FILES = {
    "pretrain_images": "pretrain_images.npy",
    "pretrain_manifest": "pretrain.jsonl",
    "test_pairs": "test_pairs.json",
}
_FILES.update({k: f"{k}.jsonl" for split in ("train", "val", "test", "probe") for k in (split, f"{split}_events")})
ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class PocketConfig:
    """What to generate; the output is a pure function of this config (and GENERATOR_VERSION)."""

    seed: int = 0  # every item is drawn from default_rng([seed, split_id, index, ...])
    image_size: int = 64  # frames and images are image_size x image_size (even, for yuv420p)
    frames: int = 8  # frames per clip (T); sample all of them to keep reversal pairs order-only
    fps: int = 1  # clip frame rate; 1 so that 1-fps sampling returns every frame exactly once
    pretrain_images: int = 20000  # static image-caption pairs for tiny-CLIP pretraining
    train_clips: int = 2000
    val_clips: int = 200
    test_clips: int = 256  # clips before adding reversed twins
    test_reversed_fraction: float = 0.5  # share of test clips that also get a time-reversed twin
    probe_clips: int = 100  # static clips with pretraining-style captions (zero-shot probe)
    train_captions: int = 4  # paraphrases per training clip
    eval_captions: int = 1  # captions per val/test/probe clip
    two_event_prob: float = 0.7  # P(a clip has two events in sequence) vs one
    two_object_prob: float = 0.6  # P(a scene has two objects) vs one
    qp: int = 10  # h264 constant quantiser, every frame intra-coded (0 = lossless, 4:4:4 profile)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> VidretError:
            return VidretError(f"PocketConfig.{name}={getattr(self, name)!r}: {why}")

        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float) if f.type == "float" else int):
                raise bad(f.name, f"must be a{'' if f.type == 'float' else 'n'} {f.type}")
        if self.seed < 0:
            raise bad("seed", "must be >= 0")
        if not 32 <= self.image_size <= 256 or self.image_size % 2:
            raise bad("image_size", "must be an even number between 32 and 256")
        if not 2 <= self.frames <= 64:
            raise bad("frames", "must be between 2 and 64")
        if not 1 <= self.fps <= 60:
            raise bad("fps", "must be between 1 and 60")
        for name in ("pretrain_images", "train_clips", "val_clips", "test_clips", "probe_clips"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        for name in ("train_captions", "eval_captions"):
            if not 1 <= getattr(self, name) <= 20:
                raise bad(name, "must be between 1 and 20")
        for name in ("test_reversed_fraction", "two_event_prob", "two_object_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be between 0 and 1")
        if not 0 <= self.qp <= 51:
            raise bad("qp", "must be between 0 and 51 (h264 quantiser)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PocketConfig:
        """Build from a dict (e.g. pocket_world.json); unknown keys raise VidretError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise VidretError(f"unknown PocketConfig key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_size(cls, size: PocketSize = "default", seed: int = 0) -> PocketConfig:
        """A named size: ``default`` (the demo), ``small`` (quick look), ``tiny`` (tests)."""
        if size not in _SIZES:
            raise VidretError(f"unknown pocket size {size!r}; choose one of {sorted(_SIZES)}")
        return replace(cls(seed=seed), **_SIZES[size])

    def split_clips(self, split: Split) -> int:
        return int(getattr(self, f"{split}_clips"))

    def reversed_twins(self) -> int:
        """Number of test clips that get a reversed twin."""
        return int(np.floor(self.test_clips * self.test_reversed_fraction + 1e-9))


_SIZES: dict[str, dict[str, Any]] = {
    "default": {},
    "small": {"pretrain_images": 2000, "train_clips": 300, "val_clips": 50, "test_clips": 64, "probe_clips": 20},
    "tiny": {"pretrain_images": 48, "train_clips": 10, "val_clips": 4, "test_clips": 8, "probe_clips": 2},
}


@dataclass(frozen=True)
class PocketReport:
    """What generate_pocket_world did (or found already there)."""

    out_dir: Path
    config: PocketConfig
    counts: dict[str, int]  # videos per split, "pretrain_images", "reversal_pairs", "captions_<split>"
    manifests: dict[str, Path]  # split -> manifest path
    pretrain_images: Path  # the .npy array
    pretrain_manifest: Path  # pretrain.jsonl
    pairs_file: Path  # test_pairs.json
    bytes_on_disk: int
    seconds: float  # generation time (0.0 when reused)
    reused: bool  # True when a complete world for this config was already there


class PretrainSet(NamedTuple):
    """The image-caption pretraining set: ``images`` uint8 ``[N, H, W, 3]`` (memory-mapped)."""

    images: np.ndarray
    captions: list[str]


# --------------------------------------------------------------------------- writing


def _write_mp4(path: Path, frames: np.ndarray, cfg: PocketConfig) -> None:
    """h264 yuv420p, every frame an IDR frame with a constant quantiser (see the module docstring)."""
    import av  # imported here: the generator is the only part of this module that needs it

    # written in place: an interrupted run leaves no pocket_world.json, so the folder counts as incomplete
    with av.open(str(path), "w") as container:
        stream = container.add_stream(
            "libx264", rate=cfg.fps, options={"qp": str(cfg.qp), "g": "1", "preset": "veryfast"}
        )
        stream.width = stream.height = cfg.image_size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # deterministic bytes, no thread start-up per tiny file
        for t, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = t
            container.mux(stream.encode(vf))
        container.mux(stream.encode(None))


def _scene_json(objs: list[Obj], events: list[Event], s: int) -> dict[str, Any]:
    def obj(o: Obj) -> dict[str, Any]:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(o).items()}

    large = object_sizes(s)[1]
    first = [
        {"shape": o.shape, "colour": o.colour, "size": "large" if o.size >= large else "small"}
        | {"cell": cell_of(o, s)}
        for o in objs
        if o.present
    ]
    return {
        "objects": [obj(o) for o in objs],
        "events": [{"object": e.obj, "kind": e.kind, "arg": e.arg} for e in events],
        # what the static clause describes: the objects of the first frame, symbolically (for the static oracle)
        "first_frame": sorted(first, key=lambda d: (d["cell"], d["shape"])),
    }


def _clip_task(args: tuple[PocketConfig, str, Split, int]) -> list[tuple[ManifestEntry, dict[str, Any]]]:
    """Generate clip ``index`` of ``split`` (and its reversed twin); returns manifest + event records."""
    cfg, root, split, index = args
    sid, s = _SPLIT_IDS[split], cfg.image_size
    rng = np.random.default_rng([cfg.seed, sid, index, 0])
    bg = int(rng.integers(0, 48))
    vid = f"{split}_{index:05d}"
    folder = Path(root) / "videos" / split
    n_caps = cfg.train_captions if split == "train" else cfg.eval_captions
    seeds = [[cfg.seed, sid, index, 1, k] for k in range(n_caps)]
    out = []
    if split == "probe":
        objs, cells = sample_static(rng, cfg)
        frames = np.repeat(render(objs, bg, s)[None], cfg.frames, axis=0)  # [S,S,3] -> [T,S,S,3]
        caps, statics = draw_captions(lambda r: (c := static_caption(objs, cells, r, s), c), seeds, n_caps)
        rec = _scene_json(objs, [], s)
    else:
        objs, events = sample_scene(rng, cfg)
        frames = render_clip(objs, events, bg, cfg)
        caps, statics = draw_captions(lambda r: video_caption(objs, events, r, s), seeds, n_caps)
        rec = _scene_json(objs, events, s)
    _write_mp4(folder / f"{vid}.mp4", frames, cfg)
    rec.update(static_clauses=statics)
    out.append((ManifestEntry(vid, f"videos/{split}/{vid}.mp4", tuple(caps)), {"video_id": vid, **rec}))
    if split == "test" and _has_twin(cfg, index):
        r_objs, r_events = reverse_scene(objs, events, s)
        r_caps, r_statics = draw_captions(
            lambda r: video_caption(r_objs, r_events, r, s), seeds, n_caps
        )  # same phrasing
        rid = f"{vid}_rev"
        _write_mp4(folder / f"{rid}.mp4", frames[::-1], cfg)  # the very same frames, backwards
        rec = {"video_id": rid, "reversed_of": vid, **_scene_json(r_objs, r_events, s), "static_clauses": r_statics}
        out.append((ManifestEntry(rid, f"videos/{split}/{rid}.mp4", tuple(r_caps)), rec))
    return out


def _has_twin(cfg: PocketConfig, index: int) -> bool:
    """Spread the twins evenly over the test clips (exactly cfg.reversed_twins() of them)."""
    f = cfg.test_reversed_fraction
    return int(np.floor((index + 1) * f + 1e-9)) > int(np.floor(index * f + 1e-9))


def _pretrain_task(args: tuple[PocketConfig, str, int, int]) -> list[dict[str, Any]]:
    """Render pretraining images [lo, hi) straight into the shared .npy; returns their records."""
    cfg, npy, lo, hi = args
    s = cfg.image_size
    buf = np.empty((hi - lo, s, s, 3), dtype=np.uint8)
    recs = []
    for i in range(lo, hi):
        rng = np.random.default_rng([cfg.seed, _SPLIT_IDS["pretrain"], i])
        bg = int(rng.integers(0, 48))
        objs, cells = sample_static(rng, cfg)
        buf[i - lo] = render(objs, bg, s)
        caption = static_caption(objs, cells, rng, s)
        sizes = ["large" if o.size >= object_sizes(s)[1] else "small" for o in objs]
        objects = [
            {"shape": o.shape, "colour": o.colour, "size": z, "position": f"{ROWS[r]} {COLS[c]}"}
            for o, z, (r, c) in zip(objs, sizes, cells)
        ]
        recs.append({"image": i, "caption": caption, "objects": objects})
    arr = np.load(npy, mmap_mode="r+", allow_pickle=False)
    arr[lo:hi] = buf
    arr.flush()
    del arr
    return recs


def _map(fn: Callable[[Any], Any], tasks: list[Any], workers: int) -> Iterator[Any]:
    """Ordered map, in-process or over a process pool (results are the same either way)."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    # fork: workers need no re-import (torch may be loaded by the caller); spawn elsewhere
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    from vidret.procs import die_with_parent

    with ctx.Pool(workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        yield from pool.imap(fn, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers))))


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _report(root: Path, cfg: PocketConfig, counts: dict[str, int], seconds: float, reused: bool) -> PocketReport:
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    manifests = {s: root / _FILES[s] for s in ("train", "val", "test", "probe")}
    images, pretrain, pairs = (root / _FILES[k] for k in ("pretrain_images", "pretrain_manifest", "test_pairs"))
    return PocketReport(root, cfg, counts, manifests, images, pretrain, pairs, size, seconds, reused)


def _existing(root: Path) -> dict[str, Any] | None:
    p = root / _INFO
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def generate_pocket_world(
    out_dir: str | os.PathLike[str],
    config: PocketConfig | None = None,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> PocketReport:
    """Write the pocket world to ``out_dir`` (see the module docstring for the layout).

    Idempotent: when ``out_dir`` already holds a complete world for the same config and generator
    version, nothing is regenerated (``report.reused``). A complete world for a DIFFERENT config is
    refused unless ``overwrite``; an incomplete one (interrupted run) is regenerated.

    Args:
        out_dir: folder to write (created if needed).
        config: what to generate; ``PocketConfig()`` (the default size) when None.
        workers: processes to use; None = the usable CPUs, at most 8. Does not change the output.
        overwrite: replace a complete world made with another config.
        progress: optional callback ``(stage, done, total)``, e.g. to drive a progress bar.
    """
    cfg = config or PocketConfig()
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise VidretError(f"{root} exists and is not a folder; pass a folder path for the pocket world")
    info = _existing(root)
    if info is not None:
        same = info.get("version") == GENERATOR_VERSION and info.get("config") == cfg.to_dict()
        if same and all((root / f).is_file() for f in _FILES.values()):
            logger.info("pocket world in %s is complete for this config; reusing it", root)
            return _report(root, cfg, dict(info.get("counts", {})), 0.0, reused=True)
        if not overwrite and not same:
            raise VidretError(
                f"{root} holds a pocket world made with another config or generator version; "
                "choose another --out folder or pass overwrite=True (--overwrite) to replace it"
            )
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / _INFO).unlink(missing_ok=True)  # until it is rewritten, the folder is incomplete
    n_workers = min(8, _cpus()) if workers is None else max(1, int(workers))
    counts: dict[str, int] = {}

    def tick(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    # (a) image-caption pretraining set: workers render into one memory-mapped array
    s, n = cfg.image_size, cfg.pretrain_images
    npy_tmp = root / (_FILES["pretrain_images"] + ".tmp")
    arr = np.lib.format.open_memmap(npy_tmp, mode="w+", dtype=np.uint8, shape=(n, s, s, 3))
    del arr
    chunk = 500
    tasks = [(cfg, str(npy_tmp), lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    jsonl_tmp = root / (_FILES["pretrain_manifest"] + ".tmp")
    with jsonl_tmp.open("w", encoding="utf-8") as f:
        done = 0
        for recs in _map(_pretrain_task, tasks, n_workers):
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            done += len(recs)
            tick("pretrain", done, n)
    os.replace(npy_tmp, root / _FILES["pretrain_images"])
    os.replace(jsonl_tmp, root / _FILES["pretrain_manifest"])
    counts["pretrain_images"] = n

    # (b) video splits, streamed: each clip is written by a worker, its manifest line by us, in order
    pairs: list[dict[str, str]] = []
    for split in ("train", "val", "test", "probe"):
        counts[split], counts[f"captions_{split}"] = _write_split(root, cfg, split, n_workers, pairs, tick)
    counts["reversal_pairs"] = len(pairs)
    pairs_doc = {
        "manifest": _FILES["test"],
        "note": "each pair is one test clip and the same frames in reverse order; each video's caption "
        "describes its own order, so a model should rank a caption's video above its twin",
        "pairs": pairs,
    }
    _write_json(root / _FILES["test_pairs"], pairs_doc)

    import av

    video = {"codec": "h264", "pix_fmt": "yuv420p", "intra_only": True, "qp": cfg.qp, "fps": cfg.fps}
    video.update(frames=cfg.frames, size=[cfg.image_size, cfg.image_size], pyav=av.__version__)
    info = {"generator": "vidret.data.pocket", "version": GENERATOR_VERSION, "seed": cfg.seed}
    info.update(config=cfg.to_dict(), counts=counts, files=_FILES, video=video)
    _write_json(root / _INFO, info)  # LAST: its presence marks the world complete
    seconds = time.perf_counter() - t0
    logger.info("pocket world written to %s in %.1f s: %s", root, seconds, counts)
    return _report(root, cfg, counts, seconds, reused=False)


def _write_split(
    root: Path, cfg: PocketConfig, split: Split, workers: int, pairs: list[dict[str, str]], tick: ProgressFn
) -> tuple[int, int]:
    """Write one split's videos, manifest and events file; returns (videos, captions)."""
    (root / "videos" / split).mkdir(parents=True, exist_ok=True)
    total = cfg.split_clips(split)
    tasks = [(cfg, str(root), split, i) for i in range(total)]
    n_caps = 0
    ev_tmp = root / (_FILES[f"{split}_events"] + ".tmp")
    with ev_tmp.open("w", encoding="utf-8") as ev:

        def entries() -> Iterator[ManifestEntry]:
            nonlocal n_caps
            for i, items in enumerate(_map(_clip_task, tasks, workers)):
                for entry, rec in items:
                    ev.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    if "reversed_of" in rec:
                        pairs.append({"forward": rec["reversed_of"], "reversed": rec["video_id"]})
                    n_caps += len(entry.captions)
                    yield entry
                tick(split, i + 1, total)

        n_videos = write_manifest(root / _FILES[split], entries())
    os.replace(ev_tmp, root / _FILES[f"{split}_events"])
    return n_videos, n_caps


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- reading


def _require_world(root: Path) -> dict[str, Any]:
    info = _existing(root)
    if info is None:
        raise VidretError(
            f"no complete pocket world in {root}; generate one with `vidret pocket generate --out {root}`"
        )
    return info


def load_pretrain_set(out_dir: str | os.PathLike[str]) -> PretrainSet:
    """The pretraining images (uint8 ``[N, H, W, 3]``, memory-mapped, read-only) and their captions."""
    root = Path(out_dir)
    files = _require_world(root).get("files", {})
    images = np.load(root / files.get("pretrain_images", "pretrain_images.npy"), mmap_mode="r", allow_pickle=False)
    captions: list[str] = []
    with (root / files.get("pretrain_manifest", "pretrain.jsonl")).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                captions.append(json.loads(line)["caption"])
    if images.ndim != 4 or images.shape[0] != len(captions):
        raise VidretError(
            f"{root}: {images.shape[0]} pretraining images but {len(captions)} captions; "
            "regenerate with `vidret pocket generate --overwrite`"
        )
    return PretrainSet(images, captions)


def load_reversal_pairs(out_dir: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Test-split (forward_video_id, reversed_video_id) pairs: the time-only hard negatives."""
    root = Path(out_dir)
    files = _require_world(root).get("files", {})
    doc = json.loads((root / files.get("test_pairs", "test_pairs.json")).read_text(encoding="utf-8"))
    return [(p["forward"], p["reversed"]) for p in doc["pairs"]]


def load_pocket_info(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The world's ``pocket_world.json`` (config, counts, files); VidretError if incomplete."""
    return _require_world(Path(out_dir))
