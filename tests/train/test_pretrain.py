"""Pocket pretraining writes checkpoints the normal loader reads back; the shipped pocket CLIP loads by name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vidret.backbone.pretrained import PRETRAINED, PretrainedSource, backbone_info, load_backbone, packaged_path
from vidret.cli import main
from vidret.errors import VidretError
from vidret.train.pretrain import PretrainConfig, lr_at, pretrain


def test_pretrain_round_trips_through_the_openai_loader(tiny_world: Path, tmp_path: Path) -> None:
    cfg = PretrainConfig(world=str(tiny_world), out=str(tmp_path / "p.pt"), steps=3, warmup=1, batch=16)
    out = pretrain(cfg, progress=False)
    raw = torch.load(out, weights_only=True)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in raw  # OpenAI layout, fused q/k/v
    assert "token_embedding.weight" in raw and "text_projection" in raw
    clip = load_backbone(str(out))
    assert clip.config.name == "pocket-small"
    x = torch.randn(2, 3, 64, 64)
    assert torch.isfinite(clip.encode_image(x)).all()
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["holdout_images"] > 0 and 0.0 <= summary["holdout"]["i2t_R1"] <= 100.0


def test_pretrain_writes_fp16_safetensors_with_the_architecture(tiny_world: Path, tmp_path: Path) -> None:
    cfg = PretrainConfig(world=str(tiny_world), out=str(tmp_path / "p.safetensors"), steps=2, warmup=1, batch=16)
    out = pretrain(cfg, progress=False)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("visual.conv1.weight").dtype == torch.float16
    assert json.loads(meta["vidret_config"])["name"] == "pocket-small"
    assert json.loads(out.with_suffix(".json").read_text())["config"]["steps"] == 2
    assert load_backbone(out).config.name == "pocket-small"


def test_pretrain_is_deterministic(tiny_world: Path, tmp_path: Path) -> None:
    def run(name: str) -> bytes:
        cfg = PretrainConfig(world=str(tiny_world), out=str(tmp_path / name), steps=2, warmup=1, batch=16)
        return pretrain(cfg, progress=False).read_bytes()

    assert run("a.safetensors") == run("b.safetensors")


def test_pretrain_generates_its_own_set_when_no_world_is_given(tmp_path: Path) -> None:
    cfg = PretrainConfig(out=str(tmp_path / "p.safetensors"), pretrain_images=200, steps=1, warmup=0, batch=8)
    out = pretrain(cfg, progress=False)
    assert json.loads(out.with_suffix(".json").read_text())["pretrain_images"] == 200


def test_pretrain_cli_knobs(tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.safetensors"
    argv = ["pretrain", "--world", str(tiny_world), "--out", str(out), "--steps", "3", "--warmup", "1"]
    assert main([*argv, "--lr", "2e-3", "--batch", "16", "--seed", "1", "--store", "fp32"]) == 0
    assert "held-out R@1" in capsys.readouterr().out
    recipe = json.loads(out.with_suffix(".json").read_text())["config"]
    assert (recipe["steps"], recipe["warmup"], recipe["lr"], recipe["batch"], recipe["seed"]) == (3, 1, 2e-3, 16, 1)


def test_schedule_warms_up_then_decays_to_zero() -> None:
    cfg = PretrainConfig(out="x.safetensors", steps=100, warmup=10, lr=1e-3)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3) and lr_at(99, cfg) < 1e-6
    with pytest.raises(VidretError, match="warmup"):
        PretrainConfig(out="x.safetensors", steps=10, warmup=10)
    with pytest.raises(VidretError, match="safetensors or .pt"):
        PretrainConfig(out="x.bin")


def test_pretrain_refuses_a_mismatched_image_size(tiny_world: Path, tmp_path: Path) -> None:
    with pytest.raises(VidretError, match="px"):
        pretrain(
            PretrainConfig(world=str(tiny_world), out=str(tmp_path / "x.pt"), config="pocket-tiny", steps=1, warmup=0),
            progress=False,
        )


# --------------------------------------------------------------------------- the shipped checkpoint


def test_the_shipped_pocket_clip_loads_by_name_and_is_strong() -> None:
    src = PRETRAINED["pocket-small"]
    path = packaged_path(src)
    assert path.is_file() and path.stat().st_size < 8 * 2**20
    assert hashlib.sha256(path.read_bytes()).hexdigest() == src.sha256
    clip = load_backbone("pocket-small")
    assert clip.config.name == "pocket-small" and next(clip.parameters()).dtype == torch.float32
    summary = json.loads(path.with_suffix(".json").read_text())
    # the recipe the issue asks for, and held-out static R@1 >= 85% both ways (measured on the fp16 file)
    assert summary["config"]["steps"] == 1200 and summary["holdout_images"] == 512
    assert min(summary["holdout"].values()) >= 85.0
    info = backbone_info("pocket-small")
    assert info["pretrained"]["sha256"] == src.sha256 and "shipped with vidret" in info["source"]


def test_a_corrupt_or_missing_shipped_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    src = PRETRAINED["pocket-small"]
    monkeypatch.setitem(PRETRAINED, "pocket-small", PretrainedSource(src.config, "", "0" * 64, src.package_file))
    with pytest.raises(VidretError, match="reinstall vidret"):
        load_backbone("pocket-small")
    gone = PretrainedSource(src.config, "", src.sha256, "backbone/weights/missing.safetensors")
    monkeypatch.setitem(PRETRAINED, "pocket-small", gone)
    with pytest.raises(VidretError, match="missing"):
        load_backbone("pocket-small")
