"""``vidret demo``: the papers' comparison, end to end, on the offline pocket world (POCKET.md).

1. generate the pocket world (real h264 files + manifests) unless it is already there;
2. pretrain the tiny pocket CLIP on static image-caption pairs (or reuse it);
3. train frozen / full / mv_adapter / cross_modal / lora / bottleneck with the same budget (steps, batch, data);
4. evaluate each on the test split, including the time-reversed hard-negative pairs;
5. print the comparison table and write it as Markdown + JSON + a PNG plot.

Everything runs through the same code paths as a real ViT-B/16 run: the loader reads the pretrained
checkpoint as an OpenAI ``.pt``, training goes through ``vidret.train.loop.train`` with a config file.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vidret.errors import VidretError

log = logging.getLogger(__name__)

# Per-method settings on the pocket world. Learning rates differ by design (as in the papers: full
# fine-tuning uses a much smaller lr than adapters); everything else - data, steps, batch - is equal.
# Chosen from short sweeps on this world (benchmarks/pocket.md): full 1e-4 -> 3e-4 and adapters 1e-3 -> 3e-3
# both helped within the demo's budget.
POCKET_METHODS: dict[str, dict[str, Any]] = {
    "frozen": {},
    "full": {"lr": 3e-4},
    "mv_adapter": {"lr": 3e-3, "backbone_lr": 1e-4, "options": {"r": 32, "cmt_layers": [2, 3], "num_frames": 8}},
    "cross_modal": {"lr": 3e-3, "options": {"r": 16, "share_dim": 16}},
    "lora": {"lr": 3e-3, "options": {"r": 8}},
    "bottleneck": {"lr": 3e-3, "options": {"r": 32}},
}


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs."""

    out: str = "demo_out"  # everything goes here (world/, backbone.pt, runs/, results.*)
    quick: bool = False  # a much smaller world and budget (tests, smoke runs)
    seed: int = 0
    methods: tuple[str, ...] = tuple(POCKET_METHODS)
    backbone_config: str = "pocket-small"
    pretrain_steps: int = 400
    train_epochs: int = 3
    global_batch: int = 32
    num_workers: int = 0  # frames come from the frame cache: reading them in-process beats worker start-up
    extra: dict[str, Any] = field(default_factory=dict)

    def scaled(self) -> DemoConfig:
        """The quick variant: tiny world, tiny budget; same code paths."""
        if not self.quick:
            return self
        return replace(self, pretrain_steps=20, train_epochs=1, global_batch=8, num_workers=0)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}"


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict[str, Any]:
    """Run the whole comparison; returns the results dict (also written to ``out/results.json``)."""
    from vidret.data.pocket import PocketConfig, generate_pocket_world
    from vidret.train.config import DataConfig, OptimConfig, TrainConfig
    from vidret.train.loop import train
    from vidret.train.pretrain import PretrainConfig, pretrain

    cfg = cfg.scaled()
    # The pocket models are tiny: one thread beats two on a 2-core machine (0.29 s vs 0.46 s per
    # pretraining step measured here) and cannot be starved by other processes.
    torch.set_num_threads(1)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    # 1. the world
    world_dir = out / "world"
    pocket_cfg = PocketConfig.from_size("tiny" if cfg.quick else "default", seed=cfg.seed)
    t0 = time.perf_counter()
    world = generate_pocket_world(world_dir, pocket_cfg)
    how = "reused" if world.reused else f"generated in {time.perf_counter() - t0:.1f}s"
    print(f"[1/4] pocket world: {world_dir} ({how})")

    # 2. the backbone
    ckpt = out / f"{cfg.backbone_config}-pocket.pt"
    if ckpt.exists():
        print(f"[2/4] pocket CLIP: reusing {ckpt}")
    else:
        t0 = time.perf_counter()
        pretrain(
            PretrainConfig(
                world=str(world_dir),
                out=str(ckpt),
                config=cfg.backbone_config,
                steps=cfg.pretrain_steps,
                seed=cfg.seed,
                batch=min(128, 16 if cfg.quick else 128),
            ),
            progress=progress,
        )
        print(f"[2/4] pocket CLIP pretrained in {time.perf_counter() - t0:.1f}s -> {ckpt}")

    # 3. + 4. train and evaluate every method with the same budget
    rows: list[dict[str, Any]] = []
    data = DataConfig(
        train_manifest=str(world.manifests["train"]),
        test_manifest=str(world.manifests["test"]),
        num_frames=pocket_cfg.frames,
        fps=float(pocket_cfg.fps),
        image_size=pocket_cfg.image_size,
        max_words=32,
        num_workers=cfg.num_workers,
        cache_dir=str(out / "frame_cache"),
    )
    # Decode + sample every clip once, in parallel processes, before any training (the frame cache).
    from vidret.data.cache import FrameCache, preprocess
    from vidret.data.manifest import read_manifest
    from vidret.data.sampling import SamplingConfig

    t0 = time.perf_counter()
    cache = FrameCache(data.cache_dir, SamplingConfig(num_frames=data.num_frames, fps=data.fps), data.image_size)
    entries = read_manifest(data.train_manifest) + read_manifest(data.test_manifest)
    cache_report = preprocess(entries, cache, num_workers=0 if cfg.quick else 2, progress=progress)
    print(f"[3/4] frame cache: {len(entries)} clips in {time.perf_counter() - t0:.1f}s ({cache.root})")
    for method in cfg.methods:
        if method not in POCKET_METHODS:
            raise VidretError(f"unknown demo method {method!r}; choose from {sorted(POCKET_METHODS)}")
        settings = POCKET_METHODS[method]
        run_dir = out / "runs" / method
        tcfg = TrainConfig(
            backbone=str(ckpt),
            method=method,
            method_options=dict(settings.get("options", {})),
            data=data,
            optim=OptimConfig(lr=settings.get("lr", 1e-4), backbone_lr=settings.get("backbone_lr")),
            epochs=cfg.train_epochs,
            global_batch=cfg.global_batch,
            precision="fp32",
            seed=cfg.seed,
            out_dir=str(run_dir),
            checkpoint_every=0,
            log_every=5,
            device="cpu",
        )
        row = _train_and_eval(tcfg, world.pairs_file, progress, train)
        rows.append(row)
        print(
            f"[4/4] {method:12s} T2V R@1 {row['t2v']['R1']:5.1f}  reversed pairs {row['pair_accuracy']:5.1f}%  "
            f"trainable {row['trainable']:,} ({row['percent']:.2f}%)  {row['train_seconds']:.0f}s"
        )

    results = {
        "command": "vidret demo" + (" --quick" if cfg.quick else ""),
        "machine": _machine(),
        "seed": cfg.seed,
        "world": pocket_cfg.to_dict(),
        "backbone": cfg.backbone_config,
        "budget": {
            "epochs": cfg.train_epochs,
            "global_batch": cfg.global_batch,
            "train_videos": world.counts.get("train"),
            "test_videos": world.counts.get("test"),
        },
        "rows": rows,
        "frame_cache": cache_report.to_dict(),
        "total_seconds": time.perf_counter() - t_all,
    }
    md = format_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(md)
    plot_path = _plot(results, out / "results.png")
    print("\n" + md)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}" + (f", {plot_path}" if plot_path else ""))
    return results


