"""Contract tests generated from the registry: every method x a tiny random CLIP (DESIGN.md rule 13)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from vidret.adapters.base import backbone_state_dict, get_method, list_methods
from vidret.adapters.io import load_adapter, save_adapter, weights_file
from vidret.backbone.clip import create_backbone
from vidret.heads import VideoFeatures
from vidret.model import VideoTextModel, build_model, parameter_report

# Options that fit the 2-layer, width-32 "pocket-tiny" backbone (presets are sized for ViT-B).
TINY: dict[str, dict[str, Any]] = {
    "mv_adapter": {"r": 8, "cmt_layers": [0, 1], "num_frames": 4, "max_words": 16},
    "cross_modal": {"r": 4, "share_dim": 8},
    "bottleneck": {"r": 8},
    "lora": {"r": 4},
    "st_adapter": {"r": 8},
    "convpass": {"r": 8},
}
B, T, L = 2, 4, 16
METHODS = list_methods()


def test_registry_has_every_method_of_the_api() -> None:
    assert set(METHODS) >= {
        "frozen",
        "full",
        "mv_adapter",
        "cross_modal",
        "bottleneck",
        "lora",
        "st_adapter",
        "convpass",
        "prompt",
    }


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(B, T, 3, 32, 32, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -1] = False  # one padded frame
    tokens = torch.randint(1, 49000, (B, L), generator=g)
    tokens[:, 0] = 49406
    tokens[0, 9], tokens[1, 15] = 49407, 49407
    tokens[0, 10:] = 0
    return frames, mask, tokens


def _build(method: str, seed: int = 0) -> VideoTextModel:
    torch.manual_seed(seed)  # adapter initialisers draw from the global generator
    return build_model(create_backbone("pocket-tiny", seed=seed), method, **TINY.get(method, {}))


def _randomise(model: VideoTextModel, seed: int = 1) -> None:
    """Move every trainable away from its (possibly identity) initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _features(model: VideoTextModel) -> tuple[torch.Tensor, torch.Tensor]:
    frames, mask, tokens = _inputs()
    with torch.no_grad():
        return model.encode_video(frames, mask).frames, model.encode_text(tokens)


@pytest.mark.parametrize("method", METHODS)
def test_initialisation_matches_the_declared_behaviour(method: str) -> None:
    model, frozen = _build(method), _build("frozen")
    (v, t), (v0, t0) = _features(model), _features(frozen)
    behaviour = get_method(method).init_behaviour
    if behaviour == "identity":
        assert torch.equal(v, v0) and torch.equal(t, t0), "zero-initialised method must start as the frozen model"
    elif behaviour == "near_identity":
        # trunc_normal(0.01) adapters: features stay within 2% cosine of the frozen backbone's
        assert F.cosine_similarity(v.flatten(0, 1), v0.flatten(0, 1)).min() > 0.98
        assert F.cosine_similarity(t, t0).min() > 0.98
        assert not torch.equal(v, v0)
    else:
        assert behaviour == "changes"
        assert not (torch.equal(v, v0) and torch.equal(t, t0))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "frozen"])
def test_one_step_changes_only_declared_trainables_and_reaches_all(method: str) -> None:
    model = _build(method)
    _randomise(model)
    named = model.trainable_named_parameters()
    trainable_ids = {id(p) for _, p in named}
    assert trainable_ids == {id(p) for p in model.parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for _, p in named], lr=0.1)
    frames, mask, tokens = _inputs()
    logits = model(frames, mask, tokens)
    loss = F.cross_entropy(logits, torch.arange(B)) + F.cross_entropy(logits.t(), torch.arange(B))
    loss.backward()
    for n, p in named:
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"{n} got an all-zero gradient"
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    trainable_names = {n for n, p in model.named_parameters() if id(p) in trainable_ids}
    assert changed <= trainable_names, f"frozen tensors changed: {sorted(changed - trainable_names)[:5]}"
    assert changed, "nothing changed"


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_with_trained_weights(method: str, tmp_path: Path) -> None:
    model = _build(method)
    _randomise(model)
    save_adapter(model, tmp_path / "a")
    fresh = create_backbone("pocket-tiny", seed=0)
    loaded = load_adapter(fresh, tmp_path / "a")
    (v, t), (v2, t2) = _features(model), _features(loaded)
    assert torch.equal(v, v2) and torch.equal(t, t2)
    assert loaded.config == model.config


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_keeps_trainables_fp32(method: str) -> None:
    model = _build(method)
    _randomise(model)
    frames, mask, tokens = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(frames, mask, tokens)
    loss = F.cross_entropy(logits.float(), torch.arange(B))
    if any(p.requires_grad for p in model.parameters()):
        loss.backward()
    for n, p in model.trainable_named_parameters():
        assert p.dtype == torch.float32, n
        assert p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()), n
    with torch.no_grad():
        ref = model(frames, mask, tokens)
    assert torch.allclose(logits.float(), ref, atol=0.5 * ref.abs().max().item() * 0.05 + 0.5)


