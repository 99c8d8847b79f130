"""Pocket pretraining writes an OpenAI-layout checkpoint that the normal loader reads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vidret.backbone.pretrained import load_backbone
from vidret.errors import VidretError
from vidret.train.pretrain import PretrainConfig, pretrain


def test_pretrain_round_trips_through_the_openai_loader(tiny_world: Path, tmp_path: Path) -> None:
    out = pretrain(PretrainConfig(world=str(tiny_world), out=str(tmp_path / "p.pt"), steps=3, batch=16), progress=False)
    raw = torch.load(out, weights_only=True)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in raw  # OpenAI layout, fused q/k/v
    assert "token_embedding.weight" in raw and "text_projection" in raw
    clip = load_backbone(str(out))
    assert clip.config.name == "pocket-small"
    x = torch.randn(2, 3, 64, 64)
    assert torch.isfinite(clip.encode_image(x)).all()
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["holdout_images"] > 0 and 0.0 <= summary["holdout"]["i2t_R1"] <= 100.0


def test_pretrain_is_deterministic(tiny_world: Path, tmp_path: Path) -> None:
    a = torch.load(
        pretrain(PretrainConfig(world=str(tiny_world), out=str(tmp_path / "a.pt"), steps=2, batch=16), progress=False),
        weights_only=True,
    )
    b = torch.load(
        pretrain(PretrainConfig(world=str(tiny_world), out=str(tmp_path / "b.pt"), steps=2, batch=16), progress=False),
        weights_only=True,
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_refuses_a_mismatched_image_size(tiny_world: Path, tmp_path: Path) -> None:
    with pytest.raises(VidretError, match="px"):
        pretrain(
            PretrainConfig(world=str(tiny_world), out=str(tmp_path / "x.pt"), config="pocket-tiny", steps=1),
            progress=False,
        )