def _train_and_eval(tcfg: Any, pairs_file: Path, progress: bool, train_fn: Any) -> dict[str, Any]:
    import shutil

    from vidret.adapters.io import load_adapter
    from vidret.eval.evaluate import evaluate_model
    from vidret.model import parameter_report
    from vidret.train.loop import load_backbone_for

    run_dir = Path(tcfg.out_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # each demo run starts clean; the world and backbone are reused
    if tcfg.method == "frozen":
        # nothing to train: evaluate the zero-shot model directly
        from vidret.adapters.io import save_adapter
        from vidret.model import build_model

        clip = load_backbone_for(tcfg.backbone)
        model = build_model(clip, "frozen")
        save_adapter(model, run_dir / "adapter")
        train_seconds, peak = 0.0, 0
    else:
        result = train_fn(replace(tcfg, data=replace(tcfg.data, test_manifest="")), progress=progress)
        # Peak memory is per method only on CUDA; a CPU process's peak RSS never shrinks between methods,
        # so it is not reported here (benchmarks/efficiency.md measures each method in its own process).
        train_seconds = result.train_seconds
        peak = result.peak_memory_bytes if torch.cuda.is_available() else 0
        clip = load_backbone_for(tcfg.backbone)
        model = load_adapter(clip, run_dir / "adapter")
    res = evaluate_model(model, tcfg.data.test_manifest, tcfg.data, device="cpu", pairs_file=pairs_file)
    rep = parameter_report(model)
    size = sum(f.stat().st_size for f in (run_dir / "adapter").iterdir())
    (run_dir / "results.json").write_text(json.dumps(res, indent=2))
    return {
        "method": tcfg.method,
        "t2v": res["t2v"],
        "v2t": res["v2t"],
        "pair_accuracy": res.get("reversal", {}).get("pair_accuracy", float("nan")),
        "trainable": rep["trainable"],
        "percent": rep["percent"],
        "adapter_bytes": size,
        "train_seconds": train_seconds,
        "peak_memory_bytes": peak,
    }


def format_table(results: dict[str, Any]) -> str:
    """The POCKET.md comparison table as Markdown."""
    lines = [
        "| method | T2V R@1 | R@5 | R@10 | MdR | MnR | V2T R@1 | R@5 | R@10 | MdR | MnR | reversed pairs % "
        "| trainable | % | adapter file | train s | peak mem |",
        "|---|" + "---:|" * 16,
    ]
    for r in results["rows"]:
        t, v = r["t2v"], r["v2t"]
        lines.append(
            f"| {r['method']} | {t['R1']:.1f} | {t['R5']:.1f} | {t['R10']:.1f} | {t['MdR']:.1f} | {t['MnR']:.1f} "
            f"| {v['R1']:.1f} | {v['R5']:.1f} | {v['R10']:.1f} | {v['MdR']:.1f} | {v['MnR']:.1f} "
            f"| {r['pair_accuracy']:.1f} | {r['trainable']:,} | {r['percent']:.2f} | {_bytes(r['adapter_bytes'])} "
            f"| {r['train_seconds']:.0f} | {_bytes(r['peak_memory_bytes']) if r['peak_memory_bytes'] else 'n/a'} |"
        )
    return "\n".join(lines) + "\n"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _plot(results: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the [plot] extra is optional
        return None
    rows = results["rows"]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(names, [r["t2v"]["R1"] for r in rows], color="tab:blue", label="T2V R@1")
    axes[0].plot(names, [r["pair_accuracy"] for r in rows], "o-", color="tab:red", label="reversed pairs %")
    axes[0].axhline(50, ls="--", color="grey", lw=0.8)
    axes[0].set_ylabel("%")
    axes[0].set_title("pocket world test split")
    axes[0].legend()
    axes[0].tick_params(axis="x", rotation=30)
    axes[1].scatter([max(r["trainable"], 1) for r in rows], [r["t2v"]["R1"] for r in rows])
    for r in rows:
        axes[1].annotate(r["method"], (max(r["trainable"], 1), r["t2v"]["R1"]))
    axes[1].set_xscale("log")
    axes[1].set_xlabel("trainable parameters")
    axes[1].set_ylabel("T2V R@1")
    axes[1].set_title("quality vs parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
