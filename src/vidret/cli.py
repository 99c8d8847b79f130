"""The ``vidret`` command line: thin, config file + overrides -> dataclasses -> library calls.

Every subcommand has ``--help``. Errors a user can cause (VidretError) print one line and exit 2, no traceback.
Library modules are imported inside each handler so ``vidret --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vidret.errors import VidretError

Handler = Callable[[argparse.Namespace], int]
# deterministic frame rules (vidret.data.sampling.FrameRule less segment_random): eval / index --sampling
EVAL_RULES = ("segment_centre", "mvadapter_floor", "cma_linspace")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ----------------------------------------------------------------------------- backbone


def cmd_backbone_list(args: argparse.Namespace) -> int:
    from vidret.backbone.pretrained import PRETRAINED, list_backbones

    for name in list_backbones():
        print(f"{name:16s} {'pretrained weights available' if name in PRETRAINED else 'architecture only'}")
    return 0


def cmd_backbone_info(args: argparse.Namespace) -> int:
    from vidret.backbone.pretrained import backbone_info

    info = backbone_info(args.name_or_path)
    _print_json(info)
    return 0


def cmd_backbone_convert(args: argparse.Namespace) -> int:
    from vidret.backbone.pretrained import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- adapters


def cmd_adapters_list(args: argparse.Namespace) -> int:
    from vidret.adapters.base import get_method, list_methods

    for name in list_methods():
        spec = get_method(name)
        presets = ", ".join(sorted(spec.presets)) or "-"
        print(f"{name:12s} {spec.description}\n{'':12s} presets: {presets}")
    return 0


def cmd_adapters_report(args: argparse.Namespace) -> int:
    from vidret.adapters.report import format_report, method_report

    overrides = _kv_options(args.option)
    rows = method_report(args.method, args.backbone, args.preset, **overrides)
    if args.json:
        _print_json(rows)
    else:
        print(format_report(rows))
    return 0


def _kv_options(items: Sequence[str] | None) -> dict[str, Any]:
    from vidret.train.config import parse_overrides

    return parse_overrides(list(items or []))


# ----------------------------------------------------------------------------- data


def cmd_data_convert(args: argparse.Namespace) -> int:
    from vidret.data.converters import convert

    report = convert(args.dataset, args.annotations, args.videos, args.out)
    print(report.format_report())
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from vidret.data.check import check_manifest

    report = check_manifest(args.manifest, decode=not args.no_decode, max_videos=args.max_videos)
    print(report.format_report())
    return 0 if report.ok else 1  # a script must be able to tell "problems found"


def cmd_data_preprocess(args: argparse.Namespace) -> int:
    from vidret.data.cache import FrameCache, preprocess
    from vidret.data.manifest import read_manifest
    from vidret.data.sampling import SamplingConfig

    entries = read_manifest(args.manifest)
    cache = FrameCache(args.cache, image_size=args.image_size, sampling=SamplingConfig(fps=args.fps))
    report = preprocess(entries, cache, num_workers=args.workers, progress=True)
    print(report.summary() if hasattr(report, "summary") else report)
    return 0


def cmd_pocket_generate(args: argparse.Namespace) -> int:
    from vidret.data.pocket import PocketConfig, generate_pocket_world

    cfg = (
        PocketConfig.preset(args.size, seed=args.seed)
        if hasattr(PocketConfig, "preset")
        else PocketConfig(seed=args.seed)
    )
    report = generate_pocket_world(args.out, cfg)
    print(report.summary() if hasattr(report, "summary") else report)
    return 0


# ----------------------------------------------------------------------------- train / eval / demo


def cmd_pretrain(args: argparse.Namespace) -> int:
    from vidret.train.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(world=args.world, out=args.out, config=args.config, steps=args.steps, seed=args.seed)
    path = pretrain(cfg, progress=True)
    print(f"pretrained backbone written to {path} (OpenAI checkpoint layout; load with --backbone {path})")
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    from vidret.train.config import load_config
    from vidret.train.recipe import format_card, recipe_card

    card = recipe_card(load_config(args.config, args.overrides), config_path=args.config)
    if getattr(args, "json", False):
        _print_json(card)
    else:
        print(format_card(card))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vidret.train.config import load_config
    from vidret.train.loop import train

    if args.dry_run:
        return cmd_recipe(args)
    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"adapter written to {result.adapter_dir} after {result.steps} steps ({result.train_seconds:.1f}s)")
    if result.eval:
        from vidret.eval.metrics import format_metrics

        print("T2V", format_metrics(result.eval["t2v"]))
        print("V2T", format_metrics(result.eval["v2t"]))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vidret.adapters.io import load_adapter, read_adapter, recorded_eval_settings
    from vidret.eval.evaluate import evaluate_model, settings_for_adapter
    from vidret.eval.metrics import format_metrics
    from vidret.retrieval.build import load_backbone_spec, resolve_backbone
    from vidret.train.config import DataConfig
    from vidret.train.loop import resolve_device

    meta, _ = read_adapter(args.adapter)
    # a recorded pretrained name is followed; a recorded file path only when the user names it (docs/security.md)
    clip = load_backbone_spec(resolve_backbone(args.backbone, meta, adapter=args.adapter))
    model = load_adapter(clip, args.adapter)
    device = resolve_device(args.device)
    model.to(device)
    # the flag, else what the adapter's training recipe recorded, else the defaults of older adapters
    default = DataConfig()
    settings, notices = settings_for_adapter(
        recorded_eval_settings(meta),
        {"num_frames": args.frames, "max_words": args.max_words, "sampling": args.sampling, "protocol": args.protocol},
        {
            "num_frames": default.num_frames,
            "max_words": default.max_words,
            "sampling": default.eval_sampling,
            "protocol": default.test_protocol,
            "fps": default.fps,
            "image_size": clip.config.vision.image_size,
        },
    )
    for line in notices:
        print(line, file=sys.stderr)
    data = DataConfig(
        num_frames=settings["num_frames"],
        max_words=settings["max_words"],
        eval_sampling=settings["sampling"],
        test_protocol=settings["protocol"],
        fps=settings["fps"],
        image_size=settings["image_size"],
        num_workers=args.workers,
        cache_dir=args.cache or "",
    )
    res = evaluate_model(
        model,
        args.manifest,
        data,
        device=device,
        precision=args.precision,
        pairs_file=args.pairs,
        query_bank=args.qb_bank,
        query_bank_size=args.qb_bank_size,
        qb_k=args.qb_k,
        qb_beta=args.qb_beta,
    )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    print("T2V", format_metrics(res["t2v"]))
    print("V2T", format_metrics(res["v2t"]))
    if "dsl" in res.get("postprocessed", {}):
        print("T2V with DSL (transductive: uses all test queries)", format_metrics(res["postprocessed"]["dsl"]["t2v"]))
    if "qbnorm" in res.get("postprocessed", {}):
        qb = res["postprocessed"]["qbnorm"]
        print(f"T2V with QB-Norm ({qb['bank_queries']} bank captions)", format_metrics(qb["t2v"]))
    if "reversal" in res:
        print(f"time-reversed pairs: {res['reversal']['pair_accuracy']:.1f}% of captions prefer their own video")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vidret.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, quick=args.quick, seed=args.seed))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from vidret.train.plot import plot_run

    out = plot_run(args.run, args.out)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- bench


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from vidret.bench.decode import main as bench_main

    return bench_main(args.rest)


def cmd_bench_train(args: argparse.Namespace) -> int:
    from vidret.bench.train import main as bench_main

    return bench_main(args.rest)


def cmd_bench_encode(args: argparse.Namespace) -> int:
    from vidret.bench.encode import main as bench_main

    return bench_main(args.rest)


def cmd_bench_search(args: argparse.Namespace) -> int:
    from vidret.bench.search import main as bench_main

    return bench_main(args.rest)


def cmd_bench_hostpath(args: argparse.Namespace) -> int:
    from vidret.bench.hostpath import main as bench_main

    return bench_main(args.rest)


# ----------------------------------------------------------------------------- search


def cmd_index(args: argparse.Namespace) -> int:
    from vidret.retrieval.cli import run_index

    return run_index(args)


def cmd_search(args: argparse.Namespace) -> int:
    from vidret.retrieval.cli import run_search

    return run_search(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from vidret.retrieval.cli import run_serve

    return run_serve(args)


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vidret",
        description="Parameter-efficient text-video retrieval: one frozen CLIP, many small adapters.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(parent: Any, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(handler=handler)
        return sp

    d = add(sub, "demo", cmd_demo, "the whole task on the offline pocket world: generate, pretrain, train, compare")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--quick", action="store_true", help="a smaller, faster version (for tests)")
    d.add_argument("--seed", type=int, default=0)

    bb = sub.add_parser("backbone", help="CLIP backbones: list, inspect, convert").add_subparsers(
        dest="sub", metavar="SUB"
    )
    add(bb, "list", cmd_backbone_list, "named backbone architectures and which have pretrained weights")
    s = add(bb, "info", cmd_backbone_info, "architecture and parameter counts of a named backbone or checkpoint file")
    s.add_argument("name_or_path")
    s = add(bb, "convert", cmd_backbone_convert, "convert an OpenAI / open_clip / HF checkpoint to vidret safetensors")
    s.add_argument("src")
    s.add_argument("dst")

    ad = sub.add_parser("adapters", help="methods and their parameter budgets").add_subparsers(
        dest="sub", metavar="SUB"
    )
    add(ad, "list", cmd_adapters_list, "registered methods and their presets")
    s = add(ad, "report", cmd_adapters_report, "trainable parameters of a method on a backbone, against the papers")
    s.add_argument("--method", required=True)
    s.add_argument("--backbone", default="ViT-B-16")
    s.add_argument("--preset", default=None, help="a preset name, or 'all' for every preset")
    s.add_argument("--option", action="append", help="method option override key=value (repeatable)")
    s.add_argument("--json", action="store_true")

    da = sub.add_parser("data", help="benchmark converters, frame cache, checks").add_subparsers(
        dest="sub", metavar="SUB"
    )
    s = add(da, "convert", cmd_data_convert, "convert a benchmark's annotation files to vidret manifests")
    s.add_argument("--dataset", required=True)
    s.add_argument("--annotations", required=True, help="folder with the annotation files")
    s.add_argument("--videos", required=True, help="folder with the video files")
    s.add_argument("--out", required=True, help="output folder for <split>.jsonl")
    s = add(da, "check", cmd_data_check, "counts, missing files, unreadable videos and durations of a manifest")
    s.add_argument("manifest")
    s.add_argument("--no-decode", action="store_true", help="only check that files exist")
    s.add_argument("--max-videos", type=int, default=None)
    s = add(da, "preprocess", cmd_data_preprocess, "decode and sample every video once into a frame cache")
    s.add_argument("manifest")
    s.add_argument("--cache", required=True, help="cache folder")
    s.add_argument("--image-size", type=int, default=224)
    s.add_argument("--fps", type=float, default=1.0)
    s.add_argument("--workers", type=int, default=2)

    po = sub.add_parser("pocket", help="the synthetic pocket world").add_subparsers(dest="sub", metavar="SUB")
    s = add(po, "generate", cmd_pocket_generate, "generate the pocket world (videos, manifests, pretraining images)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", default="default", choices=["small", "default"])

    s = add(sub, "pretrain", cmd_pretrain, "pretrain the tiny pocket CLIP on the pocket image-caption set")
    s.add_argument("--world", required=True, help="pocket world folder (vidret pocket generate)")
    s.add_argument("--out", required=True, help="checkpoint path (.pt, OpenAI layout)")
    s.add_argument("--config", default="pocket-small", help="backbone architecture (default pocket-small)")
    s.add_argument("--steps", type=int, default=1500)
    s.add_argument("--seed", type=int, default=0)

    s = add(sub, "train", cmd_train, "train a method from a config file; key=value overrides (e.g. optim.lr=1e-4)")
    s.add_argument("config", help="YAML experiment file (configs/...)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys")
    s.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.json")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--dry-run", action="store_true", help="print the recipe card (vidret recipe) and train nothing")

    s = add(sub, "recipe", cmd_recipe, "the effective recipe of a config: steps, lr schedule, parameter groups, frames")
    s.add_argument("config", help="YAML experiment file (configs/...)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys")
    s.add_argument("--json", action="store_true", help="print the card as JSON")

    s = add(sub, "eval", cmd_eval, "evaluate an adapter on a manifest: T2V/V2T R@1/5/10, MdR, MnR")
    s.add_argument("--adapter", required=True)
    s.add_argument("--manifest", required=True)
    s.add_argument("--backbone", default=None, help="backbone name or checkpoint (default: the one recorded)")
    recorded = "default: the adapter's recorded setting, else"
    s.add_argument(
        "--protocol", default=None, choices=["single", "multi", "paragraph"], help=f"test protocol ({recorded} single)"
    )
    s.add_argument("--frames", type=int, default=None, help=f"frames per video ({recorded} 12)")
    s.add_argument("--max-words", type=int, default=None, help=f"text length in tokens ({recorded} 32)")
    s.add_argument("--sampling", default=None, choices=EVAL_RULES, help=f"frame rule ({recorded} segment_centre)")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--cache", default=None)
    s.add_argument("--device", default="auto")
    s.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    s.add_argument("--pairs", default=None, help="reversal pairs JSON (pocket world test_pairs.json)")
    s.add_argument("--qb-bank", default=None, help="QB-Norm: manifest whose captions are the querybank (train split)")
    s.add_argument("--qb-bank-size", type=int, default=None, help="QB-Norm: draw this many bank captions (seeded)")
    s.add_argument("--qb-k", type=int, default=1, help="QB-Norm: top-k of each bank query in the activation set")
    s.add_argument("--qb-beta", type=float, default=20.0, help="QB-Norm: inverse temperature (cosine scale)")
    s.add_argument("--out", default=None, help="write results JSON here")

    s = add(sub, "plot", cmd_plot, "draw a run's loss and recall curves to PNG")
    s.add_argument("run", help="run folder (with metrics.jsonl)")
    s.add_argument("--out", default=None)

    be = sub.add_parser("bench", help="speed and memory benchmarks").add_subparsers(dest="sub", metavar="SUB")
    for name, h, text in (
        ("decode", cmd_bench_decode, "raw decoding vs frame cache throughput"),
        ("train", cmd_bench_train, "training step time and peak memory of every method vs full fine-tuning"),
        ("encode", cmd_bench_encode, "video encoding throughput"),
        ("search", cmd_bench_search, "index and HTTP search latency"),
        ("hostpath", cmd_bench_hostpath, "CPU fast paths before/after: QuickGELU backward, host allocator"),
    ):
        s = add(be, name, h, text)
        s.add_argument("rest", nargs=argparse.REMAINDER, help="benchmark options (see `vidret bench NAME -- --help`)")

    s = add(sub, "index", cmd_index, "encode a folder or manifest of videos into a searchable index")
    s.add_argument("--adapter", required=True)
    s.add_argument("--backbone", default=None)
    s.add_argument("--videos", default=None)
    s.add_argument("--manifest", default=None)
    s.add_argument("--out", required=True)
    s.add_argument("--update", action="store_true", help="add new / drop deleted videos, keep the rest")
    s.add_argument(
        "--frames",
        type=int,
        default=None,
        help="frames per video (default: the adapter's, else 12; --update: the index's)",
    )
    s.add_argument(
        "--max-words", type=int, default=None, help="query length in tokens (default: the adapter's, else 32)"
    )
    s.add_argument(
        "--sampling", default=None, choices=EVAL_RULES, help="frame rule (default: the adapter's, else segment_centre)"
    )
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--backend", choices=["exact", "faiss"], default=None, help="search backend (default exact)")
    s.add_argument("--nlist", type=int, default=None, help="FAISS IVF lists (default ~sqrt(N))")
    s.add_argument("--nprobe", type=int, default=None, help="FAISS lists probed per query (default 16)")
    s.add_argument("--dtype", choices=["float16", "float32"], default=None, help="feature storage (default float16)")
    s.add_argument("--cache", default=None, help="frame cache folder (default OUT/cache)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--max-bad-fraction", type=float, default=0.25, help="stop if more videos than this are bad")
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true", help="print the build report as JSON")
    s = add(sub, "search", cmd_search, "search an index by sentence (or by a video file)")
    s.add_argument("index")
    s.add_argument("query", nargs="?", default=None)
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--video", default=None, help="query by a video file instead of text")
    s.add_argument("--json", action="store_true")
    s.add_argument("--backbone", default=None)
    s.add_argument("--adapter", default=None, help="adapter folder (default: the one recorded in the index)")
    s.add_argument("--backend", choices=["exact", "faiss"], default=None, help="override the index's backend")
    s.add_argument("--nprobe", type=int, default=None, help="FAISS lists probed per query")
    s.add_argument("--device", default="cpu")
    s = add(sub, "serve", cmd_serve, "HTTP search service + web page over one or more indexes")
    s.add_argument("indexes", nargs="+", help="index folders (name=path to name them)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--backbone", default=None)
    s.add_argument("--backend", choices=["exact", "faiss"], default=None, help="override the indexes' backend")
    s.add_argument("--nprobe", type=int, default=None, help="FAISS lists probed per query")
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, default=None, help="torch/FAISS threads (default: one per core)")
    s.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header is NAME (repeatable; '*': any). Always answered: localhost, "
        "127.0.0.1, ::1 and --host; other Hosts get 400 (DNS rebinding)",
    )
    s.add_argument(
        "--media-root",
        action="append",
        default=[],
        metavar="DIR",
        help="serve video files only from inside DIR (repeatable); replaces the collection folder each index "
        "recorded when it was built, and is needed for indexes that recorded none",
    )
    return p


_BENCHES = {
    "decode": "vidret.bench.decode",
    "train": "vidret.bench.train",
    "encode": "vidret.bench.encode",
    "search": "vidret.bench.search",
    "hostpath": "vidret.bench.hostpath",
}


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP's default busy-waiting makes torch 8-10x slower when anything else shares the cores (measured:
    # a pocket-model step took 3.8 s instead of 0.46 s with a second process running); set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # glibc would unmap and re-fault every large activation each step (see host_memory.py for the figures)
    from vidret.host_memory import keep_freed_memory

    keep_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in _BENCHES:
        # benchmarks own their options (and --help): hand them everything after the name
        import importlib

        rest = argv[2:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        try:
            return int(importlib.import_module(_BENCHES[argv[1]]).main(rest) or 0)
        except VidretError as e:
            print(f"vidret: error: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    handler = getattr(args, "handler", None)
    if handler is None:
        # a group without its subcommand: show that group's help
        parser.parse_args([*argv, "--help"])
        return 2
    try:
        return int(handler(args) or 0)
    except VidretError as e:
        print(f"vidret: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vidret: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
