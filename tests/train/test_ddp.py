"""DDP smoke test (gloo, 2 CPU processes via torchrun): same result as one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train.test_loop import cfg_dict
from vidret.adapters.io import weights_file

pytestmark = pytest.mark.ddp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def test_two_process_gloo_matches_single_process(tiny_world: Path, tmp_path: Path) -> None:
    common = {"epochs": 1, "checkpoint_every": 0, "log_every": 1}
    single = tmp_path / "single.yaml"
    single.write_text(yaml.safe_dump(cfg_dict(tiny_world, tmp_path / "single", **common)))
    ddp = tmp_path / "ddp.yaml"
    ddp.write_text(yaml.safe_dump(cfg_dict(tiny_world, tmp_path / "ddp", **common)))

    r1 = _run([sys.executable, "-m", "vidret", "train", str(single), "--no-progress"])
    assert r1.returncode == 0, r1.stderr
    r2 = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "vidret",
            "train",
            str(ddp),
            "--no-progress",
        ]
    )
    assert r2.returncode == 0, r2.stderr[-4000:]
    assert "2 ranks x 2 micro-batch" in r2.stderr

    # the loss of every step is the global-batch loss, whatever the number of processes
    l1 = [json.loads(x)["loss"] for x in (tmp_path / "single/metrics.jsonl").read_text().splitlines()]
    l2 = [json.loads(x)["loss"] for x in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    assert len(l1) == len(l2) == 2
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    # and the trained adapters agree (the ranks themselves are checked bitwise in sync at the end of train())
    a = load_file(str(weights_file(tmp_path / "single/adapter")))
    b = load_file(str(weights_file(tmp_path / "ddp/adapter")))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # only rank 0 wrote files
    assert json.loads((tmp_path / "ddp/adapter/adapter.json").read_text())["extra"]["train"]["world_size"] == 2
