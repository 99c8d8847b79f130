"""``vidret bench search``: end-to-end text-query latency through the HTTP service, and FAISS recall.

For each collection size N a server process generates N synthetic unit vectors (dim 512 by default), stores
them as a real index (``VideoIndex.save`` in float16, then ``VideoIndex.load`` with checksums), builds the
FAISS IVF-Flat index over the same vectors, measures recall@k of FAISS against exact search over an
``nprobe`` sweep, and serves both as two collections ("exact", "faiss") with the real service
(``vidret.retrieval.service``) on uvicorn at 127.0.0.1. This process then runs ``clients`` concurrent HTTP
clients (threads, keep-alive) issuing ``GET /search?q=...`` for a bounded time per backend and reports
p50/p99 latency, throughput and errors. The text encoder is a tiny random CLIP text tower (width 32, 2 layers,
projection to the index dimension): its cost is inside the measured latency, but a real ViT-B text tower costs
more (measure it with ``vidret bench encode``). Only loopback traffic.

    vidret bench search -- --sizes 100000,1000000 --duration 20 --out benchmarks/search.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vidret.errors import VidretError
from vidret.procs import die_with_parent

DataKind = Literal["random", "clustered"]

_ADJ = ["red", "small", "happy", "old", "fast", "young", "tall", "noisy", "bright", "dark", "wet", "tiny"]
_NOUN = ["dog", "man", "woman", "car", "cat", "child", "band", "chef", "player", "horse", "bird", "crowd"]
_VERB = ["runs", "sings", "cooks", "jumps", "plays", "dances", "drives", "talks", "swims", "catches a frisbee"]
_PLACE = ["in a park", "on stage", "in a kitchen", "on a road", "at the beach", "in the snow", "indoors"]


def query_sentences(n: int = 256, seed: int = 0) -> list[str]:
    """Distinct-ish caption-like sentences for load generation."""
    rng = np.random.default_rng(seed)
    return [f"a {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} {rng.choice(_PLACE)}" for _ in range(n)]


@dataclass(frozen=True)
class SearchBenchConfig:
    """What the search benchmark measures."""

    sizes: tuple[int, ...] = (100_000, 1_000_000)  # collection sizes N
    dim: int = 512  # vector dimension (CLIP ViT-B embed dim)
    backends: tuple[str, ...] = ("exact", "faiss")  # measured through HTTP, in this order
    clients: tuple[int, ...] = (8,)  # concurrent HTTP clients; one load row per value (1 = a query alone)
    duration_s: float = 20.0  # measured load per (N, backend)
    warmup_s: float = 2.0  # unmeasured load before each measurement
    k: int = 10  # results per query (and the k of recall@k)
    nlist: int = 0  # FAISS IVF lists; 0 = chosen from N (backends.default_nlist)
    nprobe: int = 0  # FAISS lists probed by the served index; 0 = chosen from N (backends.default_nprobe)
    sweep: tuple[int, ...] = (1, 4, 16, 64, 256)  # nprobe values of the recall sweep
    recall_queries: int = 200  # queries of the recall measurement
    data: DataKind = "random"  # random unit vectors, or a mixture of clusters (closer to real embeddings)
    storage: Literal["float16", "float32"] = "float16"  # on-disk dtype of the saved index
    persist: bool = True  # save + reload through the index format (False: serve from memory)
    threads: int = 0  # torch / FAISS threads in the server process; 0 = their defaults (one per core)
    seed: int = 0
    encoder: Literal["tiny", "vit-b-32"] = "tiny"  # text tower: tiny random, or ViT-B/32's shape (random weights)
    quantize: bool = False  # int8 dynamic quantisation of the text tower (vidret search/serve --quantize)
    text_cache: int = 0  # the service's query-embedding LRU size; 0: every query runs the encoder

    def __post_init__(self) -> None:
        if not self.sizes or any(n < 100 for n in self.sizes):
            raise VidretError("sizes must be >= 100")
        if any(b not in ("exact", "faiss") for b in self.backends):
            raise VidretError("backends must be exact and/or faiss")
        if not self.clients or min(self.clients) < 1 or self.duration_s <= 0 or self.k < 1 or self.dim < 2:
            raise VidretError("clients, duration, k must be positive and dim >= 2")


# ------------------------------------------------------------------------------------------ server side


def vitb32_text_model() -> Any:
    """ViT-B/32's architecture with random weights (the cost is the real one)."""
    from vidret.backbone.clip import create_backbone
    from vidret.model import build_model

    return build_model(create_backbone("ViT-B-32", seed=0).eval(), "frozen", adapter_name="bench").eval()


