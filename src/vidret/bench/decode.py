"""Decode benchmark: clips/s through a DataLoader for raw decoding vs the frame cache.

Generates N synthetic 10 s 320x240 30 fps h264 clips (x264 "medium", CRF 23, ~200 kb/s: moving
textured background, a moving block and sensor-like noise, so the bitrate is close to MSR-VTT's clips),
then, for each DataLoader worker count, measures steady-state clips/s of
(a) raw: decode + sample 12 frames + resize/crop to 224 + normalise (``EvalVideoDataset``, no cache);
(b) cache: the same batches read from a ``FrameCache`` filled by ``preprocess`` beforehand.
One untimed warm-up epoch precedes the timed epochs (workers persist across epochs); timed epochs of
the two paths alternate, so load from other processes on a shared machine affects both alike. Besides
wall-clock clips/s it reports CPU time per clip (this process + its DataLoader workers), which depends
far less on what else runs on the machine: on an otherwise idle machine, where both paths are CPU-bound,
the clips/s speed-up approaches the CPU-time ratio.

``main(argv)`` is the ``vidret bench decode`` entry point; ``run_decode_benchmark`` returns the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from vidret.procs import dataloader_worker_init, die_with_parent


def make_clip(
    path: str | os.PathLike[str],
    seconds: float = 10.0,
    fps: int = 30,
    width: int = 320,
    height: int = 240,
    seed: int = 0,
) -> str:
    """Write one synthetic h264 clip (deterministic from ``seed``); returns its path."""
    import av

    rng = np.random.default_rng(seed)
    big_h, big_w = 2 * height, 2 * width
    yy, xx = np.mgrid[0:big_h, 0:big_w].astype(np.float32)
    waves = [
        128 + 90 * np.sin(xx / (20 + 10 * rng.random()) + 6 * rng.random()) * np.cos(yy / (15 + 10 * rng.random()))
        for _ in range(3)
    ]
    canvas = np.clip(np.stack(waves, -1) + rng.integers(0, 30, (big_h, big_w, 3)), 0, 255).astype(np.uint8)
    noise = [rng.integers(-6, 7, (height, width, 1)).astype(np.int16) for _ in range(7)]
    colour = rng.integers(0, 256, 3)
    with av.open(os.fspath(path), "w") as c:
        s = c.add_stream("libx264", rate=fps, options={"preset": "medium", "crf": "23"})
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for i in range(int(round(seconds * fps))):
            # camera pan over the canvas + a moving block + per-frame noise
            x0 = int(width * (0.5 + 0.5 * np.sin(i / 40)))
            y0 = int(height * (0.5 + 0.5 * np.cos(i / 55)))
            img = canvas[y0 : y0 + height, x0 : x0 + width].astype(np.int16) + noise[i % len(noise)]
            bx = int((width - 60) * (0.5 + 0.5 * np.sin(i / 20)))
            by = int((height - 60) * (0.5 + 0.5 * np.cos(i / 25)))
            img[by : by + 60, bx : bx + 60] = colour
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return os.fspath(path)


def _make_clip_job(job: tuple[Path, float, int]) -> str:
    path, seconds, seed = job
    return make_clip(path, seconds=seconds, seed=seed)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, load and library versions, for the benchmark's record."""
    import av
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1min": round(load, 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "av": av.__version__,
        "platform": platform.platform(),
    }


def _throughput(
    datasets: dict[str, Any], workers: int, batch_size: int, min_seconds: float
) -> dict[str, tuple[float, float, int]]:
    """Steady-state throughput of each dataset: {name: (clips/s, CPU ms per clip, timed epochs)}.

    Each loader runs one untimed warm-up epoch; then timed epochs alternate between the loaders until
    each has run ``min_seconds``, so a load change on a shared machine hits every path alike.
    """
    from torch.utils.data import DataLoader

    from vidret.data.dataset import collate

    loaders = {
        name: DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate,
            persistent_workers=workers > 0,
            worker_init_fn=dataloader_worker_init(),
        )
        for name, ds in datasets.items()
    }

    def epoch(loader: DataLoader[Any]) -> int:
        n = 0
        for batch in loader:
            if batch["bad"]:
                raise RuntimeError(f"benchmark clip failed to decode: {batch['bad_reasons']}")
            n += batch["frames"].shape[0]
        return n

    for loader in loaders.values():
        epoch(loader)  # warm-up: worker start, page cache, allocator
    clips = dict.fromkeys(loaders, 0)
    epochs = dict.fromkeys(loaders, 0)
    seconds = dict.fromkeys(loaders, 0.0)
    cpu = dict.fromkeys(loaders, 0.0)
    while min(seconds.values()) < min_seconds or min(epochs.values()) == 0:
        for name, loader in loaders.items():
            if seconds[name] >= min_seconds and epochs[name] > 0:
                continue
            c0, t0 = _cpu_seconds(), time.perf_counter()
            clips[name] += epoch(loader)
            seconds[name] += time.perf_counter() - t0
            cpu[name] += _cpu_seconds() - c0
            epochs[name] += 1
    loaders.clear()  # drops the last references: persistent workers shut down
    return {name: (clips[name] / seconds[name], 1000 * cpu[name] / clips[name], epochs[name]) for name in clips}


