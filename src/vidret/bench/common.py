"""Shared pieces of the model benchmarks: machine record, synthetic batches, timing, FLOP formula, sync check.

Nothing here prints; ``bench/train.py`` and ``bench/encode.py`` format and print the results.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from vidret.backbone.clip import CLIPConfig, VisionConfig
from vidret.errors import VidretError
from vidret.host_memory import allocator_mode

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; matched by substring of
# ``torch.cuda.get_device_name()`` in this order (more specific names first).
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)

# The CLIP end-of-text token id: the text tower pools at argmax(tokens), so it must be the largest id.
EOT_TOKEN = 49407
SOT_TOKEN = 49406


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda" without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VidretError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" -> bf16 on GPU, fp32 on CPU (CPUs without native bf16 run bf16 matmuls slower than fp32)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise VidretError(f"unknown precision {precision!r}; use fp32, bf16, fp16 or auto")
    return precision


def _cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name : value`` line of /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """What a result was measured on: CPU, cores, threads, load, memory, library versions, GPU if used."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpu_bf16_native": _cpu_has_native_bf16(),
        "host_allocator": allocator_mode(),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # psutil is optional for the record
        pass
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            gpu_bf16_peak_tflops=bf16_peak_tflops(props.name),
        )
    return info


def _cpu_has_native_bf16() -> bool:
    # avx512_bf16 (Cooper Lake+) or AMX (Sapphire Rapids+): without them bf16 matmuls are emulated on CPU.
    flags = set((_cpuinfo_field("flags") or "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def bf16_peak_tflops(gpu_name: str) -> float | None:
    """The data-sheet dense bf16 peak of a GPU (None when unknown: pass --peak-tflops)."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in gpu_name:
            return tflops
    return None


def cpu_time_counters() -> list[int] | None:
    """The machine's aggregate CPU time counters from /proc/stat (user nice system idle iowait irq softirq steal
    ...), in clock ticks; None where there is no /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            first = f.readline().split()
    except OSError:
        return None
    return [int(x) for x in first[1:]] if first and first[0] == "cpu" else None


def steal_percent(before: list[int] | None, after: list[int] | None) -> float | None:
    """Share of all CPU time between two :func:`cpu_time_counters` readings that the hypervisor gave to other
    guests (the ``steal`` column): time a benchmark waited for a core it was not given."""
    if before is None or after is None or len(before) < 8 or len(after) < 8:
        return None
    delta = [a - b for a, b in zip(after, before)]
    total = sum(delta[:8])  # guest time is already counted in user
    return 100.0 * delta[7] / total if total > 0 else None


def format_machine(info: dict[str, Any]) -> str:
    parts = [
        f"CPU {info['cpu']} ({info.get('physical_cores', '?')} physical / {info['logical_cores']} logical cores, "
        f"{info.get('memory_gib', '?')} GiB)",
        f"torch {info['torch']}, {info['torch_threads']} threads, Python {info['python']}",
        f"load avg (1 min) at start {info.get('load_avg_1min')}",
        f"host allocator: {info.get('host_allocator', 'system default')}",
    ]
    if "gpu" in info:
        peak = info.get("gpu_bf16_peak_tflops")
        parts.append(
            f"GPU {info['gpu']} ({info['gpu_memory_gib']} GiB), CUDA {info['cuda']}, "
            f"bf16 peak {peak if peak is not None else 'unknown'} TFLOP/s"
        )
    return "\n".join(parts)


# ----------------------------------------------------------------------------- inputs and timing


def synthetic_batch(
    batch: int, frames: int, image_size: int, words: int, seed: int = 0, vocab_size: int = 49408
) -> dict[str, Any]:
    """A training micro-batch like ``train_collate`` makes: B videos x T frames and B captions of ``words`` tokens.

    Values are random (compute does not depend on them); every caption has a start token, random words, and
    the end token at a random position so the text tower pools where a real caption would.
    """
    if batch < 1 or frames < 1 or words < 2:
        raise VidretError("batch and frames must be >= 1 and words >= 2")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, words, dtype=torch.long)
    hi = min(vocab_size, SOT_TOKEN)
    for i in range(batch):
        end = int(torch.randint(2, words, (1,), generator=g)) if words > 2 else 1
        tokens[i, 0] = SOT_TOKEN if vocab_size > SOT_TOKEN else 1
        tokens[i, 1:end] = torch.randint(1, hi, (end - 1,), generator=g)
        tokens[i, end] = EOT_TOKEN if vocab_size > EOT_TOKEN else vocab_size - 1
    return {
        "frames": torch.randn(batch, frames, 3, image_size, image_size, generator=g),  # [B, T, 3, S, S]
        "frame_mask": torch.ones(batch, frames, dtype=torch.bool),  # [B, T]
        "tokens": tokens,  # [B, L]
        "valid": torch.ones(batch, dtype=torch.bool),  # [B]
        "bad_reasons": [],
    }


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (timing only; the training step itself never does this)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds per call of ``fn`` for ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark.

    Linux: ``VmHWM`` of the current address space. ``ru_maxrss`` is the fallback elsewhere, but on Linux it
    would be wrong for a subprocess: it starts at the parent's RSS at fork and survives ``exec``.
    """
    kib = _proc_status_kib("VmHWM")
    if kib is None:
        kib = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return kib * 1024


def current_rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    return (kib if kib is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)) * 1024


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_gemm_tflops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Achieved TFLOP/s of one square n x n matmul on this machine: a practical ceiling for the model's GEMMs."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_calls(lambda: a @ b, device, warmup=2, steps=reps)
    return 2 * n**3 / median(times) / 1e12


# ----------------------------------------------------------------------------- model helpers


def split_top_level(s: str) -> list[str]:
    """Split on commas outside brackets: "lora+layers=[9,10],full" -> ["lora+layers=[9,10]", "full"]."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def optimizer_state_bytes(opt: torch.optim.Optimizer | None) -> int:
    """Bytes of the optimiser's state tensors (AdamW: two moments and a step per trainable tensor)."""
    if opt is None:
        return 0
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if isinstance(v, Tensor))