def tiny_text_model(dim: int) -> Any:
    """A random CLIP with a tiny text tower (width 32, 2 layers) projecting to ``dim``: the benchmark encoder."""
    from vidret.backbone.clip import CLIPConfig, create_backbone
    from vidret.model import build_model

    cfg = CLIPConfig.from_dict(
        {
            "name": f"bench-tiny-{dim}",
            "embed_dim": dim,
            "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
            "text": {"context_length": 77, "vocab_size": 49408, "width": 32, "layers": 2, "heads": 2},
        }
    )
    clip = create_backbone(cfg, seed=0).eval()
    return build_model(clip, "frozen", adapter_name="bench").eval()


def synthetic_vectors(n: int, dim: int, seed: int, data: DataKind) -> torch.Tensor:
    """[n, dim] float32 unit vectors: uniform on the sphere, or around 1000 random centres (noise 0.5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    if data == "clustered":
        centres = torch.randn(min(1000, n), dim, generator=g)
        assign = torch.randint(0, centres.shape[0], (n,), generator=g)
        x.mul_(0.5).add_(centres[assign])  # noise at half the centres' norm; in place
    x.div_(x.norm(dim=1, keepdim=True))
    return x


def _recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist()))
    return hits / exact.numel()


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def _median_ms(fn: Any, queries: torch.Tensor, reps: int = 20) -> float:
    times = []
    for i in range(min(reps, queries.shape[0])):
        t0 = time.perf_counter()
        fn(queries[i : i + 1])
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def _prepare(cfg: SearchBenchConfig, n: int, workdir: str) -> tuple[Any, dict[str, Any]]:
    """Build the service for one size; returns (service, stats)."""
    from vidret.backbone.tokenizer import tokenize
    from vidret.model import AdapterBank
    from vidret.retrieval.backends import FaissIndex
    from vidret.retrieval.index import VideoIndex, model_identity
    from vidret.retrieval.index_files import IndexSettings
    from vidret.retrieval.service import Collection, SearchService

    stats: dict[str, Any] = {"n": n, "dim": cfg.dim, "data": cfg.data}
    from vidret.retrieval.query import drop_vision, quantize_text_tower

    model = vitb32_text_model() if cfg.encoder == "vit-b-32" else tiny_text_model(cfg.dim)
    if model.clip.config.embed_dim != cfg.dim:
        raise VidretError(f"--encoder {cfg.encoder} embeds to {model.clip.config.embed_dim}, not --dim {cfg.dim}")
    stats["text_encoder_params"] = sum(p.numel() for p in model.clip.text.parameters())
    stats["encoder"] = cfg.encoder
    sentences = query_sentences(cfg.recall_queries, cfg.seed + 2)
    if cfg.quantize:
        with torch.no_grad():
            fp32 = model.encode_text(tokenize(sentences, 32))
        stats["quantized_linears"] = quantize_text_tower(model)
    t0 = time.perf_counter()
    vectors = synthetic_vectors(n, cfg.dim, cfg.seed, cfg.data)
    stats["generate_s"] = time.perf_counter() - t0
    settings = IndexSettings(image_size=32, dtype=cfg.storage, nlist=cfg.nlist, nprobe=cfg.nprobe)
    index = VideoIndex.from_vectors(vectors, identity=model_identity(model), settings=settings)
    del vectors
    if cfg.persist:
        folder = Path(workdir) / f"index-{n}"
        t0 = time.perf_counter()
        index.save(folder)
        stats["save_s"] = time.perf_counter() - t0
        stats["index_bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        del index
        t0 = time.perf_counter()
        index = VideoIndex.load(folder, backend="exact", verify=True)
        stats["load_s"] = time.perf_counter() - t0
    collections = [Collection("exact", index, "bench")]
    exact = index.backend
    rng = torch.Generator().manual_seed(cfg.seed + 1)
    rq = torch.nn.functional.normalize(torch.randn(cfg.recall_queries, cfg.dim, generator=rng), dim=-1)
    with torch.no_grad():
        tq = torch.nn.functional.normalize(model.encode_text(tokenize(sentences, 32)), dim=-1)
        one = tokenize(sentences[:1], 32)
        stats["encode_ms_one_query"] = float(np.median([_timed(lambda: model.encode_text(one)) for _ in range(10)]))
    _, truth = exact.search(rq, cfg.k)
    _, truth_text = exact.search(tq, cfg.k)
    if cfg.quantize:  # recall@k of the int8 encoder's results against the fp32 encoder's, exact search
        _, fp32_rows = exact.search(torch.nn.functional.normalize(fp32, dim=-1), cfg.k)
        stats["int8_recall_vs_fp32"] = _recall(truth_text, fp32_rows)
    stats["exact_ms_per_query"] = _median_ms(lambda q: exact.search(q, cfg.k), rq)
    if "faiss" in cfg.backends:
        t0 = time.perf_counter()
        assert index.vectors is not None
        fi = FaissIndex(index.vectors, cfg.nlist, cfg.nprobe, seed=cfg.seed)
        stats["faiss_build_s"] = time.perf_counter() - t0
        stats["nlist"] = fi.nlist
        stats["nprobe"] = fi.nprobe  # the served value (cfg.nprobe, or the size rule's when 0)
        sweep = []
        for p in sorted({min(p, fi.nlist) for p in cfg.sweep if p > 0} | {stats["nprobe"]}):
            fi.nprobe = p
            _, rows = fi.search(rq, cfg.k)
            _, rows_t = fi.search(tq, cfg.k)
            sweep.append(
                {
                    "nprobe": fi.nprobe,
                    "recall": _recall(rows, truth),
                    "recall_text": _recall(rows_t, truth_text),
                    "ms_per_query": _median_ms(lambda q: fi.search(q, cfg.k), rq),
                }
            )
        stats["sweep"] = sweep
        fi.nprobe = stats["nprobe"]
        faiss_index = dataclasses.replace(index, backend_name="faiss", _backend=fi, _rows=None)
        collections.append(Collection("faiss", faiss_index, "bench"))
    bank = AdapterBank(model.clip)
    bank.add("bench", model)
    drop_vision(model)  # as `vidret serve` does: queries never run the vision tower
    service = SearchService(bank, collections, text_cache_size=cfg.text_cache)
    service.warm_up()
    return service, stats


def _server_main(cfg_json: str, n: int, port: int, conn: Any, parent_pid: int) -> None:
    """Child process: build one size, report stats through ``conn``, serve until terminated."""
    import uvicorn

    die_with_parent(parent_pid)  # a killed benchmark must not leave its server holding the port and the index

    from vidret.retrieval.service import create_app

    cfg = _config_from_json(cfg_json)
    if cfg.threads > 0:
        from vidret.retrieval.service import set_threads

        set_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="vidret-bench-") as workdir:
        try:
            service, stats = _prepare(cfg, n, workdir)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            conn.send({"error": f"{type(e).__name__}: {e}"})
            return
        conn.send(stats)
        server = uvicorn.Server(
            uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning", access_log=False)
        )
        server.run()


def _config_from_json(s: str) -> SearchBenchConfig:
    d = json.loads(s)
    for key in ("sizes", "backends", "sweep", "clients"):
        d[key] = tuple(d[key])
    return SearchBenchConfig(**d)


# ------------------------------------------------------------------------------------------ client side


@dataclass
class LoadResult:
    """Latencies of one (size, backend) load run."""

    backend: str
    n: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "backend": self.backend,
            "n": self.n,
            "requests": self.requests,
            "errors": self.errors,
            "qps": self.requests / self.seconds if self.seconds else 0.0,
            "p50_ms": float(np.percentile(lat, 50)),
            "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max()),
            "error_samples": self.error_samples[:5],
        }


def run_load(
    base_url: str, index: str, n: int, clients: int, duration_s: float, warmup_s: float, k: int, seed: int = 0
) -> LoadResult:
    """``clients`` threads issuing GET /search for warmup + duration seconds; only the last part is measured."""
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one log line per request
    sentences = query_sentences(512, seed + 3)
    result = LoadResult(index, n)
    lock = threading.Lock()
    start = time.perf_counter()
    measure_from = start + warmup_s
    end = measure_from + duration_s

    def worker(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        with httpx.Client(base_url=base_url, timeout=120.0) as client:
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                q = sentences[int(rng.integers(len(sentences)))]
                err = ""
                try:
                    r = client.get("/search", params={"q": q, "k": k, "index": index})
                    if r.status_code != 200:
                        err = f"HTTP {r.status_code}: {r.text[:200]}"
                    elif len(r.json()["results"]) != min(k, n):
                        err = f"{len(r.json()['results'])} results instead of {min(k, n)}"
                except Exception as e:  # noqa: BLE001 - counted as an error
                    err = f"{type(e).__name__}: {e}"
                dt = (time.perf_counter() - t0) * 1000
                if t0 >= measure_from:
                    with lock:
                        result.requests += 1
                        result.latencies_ms.append(dt)
                        if err:
                            result.errors += 1
                            result.error_samples.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = duration_s
    return result


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(base_url: str, proc: Any, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not proc.is_alive():
            raise VidretError("the benchmark server exited")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base_url + "/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.2)
    raise VidretError("the benchmark server did not come up")


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory, library versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine skews latency
    with contextlib.suppress(ImportError):
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    with contextlib.suppress(ImportError):
        import faiss

        info["faiss"] = faiss.__version__
    return info


def run_bench(cfg: SearchBenchConfig, log: Any = None) -> dict[str, Any]:
    """Run every size and backend; returns a JSON-ready dict (machine, build stats, recall, load)."""
    from vidret.retrieval.backends import faiss_available

    if "faiss" in cfg.backends and not faiss_available():
        raise VidretError("the FAISS backend needs the [ann] extra: pip install faiss-cpu (or --backends exact)")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out: dict[str, Any] = {"config": dataclasses.asdict(cfg), "machine": machine_info(), "sizes": []}
    t_start = time.perf_counter()
    ctx = mp.get_context("spawn")
    cfg_json = json.dumps(dataclasses.asdict(cfg))
    for n in cfg.sizes:
        port = _free_port()
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_server_main, args=(cfg_json, n, port, child, os.getpid()), daemon=True)
        log(f"[bench search] N={n}: building the index in a server process ...")
        proc.start()
        try:
            if not parent.poll(3600):
                raise VidretError(f"N={n}: the server did not finish building within an hour")
            stats = parent.recv()
            if "error" in stats:
                raise VidretError(f"N={n}: the server failed: {stats['error']}")
            base = f"http://127.0.0.1:{port}"
            _wait_healthy(base, proc)
            loads = []
            for backend in cfg.backends:
                for clients in cfg.clients:
                    log(f"[bench search] N={n} {backend}: {clients} clients for {cfg.duration_s:g} s ...")
                    res = run_load(base, backend, n, clients, cfg.duration_s, cfg.warmup_s, cfg.k, cfg.seed)
                    loads.append({**res.summary(), "clients": clients})
                log(f"[bench search]   {_load_line(loads[-1])}")
            out["sizes"].append({"stats": stats, "load": loads})
        finally:
            proc.terminate()
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    out["total_s"] = time.perf_counter() - t_start
    with contextlib.suppress(OSError, AttributeError):
        out["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    return out


def _load_line(s: dict[str, Any]) -> str:
    return (
        f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, {s['qps']:.1f} req/s, "
        f"{s['requests']} requests, {s['errors']} errors"
    )


def format_markdown(res: dict[str, Any]) -> str:
    """Result tables in Markdown."""
    m, cfg = res["machine"], res["config"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('ram_gb', '?')} GB RAM; torch {m['torch']} "
        f"({m['torch_threads']} threads), faiss {m.get('faiss', '-')}, Python {m['python']}; load average "
        f"{m.get('loadavg_1m', '?')} at the start, {m.get('loadavg_1m_end', '?')} at the end; "
        f"total {res.get('total_s', 0):.0f} s.",
        "",
        f"Data: {cfg['data']} unit vectors, dim {cfg['dim']}, stored as {cfg['storage']}; "
        f"concurrent HTTP clients for {cfg['duration_s']:g} s per row (after {cfg['warmup_s']:g} s "
        f"warm-up); k = {cfg['k']}; server threads: {cfg.get('threads') or 'default'}; text encoder "
        f"{cfg.get('encoder', 'tiny')}{' int8' if cfg.get('quantize') else ''}; query cache "
        f"{cfg.get('text_cache') or 'off'}.",
        "",
        "| N | backend | clients | nprobe | p50 ms | p90 ms | p99 ms | max ms | req/s | requests | errors | recall@k |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in res["sizes"]:
        st = size["stats"]
        want = st.get("nprobe") or min(cfg["nprobe"], st.get("nlist", 1))  # results written before: cfg's value
        served = next((s for s in st.get("sweep", []) if s["nprobe"] == want), None)
        for ld in size["load"]:
            faiss_row = ld["backend"] == "faiss"
            nprobe = f"{served['nprobe']}/{st['nlist']}" if faiss_row and served else "-"
            recall = f"{served['recall']:.3f}" if faiss_row and served else "1 (exact)"
            lines.append(
                f"| {st['n']:,} | {ld['backend']} | {ld.get('clients', '-')} | {nprobe} | {ld['p50_ms']:.1f} | "
                f"{ld['p90_ms']:.1f} | "
                f"{ld['p99_ms']:.1f} | {ld['max_ms']:.1f} | {ld['qps']:.1f} | {ld['requests']} | {ld['errors']} | "
                f"{recall} |"
            )
    lines += [
        "",
        "Index build (in the server process) and in-process search, one query at a time:",
        "",
        "| N | generate s | save s | index on disk | load s (checksums) | FAISS build s | nlist | exact ms/query |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in res["sizes"]:
        st = size["stats"]
        disk = f"{st['index_bytes'] / 1e6:.0f} MB" if "index_bytes" in st else "-"
        lines.append(
            f"| {st['n']:,} | {st['generate_s']:.1f} | {st.get('save_s', float('nan')):.1f} | {disk} | "
            f"{st.get('load_s', float('nan')):.1f} | {st.get('faiss_build_s', float('nan')):.1f} | "
            f"{st.get('nlist', '-')} | {st['exact_ms_per_query']:.1f} |"
        )
    if any("sweep" in s["stats"] for s in res["sizes"]):
        lines += [
            "",
            f"FAISS IVF-Flat recall@{cfg['k']} against exact search ({cfg['recall_queries']} queries: random unit "
            "vectors / tiny-encoder text queries), and in-process latency per single query:",
            "",
            "| N | nlist | nprobe | recall (random queries) | recall (text queries) | ms/query |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for size in res["sizes"]:
            st = size["stats"]
            for s in st.get("sweep", []):
                lines.append(
                    f"| {st['n']:,} | {st['nlist']} | {s['nprobe']} | {s['recall']:.3f} | {s['recall_text']:.3f} | "
                    f"{s['ms_per_query']:.2f} |"
                )
    st0 = res["sizes"][0]["stats"] if res["sizes"] else {}
    enc = st0.get("text_encoder_params")
    if enc:
        shape = (
            "ViT-B/32's text tower (width 512, 12 layers)"
            if st0.get("encoder") == "vit-b-32"
            else ("width 32, 2 layers")
        )
        lines += [
            "",
            f"Text encoder: random CLIP text tower, {shape}, {enc:,} parameters; one query alone "
            f"{st0.get('encode_ms_one_query', float('nan')):.1f} ms in-process.",
        ]
    if "int8_recall_vs_fp32" in st0:
        lines += [
            f"int8 text tower: recall@{cfg['k']} of its exact-search results against the fp32 tower's: "
            f"{st0['int8_recall_vs_fp32']:.3f} ({cfg['recall_queries']} queries)."
        ]
    return "\n".join(lines) + "\n"


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x.replace("_", "")) for x in s.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vidret bench search``; returns 0, or 1 when any request failed."""
    p = argparse.ArgumentParser(prog="vidret bench search", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=_ints, default=SearchBenchConfig.sizes, help="comma-separated N")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--backends", default="exact,faiss")
    p.add_argument("--clients", type=_ints, default=(8,), help="concurrent clients, comma-separated (1,8: two rows)")
    p.add_argument("--encoder", choices=["tiny", "vit-b-32"], default="tiny", help="text tower shape (random)")
    p.add_argument("--quantize", action="store_true", help="int8 dynamic quantised text tower")
    p.add_argument("--text-cache", type=int, default=0, help="query-embedding LRU size of the service (0 = off)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per size and backend")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--nlist", type=int, default=0, help="FAISS IVF lists (0 = chosen from N: 4 sqrt(N), <= 1024)")
    p.add_argument(
        "--nprobe", type=int, default=0, help="FAISS lists probed by the served index (0 = chosen from N and nlist)"
    )
    p.add_argument("--sweep", type=_ints, default=SearchBenchConfig.sweep, help="nprobe values for recall")
    p.add_argument("--recall-queries", type=int, default=200)
    p.add_argument("--data", choices=["random", "clustered"], default="random")
    p.add_argument("--storage", choices=["float16", "float32"], default="float16")
    p.add_argument("--no-persist", action="store_true", help="serve from memory (skip save + load)")
    p.add_argument("--threads", type=int, default=0, help="torch/FAISS threads of the server (0 = default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the Markdown tables here")
    p.add_argument("--json", default=None, help="write the raw results here")
    args = p.parse_args([a for a in (argv or []) if a != "--"])
    cfg = SearchBenchConfig(
        sizes=args.sizes,
        dim=args.dim,
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        clients=args.clients,
        encoder=args.encoder,
        quantize=args.quantize,
        text_cache=args.text_cache,
        duration_s=args.duration,
        warmup_s=args.warmup,
        k=args.k,
        nlist=args.nlist,
        nprobe=args.nprobe,
        sweep=args.sweep,
        recall_queries=args.recall_queries,
        data=args.data,
        storage=args.storage,
        persist=not args.no_persist,
        threads=args.threads,
        seed=args.seed,
    )
    res = run_bench(cfg)
    text = format_markdown(res)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    failed = sum(ld["errors"] for s in res["sizes"] for ld in s["load"])
    return 1 if failed else 0


__all__ = ["LoadResult", "SearchBenchConfig", "format_markdown", "machine_info", "main", "run_bench", "run_load"]
