"""The training loop end to end on a tiny pocket world: train, save, evaluate, determinism, kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vidret.adapters.io import weights_file
from vidret.backbone.clip import create_backbone
from vidret.data.manifest import read_manifest, write_manifest
from vidret.errors import VidretError
from vidret.train.config import config_from_dict
from vidret.train.loop import train

MV_TINY = {"r": 8, "cmt_layers": [0, 1], "num_frames": 8, "max_words": 16}


def cfg_dict(world: Path, out: Path, method: str = "mv_adapter", **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "backbone": "random:pocket-tiny",
        "method": method,
        "method_options": MV_TINY if method == "mv_adapter" else {},
        "data": {
            "train_manifest": str(world / "train.jsonl"),
            "num_frames": 8,
            "image_size": 32,
            "max_words": 16,
            "num_workers": 0,
        },
        "optim": {"lr": 1e-3},
        "epochs": 2,
        "global_batch": 4,
        "precision": "fp32",
        "out_dir": str(out),
        "checkpoint_every": 1,
        "log_every": 1,
        "device": "cpu",
    }
    d.update(kw)
    return d


def test_train_saves_adapter_logs_and_evaluates(tiny_world: Path, tmp_path: Path) -> None:
    d = cfg_dict(tiny_world, tmp_path / "run")
    d["data"]["test_manifest"] = str(tiny_world / "test.jsonl")
    res = train(config_from_dict(d), progress=False)
    assert res.steps == 4  # 10 clips // 4 per batch = 2 steps x 2 epochs
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[0]["lr"] < records[1]["lr"] or records[-1]["lr"] < records[1]["lr"]  # warmup + cosine moves lr
    meta = json.loads((tmp_path / "run/adapter/adapter.json").read_text())
    assert meta["method"] == "mv_adapter" and meta["backbone"]["name"] == "pocket-tiny"
    # trained: the zero-initialised up-projections moved
    state = load_file(str(weights_file(tmp_path / "run/adapter")))
    ups = [v for k, v in state.items() if "up" in k.lower() and k.endswith("weight")]
    assert ups and any(v.abs().sum() > 0 for v in ups)
    ev = res.eval
    assert ev["n_videos"] == len(read_manifest(tiny_world / "test.jsonl"))
    for direction in ("t2v", "v2t"):
        assert set(ev[direction]) >= {"R1", "R5", "R10", "MdR", "MnR"}
        assert 1.0 <= ev[direction]["MdR"] <= ev["n_videos"]
    assert ev["world_size"] == 1 and ev["global_batch"] == 4 and ev["seed"] == 42
    assert json.loads((tmp_path / "run/results.json").read_text())["t2v"] == ev["t2v"]


def test_training_is_deterministic_for_a_seed(tiny_world: Path, tmp_path: Path) -> None:
    a = train(config_from_dict(cfg_dict(tiny_world, tmp_path / "a", epochs=1)), progress=False)
    b = train(config_from_dict(cfg_dict(tiny_world, tmp_path / "b", epochs=1)), progress=False)
    sa = load_file(str(weights_file(a.adapter_dir)))
    sb = load_file(str(weights_file(b.adapter_dir)))
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = train(config_from_dict(cfg_dict(tiny_world, tmp_path / "c", epochs=1, seed=7)), progress=False)
    sc = load_file(str(weights_file(c.adapter_dir)))
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def _run_cli(cfg_path: Path, *extra: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "vidret", "train", str(cfg_path), "--no-progress", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


# the official recipe's optimiser state (BertAdam's exp_avg / exp_avg_sq, per-tensor clipping) must round-trip too
OFFICIAL = {
    "name": "bert_adam",
    "schedule": "bert_warmup_cosine",
    "per_tensor_clip": 1.0,
    "decay_rule": "mvadapter_names",
}


@pytest.mark.parametrize("optim", [{}, OFFICIAL], ids=["adamw", "bert_adam"])
def test_killed_run_resumes_to_the_same_result(tiny_world: Path, tmp_path: Path, optim: dict[str, Any]) -> None:
    def write(name: str) -> Path:
        d = cfg_dict(tiny_world, tmp_path / name, checkpoint_every=1)
        d["optim"].update(optim)
        if optim:
            d["data"].update(train_sampling="mvadapter_floor", eval_sampling="mvadapter_floor", num_frames=4)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(d))
        return path

    full_cfg, killed_cfg = write("full"), write("killed")

    ref = _run_cli(full_cfg)
    assert ref.returncode == 0, ref.stderr
    # a real SIGKILL in the middle of epoch 2 (step 3 of 4), after its checkpoint was written
    killed = _run_cli(killed_cfg, env_extra={"VIDRET_KILL_AFTER_STEP": "3"})
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed/adapter").exists()
    ckpt = json.loads((tmp_path / "killed/checkpoint.json").read_text())
    assert ckpt["position"]["step"] == 3 and ckpt["position"]["step_in_epoch"] == 1
    # starting again without --resume refuses to overwrite
    again = _run_cli(killed_cfg)
    assert again.returncode == 1 and "--resume" in again.stderr
    resumed = _run_cli(killed_cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(weights_file(tmp_path / "full/adapter")))
    b = load_file(str(weights_file(tmp_path / "killed/adapter")))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"


def test_resume_refuses_a_different_config(tiny_world: Path, tmp_path: Path) -> None:
    train(config_from_dict(cfg_dict(tiny_world, tmp_path / "r", epochs=1)), progress=False)
    with pytest.raises(VidretError, match="seed"):
        train(config_from_dict(cfg_dict(tiny_world, tmp_path / "r", epochs=1, seed=3)), resume=True, progress=False)


def test_too_many_bad_videos_stop_the_run(tiny_world: Path, tmp_path: Path) -> None:
    entries = read_manifest(tiny_world / "train.jsonl")
    bad_file = tmp_path / "broken.mp4"
    bad_file.write_bytes(b"\x00not a video" * 100)
    from dataclasses import replace

    broken = [replace(e, path=str(bad_file)) if i % 2 == 0 else e for i, e in enumerate(entries)]
    write_manifest(tmp_path / "train.jsonl", broken)
    d = cfg_dict(tiny_world, tmp_path / "run", epochs=1)
    d["data"]["train_manifest"] = str(tmp_path / "train.jsonl")
    with pytest.raises(VidretError, match="max_bad_fraction"):
        train(config_from_dict(d), progress=False)
    # with a permissive threshold the run finishes and lists the bad videos
    d["data"]["max_bad_fraction"] = 0.9
    d["out_dir"] = str(tmp_path / "run2")
    res = train(config_from_dict(d), progress=False)
    assert len(res.bad_videos) >= 1
    report = json.loads((tmp_path / "run2/bad_videos.json").read_text())
    assert report["num_bad"] == len(res.bad_videos)


def test_config_errors_come_before_any_work(tiny_world: Path, tmp_path: Path) -> None:
    d = cfg_dict(tiny_world, tmp_path / "run")
    d["data"]["train_manifest"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(VidretError, match="manifest not found"):
        train(config_from_dict(d), progress=False)
    d = cfg_dict(tiny_world, tmp_path / "run", global_batch=64)
    with pytest.raises(VidretError, match="fewer than one global batch"):
        train(config_from_dict(d), progress=False)
    d = cfg_dict(tiny_world, tmp_path / "run", method_options={"r": 8, "nonsense": 1})
    with pytest.raises(VidretError, match="nonsense"):
        train(config_from_dict(d), progress=False)


def test_cli_train_reports_errors_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lrr: 1\n")
    r = subprocess.run([sys.executable, "-m", "vidret", "train", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "optim.lrr" in r.stderr and "Traceback" not in r.stderr


def test_backbone_spec_random_is_seeded() -> None:
    from vidret.train.loop import load_backbone_for

    a, b = load_backbone_for("random:pocket-tiny"), create_backbone("pocket-tiny", seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_plot_run_draws_curves(tiny_world: Path, tmp_path: Path) -> None:
    from vidret.train.plot import plot_run

    train(config_from_dict(cfg_dict(tiny_world, tmp_path / "run", epochs=1)), progress=False)
    png = plot_run(tmp_path / "run")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(VidretError, match="metrics.jsonl"):
        plot_run(tmp_path)


def test_frozen_is_a_zero_shot_run_that_saves_and_evaluates(tiny_world: Path, tmp_path: Path) -> None:
    # The papers' frozen rows come from the same command as the trained ones: no step, the same outputs.
    d = cfg_dict(tiny_world, tmp_path / "fz", method="frozen")
    d["data"]["test_manifest"] = str(tiny_world / "test.jsonl")
    res = train(config_from_dict(d), progress=False)
    assert res.steps == 0 and res.eval is not None and 0 <= res.eval["t2v"]["R1"] <= 100
    meta = json.loads((tmp_path / "fz/adapter/adapter.json").read_text())
    assert meta["method"] == "frozen" and meta["trainable_parameters"] == 0
    assert (tmp_path / "fz/results.json").is_file() and not (tmp_path / "fz/checkpoint.json").exists()
