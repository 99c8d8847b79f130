"""VideoTextModel and AdapterBank: many adapters over one backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vidret.adapters.io import load_adapter, save_adapter
from vidret.backbone.clip import create_backbone
from vidret.errors import VidretError
from vidret.model import AdapterBank, build_model

MV = {"r": 8, "cmt_layers": [0, 1], "num_frames": 4, "max_words": 16}


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(2, 4, 3, 32, 32, generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    tokens = torch.randint(1, 49000, (3, 16), generator=g)
    tokens[:, 10] = 49407
    return frames, mask, tokens


def _trained(method: str, out: Path, seed: int, **opts: object) -> Path:
    model = build_model(create_backbone("pocket-tiny", seed=0), method, **opts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))  # includes MV-Adapter's CLIP biases
    save_adapter(model, out)
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    frames, mask, tokens = _inputs()
    with torch.no_grad():
        return model(frames, mask, tokens)


def test_bank_serves_each_adapter_exactly_as_alone(tmp_path: Path) -> None:
    a = _trained("mv_adapter", tmp_path / "a", 1, **MV)
    b = _trained("lora", tmp_path / "b", 2)
    c = _trained("mv_adapter", tmp_path / "c", 3, **MV)
    alone = {
        n: _logits(load_adapter(create_backbone("pocket-tiny", seed=0), p)) for n, p in (("a", a), ("b", b), ("c", c))
    }
    frozen = _logits(build_model(create_backbone("pocket-tiny", seed=0), "frozen"))

    clip = create_backbone("pocket-tiny", seed=0)
    n_backbone = sum(p.numel() for p in clip.parameters())
    bank = AdapterBank(clip)
    for name, path in (("a", a), ("b", b), ("c", c)):
        bank.load(str(path), name)
    assert bank.names() == ["a", "b", "c"]
    # memory: one backbone plus the adapters, not a copy per task
    n_total = sum(p.numel() for p in clip.parameters())
    n_adapters = sum(
        sum(p.numel() for _, p in m.trainable_named_parameters() if not _.startswith("backbone."))
        for m in bank.models.values()
    )
    assert n_total == n_backbone + n_adapters
    # every adapter, in any order, gives exactly its solo output (MV-Adapter's trained biases are swapped in/out)
    for name in ("b", "a", "c", "a", "b", "c"):
        with bank.lock:
            assert torch.equal(_logits(bank.use(name)), alone[name]), name
    assert not torch.equal(alone["a"], alone["c"])
    assert not torch.equal(alone["b"], frozen)


def test_bank_refuses_full_finetuning_and_foreign_adapters(tmp_path: Path) -> None:
    full = _trained("full", tmp_path / "full", 1)
    bank = AdapterBank(create_backbone("pocket-tiny", seed=0))
    with pytest.raises(VidretError, match="cannot share"):
        bank.load(str(full), "full")
    other = tmp_path / "other"
    save_adapter(build_model(create_backbone("pocket-tiny", seed=5), "lora"), other)
    with pytest.raises(VidretError, match="fingerprint"):
        bank.load(str(other), "other")
    with pytest.raises(VidretError, match="unknown adapter"):
        bank.use("nope")


def test_encode_video_runs_frames_as_one_batch_and_default_mask() -> None:
    model = build_model(create_backbone("pocket-tiny", seed=0), "frozen")
    frames, mask, _ = _inputs()
    v = model.encode_video(frames)
    assert v.frames.shape == (2, 4, 32) and v.mask.all()
    per_frame = model.clip.encode_image(frames[1, 2:3])
    torch.testing.assert_close(v.frames[1, 2:3], per_frame)


def test_frozen_prefix_is_numerically_identical_and_skips_frozen_blocks() -> None:
    model = build_model(create_backbone("pocket-tiny", seed=0), "lora", layers=[1])
    prefix = model.set_frozen_prefix(True)
    assert prefix == {"visual": 1, "text": 1}
    frames, mask, tokens = _inputs()
    out = model(frames, mask, tokens)
    out.sum().backward()
    grads = [p.grad.clone() for _, p in model.trainable_named_parameters()]
    model.zero_grad()
    model.set_frozen_prefix(False)
    out2 = model(frames, mask, tokens)
    out2.sum().backward()
    torch.testing.assert_close(out, out2)
    for g, (_, p) in zip(grads, model.trainable_named_parameters()):
        torch.testing.assert_close(g, p.grad)
    assert build_model(create_backbone("pocket-tiny", seed=0), "full").set_frozen_prefix() == {"visual": 0, "text": 0}
