"""``vidret demo``: the papers' comparison, end to end, on the offline pocket world (POCKET.md).

1. generate the pocket world's video splits (real h264 files + manifests) unless they are already there;
2. load the pocket CLIP that ships with the package (``pocket-small``, by name, through the normal loader);
3. decode every clip once into the frame cache;
4. measure how much of the retrieval signal is static (single-frame oracles, once per world);
5. train frozen / full / mv_adapter / cross_modal / lora / bottleneck with the same budget (steps, batch, data),
   once per seed, and evaluate each on the test split with tie-aware metrics and the time-reversed pairs;
6. print the comparison table (mean +- std over seeds) and write it as Markdown + JSON + a PNG plot.

Metrics are tie-aware: a ground truth tied with other items (an order-blind model always ties a clip with its
time-reversed twin) is ranked at its expected position under a random tie-break, so R@1 counts such a tie as
half a hit (``vidret.eval.metrics.metrics_from_rank_bounds``). Scores within ``TIE_TOL`` logits of the ground
truth's count as tied: a mean over the same frames in another order differs only in rounding.

The table depends only on the seed(s) and the machine (bit for bit); times are reported apart from it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vidret.errors import VidretError

log = logging.getLogger(__name__)

TIE_TOL = 1e-3  # logits (scale 100): scores closer than this to the ground truth's count as tied
# Per-method settings on the pocket world: each PETL method's "pocket" preset (<= 10% of pocket-small's
# non-embedding parameters). Learning rates differ by design (as in the papers: full fine-tuning uses a much smaller
# lr than adapters); everything else - data, steps, batch - is equal. Chosen from short sweeps (benchmarks/pocket.md).
POCKET_METHODS: dict[str, dict[str, Any]] = {
    "frozen": {},
    "full": {"lr": 3e-4},
    "mv_adapter": {"lr": 3e-3, "backbone_lr": 1e-4, "preset": "pocket"},
    "cross_modal": {"lr": 3e-3, "preset": "pocket"},
    "lora": {"lr": 3e-3, "preset": "pocket"},
    "bottleneck": {"lr": 3e-3, "preset": "pocket"},
    # not in the default run (time): vidret demo --methods st_adapter convpass prompt
    "st_adapter": {"lr": 3e-3, "preset": "pocket"},
    "convpass": {"lr": 3e-3, "preset": "pocket"},
    "prompt": {"lr": 3e-3, "preset": "pocket"},
}
DEFAULT_METHODS = ("frozen", "full", "mv_adapter", "cross_modal", "lora", "bottleneck")
QUICK_WORLD = {"pretrain_images": 0, "train_clips": 64, "test_clips": 16}  # the --quick world (tests)
# pool per-frame features without looking at their order (ST-Adapter's temporal conv and MV-Adapter's TRM do look)
ORDER_BLIND = ("frozen", "full", "cross_modal", "lora", "bottleneck", "convpass", "prompt")


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs."""

    out: str = "demo_out"  # everything goes here (world/, frame_cache/, runs/, results.*)
    quick: bool = False  # the tiny world and a tiny budget (tests, smoke runs); same code paths
    seeds: tuple[int, ...] = (0,)  # training seeds; the table gives mean and std over them when there are several
    world_seed: int = 0  # the pocket world (one world for every training seed)
    methods: tuple[str, ...] = DEFAULT_METHODS
    backbone: str = "pocket-small"  # pretrained name (shipped with the package) or a checkpoint path
    train_epochs: int = 3  # 3 x 62 = 186 optimiser steps on the default world
    global_batch: int = 32
    max_words: int = 48  # every pocket caption fits (pocket_scenes.CAPTION_TOKENS)
    num_workers: int = 0  # frames come from the frame cache: reading them in-process beats worker start-up
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise VidretError(f"seeds must be distinct non-negative integers, got {list(self.seeds)}")
        unknown = [m for m in self.methods if m not in POCKET_METHODS]
        if unknown or not self.methods:
            raise VidretError(f"unknown demo method(s) {unknown}; choose from {list(POCKET_METHODS)}")

    def scaled(self) -> DemoConfig:
        """The quick variant: tiny world, tiny budget; same code paths."""
        if not self.quick:
            return self
        return replace(self, train_epochs=2, global_batch=8, num_workers=0)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}"


