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

The handlers live in :mod:`vidret.commands`; library modules are imported inside each handler so ``vidret --help``
is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from vidret.commands import (
    BENCHES,
    _norm,
    cmd_adapters_list,
    cmd_adapters_report,
    cmd_backbone_convert,
    cmd_backbone_info,
    cmd_backbone_list,
    cmd_bench,
    cmd_data_check,
    cmd_data_convert,
    cmd_data_preprocess,
    cmd_demo,
    cmd_eval,
    cmd_index,
    cmd_plot,
    cmd_pocket_generate,
    cmd_pretrain,
    cmd_recipe,
    cmd_search,
    cmd_serve,
    cmd_train,
)
from vidret.errors import VidretError

Handler = Callable[[argparse.Namespace], int]
# deterministic frame rules (vidret.data.sampling.FrameRule less segment_random): eval / index --sampling
EVAL_RULES = ("segment_centre", "mvadapter_floor", "cma_linspace")


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
    s.add_argument(
        "name_or_path",
        help="a name from `vidret backbone list`, a checkpoint file or HF folder, or a Hugging Face Hub repo id "
        "(owner/name)",
    )
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
    s.add_argument(
        "run", help="run folder (with metrics.jsonl), or a `vidret demo` results.json to re-draw its comparison plot"
    )
    s.add_argument("--out", default=None, help="PNG file to write (default: RUN/curves.png, or results.png beside it)")
    s.add_argument("--json", action="store_true", help='print {"written": path} as JSON')

    be = group("bench", "speed and memory benchmarks", "vidret bench train -- --help")
    for name, text in (
        ("decode", "raw decoding vs frame cache throughput"),
        ("train", "training step time and peak memory of every method vs full fine-tuning"),
        ("encode", "video encoding throughput"),
        ("search", "index and HTTP search latency"),
        ("moments", "moment localisation in long stitched pocket videos: windows vs whole videos"),
        ("hostpath", "CPU fast paths before/after: QuickGELU backward, host allocator"),
    ):
        s = add(be, name, cmd_bench, text, f"vidret bench {name} -- --help")
        s.set_defaults(bench=name)
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


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP's default busy-waiting makes torch 8-10x slower when anything else shares the cores (measured:
    # a pocket-model step took 3.8 s instead of 0.46 s with a second process running); set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # glibc would unmap and re-fault every large activation each step (see host_memory.py for the figures)
    from vidret.host_memory import keep_freed_memory

    keep_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        # benchmarks own their options (and --help): hand them everything after the name
        import importlib

        rest = argv[2:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        try:
            return int(importlib.import_module(BENCHES[argv[1]]).main(rest) or 0)
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
