"""The ``vidret`` command line: thin, config file + overrides -> dataclasses -> library calls.

Rules every subcommand follows (tests/test_cli.py checks them):

- ``--help``: every option has help text, choices are listed, defaults are shown, and it ends with an example.
- Exit codes: 0 success; 1 the command ran and failed (a VidretError: a missing or bad file, a bad config value
  or override, a wrong checkpoint, no network, a refused option combination only the library can judge; an
  OSError; ``data check`` finding problems); 2 the command line itself is wrong (argparse: unknown option,
  missing argument, bad choice, a value of the wrong type or range; a group without its subcommand);
  130 interrupted.
- A user's mistake prints one line, ``vidret: error: <what, where, how to fix>``, never a traceback;
  ``VIDRET_DEBUG=1`` prints the traceback as well (a bug, any other exception, keeps its traceback).
- Results go to stdout, notes and progress for humans to stderr; every command with a result has ``--json``.
- Paths vidret was given are printed normalised (``a/../b`` as ``b``).

Library modules are imported inside each handler so ``vidret --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vidret.errors import VidretError

Handler = Callable[[argparse.Namespace], int]
# deterministic frame rules (vidret.data.sampling.FrameRule less segment_random): eval / index --sampling
EVAL_RULES = ("segment_centre", "mvadapter_floor", "cma_linspace")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _norm(path: str | os.PathLike[str]) -> str:
    """A path as printed: normalised (``main/../shared/x`` -> ``shared/x``), never resolved through links."""
    return os.path.normpath(os.fspath(path))


def _note(message: str) -> None:
    """A one-line note for humans (stderr), kept apart from results (stdout)."""
    print(f"vidret: {message}", file=sys.stderr)


def _resize_note(frame_size: int, backbone_size: int, backbone: str, fix: str) -> None:
    """Say once that frames of another size than the backbone's input size are taken as they are."""
    if frame_size != backbone_size:
        _note(
            f"frames are resized to {frame_size} px but the backbone {backbone} takes {backbone_size} px: its "
            f"positional embedding is interpolated to the frames' patch grid ({fix})"
        )


# ----------------------------------------------------------------------------- backbone


def cmd_backbone_list(args: argparse.Namespace) -> int:
    from vidret.backbone.pretrained import PRETRAINED, list_backbones

    rows = [{"name": name, "pretrained": name in PRETRAINED} for name in list_backbones()]
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        print(f"{r['name']:16s} {'pretrained weights available' if r['pretrained'] else 'architecture only'}")
    return 0


def cmd_backbone_info(args: argparse.Namespace) -> int:
    from vidret.backbone.pretrained import backbone_info

    info = backbone_info(args.name_or_path)
    if args.json:
        _print_json(info)
        return 0
    arch, params = info["architecture"], info["parameters"]
    vis, txt = arch["vision"], arch["text"]
    lines = [
        f"{info['name']}: {info['format']}, from {info['source']}",
        f"  vision: {vis['image_size']} px, patch {vis['patch_size']}, width {vis['width']}, {vis['layers']} layers, "
        f"{vis['heads']} heads",
        f"  text:   {txt['context_length']} tokens, width {txt['width']}, {txt['layers']} layers, {txt['heads']} heads",
        f"  embedding {arch['embed_dim']}; parameters: "
        + ", ".join(f"{k} {v:,}" for k, v in params.items() if isinstance(v, int)),
    ]
    if info.get("pretrained"):
        p = info["pretrained"]
        lines.append(f"  sha256 {p['sha256']}; " + (f"cached at {p['cached']}" if p.get("cached") else "not cached"))
    if info.get("fingerprint"):
        lines.append(f"  fingerprint {info['fingerprint']}; dtypes {', '.join(info['dtypes'])}")
    print("\n".join(lines))
    return 0


def cmd_backbone_convert(args: argparse.Namespace) -> int:
    from vidret.backbone.pretrained import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst)
    if args.json:
        _print_json({"written": os.path.abspath(out)})
    else:
        print(f"wrote {_norm(out)}")
    return 0


# ----------------------------------------------------------------------------- adapters


