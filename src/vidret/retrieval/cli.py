"""Handlers of ``vidret index``, ``vidret search`` and ``vidret serve`` (argparse Namespace -> library calls)."""

from __future__ import annotations

import argparse
import functools
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

    from vidret.adapters.io import load_adapter, read_adapter_meta, recorded_eval_settings
    from vidret.eval.evaluate import settings_for_adapter
    from vidret.retrieval.build import backbone_spec_for, load_backbone_spec, resolve_backbone
    from vidret.retrieval.index_files import IndexSettings, read_index_meta

    if bool(args.videos) == bool(args.manifest):
        raise VidretError("give exactly one of --videos DIR or --manifest FILE")
    out = Path(args.out)
    existing = read_index_meta(out) if args.update and (out / "index.json").exists() else None
    meta = read_adapter_meta(args.adapter)  # the tensors are read (and checked) once, by load_adapter
    recorded = existing["model"].get("backbone_spec", "") if existing else ""
    spec = backbone_spec_for(
        resolve_backbone(args.backbone, meta, recorded, where=f"index {out}", adapter=args.adapter)
    )
    clip = load_backbone_spec(spec)
    model = load_adapter(clip, args.adapter)
    sharding, device = _join_torchrun(_device(getattr(args, "device", None)))
    model.eval().to(device)

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
        recorded_eval = recorded_eval_settings(meta)
        base, notices = settings_for_adapter(recorded_eval, encoding, {k: default[k] for k in keys})
        for line in notices:
            print(line, file=sys.stderr)
        trained = recorded_eval.get("image_size", clip.config.vision.image_size)
        if trained != clip.config.vision.image_size:
            print(
                f"note: the adapter was trained on {trained} px frames; indexes take the backbone's "
                f"{clip.config.vision.image_size} px",
                file=sys.stderr,
            )
    base.update({k: v for k, v in storage.items() if v is not None})
    base["image_size"] = clip.config.vision.image_size
    segment, stride = getattr(args, "segment", None), getattr(args, "stride", None)
    if stride is not None and segment is None and not existing:
        raise VidretError("--stride needs --segment SECONDS (the window length)")
    if segment is not None:
        base["segment"] = float(segment)
        base["stride"] = float(stride) if stride is not None else float(segment) / 2
    elif stride is not None:
        base["stride"] = float(stride)
    settings = IndexSettings.from_dict(base)
    try:
        report = _build(args, model, out, settings, spec, sharding)
    finally:
        if sharding is not None:
            from vidret.train.distributed import shutdown

            shutdown()
    if sharding is not None and sharding.rank != 0:
        return 0  # rank 0 reports for the whole job
    if getattr(args, "json", False):
        print(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    else:
        for vid, path, reason in report.bad.items:
            print(f"skipped {vid} ({path}): {reason}", file=sys.stderr)
        print(report.summary())
    return 0


def _join_torchrun(device: str) -> tuple[Any, str]:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group and return (Sharding, this rank's device).

    NCCL for CUDA, gloo for CPU; the barrier waits up to a day, since ranks finish their shares at different
    times. Outside torchrun: (None, device).
    """
    import datetime
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, device
    import torch
    import torch.distributed as dist

    from vidret.retrieval.shards import Sharding
    from vidret.train.distributed import init_from_env

    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=24))
    info = init_from_env("cuda" if cuda else "cpu")
    if cuda:
        device = f"cuda:{info.local_rank}"
    return Sharding(info.rank, info.world_size, barrier=dist.barrier), device


def _build(args: argparse.Namespace, model: Any, out: Path, settings: Any, spec: str, sharding: Any) -> Any:
    from vidret.retrieval.build import build_index

    main = sharding is None or sharding.rank == 0
    return build_index(
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
        progress=main,
        sharding=sharding,
    )


def _format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no results)"
    width = max(8, *(len(r["video_id"]) for r in rows))
    spans = any(r.get("start") is not None or r.get("end") is not None for r in rows)
    head = f"{'time':>13}  " if spans else ""
    lines = [f"{'rank':>4}  {'score':>7}  {'video_id':<{width}}  {'dur':>6}  {head}path"]
    for r in rows:
        dur = f"{r['duration']:.1f}s" if r.get("duration") is not None else "-"
        score = f"{r['score']:>7.4f}" if r["score"] is not None else f"{'-':>7}"
        span = f"{_span(r):>13}  " if spans else ""
        lines.append(f"{r['rank']:>4}  {score}  {r['video_id']:<{width}}  {dur:>6}  {span}{r.get('path', '')}")
    return "\n".join(lines)


def _hits(index: Any, hits: list[tuple[int, float]]) -> list[dict[str, Any]]:
    results = []
    for rank, (row, score) in enumerate(hits, start=1):
        rec = index.records[row]
        item = {
            "rank": rank,
            "video_id": rec.video_id,
            "score": round(score, 6) if math.isfinite(score) else None,  # JSON has no NaN/Inf
            "duration": rec.duration,
            "path": rec.path,
            "start": rec.start,  # the window (or manifest segment) in seconds; None = the whole video
            "end": rec.end,
        }
        if rec.parent:
            item["parent"] = rec.parent
        results.append(item)
    return results


def _span(r: dict[str, Any]) -> str:
    if r.get("start") is None and r.get("end") is None:
        return "-"
    a = f"{r['start']:.1f}" if r.get("start") is not None else "0"
    b = f"{r['end']:.1f}" if r.get("end") is not None else "end"
    return f"{a}-{b}s"


def _print_results(args: argparse.Namespace, where: str, query: dict[str, Any], results: list[dict[str, Any]]) -> None:
    if args.json:
        out = {"index": where, **query, "k": len(results), "results": results}
        # one object per line when reading queries from stdin, so a script can read answers line by line
        print(json.dumps(out, indent=None if args.interactive else 2, allow_nan=False), flush=True)
    elif "caption" in (results[0] if results else {}):
        lines = [f"{'rank':>4}  {'score':>7}  caption"]
        lines += [
            f"{r['rank']:>4}  {r['score'] if r['score'] is not None else '-':>7}  {r['caption']}" for r in results
        ]
        print("\n".join(lines) if results else "(no results)", flush=True)
    else:
        print(_format_table(results), flush=True)


def _queries(args: argparse.Namespace) -> Any:
    """The query sentences: the one given, or stdin lines with --interactive (blank lines skipped)."""
    if not args.interactive:
        yield args.query.strip()
        return
    if sys.stdin.isatty():
        print("type a query per line (Ctrl-D ends)", file=sys.stderr, flush=True)
    for line in sys.stdin:
        if line.strip():
            yield line.strip()


def _search_url(args: argparse.Namespace) -> int:
    """``vidret search --url http://HOST:PORT [NAME] "query"``: ask a running ``vidret serve``."""
    import urllib.error
    import urllib.parse
    import urllib.request

    base = args.url.rstrip("/")
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise VidretError(f"--url must be an http(s) URL such as http://127.0.0.1:8000, got {args.url!r}")
    # with --url the positional INDEX is the served collection's name (optional): "[NAME] query", or "[NAME]"
    # with --interactive
    if args.query is not None or args.interactive:
        name, query = args.index, args.query
    else:
        name, query = None, args.index
    args.query = query
    if not args.interactive and (query is None or not query.strip()):
        raise VidretError('give a query sentence: vidret search --url URL [NAME] "a dog catches a frisbee"')
    for text in _queries(args):
        params = {"q": text, "k": str(args.k), "group": args.group, **({"index": name} if name else {})}
        url = f"{base}/search?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 - the user's own URL, http(s) only
                body = json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read().decode("utf-8")).get("detail", "")
            except ValueError:
                detail = ""
            raise VidretError(f"{base} answered {e.code}: {detail or e.reason}") from e
        except (urllib.error.URLError, OSError) as e:
            raise VidretError(f"cannot reach {base} ({getattr(e, 'reason', e)}); is `vidret serve` running?") from e
        results = [
            {
                "rank": h.get("rank"),
                "video_id": h.get("video_id"),
                "score": h.get("score"),
                "duration": h.get("duration"),
                "path": h.get("video_url", ""),
                "start": h.get("start"),
                "end": h.get("end"),
            }
            for h in body.get("results", [])
        ]
        _print_results(args, body.get("index", name or base), {"text": text}, results)
    return 0


def run_search(args: argparse.Namespace) -> int:
    """``vidret search INDEX "a sentence" -k 10 [--json]``, ``--interactive`` (stdin), ``--url URL``,
    ``--video FILE`` (videos like it) or ``--video FILE --captions BANK`` (captions that describe it)."""
    import torch

    from vidret.retrieval.index import VideoIndex

    for name in ("interactive", "url", "quantize", "captions"):
        if not hasattr(args, name):
            setattr(args, name, None)
    if getattr(args, "group", None) is None:
        args.group = "video"
    from vidret.retrieval.moments import GROUPS

    if args.group not in GROUPS:
        raise VidretError(f"--group must be 'video' or 'segment', got {args.group!r}")
    if args.k < 1:
        raise VidretError(f"-k must be >= 1, got {args.k}")
    if args.url:
        if args.video:
            raise VidretError("--url asks a running `vidret serve` by sentence; --video needs a local INDEX")
        return _search_url(args)
    if args.index is None:
        raise VidretError('give an index folder: vidret search INDEX "a dog catches a frisbee" (or --url URL)')
    has_text = args.query is not None and bool(args.query.strip())
    if args.interactive and (has_text or args.video):
        raise VidretError("--interactive reads the queries from stdin; give no query sentence or --video")
    if not args.interactive and has_text == (args.video is not None):
        raise VidretError('give a query sentence (vidret search INDEX "a dog catches a frisbee") or --video FILE')
    if args.captions and args.video is None:
        raise VidretError("--captions BANK ranks captions for a video: add --video FILE")
    index = VideoIndex.load(args.index, backend=getattr(args, "backend", None), nprobe=getattr(args, "nprobe", None))
    device = _device(getattr(args, "device", None))
    where = str(args.index)
    if args.video is not None:  # the vision tower is needed: the full model
        from vidret.retrieval.build import open_model_for_index, video_query_vector

        model = open_model_for_index(index, args.backbone, getattr(args, "adapter", None), device=device)
        if args.captions:
            from vidret.retrieval.query import rank_captions, read_caption_bank

            bank = read_caption_bank(args.captions)
            ranked = rank_captions(model, args.video, bank, index.settings, args.k)
            results = [
                {"rank": r, "caption": bank[i], "position": i + 1, "score": round(s, 6) if math.isfinite(s) else None}
                for r, (i, s) in enumerate(ranked, start=1)
            ]
            _print_results(args, where, {"video": str(args.video), "captions": str(args.captions)}, results)
            return 0
        with torch.no_grad():
            qv = video_query_vector(model, args.video, index.settings)
            hits = index.top_hits(lambda n: index.search(qv, n), [args.k], [args.group])[0]
        _print_results(args, where, {"video": str(args.video)}, _hits(index, hits))
        return 0

    from vidret.retrieval.query import TextCache, encode_texts, open_text_model_for_index, quantize_text_tower

    model = open_text_model_for_index(index, args.backbone, getattr(args, "adapter", None), device=device)
    if args.quantize:
        if device != "cpu":
            raise VidretError("--quantize is for CPU (int8 dynamic quantisation); drop it or use --device cpu")
        quantize_text_tower(model)
    cache = TextCache(256)
    for text in _queries(args):
        feats = encode_texts(model, [text], index.settings.max_words, cache).to(device)
        with torch.no_grad():
            hits = index.top_hits(functools.partial(index.search_text, model, feats), [args.k], [args.group])[0]
        _print_results(args, where, {"text": text}, _hits(index, hits))
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
        captions=getattr(args, "captions", None),
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
        if service.captions is not None:
            names += f"; {len(service.captions)} captions for /captions"
        url_host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving {names} at http://{url_host}:{port}/ (API docs at /docs)", flush=True)
        make_server(create_app(service, allowed_hosts=allowed)).run(sockets=[sock])
    finally:
        sock.close()
    return 0


__all__ = ["run_index", "run_search", "run_serve"]