def _load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:  # not available on this platform
        return "load average n/a"


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict[str, Any]:
    """Run the whole comparison; returns the results dict (also written to ``out/results.json``)."""
    from vidret.backbone.pretrained import PRETRAINED, load_backbone
    from vidret.data.cache import FrameCache, preprocess
    from vidret.data.manifest import read_manifest
    from vidret.data.pocket import PocketConfig, generate_pocket_world, load_reversal_pairs
    from vidret.train.config import DataConfig

    cfg = cfg.scaled()
    # The pocket models are tiny: one thread beats two on a 2-core machine and cannot be starved by other
    # processes; it also makes every number reproducible bit for bit on a machine.
    torch.set_num_threads(1)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    times: dict[str, float] = {}
    load_at_start = _load()

    # 1. the world (the pretraining images are not needed: the backbone ships with the package)
    world_dir = out / "world"
    pocket_cfg = replace(PocketConfig(seed=cfg.world_seed), pretrain_images=0)
    if cfg.quick:  # 64 training clips, 16 test clips + 8 reversed twins: seconds per method
        pocket_cfg = replace(PocketConfig.from_size("tiny", seed=cfg.world_seed), **QUICK_WORLD)
    t0 = time.perf_counter()
    world = generate_pocket_world(world_dir, pocket_cfg, overwrite=True)
    times["world"] = time.perf_counter() - t0
    how = "reused" if world.reused else f"generated in {times['world']:.1f}s"
    print(f"[1/5] pocket world: {world_dir} ({how}; {world.counts['train']} train clips, {world.counts['test']} test)")

    # 2. the backbone: loaded by name, as a real CLIP would be
    t0 = time.perf_counter()
    clip0 = load_backbone(cfg.backbone)
    times["backbone"] = time.perf_counter() - t0
    shipped = _shipped_summary(cfg.backbone)
    src = PRETRAINED.get(cfg.backbone)
    print(
        f"[2/5] backbone {cfg.backbone}: loaded in {times['backbone']:.1f}s"
        + (f" (sha256 {src.sha256[:12]}...)" if src else "")
        + (
            f"; held-out static R@1 {shipped['i2t_R1']:.1f} image->caption, {shipped['t2i_R1']:.1f} caption->image"
            if shipped
            else ""
        )
    )

    # 3. the frame cache: decode + sample every clip once, in parallel processes, before any training
    data = DataConfig(
        train_manifest=str(world.manifests["train"]),
        test_manifest=str(world.manifests["test"]),
        num_frames=pocket_cfg.frames,
        fps=float(pocket_cfg.fps),
        image_size=pocket_cfg.image_size,
        max_words=cfg.max_words,
        num_workers=cfg.num_workers,
        cache_dir=str(out / "frame_cache"),
    )
    from vidret.data.sampling import SamplingConfig

    t0 = time.perf_counter()
    cache = FrameCache(data.cache_dir, SamplingConfig(num_frames=data.num_frames, fps=data.fps), data.image_size)
    entries = read_manifest(data.train_manifest) + read_manifest(data.test_manifest)
    cache_report = preprocess(entries, cache, num_workers=0 if cfg.quick else 2, progress=progress)
    times["frame_cache"] = time.perf_counter() - t0
    print(f"[3/5] frame cache: {len(entries)} clips in {times['frame_cache']:.1f}s ({cache.root})")

    # 4. how much of the signal is static, and what an order-blind model can reach at best
    t0 = time.perf_counter()
    test_entries = read_manifest(data.test_manifest)
    pairs = load_reversal_pairs(world_dir)
    oracle = static_oracle(world_dir, clip0, test_entries, data)
    times["oracle"] = time.perf_counter() - t0
    first, first_static = oracle["frozen_first_frame"]["R1"], oracle["frozen_first_frame_static"]["R1"]
    print(
        f"[4/5] static signal: a perfect first-frame matcher gets T2V R@1 {oracle['first_frame_ceiling']:.1f}, a "
        f"perfect order-blind model {oracle['order_blind_ceiling']:.1f}; the frozen CLIP on the first frame alone "
        f"{first:.1f} (static clause only: {first_static:.1f})"
    )
    del clip0

    # 5. train and evaluate every method with the same budget, once per seed
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.methods}
    for seed in cfg.seeds:
        for method in cfg.methods:
            row = _train_and_eval(method, cfg, data, seed, out, test_entries, pairs, progress)
            runs[method].append(row)
            print(
                f"[5/5] seed {seed} {method:12s} T2V R@1 {row['t2v']['R1']:5.1f}  reversed pairs "
                f"{row['pair_accuracy']:5.1f}%  trainable {row['trainable']:,} ({row['percent_non_embedding']:.2f}% of "
                f"non-embedding)  train {row['train_seconds']:.0f}s"
            )
    rows = [aggregate(method, runs[method]) for method in cfg.methods]
    times["total"] = time.perf_counter() - t_all
    command = (
        "vidret demo"
        + (" --quick" if cfg.quick else "")
        + (" --seeds " + " ".join(map(str, cfg.seeds)) if cfg.seeds != (0,) else "")
    )
    results = {
        "command": command,
        "machine": _machine(),
        "load": {"start": load_at_start, "end": _load()},
        "seeds": list(cfg.seeds),
        "world": pocket_cfg.to_dict(),
        "backbone": {"name": cfg.backbone, "sha256": src.sha256 if src else None, "holdout": shipped},
        "budget": {
            "epochs": cfg.train_epochs,
            "global_batch": cfg.global_batch,
            "steps": _steps(world.counts.get("train", 0), cfg),
            "train_videos": world.counts.get("train"),
            "test_videos": world.counts.get("test"),
            "reversal_pairs": len(pairs),
            "max_words": data.max_words,
        },
        "tie_tolerance": TIE_TOL,
        "oracle": oracle,
        "rows": rows,
        "runs": runs,
        "frame_cache": cache_report.to_dict(),
        "seconds": times,
    }
    md = format_table(results) + "\n" + format_ties(results) + "\n" + format_times(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(md)
    plot_path = _plot(results, out / "results.png")
    print("\n" + md)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}" + (f", {plot_path}" if plot_path else ""))
    return results