def write_result_json(path: str | os.PathLike[str], result: dict[str, Any]) -> None:
    """A benchmark's ``--out``: the result as indented JSON (folders created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def run_json_worker(module: str, spec: dict[str, Any], env: dict[str, str], what: str) -> dict[str, Any]:
    """Run ``python -m MODULE --worker IN OUT`` in a fresh process: ``spec`` goes in as JSON, the result comes back."""
    with tempfile.TemporaryDirectory() as tmp:
        inp, outp = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, "-m", module, "--worker", str(inp), str(outp)], capture_output=True, text=True, env=env
        )
        if proc.returncode != 0 or not outp.exists():
            raise VidretError(f"{what} failed in its subprocess:\n{proc.stderr[-3000:]}")
        return dict(json.loads(outp.read_text()))


def _plain_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def use_plain_gelu(model: Any) -> None:
    """Every QuickGELU of the model (backbone and adapters) computes through autograd's graph, keeping x and
    sigmoid(1.702 x) for backward: how clip.py did it before ``_QuickGELUFunction``."""
    from vidret.backbone.clip import QuickGELU

    for m in model.modules():
        if isinstance(m, QuickGELU):
            m.forward = _plain_gelu  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class VitFlops:
    """Forward FLOPs of the CLIP vision tower for one frame (a multiply-add counts 2)."""

    patch_embed: int
    linears: int
    attention: int
    projection: int

    @property
    def total(self) -> int:
        return self.patch_embed + self.linears + self.attention + self.projection


VIT_FLOPS_FORMULA = (
    "per frame, N = (S/p)^2 + 1 tokens, width D, MLP hidden M, layers K, embed E: "
    "2*(N-1)*3p^2*D (patch conv) + K*[2*N*4D^2 (q,k,v,out) + 2*N*2DM (c_fc, c_proj) + 4*N^2*D (QK^T and AV)] "
    "+ 2*D*E (projection); LayerNorm, softmax, activations and adapters are not counted"
)


def vit_forward_flops(vision: VisionConfig, embed_dim: int, image_size: int | None = None) -> VitFlops:
    """Analytic forward FLOPs of the vision tower per frame (see ``VIT_FLOPS_FORMULA``)."""
    s = image_size or vision.image_size
    patches = (s // vision.patch_size) ** 2
    n = patches + 1
    d = vision.width
    m = int(d * vision.mlp_ratio)
    return VitFlops(
        patch_embed=2 * patches * 3 * vision.patch_size**2 * d,
        linears=vision.layers * (2 * n * 4 * d * d + 2 * n * 2 * d * m),
        attention=vision.layers * 4 * n * n * d,
        projection=2 * d * embed_dim,
    )


def backbone_flops_per_frame(config: CLIPConfig) -> int:
    return vit_forward_flops(config.vision, config.embed_dim).total


def flop_counter() -> Any:
    """torch's FLOP counter (matmuls, convolutions, attention), taught the CPU flash-attention kernels.

    The stock counter knows SDPA's CUDA kernels only, so on CPU attention would silently count 0.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def cpu_sdpa(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return int(sdpa_flop_count(q, k, v))

    def cpu_sdpa_backward(g: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return int(sdpa_backward_flop_count(g, q, k, v))

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward,
    }
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` under :func:`flop_counter`; returns (result, FLOPs)."""
    with flop_counter() as counter:
        out = fn()
    return out, int(counter.get_total_flops())


# ----------------------------------------------------------------------------- host-device syncs

# Ops that make the host wait for the device on CUDA: reading a value (item / bool / int), and ops whose output
# shape depends on the data (boolean indexing, nonzero, masked_select, unique, repeat_interleave without a size).
_SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.is_nonzero",
        "aten.equal",
        "aten.nonzero",
        "aten.masked_select",
        "aten.unique_consecutive",
        "aten._unique2",
        "aten.unique_dim",
        "aten.repeat_interleave",
        "aten.masked_scatter",
    }
)


class SyncCounter(TorchDispatchMode):
    """Counts ops that would synchronise host and device on CUDA; works on CPU too (the ops are the same).

    ``torch.cuda.set_sync_debug_mode`` is the GPU-side check; this one runs anywhere, so the benchmark can
    say "0 host syncs per step" on a CPU-only machine. Boolean-mask indexing counts as ``index(bool)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        name = str(func.overloadpacket)
        if name in _SYNC_OPS:
            self.events.append(name)
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and _has_bool_index(args):
            self.events.append(f"{name}(bool)")
        return func(*args, **(kwargs or {}))


def _has_bool_index(args: Iterable[Any]) -> bool:
    for a in args:
        if isinstance(a, (list, tuple)) and any(isinstance(t, Tensor) and t.dtype == torch.bool for t in a):
            return True
    return False


class SavedTensorBytes:
    """Bytes autograd keeps for backward (activations) while active: unique storages, weights excluded.

    Independent of the allocator and of machine load, so before/after comparisons of activation memory are
    exact where an RSS high-water mark is not. Saved weights (or views of them, e.g. ``weight.t()``) cost
    nothing extra, so the storages of ``exclude`` are skipped.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.bytes = 0
        self._seen: set[int] = {p.untyped_storage().data_ptr() for p in exclude}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: Tensor) -> Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._seen:
                self._seen.add(storage.data_ptr())
                self.bytes += storage.nbytes()
        return t


def _unpack(t: Tensor) -> Tensor:
    return t


def summarize_syncs(events: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in events:
        out[e] = out.get(e, 0) + 1
    return out


def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
