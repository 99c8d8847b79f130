"""`vidret bench search`: the server-side preparation, the HTTP load generator, the report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("uvicorn")

from tests.retrieval.helpers import running_server  # noqa: E402
from vidret.bench.search import (  # noqa: E402
    SearchBenchConfig,
    _prepare,
    format_markdown,
    machine_info,
    main,
    run_load,
    synthetic_vectors,
)
from vidret.errors import VidretError  # noqa: E402
from vidret.retrieval.backends import faiss_available  # noqa: E402


def test_synthetic_vectors_are_unit_and_deterministic() -> None:
    for data in ("random", "clustered"):
        x = synthetic_vectors(500, 32, seed=1, data=data)
        assert x.shape == (500, 32) and torch.allclose(x.norm(dim=1), torch.ones(500), atol=1e-5)
        assert torch.equal(x, synthetic_vectors(500, 32, seed=1, data=data))

    # clustered data has far closer nearest neighbours than uniform data
    def nn_sim(x: torch.Tensor) -> float:
        s = x @ x.T
        s.fill_diagonal_(-2)
        return float(s.max(dim=1).values.mean())

    assert nn_sim(synthetic_vectors(3000, 32, 0, "clustered")) > nn_sim(synthetic_vectors(3000, 32, 0, "random")) + 0.15


def test_config_validation() -> None:
    with pytest.raises(VidretError):
        SearchBenchConfig(sizes=(10,))
    with pytest.raises(VidretError):
        SearchBenchConfig(backends=("annoy",))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    backends = ("exact", "faiss") if faiss_available() else ("exact",)
    cfg = SearchBenchConfig(sizes=(3000,), dim=64, backends=backends, sweep=(1, 1000), recall_queries=30, nprobe=4)
    return cfg, *_prepare(cfg, 3000, str(tmp_path_factory.mktemp("bench")))


def test_prepare_builds_a_persisted_index_and_measures_recall(prepared) -> None:
    cfg, service, stats = prepared
    assert stats["n"] == 3000 and stats["index_bytes"] > 3000 * 64 * 2  # float16 features on disk
    assert stats["load_s"] >= 0 and stats["exact_ms_per_query"] > 0
    hits = service.search("a dog catches a frisbee", k=10, index="exact")
    assert len(hits) == 10 and hits[0]["rank"] == 1
    if "faiss" in cfg.backends:
        sweep = {s["nprobe"]: s for s in stats["sweep"]}
        assert stats["nlist"] == 76  # 4 sqrt(3000), with >= 39 training points per list
        assert stats["nprobe"] == 4  # the explicit value wins over the size rule
        assert sweep[76]["recall"] == 1.0 and sweep[76]["recall_text"] == 1.0  # nprobe clipped to nlist: exact
        assert sweep[1]["recall"] < 1.0
        assert len(service.search("a dog", k=10, index="faiss")) == 10


def test_run_load_through_real_uvicorn(prepared) -> None:
    from vidret.retrieval.service import create_app

    cfg, service, _ = prepared
    with running_server(create_app(service)) as port:
        res = run_load(f"http://127.0.0.1:{port}", "exact", 3000, clients=4, duration_s=1.0, warmup_s=0.2, k=10)
        summary = res.summary()
        assert res.requests > 4 and res.errors == 0, res.error_samples
        assert 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
        bad = run_load(f"http://127.0.0.1:{port}", "missing", 3000, clients=1, duration_s=0.3, warmup_s=0, k=10)
        assert bad.errors == bad.requests > 0 and "404" in bad.error_samples[0]  # errors are counted
    with contextlib.suppress(Exception):
        service.close()


def test_format_markdown_lists_every_row() -> None:
    res = {
        "config": {
            "data": "random",
            "dim": 512,
            "storage": "float16",
            "clients": 8,
            "duration_s": 20.0,
            "warmup_s": 2.0,
            "k": 10,
            "nprobe": 32,
            "recall_queries": 200,
        },
        "machine": machine_info(),
        "total_s": 100.0,
        "sizes": [
            {
                "stats": {
                    "n": 100000,
                    "generate_s": 1.0,
                    "save_s": 2.0,
                    "index_bytes": 1e8,
                    "load_s": 3.0,
                    "faiss_build_s": 4.0,
                    "nlist": 316,
                    "exact_ms_per_query": 20.0,
                    "text_encoder_params": 1000,
                    "sweep": [{"nprobe": 32, "recall": 0.5, "recall_text": 0.6, "ms_per_query": 1.0}],
                },
                "load": [
                    {
                        "backend": b,
                        "p50_ms": 10.0,
                        "p90_ms": 11.0,
                        "p99_ms": 12.0,
                        "max_ms": 13.0,
                        "qps": 100.0,
                        "requests": 2000,
                        "errors": 0,
                        "clients": 8,
                    }
                    for b in ("exact", "faiss")
                ],
            }
        ],
    }
    text = format_markdown(res)
    assert "| 100,000 | exact | 8 | - | 10.0 |" in text and "| 100,000 | faiss | 8 | 32/316 |" in text
    assert "0.500" in text and machine_info()["cpu"] in text


@pytest.mark.slow
def test_main_end_to_end(tmp_path: Path) -> None:
    args = ["--sizes", "1000", "--dim", "64", "--duration", "1", "--warmup", "0.2", "--sweep", "1,4"]
    args += ["--recall-queries", "20", "--out", str(tmp_path / "s.md"), "--json", str(tmp_path / "s.json")]
    if not faiss_available():
        args += ["--backends", "exact"]
    assert main(args) == 0
    assert "| 1,000 | exact |" in (tmp_path / "s.md").read_text()


def test_bench_config_takes_client_counts_and_the_encoder_options() -> None:
    from vidret.bench.search import SearchBenchConfig, _config_from_json

    cfg = SearchBenchConfig(sizes=(1000,), clients=(1, 8), encoder="vit-b-32", quantize=True)
    back = _config_from_json(json.dumps(dataclasses.asdict(cfg)))
    assert back == cfg and back.clients == (1, 8)
    with pytest.raises(VidretError):
        SearchBenchConfig(sizes=(1000,), clients=())
