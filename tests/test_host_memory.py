"""The host allocator tuning: applied on glibc, skipped on request, and allocations still work after it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vidret import host_memory

_PROBE = """
import os, resource, torch
from vidret.host_memory import keep_freed_memory, allocator_mode
applied = keep_freed_memory()
torch.set_num_threads(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a training step's pattern: several big activations alive together, then all freed
    xs = [torch.ones(n * 2**20 // 4) for n in (64, 40, 48)]  # MiB: above glibc's largest mmap threshold
    del xs
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, allocator_mode(), faults)
"""


def _probe(env_value: str | None) -> tuple[str, str, int]:
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV}
    if env_value is not None:
        env[host_memory.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    applied, mode_and_faults = out.stdout.strip().split(" ", 1)
    mode, faults = mode_and_faults.rsplit(" ", 1)
    return applied, mode, int(faults)


@pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc")
def test_kept_memory_is_reused_instead_of_faulted_in_again() -> None:
    applied, mode, faults_kept = _probe(None)
    assert applied == "True" and "kept" in mode
    skipped, mode_sys, faults_system = _probe("system")
    assert skipped == "False" and mode_sys == "system default"
    # 20 x 152 MiB = 778,240 pages of 4 KiB: glibc's default unmaps and faults every one in again
    assert faults_system > 700_000
    assert faults_kept < faults_system / 4


def test_opt_out_is_honoured_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(host_memory.ENV, "system")
    assert host_memory.keep_freed_memory() is False
