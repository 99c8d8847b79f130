"""Handlers of ``vidret index``, ``vidret search`` and ``vidret serve`` (argparse Namespace -> library calls)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from vidret.errors import VidretError

logger = logging.getLogger(__name__)


def _device(name: str | None) -> str:
    import torch

    if not name or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_index(args: argparse.Namespace) -> int:
    """``vidret index --adapter DIR (--videos DIR | --manifest M) --out INDEX [--update]``."""
    from dataclasses import asdict

    from vidret.adapters.io import load_adapter, read_adapter, recorded_eval_settings
    from vidret.eval.evaluate import settings_for_adapter
    from vidret.retrieval.build import backbone_spec_for, build_index, load_backbone_spec, resolve_backbone
    from vidret.retrieval.index_files import IndexSettings, read_index_meta

    if bool(args.videos) == bool(args.manifest):
        raise VidretError("give exactly one of --videos DIR or --manifest FILE")
    out = Path(args.out)
    existing = read_index_meta(out) if args.update and (out / "index.json").exists() else None
    meta, _ = read_adapter(args.adapter)
    recorded = existing["model"].get("backbone_spec", "") if existing else ""
    spec = backbone_spec_for(
        resolve_backbone(args.backbone, meta, recorded, where=f"index {out}", adapter=args.adapter)
    )
    clip = load_backbone_spec(spec)
    model = load_adapter(clip, args.adapter)
    model.eval().to(_device(getattr(args, "device", None)))

    # Explicit options override the existing index's settings (update: they must not change how videos are
    # encoded), else the settings the adapter's training recipe recorded, else the defaults.
    encoding = {
        "num_frames": getattr(args, "frames", None),
        "max_words": getattr(args, "max_words", None),
        "sampling": getattr(args, "sampling", None),
    }
    storage = {
        "backend": getattr(args, "backend", None),
        "nlist": getattr(args, "nlist", None),
        "nprobe": getattr(args, "nprobe", None),
        "dtype": getattr(args, "dtype", None),
    }
    if existing:
        base: dict[str, Any] = asdict(IndexSettings.from_dict(existing["settings"]))  # old indexes: their defaults
        base.update({k: v for k, v in encoding.items() if v is not None})
    else:
        default = asdict(IndexSettings())
        keys = ("num_frames", "max_words", "sampling", "fps", "max_candidates")
        base, notices = settings_for_adapter(recorded_eval_settings(meta), encoding, {k: default[k] for k in keys})
        for line in notices:
            print(line, file=sys.stderr)
        trained = recorded_eval_settings(meta).get("image_size", clip.config.vision.image_size)
        if trained != clip.config.vision.image_size:
            print(
                f"note: the adapter was trained on {trained} px frames; indexes take the backbone's "
                f"{clip.config.vision.image_size} px",
                file=sys.stderr,
            )
    base.update({k: v for k, v in storage.items() if v is not None})
    base["image_size"] = clip.config.vision.image_size
    settings = IndexSettings.from_dict(base)
    report = build_index(
        model,
        args.videos or args.manifest,
        out,
        settings=settings,
        backbone_spec=spec,
        adapter_path=str(Path(args.adapter).absolute()),
        update=bool(args.update),
        cache_dir=getattr(args, "cache", None),
        batch_size=getattr(args, "batch_size", 16) or 16,
        num_workers=args.workers,
        max_bad_fraction=getattr(args, "max_bad_fraction", 0.25),
        progress=True,
    )
    if getattr(args, "json", False):
        print(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    else:
        for vid, path, reason in report.bad.items:
            print(f"skipped {vid} ({path}): {reason}", file=sys.stderr)
        print(report.summary())
    return 0


def _format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no results)"
    width = max(8, *(len(r["video_id"]) for r in rows))
    lines = [f"{'rank':>4}  {'score':>7}  {'video_id':<{width}}  {'dur':>6}  path"]
    for r in rows:
        dur = f"{r['duration']:.1f}s" if r.get("duration") is not None else "-"
        score = f"{r['score']:>7.4f}" if r["score"] is not None else f"{'-':>7}"
        lines.append(f"{r['rank']:>4}  {score}  {r['video_id']:<{width}}  {dur:>6}  {r.get('path', '')}")
    return "\n".join(lines)


def run_search(args: argparse.Namespace) -> int:
    """``vidret search INDEX "a sentence" -k 10 [--json]`` or ``vidret search INDEX --video FILE``."""
    import torch

    from vidret.backbone.tokenizer import tokenize
    from vidret.retrieval.build import open_model_for_index, video_query_vector
    from vidret.retrieval.index import VideoIndex

    if (args.query is None or not args.query.strip()) == (args.video is None):
        raise VidretError('give a query sentence (vidret search INDEX "a dog catches a frisbee") or --video FILE')
    if args.k < 1:
        raise VidretError(f"-k must be >= 1, got {args.k}")
    index = VideoIndex.load(args.index, backend=getattr(args, "backend", None), nprobe=getattr(args, "nprobe", None))
    model = open_model_for_index(
        index, args.backbone, getattr(args, "adapter", None), device=_device(getattr(args, "device", None))
    )
    with torch.no_grad():
        if args.video is not None:
            scores, rows = index.search(video_query_vector(model, args.video, index.settings), args.k)
            query: dict[str, Any] = {"video": str(args.video)}
        else:
            device = next(model.parameters()).device
            tokens = tokenize([args.query.strip()], context_length=index.settings.max_words, truncate=True)
            scores, rows = index.search_text(model, model.encode_text(tokens.to(device)), args.k)
            query = {"text": args.query.strip()}
    results = []
    for rank, (row, score) in enumerate(zip(rows[0].tolist(), scores[0].tolist()), start=1):
        if row < 0:
            continue
        rec = index.records[row]
        results.append(
            {
                "rank": rank,
                "video_id": rec.video_id,
                "score": round(score, 6) if math.isfinite(score) else None,  # JSON has no NaN/Inf
                "duration": rec.duration,
                "path": rec.path,
            }
        )
    if args.json:
        out = {"index": str(args.index), **query, "k": len(results), "results": results}
        print(json.dumps(out, indent=2, allow_nan=False))
    else:
        print(_format_table(results))
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _allowed_hosts(bind_host: str, extra: list[str]) -> list[str]:
    """Host header names served: the localhost names, the bound host unless a wildcard, and --allow-host."""
    from vidret.retrieval.http import LOCAL_HOSTS

    wildcard = bind_host.strip("[]") in ("", "0.0.0.0", "::")
    return [*LOCAL_HOSTS, *([] if wildcard else [bind_host]), *extra]


def run_serve(args: argparse.Namespace) -> int:
    """``vidret serve [NAME=]INDEX... [--host 127.0.0.1 --port 8000 --allow-host NAME --media-root DIR]``."""
    try:
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise VidretError("serving needs the [serve] extra: pip install 'vidret[serve]'") from e
    from vidret.retrieval.http import bind_socket, make_server
    from vidret.retrieval.service import create_app, open_service, set_threads

    threads = getattr(args, "threads", None)
    if threads:
        set_threads(threads)
    service = open_service(
        args.indexes,
        backbone=args.backbone,
        device=_device(getattr(args, "device", None) or "cpu"),
        backend=getattr(args, "backend", None),
        nprobe=getattr(args, "nprobe", None),
        media_roots=list(getattr(args, "media_root", None) or []),
    )
    allowed = _allowed_hosts(args.host, list(getattr(args, "allow_host", None) or []))
    try:
        sock = bind_socket(args.host, args.port)  # before announcing: a busy port fails here, cleanly
    except BaseException:
        service.close()
        raise
    try:
        port = sock.getsockname()[1]
        if not _is_loopback(args.host):
            logger.warning(
                "listening on %s: the service has no authentication; anyone who can reach it can search. "
                "Requests must name one of these hosts: %s (add more with --allow-host NAME)",
                args.host,
                ", ".join(allowed),
            )
        names = ", ".join(f"{c.name} ({len(c.index)} videos)" for c in service.collections.values())
        url_host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving {names} at http://{url_host}:{port}/ (API docs at /docs)", flush=True)
        make_server(create_app(service, allowed_hosts=allowed)).run(sockets=[sock])
    finally:
        sock.close()
    return 0


__all__ = ["run_index", "run_search", "run_serve"]