def cmd_adapters_list(args: argparse.Namespace) -> int:
    from vidret.adapters.base import get_method, list_methods

    rows = [
        {"name": name, "description": get_method(name).description, "presets": sorted(get_method(name).presets)}
        for name in list_methods()
    ]
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        print(f"{r['name']:12s} {r['description']}\n{'':12s} presets: {', '.join(r['presets']) or '-'}")
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
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.format_report())
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from vidret.data.check import check_manifest

    report = check_manifest(args.manifest, decode=not args.no_decode, max_videos=args.max_videos)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.format_report())
    return 0 if report.ok else 1  # a script must be able to tell "problems found"


def cmd_data_preprocess(args: argparse.Namespace) -> int:
    from vidret.data.cache import FrameCache, preprocess
    from vidret.data.manifest import read_manifest
    from vidret.data.sampling import SamplingConfig

    entries = read_manifest(args.manifest)
    cache = FrameCache(args.cache, image_size=args.image_size, sampling=SamplingConfig(fps=args.fps))
    report = preprocess(entries, cache, num_workers=args.workers, progress=True)
    if args.json:
        where = {"manifest": os.path.abspath(args.manifest), "cache": os.path.abspath(args.cache)}
        _print_json({**where, **report.to_dict()})
    else:
        print(f"{report.summary()} -> {_norm(args.cache)}")
    return 0


def cmd_pocket_generate(args: argparse.Namespace) -> int:
    from vidret.data.pocket import PocketConfig, generate_pocket_world

    cfg = PocketConfig.from_size(args.size, seed=args.seed)
    report = generate_pocket_world(args.out, cfg, overwrite=args.overwrite)
    how = "reused (complete for this config)" if report.reused else f"generated in {report.seconds:.1f}s"
    counts = ", ".join(f"{k} {v:,}" for k, v in report.counts.items() if not k.startswith("captions_"))
    print(f"pocket world {report.out_dir}: {how}; {counts}; {report.bytes_on_disk / 2**20:.1f} MiB")
    return 0


# ----------------------------------------------------------------------------- train / eval / demo


def cmd_pretrain(args: argparse.Namespace) -> int:
    import torch

    from vidret.train.pretrain import PretrainConfig, pretrain

    torch.set_num_threads(args.threads)  # results are reproducible for a given thread count (1: the shipped file)
    cfg = PretrainConfig(
        out=args.out,
        world=args.world or "",
        world_seed=args.world_seed,
        config=args.config,
        steps=args.steps,
        warmup=args.warmup,
        lr=args.lr,
        batch=args.batch,
        seed=args.seed,
        store=args.store,
        eval_every=args.eval_every,
    )
    path = pretrain(cfg, progress=True)
    summary = json.loads(path.with_suffix(".json").read_text())
    hold = summary.get("holdout", {})
    print(
        f"pretrained backbone written to {path}; held-out R@1 image->caption {hold.get('i2t_R1', float('nan')):.1f}, "
        f"caption->image {hold.get('t2i_R1', float('nan')):.1f} ({summary['holdout_images']} images); "
        f"load it with --backbone {path}"
    )
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
    _train_resize_note(cfg)
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    if args.json:
        _print_json(
            {
                "adapter": os.path.abspath(result.adapter_dir),
                "out_dir": os.path.abspath(result.out_dir),
                "steps": result.steps,
                "final_loss": result.final_loss,
                "train_seconds": result.train_seconds,
                "peak_memory_bytes": result.peak_memory_bytes,
                "bad_videos": result.bad_videos,
                "eval": result.eval,
            }
        )
        return 0
    print(f"adapter written to {_norm(result.adapter_dir)} after {result.steps} steps ({result.train_seconds:.1f}s)")
    if result.eval:
        from vidret.eval.metrics import format_metrics

        print("T2V", format_metrics(result.eval["t2v"]))
        print("V2T", format_metrics(result.eval["v2t"]))
    return 0


def _train_resize_note(cfg: Any) -> None:
    """The resize note for a training config, before training (names need no file; a local checkpoint is read)."""
    from vidret.train.recipe import backbone_architecture

    try:
        arch = backbone_architecture(cfg.backbone)
    except VidretError:
        return  # train() reports a bad backbone in its own words
    size = arch.vision.image_size
    _resize_note(cfg.data.image_size, size, cfg.backbone, f"data.image_size={size} matches it")


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
    _resize_note(
        settings["image_size"],
        clip.config.vision.image_size,
        clip.config.name,
        f"the adapter was trained on {settings['image_size']} px frames: it recorded that size",
    )
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
    if args.json:
        _print_json(res)
        return 0
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
    from vidret.demo import DEFAULT_METHODS, DemoConfig, run_demo

    methods = tuple(args.methods or DEFAULT_METHODS)
    run_demo(DemoConfig(out=args.out, quick=args.quick, seeds=tuple(args.seeds), methods=methods))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from vidret.train.plot import plot_run

    out = plot_run(args.run, args.out)
    if args.json:
        _print_json({"written": os.path.abspath(out)})
    else:
        print(f"wrote {_norm(out)}")
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


