"""`vidret bench hostpath` on the tiny config: both parts run and report consistent, finite figures."""

from __future__ import annotations

import math

import pytest

from vidret import host_memory
from vidret.bench.hostpath import format_hostpath_benchmark, run_hostpath_benchmark, time_gelu_backward


def test_gelu_backward_timing_reports_both_forms() -> None:
    r = time_gelu_backward(64, 256, reps=3)
    assert r["graph_ms"] > 0 and r["fused_ms"] > 0
    assert r["recompute_ms"] > 0
    assert math.isclose(r["speedup"], r["graph_ms"] / r["fused_ms"])
    assert math.isclose(r["speedup_vs_recompute"], r["recompute_ms"] / r["fused_ms"])


@pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc")
def test_allocator_comparison_runs_each_mode_in_its_own_process() -> None:
    r = run_hostpath_benchmark("pocket-tiny", "lora", frames=2, batch=2, steps=2, threads=1)
    system, kept = r["allocator"]["system"], r["allocator"]["kept"]
    assert system["kept_memory"] is False and kept["kept_memory"] is True
    for row in (system, kept):
        assert len(row["step_times_s"]) == 2 and row["median_step_s"] > 0 and row["minor_faults"] >= 0
    assert r["gelu_shape"] == [2 * 2 * ((32 // 8) ** 2 + 1), 4 * 32]  # B*T*(patches + class) x 4*width
    text = format_hostpath_benchmark(r)
    assert "glibc default" in text and "freed memory kept" in text