@pytest.mark.parametrize("method", METHODS)
def test_padding_frames_do_not_change_video_features(method: str) -> None:
    model = _build(method)
    _randomise(model)
    frames, mask, _ = _inputs()
    other = frames.clone()
    other[1, -1] = torch.randn(3, 32, 32) * 5  # different garbage in the masked frame
    with torch.no_grad():
        a = model.pool_video(model.encode_video(frames, mask))
        b = model.pool_video(model.encode_video(other, mask))
        fa = model.encode_video(frames, mask).frames[mask]
        fb = model.encode_video(other, mask).frames[mask]
    torch.testing.assert_close(fa, fb, rtol=1e-5, atol=1e-5)
    if a is not None:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_parameter_report_counts_exactly_the_trainables(method: str) -> None:
    model = _build(method)
    rep = parameter_report(model)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rep["trainable"] == n
    assert rep["backbone"] == sum(t.numel() for t in backbone_state_dict(model.clip).values())
    assert rep["bytes_fp32"] == 4 * n


def test_adapter_for_another_backbone_is_refused(tmp_path: Path) -> None:
    from vidret.errors import VidretError

    model = _build("lora")
    save_adapter(model, tmp_path / "a")
    with pytest.raises(VidretError, match="fingerprint"):
        load_adapter(create_backbone("pocket-tiny", seed=1), tmp_path / "a")
    with pytest.raises(VidretError, match="pocket-small"):
        load_adapter(create_backbone("pocket-small", seed=0), tmp_path / "a")


def test_damaged_adapter_files_give_clear_errors(tmp_path: Path) -> None:
    from vidret.errors import VidretError

    model = _build("lora")
    save_adapter(model, tmp_path / "a")
    with pytest.raises(VidretError, match="not an adapter folder"):
        load_adapter(create_backbone("pocket-tiny", seed=0), tmp_path)
    weights_file(tmp_path / "a").write_bytes(b"garbage")
    with pytest.raises(VidretError, match="damaged"):
        load_adapter(create_backbone("pocket-tiny", seed=0), tmp_path / "a")


def test_frozen_meanp_is_order_blind_but_mv_adapter_is_not() -> None:
    frames, mask, _ = _inputs()
    mask[:] = True
    rev = frames.flip(1)
    frozen = _build("frozen")
    mv = _build("mv_adapter")
    _randomise(mv)
    with torch.no_grad():
        f0, f1 = (frozen.pool_video(frozen.encode_video(x, mask)) for x in (frames, rev))
        m0, m1 = (mv.pool_video(mv.encode_video(x, mask)) for x in (frames, rev))
    torch.testing.assert_close(f0, f1, rtol=1e-5, atol=1e-6)
    # an order-aware model moves well beyond that float-rounding level
    assert (m0 - m1).abs().max() > 1e-5


def test_text_conditioned_head_matches_brute_force() -> None:
    from vidret.heads import TextConditionedHead

    g = torch.Generator().manual_seed(0)
    text, frames = torch.randn(5, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    got = TextConditionedHead(tau=5.0, chunk=2)(text, VideoFeatures(frames, mask), torch.tensor(100.0))
    ref = torch.zeros(5, 3)
    for n in range(5):
        for b in range(3):
            f = frames[b][mask[b]]
            w = torch.softmax(f @ text[n] / 5.0, dim=0)
            v = (w[:, None] * f).sum(0)
            ref[n, b] = 100 * F.cosine_similarity(text[n], v, dim=0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_forward_and_backward_run_in_float64(method: str) -> None:
    # The reference checks against the official codes run in float64; every method must too (a float32
    # attention bias clamped to float64's minimum used to overflow in MV-Adapter's temporal transformer).
    model = _build(method).double()
    frames, mask, tokens = _inputs()
    video = model.encode_video(frames.double(), mask)
    text = model.encode_text(tokens)
    assert video.frames.dtype == torch.float64 and text.dtype == torch.float64
    loss = model.similarity(text, video).logsumexp(dim=1).sum()
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    trainables = [p for _, p in model.trainable_named_parameters()]
    if not trainables:  # frozen: nothing to differentiate
        return
    loss.backward()
    grads = [p.grad for p in trainables]
    assert all(g is not None and g.dtype == torch.float64 and torch.isfinite(g).all() for g in grads)