def cmd_bench_moments(args: argparse.Namespace) -> int:
    from vidret.bench.moments import main as bench_main

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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it or there is none (None, off, empty);
    keeps the example line unwrapped. Every vidret parser uses it (the benchmarks' too)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d == [] or d is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example: "):  # one line, unwrapped, so that it can be copied
            return indent + text
        return super()._fill_text(text, width, indent)


def at_least(lo: float, kind: type = int, above: bool = False) -> Callable[[str], Any]:
    """An argparse type: a number >= ``lo`` (> with ``above``); another value is a usage error (exit code 2)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}"
            ) from None
        if not (value > lo if above else value >= lo):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {lo}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def example_epilog(command: str) -> str | None:
    """The last line of a command's --help (benchmarks use it too)."""
    return f"example: {command}" if command else None


# vidret.data.converters.DATASETS, spelled out here so that `vidret --help` imports no library code (a test
# checks the two agree)
DATASETS = ("msrvtt", "msvd", "lsmdc", "didemo", "activitynet", "vatex", "generic")
# the registered methods (vidret.adapters.base.list_methods()), likewise
METHODS = ("bottleneck", "convpass", "cross_modal", "frozen", "full", "lora", "mv_adapter", "prompt", "st_adapter")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vidret",
        description="Parameter-efficient text-video retrieval: one frozen CLIP, many small adapters. "
        "Exit codes: 0 success, 1 failure (one line says why), 2 bad command line; VIDRET_DEBUG=1 adds tracebacks.",
        epilog=example_epilog("vidret train configs/pocket/mv_adapter.yaml   (vidret COMMAND --help for each command)"),
        formatter_class=HelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(parent: Any, name: str, handler: Handler, help: str, example: str = "") -> argparse.ArgumentParser:
        sp = parent.add_parser(
            name, help=help, description=help, epilog=example_epilog(example), formatter_class=HelpFormatter
        )
        sp.set_defaults(handler=handler)
        return sp

    def group(name: str, help: str, example: str) -> Any:
        gp = sub.add_parser(
            name, help=help, description=help, epilog=example_epilog(example), formatter_class=HelpFormatter
        )
        return gp.add_subparsers(dest="sub", metavar="SUB")

    d = add(
        sub,
        "demo",
        cmd_demo,
        "the whole task on the offline pocket world: generate, train, compare",
        "vidret demo --seeds 0 1 2",
    )
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--quick", action="store_true", help="a smaller, faster version (for tests)")
    d.add_argument(
        "--seeds",
        "--seed",
        nargs="+",
        type=int,
        default=[0],
        help="training seeds; several give mean ± std (default 0)",
    )
    d.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="methods to compare (default: frozen full mv_adapter cross_modal lora bottleneck; also st_adapter "
        "convpass prompt)",
    )

    bb = group("backbone", "CLIP backbones: list, inspect, convert", "vidret backbone info ViT-B-16")
    s = add(
        bb,
        "list",
        cmd_backbone_list,
        "named backbone architectures and which have pretrained weights",
        "vidret backbone list --json",
    )
    s.add_argument("--json", action="store_true", help="print the list as JSON")
    s = add(
        bb,
        "info",
        cmd_backbone_info,
        "architecture and parameter counts of a named backbone or checkpoint file",
        "vidret backbone info /models/ViT-B-16.pt",
    )
    s.add_argument("name_or_path", help="a name from `vidret backbone list`, or a checkpoint file or HF folder")
    s.add_argument("--json", action="store_true", help="print everything as JSON")
    s = add(
        bb,
        "convert",
        cmd_backbone_convert,
        "convert an OpenAI / open_clip / HF checkpoint to vidret safetensors",
        "vidret backbone convert ViT-B-16.pt ViT-B-16.safetensors",
    )
    s.add_argument("src", help="checkpoint to read: OpenAI .pt, open_clip .pt/.bin, HF CLIPModel folder or file")
    s.add_argument("dst", help="the .safetensors file to write")
    s.add_argument("--json", action="store_true", help='print {"written": path} as JSON')

    ad = group("adapters", "methods and their parameter budgets", "vidret adapters report --method lora")
    s = add(ad, "list", cmd_adapters_list, "registered methods and their presets", "vidret adapters list --json")
    s.add_argument("--json", action="store_true", help="print the methods as JSON")
    s = add(
        ad,
        "report",
        cmd_adapters_report,
        "trainable parameters of a method on a backbone, against the papers",
        "vidret adapters report --method mv_adapter --backbone ViT-B-16 --preset all",
    )
    s.add_argument("--method", required=True, help=f"a registered method: {', '.join(METHODS)}")
    s.add_argument("--backbone", default="ViT-B-16", help="a named backbone (vidret backbone list)")
    s.add_argument(
        "--preset",
        default=None,
        help="a preset of the method (vidret adapters list), or 'all' for every preset sized for the backbone "
        "(default: the method's own defaults)",
    )
    s.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="method option override, e.g. --option r=16 or --option cmt_layers=[-2,-1] (repeatable)",
    )
    s.add_argument("--json", action="store_true", help="print the rows as JSON")

    da = group("data", "benchmark converters, frame cache, checks", "vidret data check data/msrvtt/test.jsonl")
    s = add(
        da,
        "convert",
        cmd_data_convert,
        "convert a benchmark's annotation files to vidret manifests (<split>.jsonl + conversion_report.json)",
        "vidret data convert --dataset msrvtt --annotations ~/MSRVTT/annotation --videos ~/MSRVTT/videos "
        "--out data/msrvtt",
    )
    s.add_argument(
        "--dataset",
        required=True,
        choices=DATASETS,
        help="the benchmark whose annotation layout to read (DATA.md); generic: CSV/TSV files of path,caption",
    )
    s.add_argument(
        "--annotations",
        required=True,
        help="folder with the benchmark's annotation files; generic: a .csv/.tsv file (its name is the split) "
        "or a folder of them",
    )
    s.add_argument(
        "--videos",
        required=True,
        help="folder with the video files, searched recursively (generic: where relative paths start)",
    )
    s.add_argument("--out", required=True, help="output folder for <split>.jsonl and conversion_report.json")
    s.add_argument("--json", action="store_true", help="print the conversion report as JSON")
    s = add(
        da,
        "check",
        cmd_data_check,
        "counts, missing files, unreadable videos and durations of a manifest; exit code 1 if it finds problems",
        "vidret data check data/msrvtt/test.jsonl --no-decode",
    )
    s.add_argument("manifest", help="a JSONL manifest (vidret data convert writes them)")
    s.add_argument("--no-decode", action="store_true", help="only check that files exist (fast)")
    s.add_argument(
        "--max-videos", type=at_least(0), default=None, help="open at most this many videos, a sample (default: all)"
    )
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s = add(
        da,
        "preprocess",
        cmd_data_preprocess,
        "decode and sample every video once into a frame cache (resumable; train/eval read it via data.cache_dir)",
        "vidret data preprocess data/msrvtt/train.jsonl --cache cache/msrvtt",
    )
    s.add_argument("manifest", help="a JSONL manifest")
    s.add_argument("--cache", required=True, help="cache folder (the config's data.cache_dir)")
    s.add_argument(
        "--image-size",
        type=at_least(1),
        default=224,
        help="frame side in px: the config's data.image_size, which a cache must match (pocket world: 64)",
    )
    s.add_argument(
        "--fps",
        type=at_least(0, float, above=True),
        default=1.0,
        help="candidate frames per second: the config's data.fps",
    )
    s.add_argument("--workers", type=at_least(0), default=2, help="decoding processes (0: in this process)")
    s.add_argument("--json", action="store_true", help="print the cache report as JSON")

    po = group("pocket", "the synthetic pocket world", "vidret pocket generate --out data/pocket")
    s = add(
        po,
        "generate",
        cmd_pocket_generate,
        "generate the pocket world (videos, manifests, pretraining images)",
        "vidret pocket generate --out data/pocket",
    )
    s.add_argument("--out", required=True, help="folder to write the world into (reused when already complete)")
    s.add_argument("--seed", type=int, default=0, help="the world's seed: the same seed, the same world")
    s.add_argument("--size", default="default", choices=["tiny", "small", "default"], help="how many clips and images")
    s.add_argument("--overwrite", action="store_true", help="replace a world made with another config or version")

    s = add(
        sub,
        "pretrain",
        cmd_pretrain,
        "pretrain the tiny pocket CLIP on the pocket image-caption set",
        "vidret pretrain --out pocket-small.safetensors",
    )
    s.add_argument("--out", required=True, help="checkpoint path: .safetensors (vidret layout) or .pt (OpenAI layout)")
    s.add_argument("--world", default=None, help="pocket world folder (default: generate the pretraining set only)")
    s.add_argument("--world-seed", type=int, default=0, help="seed of the generated pretraining set (default 0)")
    s.add_argument("--config", default="pocket-small", help="backbone architecture (default pocket-small)")
    s.add_argument("--steps", type=int, default=1200, help="optimiser steps (default 1200)")
    s.add_argument("--warmup", type=int, default=60, help="linear warmup steps before the cosine (default 60)")
    s.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (default 1e-3)")
    s.add_argument("--batch", type=int, default=128, help="image-caption pairs per step (default 128)")
    s.add_argument("--seed", type=int, default=0, help="model init and batch order (default 0)")
    s.add_argument("--store", choices=["fp16", "fp32"], default="fp16", help="dtype of a .safetensors output")
    s.add_argument("--eval-every", type=int, default=0, help="log held-out R@1 every N steps (default: at the end)")
    s.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the shipped file used 1)")

    overrides = "KEY=VALUE overrides of the config, dotted for nested keys (optim.lr=1e-4 data.num_workers=0)"
    s = add(
        sub,
        "train",
        cmd_train,
        "train a method from a config file; key=value overrides (e.g. optim.lr=1e-4)",
        "vidret train configs/pocket/mv_adapter.yaml max_steps=20 method_options.cmt_layers=[-2,-1]",
    )
    s.add_argument("config", help="YAML experiment file (configs/<dataset>/*.yaml, configs/pocket/*.yaml)")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides)
    s.add_argument("--resume", action="store_true", help="continue from out_dir's checkpoint (same config)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    s.add_argument("--dry-run", action="store_true", help="print the recipe card (vidret recipe) and train nothing")
    s.add_argument("--json", action="store_true", help="print the final summary (or with --dry-run the card) as JSON")

    s = add(
        sub,
        "recipe",
        cmd_recipe,
        "the effective recipe of a config: steps, lr schedule, parameter groups, frames",
        "vidret recipe configs/msrvtt/mv_adapter_ViT-B-16_paper.yaml --json",
    )
    s.add_argument("config", help="YAML experiment file (configs/...)")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides)
    s.add_argument("--json", action="store_true", help="print the card as JSON")

    s = add(
        sub,
        "eval",
        cmd_eval,
        "evaluate an adapter on a manifest: T2V/V2T R@1/5/10, MdR, MnR; frames, words, frame rule, protocol and "
        "frame size default to what the adapter recorded at training (a flag overrides, with a note)",
        "vidret eval --adapter runs/msrvtt/mv_adapter_ViT-B-16_paper/adapter --manifest data/msrvtt/test.jsonl",
    )
    s.add_argument("--adapter", required=True, help="adapter folder (a run's out_dir/adapter)")
    s.add_argument("--manifest", required=True, help="JSONL manifest of the test split")
    s.add_argument(
        "--backbone",
        default=None,
        help="backbone name or checkpoint (default: the one the adapter recorded; a recorded file path must be "
        "named here)",
    )
    recorded = "default: the adapter's recorded setting, else"
    s.add_argument(
        "--protocol", default=None, choices=["single", "multi", "paragraph"], help=f"test protocol ({recorded} single)"
    )
    s.add_argument("--frames", type=at_least(1), default=None, help=f"frames per video ({recorded} 12)")
    s.add_argument("--max-words", type=at_least(1), default=None, help=f"text length in tokens ({recorded} 32)")
    s.add_argument("--sampling", default=None, choices=EVAL_RULES, help=f"frame rule ({recorded} segment_centre)")
    s.add_argument("--workers", type=at_least(0), default=2, help="frame-loading worker processes (0: in this process)")
    s.add_argument(
        "--cache", default=None, help="frame cache folder from `vidret data preprocess` (default: decode every video)"
    )
    s.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    s.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
    s.add_argument("--pairs", default=None, help="reversal pairs JSON (pocket world test_pairs.json)")
    s.add_argument("--qb-bank", default=None, help="QB-Norm: manifest whose captions are the querybank (train split)")
    s.add_argument(
        "--qb-bank-size", type=at_least(1), default=None, help="QB-Norm: draw this many bank captions (seeded)"
    )
    s.add_argument(
        "--qb-k", type=at_least(1), default=1, help="QB-Norm: top-k of each bank query in the activation set"
    )
    s.add_argument(
        "--qb-beta",
        type=at_least(0, float, above=True),
        default=20.0,
        help="QB-Norm: inverse temperature (cosine scale)",
    )
    s.add_argument("--out", default=None, help="also write the results JSON to this file")
    s.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")

    s = add(sub, "plot", cmd_plot, "draw a run's loss and recall curves to PNG", "vidret plot runs/pocket/mv_adapter")
    s.add_argument("run", help="run folder (with metrics.jsonl)")
    s.add_argument("--out", default=None, help="PNG file to write (default: RUN/curves.png)")
    s.add_argument("--json", action="store_true", help='print {"written": path} as JSON')

    be = group("bench", "speed and memory benchmarks", "vidret bench train -- --help")
    for name, h, text in (
        ("decode", cmd_bench_decode, "raw decoding vs frame cache throughput"),
        ("train", cmd_bench_train, "training step time and peak memory of every method vs full fine-tuning"),
        ("encode", cmd_bench_encode, "video encoding throughput"),
        ("search", cmd_bench_search, "index and HTTP search latency"),
        ("moments", cmd_bench_moments, "moment localisation in long stitched pocket videos: windows vs whole videos"),
        ("hostpath", cmd_bench_hostpath, "CPU fast paths before/after: QuickGELU backward, host allocator"),
    ):
        s = add(be, name, h, text, f"vidret bench {name} -- --help")
        s.add_argument("rest", nargs=argparse.REMAINDER, help="benchmark options (see `vidret bench NAME -- --help`)")

    s = add(
        sub,
        "index",
        cmd_index,
        "encode a folder or manifest of videos into a searchable index",
        "vidret index --adapter runs/pocket/mv_adapter/adapter --manifest data/pocket/test.jsonl --out pocket_index",
    )
    s.add_argument("--adapter", required=True, help="adapter folder (a run's out_dir/adapter)")
    s.add_argument(
        "--backbone",
        default=None,
        help="backbone name or checkpoint (default: the one the adapter recorded; a recorded file path must be "
        "named here)",
    )
    s.add_argument("--videos", default=None, help="folder of videos, searched recursively (or --manifest)")
    s.add_argument("--manifest", default=None, help="JSONL manifest of the videos to index (or --videos)")
    s.add_argument("--out", required=True, help="index folder to write (or to update with --update)")
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
    s.add_argument("--workers", type=int, default=2, help="frame-loading worker processes (0: in this process)")
    s.add_argument("--backend", choices=["exact", "faiss"], default=None, help="search backend (default exact)")
    s.add_argument(
        "--nlist", type=int, default=None, help="FAISS IVF lists (default 0: 4 sqrt(N), at most 1024, from the size)"
    )
    s.add_argument(
        "--nprobe",
        type=int,
        default=None,
        help="FAISS lists probed per query (default 0: chosen from the size for recall@10 >= 0.95 on clustered data)",
    )
    s.add_argument("--dtype", choices=["float16", "float32"], default=None, help="feature storage (default float16)")
    s.add_argument("--cache", default=None, help="frame cache folder (default OUT/cache)")
    s.add_argument("--batch-size", type=int, default=16, help="videos encoded per batch")
    s.add_argument("--max-bad-fraction", type=float, default=0.25, help="stop if more videos than this are bad")
    s.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    s.add_argument(
        "--segment",
        type=float,
        default=None,
        metavar="SECONDS",
        help="index windows of SECONDS of each video instead of whole videos (moments: search then says where in "
        "a video; each window is a row, its id VIDEO#START-END); default: whole videos",
    )
    s.add_argument(
        "--stride",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --segment: seconds between window starts, at most --segment (default: half of --segment); "
        "the last window ends at the video's end",
    )
    s.add_argument("--json", action="store_true", help="print the build report as JSON")
    s = add(
        sub,
        "search",
        cmd_search,
        "search an index by sentence (or by a video file)",
        'vidret search pocket_index "a red circle moves to the right" -k 5',
    )
    s.add_argument("index", nargs="?", default=None, help="index folder (vidret index --out)")
    s.add_argument("query", nargs="?", default=None, help="the sentence to search for")
    s.add_argument("-k", type=int, default=10, help="how many results")
    s.add_argument("--video", default=None, help="query by a video file instead of text")
    s.add_argument(
        "--captions",
        default=None,
        metavar="BANK",
        help="with --video: rank these captions for the video instead of videos for it (video -> text); a text "
        'file with one caption per line, or a .jsonl of strings or {"caption": ...} objects',
    )
    s.add_argument(
        "--interactive",
        action="store_true",
        help="read queries from stdin, one per line, keeping the model loaded (answers follow each line; "
        "with --json one JSON object per line)",
    )
    s.add_argument(
        "--url",
        default=None,
        metavar="URL",
        help="ask a running `vidret serve` at URL (e.g. http://127.0.0.1:8000) instead of loading a model; "
        "INDEX then names the served index (optional)",
    )
    s.add_argument(
        "--quantize",
        action="store_true",
        help="int8 dynamic quantisation of the text tower's backbone Linears (CPU only; faster, recall may "
        "drop slightly: benchmarks/search.md)",
    )
    s.add_argument(
        "--group",
        choices=["video", "segment"],
        default="video",
        help="indexes built with --segment: 'video' gives the best window of each video, 'segment' every window "
        "ranked on its own",
    )
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.add_argument(
        "--backbone",
        default=None,
        help="backbone name or checkpoint (default: the one the index recorded; a recorded file path must be "
        "named here)",
    )
    s.add_argument("--adapter", default=None, help="adapter folder (default: the one recorded in the index)")
    s.add_argument("--backend", choices=["exact", "faiss"], default=None, help="override the index's backend")
    s.add_argument(
        "--nprobe", type=int, default=None, help="FAISS lists probed per query (default: the index's; 0: from the size)"
    )
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    s = add(
        sub,
        "serve",
        cmd_serve,
        "HTTP search service + web page over one or more indexes",
        "vidret serve pocket=pocket_index --port 8000",
    )
    s.add_argument("indexes", nargs="+", help="index folders (name=path to name them)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    s.add_argument(
        "--backbone",
        default=None,
        help="backbone name or checkpoint (default: the one each index recorded; a recorded file path must be "
        "named here)",
    )
    s.add_argument("--backend", choices=["exact", "faiss"], default=None, help="override the indexes' backend")
    s.add_argument(
        "--nprobe", type=int, default=None, help="FAISS lists probed per query (default: the index's; 0: from the size)"
    )
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
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
    s.add_argument(
        "--captions",
        default=None,
        metavar="BANK",
        help='a caption bank (.txt: one caption per line, or .jsonl of strings / {"caption": ...}) for '
        "GET /captions?index=NAME&video_id=ID&k=10: the captions that best describe an indexed video "
        "(video -> text; encoded once at start-up)",
    )
    return p


