"""Before/after figures of the two CPU fast-path changes: ``vidret bench hostpath``.

1. QuickGELU's backward: autograd's graph of ``x * sigmoid(1.702 x)`` (seven elementwise passes) against the fused
   ``silu_backward`` form in ``backbone/clip.py``, on one [tokens, 4 * width] activation, in this process.
2. The host allocator (``host_memory.py``): the same training steps in two fresh processes, one with glibc's
   defaults (``VIDRET_MALLOC=system``) and one with freed memory kept; minor page faults, system CPU time and the
   median step time of each.

    vidret bench hostpath --backbone ViT-B-16 --method lora --frames 12 --batch 2 --steps 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vidret.bench.common import format_machine, machine_info, median, run_json_worker, write_result_json
from vidret.host_memory import ENV, keep_freed_memory


class _RecomputeGELU(torch.autograd.Function):
    """The previous QuickGELU (session 1): keeps x only and recomputes the sigmoid in a seven-pass backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(1.702 * x)
        return grad * s + torch.ops.aten.sigmoid_backward(grad * x, s) * 1.702


def time_gelu_backward(tokens: int, hidden: int, reps: int = 10, seed: int = 0) -> dict[str, float]:
    """Median ms of one QuickGELU backward on [tokens, hidden]: autograd's graph (keeps x and the sigmoid), the
    previous memory-saving form (keeps x, recomputes in seven passes) and the fused form (keeps x, one kernel)."""
    from vidret.backbone.clip import QuickGELU

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).requires_grad_()
    grad = torch.randn(tokens, hidden, generator=g)
    out: dict[str, float] = {}
    fns: dict[str, Callable[[Tensor], Tensor]] = {
        "graph": lambda t: t * torch.sigmoid(1.702 * t),
        "recompute": _RecomputeGELU.apply,
        "fused": QuickGELU(),
    }
    for name, fn in fns.items():
        times = []
        for _ in range(reps + 2):
            y = fn(x)
            t0 = time.perf_counter()
            torch.autograd.grad(y, x, grad)
            times.append(time.perf_counter() - t0)
            del y
        out[f"{name}_ms"] = 1000 * median(times[2:])
    out["speedup"] = out["graph_ms"] / out["fused_ms"]
    out["speedup_vs_recompute"] = out["recompute_ms"] / out["fused_ms"]
    return out


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Training steps of one method in this (fresh) process; the allocator mode comes from the environment."""
    from vidret.bench.train import TrainBenchConfig, _Bench, parse_method

    applied = keep_freed_memory()
    torch.set_num_threads(spec["threads"])
    cfg = TrainBenchConfig(
        backbone=spec["backbone"], methods=(spec["method"],), frames=spec["frames"], batch=spec["batch"],
        steps=spec["steps"], warmup=1,
    )  # fmt: skip
    bench = _Bench(cfg, parse_method(spec["method"]), torch.device("cpu"))
    bench.timed_step()  # warm-up: first-touch of weights and optimiser state
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = [bench.timed_step() for _ in range(spec["steps"])]
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "kept_memory": applied,
        "step_times_s": times,
        "median_step_s": median(times),
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "system_s": after.ru_stime - before.ru_stime,
        "user_s": after.ru_utime - before.ru_utime,
    }


def _run_worker(spec: dict[str, Any], system: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if system:
        env[ENV] = "system"
    return run_json_worker("vidret.bench.hostpath", spec, env, "hostpath worker")


def run_hostpath_benchmark(
    backbone: str, method: str, frames: int, batch: int, steps: int, threads: int, allocator: bool = True
) -> dict[str, Any]:
    from vidret.backbone.clip import get_config

    torch.set_num_threads(threads)
    vision = get_config(backbone).vision
    tokens = batch * frames * ((vision.image_size // vision.patch_size) ** 2 + 1)
    spec = dict(backbone=backbone, method=method, frames=frames, batch=batch, steps=steps, threads=threads)
    return {
        "benchmark": "hostpath",
        "config": spec,
        "machine": machine_info(),
        "gelu_shape": [tokens, 4 * vision.width],
        "gelu_backward": time_gelu_backward(tokens, 4 * vision.width),
        "allocator": {"system": _run_worker(spec, system=True), "kept": _run_worker(spec, system=False)}
        if allocator
        else None,
    }


def format_hostpath_benchmark(r: dict[str, Any]) -> str:
    c, g = r["config"], r["gelu_backward"]
    lines = [
        f"QuickGELU backward on {r['gelu_shape'][0]} x {r['gelu_shape'][1]} fp32 ({r['machine']['host_allocator']}): "
        f"autograd graph {g['graph_ms']:.1f} ms, previous recompute form {g['recompute_ms']:.1f} ms, fused "
        f"{g['fused_ms']:.1f} ms ({g['speedup']:.2f}x and {g['speedup_vs_recompute']:.2f}x faster)",
    ]
    if r["allocator"] is None:
        return "\n".join([*lines, "", format_machine(r["machine"])])
    sysd, kept = r["allocator"]["system"], r["allocator"]["kept"]
    lines += [
        "",
        f"{c['method']} on {c['backbone']}, {c['batch']} videos x {c['frames']} frames, {c['steps']} steps after one "
        f"warm-up, {c['threads']} threads, each allocator in its own process:",
        "",
        "| host allocator | median step s | minor page faults | system CPU s | user CPU s |",
        "|---|---|---|---|---|",
    ]
    for name, row in (("glibc default (VIDRET_MALLOC=system)", sysd), ("freed memory kept (vidret default)", kept)):
        lines.append(
            f"| {name} | {row['median_step_s']:.2f} | {row['minor_faults']:,} | {row['system_s']:.1f} | "
            f"{row['user_s']:.1f} |"
        )
    lines += ["", format_machine(r["machine"])]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from vidret.cli import HelpFormatter, example_epilog

    p = argparse.ArgumentParser(
        prog="vidret bench hostpath",
        description=__doc__.split("\n\n")[0],
        epilog=example_epilog("vidret bench hostpath --backbone pocket-small --steps 2 --out hostpath.json"),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--backbone", default="ViT-B-16", help="named architecture (random weights)")
    p.add_argument("--method", default="lora", help="method spec as in `vidret bench train`")
    p.add_argument("--frames", type=int, default=12, help="T frames per video")
    p.add_argument("--batch", type=int, default=2, help="B videos per step")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()), help="torch threads")
    p.add_argument("--no-allocator", action="store_true", help="only the QuickGELU part")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        res = _worker(json.loads(Path(args.worker[0]).read_text()))
        Path(args.worker[1]).write_text(json.dumps(res))
        return 0
    keep_freed_memory()  # the in-process GELU timing runs as the `vidret` command would
    r = run_hostpath_benchmark(
        args.backbone, args.method, args.frames, args.batch, args.steps, args.threads, not args.no_allocator
    )
    print(format_hostpath_benchmark(r))
    if args.out:
        write_result_json(args.out, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