def _cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its live children (the workers).

    Idle workers of the other loader add nothing, so the difference over an epoch is that epoch's work.
    """
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_decode_benchmark(
    num_clips: int = 24,
    workers: tuple[int, ...] | list[int] = (0, 2),
    num_frames: int = 12,
    image_size: int = 224,
    batch_size: int = 4,
    clip_seconds: float = 10.0,
    min_seconds: float = 5.0,
    work_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Measure raw-decode and frame-cache clips/s through a DataLoader.

    Args:
        num_clips: Synthetic clips to generate (320x240, 30 fps, h264).
        workers: DataLoader worker counts to measure.
        num_frames: Frames sampled per clip (T).
        image_size: Frame side after resize + crop.
        batch_size: DataLoader batch size.
        clip_seconds: Length of each clip.
        min_seconds: Each measurement repeats whole epochs until this much time has passed.
        work_dir: Folder for the clips (kept and reused) and the cache (rebuilt each run); None uses a
            temporary folder (deleted).

    Returns:
        ``{"machine", "config", "preprocess", "results": [{"path", "workers", "clips_per_s",
        "ms_per_clip", "cpu_ms_per_clip", "epochs"}], "speedup": {workers: cache/raw clips/s},
        "cpu_ratio": {workers: raw/cache CPU time per clip}}``.
    """
    from vidret.data.cache import FrameCache, preprocess
    from vidret.data.dataset import EvalVideoDataset
    from vidret.data.manifest import ManifestEntry
    from vidret.data.sampling import SamplingConfig

    if num_clips < 1:
        raise ValueError("num_clips must be >= 1")
    tmp = None if work_dir is not None else tempfile.mkdtemp(prefix="vidret-bench-decode-")
    root = Path(work_dir if work_dir is not None else tmp)  # type: ignore[arg-type]
    try:
        clip_dir = root / "clips"
        clip_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        paths = [clip_dir / f"clip{i:04d}.mp4" for i in range(num_clips)]
        todo = [(p, i) for i, p in enumerate(paths) if not p.is_file()]
        if todo:
            n_proc = min(len(todo), os.cpu_count() or 1)
            with ProcessPoolExecutor(max_workers=n_proc, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
                list(pool.map(_make_clip_job, [(p, clip_seconds, 1000 + i) for p, i in todo]))
        gen_s = time.perf_counter() - t0
        entries = [ManifestEntry(p.stem, str(p), (f"clip {p.stem}",)) for p in paths]
        sampling = SamplingConfig(num_frames=num_frames)
        shutil.rmtree(root / "cache", ignore_errors=True)  # clips are reused, the cache is always rebuilt
        cache = FrameCache(root / "cache", sampling, image_size)
        report = preprocess(entries, cache, num_workers=max(workers), progress=False, max_bad_fraction=0.0)
        results: list[dict[str, Any]] = []
        datasets = {
            "raw": EvalVideoDataset(entries, sampling, image_size=image_size),
            "cache": EvalVideoDataset(entries, sampling, cache=cache, image_size=image_size),
        }
        for w in workers:
            for name, (cps, cpu_ms, epochs) in _throughput(datasets, w, batch_size, min_seconds).items():
                results.append(
                    {
                        "path": name,
                        "workers": w,
                        "clips_per_s": round(cps, 2),
                        "ms_per_clip": round(1000 / cps, 1),
                        "cpu_ms_per_clip": round(cpu_ms, 1),
                        "epochs": epochs,
                    }
                )
        by = {(r["path"], r["workers"]): r["clips_per_s"] for r in results}
        by_cpu = {(r["path"], r["workers"]): r["cpu_ms_per_clip"] for r in results}
        return {
            "machine": machine_info(),
            "config": {
                "num_clips": num_clips,
                "clip": f"{clip_seconds:g} s 320x240 30 fps h264 (x264 medium, crf 23)",
                "clip_bytes_mean": int(np.mean([p.stat().st_size for p in paths])),
                "num_frames": num_frames,
                "image_size": image_size,
                "batch_size": batch_size,
                "workers": list(workers),
                "generate_s": round(gen_s, 1),
            },
            "preprocess": {
                "workers": max(workers),
                "seconds": round(report.seconds, 2),
                "clips_per_s": round(num_clips / report.seconds, 2) if report.seconds else None,
                "bytes_on_disk": report.bytes_on_disk,
                "built": report.built,
                "reused": report.reused,
            },
            "results": results,
            "speedup": {str(w): round(by[("cache", w)] / by[("raw", w)], 1) for w in workers},
            "cpu_ratio": {  # None when an epoch was too short for the OS's CPU-time resolution
                str(w): round(by_cpu[("raw", w)] / by_cpu[("cache", w)], 1) if by_cpu[("cache", w)] > 0 else None
                for w in workers
            },
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def format_decode_benchmark(result: dict[str, Any]) -> str:
    """A plain-text table of ``run_decode_benchmark``'s result."""
    m, cfg, pre = result["machine"], result["config"], result["preprocess"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores (load {m['load_avg_1min']}), torch {m['torch']} "
        f"({m['torch_threads']} threads), av {m['av']}, python {m['python']}",
        f"clips: {cfg['num_clips']} x {cfg['clip']}, mean {cfg['clip_bytes_mean'] / 1e3:.0f} kB; "
        f"{cfg['num_frames']} frames at {cfg['image_size']} px; batch size {cfg['batch_size']}",
        f"preprocess ({pre['workers']} workers): {pre['seconds']} s, {pre['clips_per_s']} clips/s, "
        f"{pre['bytes_on_disk'] / 1e6:.1f} MB on disk",
        "",
        f"{'path':<8}{'workers':>8}{'clips/s':>10}{'ms/clip':>10}{'CPU ms/clip':>13}{'epochs':>8}",
    ]
    for r in result["results"]:
        lines.append(
            f"{r['path']:<8}{r['workers']:>8}{r['clips_per_s']:>10.2f}{r['ms_per_clip']:>10.1f}"
            f"{r['cpu_ms_per_clip']:>13.1f}{r['epochs']:>8}"
        )
    lines.append("")
    speed = ", ".join(f"{v}x ({w} workers)" for w, v in result["speedup"].items())
    cpu = ", ".join(f"{v}x ({w} workers)" for w, v in result["cpu_ratio"].items())
    lines.append(f"cache speed-up over raw decoding (clips/s): {speed}")
    lines.append(f"CPU time per clip, raw / cache: {cpu}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``vidret bench decode``: run the benchmark, print the table (and write JSON with --json)."""
    from vidret.cli import HelpFormatter, example_epilog

    ap = argparse.ArgumentParser(
        prog="vidret bench decode",
        description=__doc__.split("\n\n")[0],
        epilog=example_epilog("vidret bench decode --clips 8 --workers 0 --json decode.json"),
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--clips", type=int, default=24, help="synthetic clips to generate")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    ap.add_argument("--frames", type=int, default=12, help="frames per clip (T)")
    ap.add_argument("--size", type=int, default=224, help="frame side after resize + crop")
    ap.add_argument("--batch-size", type=int, default=4, help="clips per DataLoader batch")
    ap.add_argument("--clip-seconds", type=float, default=10.0, help="length of each synthetic clip")
    ap.add_argument("--min-seconds", type=float, default=5.0, help="minimum timed seconds per measurement")
    ap.add_argument("--work-dir", default=None, help="keep (and reuse) the clips here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the result as JSON to this file")
    args = ap.parse_args(argv)
    result = run_decode_benchmark(
        num_clips=args.clips,
        workers=tuple(args.workers),
        num_frames=args.frames,
        image_size=args.size,
        batch_size=args.batch_size,
        clip_seconds=args.clip_seconds,
        min_seconds=args.min_seconds,
        work_dir=args.work_dir,
    )
    print(format_decode_benchmark(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
