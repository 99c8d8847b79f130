"""Smoke tests of `vidret bench train|encode` on the tiny random config: structure, finiteness, and the checks the
benchmark exists for (frozen weights get no gradients, no weight-gradient FLOPs, no host syncs, real files)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vidret.adapters.base import count_backbone_parameters, list_methods
from vidret.backbone.clip import CLIP, get_config
from vidret.bench.common import SyncCounter, count_flops, synthetic_batch, vit_forward_flops
from vidret.bench.encode import main as encode_main
from vidret.bench.encode import run_encode_benchmark
from vidret.bench.train import (
    EXTRA_VARIANTS,
    TrainBenchConfig,
    expand_methods,
    main,
    parse_method,
    run_storage_benchmark,
    run_train_benchmark,
)
from vidret.errors import VidretError

TINY = dict(backbone="pocket-tiny", frames=2, batch=2, words=8, steps=1, warmup=0, threads=1)


@pytest.fixture(scope="module")
def tiny_all() -> dict:
    """Every method once on pocket-tiny, in this process (CPU memory figures are then not meaningful)."""
    return run_train_benchmark(TrainBenchConfig(methods=("all",), isolate="none", **TINY))  # type: ignore[arg-type]


def test_train_benchmark_covers_every_method_with_finite_figures(tiny_all: dict) -> None:
    rows = {r["label"]: r for r in tiny_all["results"]}
    assert set(list_methods()) <= {r["method"] for r in rows.values()}
    assert set(EXTRA_VARIANTS) <= set(rows)
    assert tiny_all["results"][0]["method"] == "full"  # the reference runs first
    for r in rows.values():
        assert len(r["step_times_s"]) == 1
        assert r["median_step_s"] > 0 and math.isfinite(r["median_step_s"])
        assert r["speedup_vs_full"] > 0 and math.isfinite(r["speedup_vs_full"])
        assert r["adapter_file_bytes"] > 0 and r["peak_memory_bytes"] >= 0
        assert r["forward_flops"] > 0
    full = rows["full"]
    clip_params = count_backbone_parameters(CLIP(get_config("pocket-tiny")))["total"]
    assert full["trainable"] == clip_params - 1  # everything but the frozen logit scale
    assert full["speedup_vs_full"] == 1.0  # (memory ratios need --isolate process: see the next tests)
    for r in rows.values():  # best-of-N: the fastest rounds' ratio
        assert r["speedup_of_best"] == pytest.approx(min(full["step_times_s"]) / min(r["step_times_s"]))
    steal = tiny_all["cpu_steal_percent_during_timing"]
    assert steal is None or 0.0 <= steal <= 100.0
    assert rows["frozen"]["trains"] is False and rows["frozen"]["trainable"] == 0
    assert rows["frozen"]["backward_flops"] == 0
    # The full model copy is by far the largest file; adapters are small.
    assert all(r["adapter_file_bytes"] < full["adapter_file_bytes"] / 5 for r in rows.values() if r is not full)
    json.dumps(tiny_all)  # the result is plain JSON


def test_frozen_weights_get_no_gradients_no_weight_grad_flops_and_no_syncs(tiny_all: dict) -> None:
    rows = {r["label"]: r for r in tiny_all["results"]}
    full = rows["full"]
    # Full fine-tuning: backward = input grads + weight grads, about twice the forward.
    assert 1.6 < full["backward_flops"] / full["forward_flops"] < 2.4
    for label in ("lora", "cross_modal", "bottleneck"):
        r = rows[label]
        assert r["frozen_params_with_grad"] == 0
        # Frozen backbone: only input grads flow back, about one forward's worth.
        assert r["backward_flops"] < 0.75 * full["backward_flops"]
        # AdamW state (two fp32 moments + a step counter per tensor) exists for the trainables only.
        assert 8 * r["trainable"] <= r["optimizer_state_bytes"] <= 8 * r["trainable"] + 4096
    for r in rows.values():
        assert r["host_syncs_per_step"] == 0, (r["label"], r["host_sync_ops"])


def test_train_benchmark_isolates_methods_in_subprocesses_for_memory() -> None:
    res = run_train_benchmark(TrainBenchConfig(methods=("full", "lora"), isolate="process", **TINY))  # type: ignore[arg-type]
    full, lora = res["results"]
    assert res["isolation"] == "process"
    assert full["memory_method"] == "rss_peak_delta" and full["peak_memory_bytes"] > 0
    # Full fine-tuning holds gradients + two Adam moments for every weight (> 19 MB here); LoRA does not.
    assert lora["peak_memory_bytes"] < full["peak_memory_bytes"]
    assert full["optimizer_state_bytes"] >= 2 * 4 * full["trainable"]


def test_train_main_writes_json_and_handles_knobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    args = ["--backbone", "pocket-tiny", "--frames", "2", "--batch", "2", "--words", "8", "--steps", "1"]
    args += ["--warmup", "0", "--threads", "1", "--isolate", "none", "--out", str(out)]
    assert main(["--", *args, "--methods", "full", "lora+layers=[1]+frozen_prefix=false,lora+layers=[1]"]) == 0
    printed = capsys.readouterr().out
    assert "x faster than full" in printed and "pocket-tiny" in printed
    res = json.loads(out.read_text())
    rows = {r["label"]: r for r in res["results"]}
    assert rows["lora+layers=[1]"]["frozen_prefix"] == {"visual": 1, "text": 1}
    assert rows["lora+layers=[1]+frozen_prefix=false"]["frozen_prefix"] == {"visual": 0, "text": 0}
    assert res["machine"]["torch"] == torch.__version__


def test_method_specs_parse_and_fail_clearly() -> None:
    run = parse_method("mv_adapter@msvd+train_biases=false+r=32+precision=bf16")
    assert (run.method, run.preset) == ("mv_adapter", "msvd")
    assert run.overrides == {"train_biases": False, "r": 32} and run.knobs == {"precision": "bf16"}
    assert parse_method("lora").preset == "qv"  # the benchmark's default preset
    runs = expand_methods(["lora,full", "lora"])
    assert [r.label for r in runs] == ["full", "lora"]
    with pytest.raises(VidretError, match="unknown method"):
        parse_method("nope")
    with pytest.raises(VidretError, match="key=value"):
        parse_method("lora+r")
    with pytest.raises(ValueError):
        TrainBenchConfig(batch=0)


def test_storage_benchmark_uses_real_files(tmp_path: Path) -> None:
    res = run_storage_benchmark("pocket-tiny")
    rows = {(r["method"], r["preset"]): r for r in res["results"]}
    full = rows[("full", "default")]
    # A full fine-tuned copy is the backbone file (less the frozen logit scale).
    assert abs(full["safetensors_bytes"] - res["backbone_file_bytes"]) < 0.01 * res["backbone_file_bytes"]
    assert rows[("lora", "qv")]["safetensors_bytes"] < full["safetensors_bytes"] / 50
    five = res["mv_adapter_five_tasks"]
    mv = [r for r in res["results"] if r["method"] == "mv_adapter"]
    expected = 100 + sum(r["percent_of_backbone_file"] for r in mv)
    assert len(mv) == 5 and five["percent_of_one_backbone"] == pytest.approx(expected)
    # Presets wider than the tiny backbone are reported as skipped, not silently dropped.
    assert {s["preset"] for s in res["skipped"]} == {"vatex", "activitynet"}


def test_encode_benchmark_counts_the_formula_flops(tmp_path: Path) -> None:
    res = run_encode_benchmark(
        backbone="pocket-tiny", methods=("frozen", "lora"), frames=2, batch=2, steps=1, warmup=0, threads=1
    )
    rows = {r["label"]: r for r in res["results"]}
    for r in rows.values():
        assert r["frames_per_s"] > 0 and math.isfinite(r["frames_per_s"])
        assert r["counted_tflops"] > 0 and r["fraction_of_peak"] is None  # CPU: no bf16 peak
    # The backbone alone does exactly the formula's FLOPs; LoRA adds its low-rank matmuls.
    assert rows["frozen"]["counted_flops_per_frame"] == res["analytic_flops_per_frame"]["total"]
    assert rows["lora"]["counted_flops_per_frame"] > rows["frozen"]["counted_flops_per_frame"]
    out = tmp_path / "e.json"
    args = ["--backbone", "pocket-tiny", "--frames", "2", "--batch", "1", "--steps", "1", "--warmup", "0"]
    assert encode_main([*args, "--threads", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["frames_per_s"] > 0


def test_vit_flop_formula_matches_the_counter_at_vit_b16() -> None:
    # Counted on the meta device: no memory, no compute, every matmul / conv / attention of the real tower.
    cfg = get_config("ViT-B-16")
    with torch.device("meta"):
        clip = CLIP(cfg)
        images = torch.empty(1, 3, 224, 224)
    _, counted = count_flops(lambda: clip.encode_image(images))
    analytic = vit_forward_flops(cfg.vision, cfg.embed_dim)
    assert counted == analytic.total
    assert 35.0e9 < analytic.total < 35.3e9  # the commonly quoted ~17.6 GMACs of ViT-B/16 at 224 px


def test_sync_counter_sees_what_would_stall_a_gpu() -> None:
    x = torch.randn(4, 4)
    keep = torch.tensor([True, False, True, True])
    with SyncCounter() as sc:
        x[keep]
        x.sum().item()
        x.masked_fill(~keep, 0.0)  # shape does not depend on data: no sync
    assert sc.events == ["aten.index(bool)", "aten._local_scalar_dense"]


def test_synthetic_batch_matches_the_training_collate() -> None:
    b = synthetic_batch(3, 4, 32, 8, seed=1)
    assert b["frames"].shape == (3, 4, 3, 32, 32) and b["frame_mask"].all() and b["valid"].all()
    assert (b["tokens"].argmax(-1) > 0).all()  # the end token is the largest id, after the start token
    assert torch.equal(b["tokens"], synthetic_batch(3, 4, 32, 8, seed=1)["tokens"])


def test_steal_percent_reads_the_steal_column() -> None:
    from vidret.bench.common import cpu_time_counters, steal_percent

    # user nice system idle iowait irq softirq steal guest guest_nice
    before = [100, 0, 50, 800, 0, 0, 0, 50, 0, 0]
    after = [200, 0, 100, 1600, 0, 0, 0, 100, 40, 0]  # +1000 ticks, 50 of them stolen; guest is inside user
    assert steal_percent(before, after) == pytest.approx(5.0)
    assert steal_percent(None, after) is None and steal_percent(before, before) is None
    now = cpu_time_counters()
    assert now is None or (len(now) >= 8 and all(x >= 0 for x in now))