_BENCHES = {
    "decode": "vidret.bench.decode",
    "train": "vidret.bench.train",
    "encode": "vidret.bench.encode",
    "search": "vidret.bench.search",
    "moments": "vidret.bench.moments",
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
        except (VidretError, OSError) as e:
            return _failed(e)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    handler = getattr(args, "handler", None)
    if handler is None:
        # a group without its subcommand is a usage error: that group's help on stderr, exit 2
        with contextlib.redirect_stdout(sys.stderr), contextlib.suppress(SystemExit):
            parser.parse_args([*argv, "--help"])
        print(f"vidret: error: {' '.join(['vidret', *argv])} needs a subcommand (listed above)", file=sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except (VidretError, OSError) as e:
        return _failed(e)
    except KeyboardInterrupt:
        print("vidret: interrupted", file=sys.stderr)
        return 130


def _failed(e: VidretError | OSError) -> int:
    """A failure the user can fix: one line (the traceback too with VIDRET_DEBUG=1); exit code 1."""
    debug = os.environ.get("VIDRET_DEBUG", "") not in ("", "0")
    if debug:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    if isinstance(e, VidretError):
        print(f"vidret: error: {e}", file=sys.stderr)
    else:  # the operating system refused (permissions, a full disk, a vanished file): its words, and where
        where = f": {_norm(e.filename)}" if isinstance(e.filename, (str, os.PathLike)) else ""
        hint = "" if debug else " (VIDRET_DEBUG=1 shows where it happened)"
        print(f"vidret: error: {e.strerror or e}{where}{hint}", file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
