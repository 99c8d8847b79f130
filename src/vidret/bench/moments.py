"""``vidret bench moments``: moment localisation in long videos stitched from pocket-world test clips.

Each long video is ``--clips`` pocket test clips played one after the other (frames copied, no re-timing), so
every clip is an event with known times ``[i L, (i + 1) L]`` and its caption is the query. The videos are indexed
twice with the same adapter: as windows (``--segment``/``--stride``, default one clip length and half of it)
and whole. For each caption:

- **localised** (IoU >= 0.5): the top window over the whole collection (``group="segment"``) lies in the right
  long video and overlaps the clip's span with temporal IoU >= 0.5. A whole-video row spans all clips of its
  video, so its IoU is 1 / clips (< 0.5 from two clips on): whole-video indexing localises nothing.
- **video R@1**: the top video (the best window per video, ``group="video"``; the single vector of a whole
  video) is the right long video: windowing also helps finding the video.
- **chance**: the share of windows a random pick would get right.

    vidret bench moments -- --world data/pocket --adapter runs/pocket/mv_adapter/adapter --videos 16 --clips 6
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidret.errors import VidretError


def stitch(clips: list[Path], out: Path) -> float:
    """Write the frames of ``clips`` one after the other into ``out`` (h264, the first clip's rate and size).

    Returns:
        seconds per clip (every pocket clip has the same length).
    """
    import av

    frames: list[np.ndarray] = []
    rate, per = 1, 0
    for p in clips:
        with av.open(str(p)) as c:
            s = c.streams.video[0]
            rate = int(s.average_rate or 1)
            got = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        per = per or len(got)
        if len(got) != per:
            raise VidretError(f"{p} has {len(got)} frames, the other clips {per}; stitch clips of one length")
        frames.extend(got)
    out.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(out), "w") as c:
        s = c.add_stream("libx264", rate=rate, options={"qp": "10", "g": "1", "preset": "veryfast"})
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        for t, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = t
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    return per / rate


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vidret.adapters.io import load_adapter, read_adapter_meta, recorded_eval_settings
    from vidret.data.manifest import ManifestEntry, read_manifest
    from vidret.retrieval.build import build_index, load_backbone_spec, resolve_backbone
    from vidret.retrieval.index import VideoIndex
    from vidret.retrieval.index_files import IndexSettings
    from vidret.retrieval.moments import iou
    from vidret.retrieval.query import encode_texts

    torch.set_num_threads(args.threads)
    world = Path(args.world)
    test = [e for e in read_manifest(world / "test.jsonl") if not e.video_id.endswith("_rev") and e.captions]
    need = args.videos * args.clips
    if len(test) < need:
        raise VidretError(f"{world}/test.jsonl has {len(test)} clips with captions; --videos x --clips needs {need}")
    rng = random.Random(args.seed)
    chosen = rng.sample(test, need)
    out = Path(args.out)
    long_dir = out / "videos"
    entries, events = [], []  # events: (caption, long video id, (start, end))
    for v in range(args.videos):
        part = chosen[v * args.clips : (v + 1) * args.clips]
        vid = f"long_{v:03d}"
        clip_s = stitch([Path(e.path) for e in part], long_dir / f"{vid}.mp4")
        entries.append(ManifestEntry(vid, str(long_dir / f"{vid}.mp4")))
        events += [(e.captions[0], vid, (i * clip_s, (i + 1) * clip_s)) for i, e in enumerate(part)]

    meta = read_adapter_meta(args.adapter)
    model = load_adapter(load_backbone_spec(resolve_backbone(args.backbone, meta, adapter=args.adapter)), args.adapter)
    model.eval()
    ev = recorded_eval_settings(meta)
    segment = args.segment or clip_s
    stride = args.stride or segment / 2
    base = {"image_size": model.clip.config.vision.image_size, "dtype": "float32"}
    base.update({k: ev[k] for k in ("num_frames", "max_words", "fps", "sampling") if k in ev})
    results: dict[str, Any] = {"videos": args.videos, "clips_per_video": args.clips, "clip_seconds": clip_s}
    texts = [c for c, _, _ in events]
    q = encode_texts(model, texts, int(base.get("max_words", 32)))
    for name, extra in (("windows", {"segment": segment, "stride": stride}), ("whole", {})):
        t0 = time.perf_counter()
        folder = out / f"index-{name}"
        build_index(
            model,
            entries,
            folder,
            settings=IndexSettings.from_dict({**base, **extra}),
            adapter_path=str(Path(args.adapter).absolute()),
            cache_dir=out / "cache",
        )
        index = VideoIndex.load(folder)
        build_s = time.perf_counter() - t0

        def search(n: int, index: VideoIndex = index) -> tuple[torch.Tensor, torch.Tensor]:
            return index.search_text(model, q, n)

        top_win = index.top_hits(search, [1] * len(events), ["segment"] * len(events))
        top_vid = index.top_hits(search, [1] * len(events), ["video"] * len(events))
        loc = vid_r1 = 0
        chance = 0.0
        for (_, vid, span), w, best in zip(events, top_win, top_vid):
            rec = index.records[w[0][0]]
            rspan = (rec.start or 0.0, rec.end if rec.end is not None else rec.duration or 0.0)
            loc += rec.group == vid and iou(rspan, span) >= 0.5
            vid_r1 += index.records[best[0][0]].group == vid
            good = sum(
                r.group == vid and iou((r.start or 0.0, r.end if r.end is not None else r.duration or 0.0), span) >= 0.5
                for r in index.records
            )
            chance += good / len(index)
        n = len(events)
        results[name] = {
            "rows": len(index),
            "segment": extra.get("segment"),
            "stride": extra.get("stride"),
            "localised_iou50": round(loc / n, 4),
            "video_r1": round(vid_r1 / n, 4),
            "chance_localised": round(chance / n, 4),
            "build_s": round(build_s, 1),
        }
    results["queries"] = len(events)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vidret bench moments``; prints the results as JSON and a Markdown table."""
    p = argparse.ArgumentParser(prog="vidret bench moments", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", required=True, help="a pocket world folder (vidret pocket generate --out)")
    p.add_argument("--adapter", required=True, help="an adapter trained on that world (a run's out_dir/adapter)")
    p.add_argument("--backbone", default=None, help="backbone (default: the adapter's recorded pretrained name)")
    p.add_argument("--videos", type=int, default=16, help="long videos to stitch")
    p.add_argument("--clips", type=int, default=6, help="test clips (events) per long video")
    p.add_argument("--segment", type=float, default=0.0, help="window seconds (default: one clip)")
    p.add_argument("--stride", type=float, default=0.0, help="seconds between windows (default: segment / 2)")
    p.add_argument("--seed", type=int, default=0, help="which clips are stitched")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default="bench_moments", help="work folder (videos, indexes, frame cache)")
    args = p.parse_args(argv)
    r = run(args)
    print(json.dumps(r, indent=2))
    print()
    print("| indexing | rows | localised (IoU >= 0.5) | chance | video R@1 | build s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("windows", "whole"):
        x = r[name]
        how = f"windows {x['segment']:g} s / stride {x['stride']:g} s" if name == "windows" else "whole videos"
        print(
            f"| {how} | {x['rows']} | {x['localised_iou50']:.3f} | {x['chance_localised']:.3f} | "
            f"{x['video_r1']:.3f} | {x['build_s']} |"
        )
    sys.stdout.flush()
    return 0


__all__ = ["main", "run", "stitch"]