def _steps(n_train: int, cfg: DemoConfig) -> int:
    return (n_train // cfg.global_batch) * cfg.train_epochs


def _shipped_summary(backbone: str) -> dict[str, float] | None:
    """The held-out static recall recorded beside a shipped (or local) checkpoint, if any."""
    from vidret.backbone.pretrained import PRETRAINED, packaged_path

    src = PRETRAINED.get(backbone)
    path = packaged_path(src) if src is not None and src.package_file else Path(backbone)
    try:
        summary = json.loads(path.with_suffix(".json").read_text())
        return {k: float(v) for k, v in summary["holdout"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- evaluation


def _similarity(model: Any, entries: list[Any], data: Any, frames: slice | None = None) -> tuple[Any, Any]:
    """[N_text, N_video] logits of the test split (one caption per video) and the caption owners."""
    from vidret.eval.evaluate import captions_for, encode_texts, encode_videos, similarity_matrix
    from vidret.heads import VideoFeatures

    model.eval()
    device = torch.device("cpu")
    video, valid, bad = encode_videos(model, entries, data, device, batch_size=64)
    if not all(valid):
        raise VidretError(f"{len(bad)} pocket test clips could not be decoded: {bad[:5]}; regenerate the world")
    if frames is not None:  # a single-frame oracle: the video is its first frame only
        video = VideoFeatures(video.frames[:, frames], video.mask[:, frames])
    texts, owner = captions_for(entries, "single")
    text = encode_texts(model, texts, data.max_words, device)
    return similarity_matrix(model, text, video), torch.tensor(owner, dtype=torch.long)


def tie_aware_metrics(sim: torch.Tensor, owner: torch.Tensor) -> dict[str, Any]:
    """T2V and V2T metrics under a random tie-break, with the optimistic and pessimistic R@1 beside them."""
    from vidret.eval.metrics import metrics_from_rank_bounds, rank_bounds

    out: dict[str, Any] = {}
    for name, s, gt in (("t2v", sim, owner), ("v2t", sim.t(), torch.argsort(owner))):
        lo, hi = rank_bounds(s, gt, tie_tol=TIE_TOL)
        m = metrics_from_rank_bounds(lo, hi)
        m["R1_optimistic"] = 100.0 * float((lo <= 1).double().mean())
        m["R1_pessimistic"] = 100.0 * float((hi <= 1).double().mean())
        out[name] = m
    return out


def _evaluate(model: Any, entries: list[Any], data: Any, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    from vidret.eval.evaluate import pair_accuracy

    sim, owner = _similarity(model, entries, data)
    res = tie_aware_metrics(sim, owner)
    res["reversal"] = pair_accuracy(sim, owner.tolist(), entries, pairs, tie_tol=TIE_TOL)
    return res


def static_oracle(world_dir: Path, clip: Any, entries: list[Any], data: Any) -> dict[str, Any]:
    """How much of the test split's retrieval signal is static, and how much needs the frames' order.

    - ``first_frame_ceiling``: T2V R@1 of a perfect matcher of the caption's static clause against each video's
      FIRST frame (symbolic: objects, sizes, colours, grid cells), ties broken at random. Knowing which frame
      is first is itself order information; an order-blind model cannot have it.
    - ``order_blind_ceiling``: T2V R@1 of a perfect model blind to frame order: it cannot tell a clip from its
      reversed twin (the same frames), so it gets 1/2 on those queries and everything else right.
    - ``frozen_first_frame``: the shipped frozen CLIP shown the first frame only, full captions (tie-aware).
    - ``frozen_first_frame_static``: the same with the static clause alone as the query.
    """
    from vidret.model import build_model

    records = {}
    for line in (world_dir / "test_events.jsonl").read_text().splitlines():
        rec = json.loads(line)
        records[rec["video_id"]] = rec
    keys = [json.dumps(records[e.video_id]["first_frame"], sort_keys=True) for e in entries]
    same = Counter(keys)
    twins = {r["reversed_of"] for r in records.values() if "reversed_of" in r}
    twins |= {vid for vid, r in records.items() if "reversed_of" in r}
    n = len(entries)
    model = build_model(clip, "frozen")
    sim, owner = _similarity(model, entries, data, frames=slice(0, 1))
    static_entries = [replace(e, captions=tuple(records[e.video_id]["static_clauses"])) for e in entries]
    sim_static, _ = _similarity(model, static_entries, data, frames=slice(0, 1))
    return {
        "first_frame_ceiling": 100.0 * sum(1.0 / same[k] for k in keys) / n,
        "order_blind_ceiling": 100.0 * sum(0.5 if e.video_id in twins else 1.0 for e in entries) / n,
        "videos_in_reversal_pairs": sum(e.video_id in twins for e in entries),
        "videos": n,
        "frozen_first_frame": tie_aware_metrics(sim, owner)["t2v"],
        "frozen_first_frame_static": tie_aware_metrics(sim_static, owner)["t2v"],
    }


def _train_and_eval(
    method: str,
    cfg: DemoConfig,
    data: Any,
    seed: int,
    out: Path,
    entries: list[Any],
    pairs: list[tuple[str, str]],
    progress: bool,
) -> dict[str, Any]:
    import shutil

    from vidret.adapters.io import load_adapter, save_adapter
    from vidret.model import build_model, parameter_report
    from vidret.train.config import OptimConfig, TrainConfig
    from vidret.train.loop import load_backbone_for, train

    settings = POCKET_METHODS[method]
    run_dir = out / "runs" / f"seed{seed}" / method
    if run_dir.exists():
        shutil.rmtree(run_dir)  # each demo run trains afresh; the world and the frame cache are reused
    tcfg = TrainConfig(
        backbone=cfg.backbone,
        method=method,
        preset=settings.get("preset"),
        data=replace(data, test_manifest=""),
        # "optim": further OptimConfig fields (none by default; the sweeps in benchmarks/pocket.md used them)
        optim=OptimConfig(
            lr=settings.get("lr", 1e-4), backbone_lr=settings.get("backbone_lr"), **settings.get("optim", {})
        ),
        epochs=cfg.train_epochs,
        global_batch=cfg.global_batch,
        precision="fp32",
        seed=seed,
        out_dir=str(run_dir),
        checkpoint_every=0,
        log_every=5,
        device="cpu",
    )
    t0 = time.perf_counter()
    if method == "frozen":  # nothing to train: the zero-shot model
        model = build_model(load_backbone_for(cfg.backbone), "frozen")
        save_adapter(model, run_dir / "adapter")
        train_seconds = 0.0
    else:
        result = train(tcfg, progress=progress)
        train_seconds = result.train_seconds
        model = load_adapter(load_backbone_for(cfg.backbone), run_dir / "adapter")
    t1 = time.perf_counter()
    res = _evaluate(model, entries, data, pairs)
    eval_seconds = time.perf_counter() - t1
    rep = parameter_report(model)
    emb = model.clip.text.token_embedding.weight.numel()
    trained_emb = emb if model.clip.text.token_embedding.weight.requires_grad else 0
    size = sum(f.stat().st_size for f in (run_dir / "adapter").iterdir())
    (run_dir / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    return {
        "method": method,
        "seed": seed,
        "t2v": res["t2v"],
        "v2t": res["v2t"],
        "pair_accuracy": res["reversal"]["pair_accuracy"],
        "pair_ties": res["reversal"]["pair_ties"],
        "pair_queries": res["reversal"]["pair_queries"],
        "trainable": rep["trainable"],
        "percent": rep["percent"],
        # share of the backbone without its token embedding (87% of pocket-small): the papers' regime is ~2-6%
        "percent_non_embedding": 100.0 * (rep["trainable"] - trained_emb) / (rep["backbone"] - emb),
        "adapter_bytes": size,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- aggregation and tables

_CELLS = [("t2v", k) for k in ("R1", "R5", "R10", "MdR", "MnR")] + [
    ("v2t", k) for k in ("R1", "R5", "R10", "MdR", "MnR")
]


def aggregate(method: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and (sample) standard deviation over seeds of every metric of one method."""

    def stat(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    row: dict[str, Any] = {"method": method, "seeds": [r["seed"] for r in runs]}
    for direction, key in _CELLS:
        row.setdefault(direction, {})[key] = stat([r[direction][key] for r in runs])
    for direction in ("t2v", "v2t"):
        for key in ("R1_optimistic", "R1_pessimistic", "tied_queries"):
            row[direction][key] = stat([float(r[direction][key]) for r in runs])
        row[direction]["n_queries"] = runs[0][direction]["n_queries"]
    for key in ("pair_accuracy", "pair_ties", "train_seconds", "eval_seconds", "adapter_bytes"):
        row[key] = stat([float(r[key]) for r in runs])
    for key in ("trainable", "percent", "percent_non_embedding", "pair_queries"):
        row[key] = runs[0][key]
    return row


def _cell(s: dict[str, float], many: bool, digits: int = 1) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if many else f"{s['mean']:.{digits}f}"


def format_table(results: dict[str, Any]) -> str:
    """The POCKET.md comparison table as Markdown (mean ± std over seeds when there are several)."""
    many = len(results["seeds"]) > 1
    head = (
        "| method | T2V R@1 | R@5 | R@10 | MdR | MnR | V2T R@1 | R@5 | R@10 | MdR | MnR | reversed pairs % "
        "| trainable | % of backbone | % of non-embedding | adapter file |"
    )
    lines = [head, "|---|" + "---:|" * 15]
    for r in results["rows"]:
        cells = [_cell(r[d][k], many) for d, k in _CELLS]
        lines.append(
            f"| {r['method']} | " + " | ".join(cells) + f" | {_cell(r['pair_accuracy'], many)} | {r['trainable']:,} "
            f"| {r['percent']:.2f} | {r['percent_non_embedding']:.2f} | {_bytes(int(r['adapter_bytes']['mean']))} |"
        )
    return "\n".join(lines) + "\n"


def format_ties(results: dict[str, Any]) -> str:
    """One line per method: how many ground truths tie, and what that does to R@1."""
    tol = results["tie_tolerance"]
    lines = [f"Ties (scores within {tol:g} logits of the ground truth's; the table ranks them at their expected rank):"]
    for r in results["rows"]:
        t, v = r["t2v"], r["v2t"]
        t_tied, v_tied = t["tied_queries"]["mean"], v["tied_queries"]["mean"]
        lines.append(
            f"- {r['method']}: {t_tied:.0f}/{t['n_queries']} T2V and {v_tied:.0f}/{v['n_queries']} V2T queries tie "
            f"their ground truth; T2V R@1 optimistic {t['R1_optimistic']['mean']:.1f} / expected {t['R1']['mean']:.1f} "
            f"/ pessimistic {t['R1_pessimistic']['mean']:.1f}; {r['pair_ties']['mean']:.1f}% of reversed-pair "
            "captions tie their twin"
        )
    return "\n".join(lines) + "\n"


def format_times(results: dict[str, Any]) -> str:
    """Stage and per-method times (these vary from run to run; the table above does not)."""
    s = results["seconds"]
    stages = ", ".join(f"{k.replace('_', ' ')} {v:.1f}s" for k, v in s.items())
    load = results["load"]
    lines = [f"Times ({results['machine']}; {load['start']} at the start, {load['end']} at the end): {stages}"]
    many = len(results["seeds"]) > 1
    for r in results["rows"]:
        lines.append(
            f"- {r['method']}: train {_cell(r['train_seconds'], many, 0)}s, eval {_cell(r['eval_seconds'], many, 1)}s"
        )
    return "\n".join(lines) + "\n"


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _plot(results: dict[str, Any], path: Path) -> Path | None:
    from vidret.train.plot import plot_comparison

    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the [plot] extra is optional
        return None
    return plot_comparison(results, path)
