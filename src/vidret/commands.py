"""Handlers of the ``vidret`` subcommands: argparse Namespace -> library calls -> printed results.

The parser and the rules every subcommand follows (help, exit codes, stdout/stderr, ``--json``) are in
:mod:`vidret.cli`. Library modules are imported inside each handler so ``vidret --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vidret.errors import VidretError


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _norm(path: str | os.PathLike[str]) -> str:
    """A path as printed: normalised (``main/../shared/x`` -> ``shared/x``), never resolved through links."""
    return os.path.normpath(os.fspath(path))


def _print_written(args: argparse.Namespace, path: str | os.PathLike[str]) -> None:
    """The result of a command that writes one file: its path (``{"written": path}`` with --json)."""
    if args.json:
        _print_json({"written": os.path.abspath(path)})
    else:
        print(f"wrote {_norm(path)}")


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
    _print_written(args, out)
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
    from vidret.adapters.io import load_adapter, read_adapter_meta, recorded_eval_settings
    from vidret.eval.evaluate import evaluate_model, settings_for_adapter
    from vidret.eval.metrics import format_metrics
    from vidret.retrieval.build import load_backbone_spec, resolve_backbone
    from vidret.train.config import DataConfig
    from vidret.train.loop import resolve_device

    meta = read_adapter_meta(args.adapter)  # the tensors are read (and checked) once, by load_adapter
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
    _print_written(args, out)
    return 0


# ----------------------------------------------------------------------------- bench


# benchmark name -> the module whose main(argv) runs it (benchmarks own their options and --help)
BENCHES = {
    "decode": "vidret.bench.decode",
    "train": "vidret.bench.train",
    "encode": "vidret.bench.encode",
    "search": "vidret.bench.search",
    "moments": "vidret.bench.moments",
    "hostpath": "vidret.bench.hostpath",
}


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return int(importlib.import_module(BENCHES[args.bench]).main(args.rest) or 0)


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
