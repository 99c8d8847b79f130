"""Video-encoding benchmark: frames/s of ``encode_video`` (inference, no grad) and achieved TFLOP/s.

    vidret bench encode --backbone ViT-B-16 [--methods frozen,mv_adapter] --frames 12 --batch 8
                        [--precision auto|fp32|bf16] [--steps 5] [--warmup 2] [--device auto|cpu|cuda]
                        [--compile] [--peak-tflops X] [--out result.json]

Every method is built on its own random backbone; all are warmed up, then each round times one
``encode_video`` call of every method in rotating order (one process, same load for all). Frames are encoded
as one [B*T] image batch, as ``VideoTextModel.encode_video`` does.

FLOPs per frame are counted two ways: analytically for the backbone's vision tower (``VIT_FLOPS_FORMULA`` in
``bench/common.py``: 2 FLOPs per multiply-add of every Linear and the patch convolution, plus 4*N^2*D per layer
for attention's QK^T and AV; LayerNorm, softmax and activations are left out), and with torch's FLOP counter on
the real model (which includes the adapter's matmuls). Achieved TFLOP/s = FLOPs per frame x frames/s. On a GPU
the table also gives the fraction of the device's dense bf16 peak (data sheet, ``BF16_PEAK_TFLOPS``, or
``--peak-tflops``) and of a measured square bf16 GEMM, the practical ceiling.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from vidret.bench.common import (
    VIT_FLOPS_FORMULA,
    count_flops,
    fmt_table,
    format_machine,
    machine_info,
    measure_gemm_tflops,
    median,
    resolve_device,
    resolve_precision,
    sync,
    synthetic_batch,
    vit_forward_flops,
    write_result_json,
)
from vidret.errors import VidretError


class _Encoder:
    """One method on its own random backbone, in eval mode, encoding a fixed synthetic batch of videos."""

    def __init__(self, spec: str, backbone: str, frames: int, batch: int, precision: str, device: torch.device,
                 compile_model: bool, seed: int) -> None:  # fmt: skip
        from vidret.backbone.clip import create_backbone, get_config
        from vidret.bench.train import method_options, parse_method
        from vidret.model import build_model
        from vidret.train.loop import autocast_for

        self.run = parse_method(spec)
        self.device, self.precision = device, precision
        bcfg = get_config(backbone)
        self.config = bcfg
        clip = create_backbone(bcfg, seed=seed)
        self.model = build_model(clip, self.run.method, preset=self.run.preset,
                                 **method_options(self.run, bcfg, frames, 32))  # fmt: skip
        self.model.set_frozen_prefix(True)
        self.model.to(device).eval()
        data = synthetic_batch(batch, frames, bcfg.vision.image_size, 2, seed=seed)
        self.frames = data["frames"].to(device)  # [B, T, 3, S, S]
        self.mask = data["frame_mask"].to(device)  # [B, T]
        self.n_frames = batch * frames
        self._autocast = lambda: autocast_for(device, precision)
        self.encode: Any = torch.compile(self.model.encode_video) if compile_model else self.model.encode_video

    @torch.no_grad()
    def call(self) -> None:
        with self._autocast():
            self.encode(self.frames, self.mask)

    def timed(self) -> float:
        t0 = time.perf_counter()
        self.call()
        sync(self.device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def counted_flops(self) -> int:
        def fn() -> None:
            with self._autocast():
                self.model.encode_video(self.frames, self.mask)

        return count_flops(fn)[1]


def run_encode_benchmark(
    backbone: str = "ViT-B-16",
    methods: tuple[str, ...] = ("frozen",),
    frames: int = 12,
    batch: int = 8,
    precision: str = "auto",
    steps: int = 5,
    warmup: int = 2,
    device: str = "auto",
    compile_model: bool = False,
    peak_tflops: float | None = None,
    threads: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Frames/s and TFLOP/s of video encoding for each method spec (see ``bench.train.parse_method``)."""
    if frames < 1 or batch < 1 or steps < 1 or warmup < 0:
        raise VidretError("frames, batch and steps must be >= 1, warmup >= 0")
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    from vidret.bench.train import expand_methods

    specs = [r.label for r in expand_methods(methods)]
    machine = machine_info(dev)
    peak = peak_tflops if peak_tflops is not None else machine.get("gpu_bf16_peak_tflops")
    gemm_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
    gemm = measure_gemm_tflops(dev, gemm_dtype, n=4096 if dev.type == "cuda" else 1024)

    encoders = [_Encoder(s, backbone, frames, batch, prec, dev, compile_model, seed) for s in specs]
    flops_counted = {e.run.label: e.counted_flops() // e.n_frames for e in encoders}
    for e in encoders:
        for _ in range(warmup):
            e.call()
    sync(dev)
    times: dict[str, list[float]] = {e.run.label: [] for e in encoders}
    for i in range(steps):
        for j in range(len(encoders)):
            e = encoders[(i + j) % len(encoders)]
            times[e.run.label].append(e.timed())

    analytic = vit_forward_flops(encoders[0].config.vision, encoders[0].config.embed_dim)
    rows = []
    for e in encoders:
        t = median(times[e.run.label])
        fps = e.n_frames / t
        row: dict[str, Any] = {
            "label": e.run.label,
            "method": e.run.method,
            "preset": e.run.preset,
            "times_s": times[e.run.label],
            "median_s": t,
            "frames_per_s": fps,
            "backbone_flops_per_frame": analytic.total,
            "counted_flops_per_frame": flops_counted[e.run.label],
            "backbone_tflops": analytic.total * fps / 1e12,
            "counted_tflops": flops_counted[e.run.label] * fps / 1e12,
        }
        row["fraction_of_peak"] = row["counted_tflops"] / peak if peak else None
        row["fraction_of_gemm"] = row["counted_tflops"] / gemm
        rows.append(row)
    return {
        "benchmark": "encode",
        "backbone": backbone,
        "frames": frames,
        "batch": batch,
        "precision": prec,
        "device": str(dev),
        "compile": compile_model,
        "steps": steps,
        "warmup": warmup,
        "machine": machine,
        "peak_tflops": peak,
        "gemm_tflops_measured": gemm,
        "flops_formula": VIT_FLOPS_FORMULA,
        "analytic_flops_per_frame": {
            "patch_embed": analytic.patch_embed,
            "linears": analytic.linears,
            "attention": analytic.attention,
            "projection": analytic.projection,
            "total": analytic.total,
        },
        "results": rows,
    }


def format_encode_benchmark(result: dict[str, Any]) -> str:
    peak = result["peak_tflops"]
    head = ["method", "preset", "ms / batch", "frames/s", "GFLOP/frame (formula / counted)", "TFLOP/s (counted)",
            "% of measured GEMM", "% of bf16 peak"]  # fmt: skip
    rows = [
        [
            r["label"],
            r["preset"] or "-",
            f"{1000 * r['median_s']:.1f}",
            f"{r['frames_per_s']:.1f}",
            f"{r['backbone_flops_per_frame'] / 1e9:.2f} / {r['counted_flops_per_frame'] / 1e9:.2f}",
            f"{r['counted_tflops']:.3f}",
            f"{100 * r['fraction_of_gemm']:.0f}%",
            f"{100 * r['fraction_of_peak']:.1f}%" if r["fraction_of_peak"] is not None else "-",
        ]
        for r in result["results"]
    ]
    lines = [
        f"vidret bench encode: {result['backbone']}, {result['batch']} videos x {result['frames']} frames per call, "
        f"{result['precision']}, device {result['device']}{', torch.compile' if result['compile'] else ''}; "
        f"median of {result['steps']} interleaved rounds after {result['warmup']} warm-up calls",
        "",
        fmt_table(head, rows),
        "",
        f"measured square GEMM: {result['gemm_tflops_measured']:.3f} TFLOP/s; bf16 peak: "
        + (f"{peak} TFLOP/s" if peak else "n/a (no GPU, or unknown GPU: pass --peak-tflops)"),
        f"FLOP formula: {result['flops_formula']}",
        format_machine(result["machine"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``vidret bench encode``: print the table and optionally write JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `vidret bench encode -- --backbone ...` passes the separator through
        argv = argv[1:]
    from vidret.cli import HelpFormatter, example_epilog

    ap = argparse.ArgumentParser(
        prog="vidret bench encode",
        description=__doc__.split("\n\n")[0],
        epilog=example_epilog("vidret bench encode --backbone pocket-small --methods frozen mv_adapter --steps 2"),
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--backbone", default="ViT-B-16", help="named architecture (random weights)")
    ap.add_argument("--methods", nargs="+", default=["frozen"], help="method specs, or 'all'")
    ap.add_argument("--frames", type=int, default=12, help="T frames per video")
    ap.add_argument("--batch", type=int, default=8, help="B videos per forward pass")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--compile", action="store_true", help="torch.compile encode_video")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak (default: data-sheet table)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = current)")
    ap.add_argument("--seed", type=int, default=0, help="random weights and inputs")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    result = run_encode_benchmark(
        backbone=args.backbone,
        methods=tuple(args.methods),
        frames=args.frames,
        batch=args.batch,
        precision=args.precision,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        compile_model=args.compile,
        peak_tflops=args.peak_tflops,
        threads=args.threads,
        seed=args.seed,
    )
    print(format_encode_benchmark(result))
    if args.out:
        write_result_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
