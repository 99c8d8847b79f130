"""The CLIP backbone's forward pass: equal to HF transformers' CLIPModel, interpolation, autocast, checkpointing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from vidret.backbone.clip import (
    CLIP,
    CLIPConfig,
    ForwardContext,
    LayerNorm,
    TextConfig,
    VisionConfig,
    create_backbone,
    get_config,
)
from vidret.backbone.convert import from_hf, infer_config, load_state_dict_strict, to_hf

TINY = get_config("pocket-tiny")
SOT, EOT = 49406, 49407


def _hf_clip(cfg: CLIPConfig, seed: int = 0) -> Any:
    """An HF CLIPModel of the same architecture with random, non-trivial weights (biases and LNs too)."""
    transformers = pytest.importorskip("transformers")
    v, t = cfg.vision, cfg.text
    text_config = {
        "vocab_size": t.vocab_size,
        "hidden_size": t.width,
        "intermediate_size": int(t.width * t.mlp_ratio),
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
        "max_position_embeddings": t.context_length,
        "hidden_act": "quick_gelu",
        "eos_token_id": EOT,
        "bos_token_id": SOT,
    }
    vision_config = {
        "hidden_size": v.width,
        "intermediate_size": int(v.width * v.mlp_ratio),
        "num_hidden_layers": v.layers,
        "num_attention_heads": v.heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": "quick_gelu",
    }
    hf_cfg = transformers.CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=cfg.embed_dim)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _features(out: Any) -> torch.Tensor:
    # transformers v5 returns a ModelOutput whose pooler_output holds the projected features; v4 a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _tokens(n: int, context_length: int = 77, seed: int = 0) -> torch.Tensor:
    """Token ids shaped like the tokenizer's output: SOT, ids, EOT, then zero padding (incl. a full row)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, context_length, dtype=torch.long)
    ids[0, :7] = torch.tensor([SOT, 320, 1125, 539, 320, 2368, EOT])  # "a photo of a cat"
    for i in range(1, n):
        length = context_length - 2 if i == n - 1 else int(torch.randint(1, context_length - 2, (1,), generator=g))
        ids[i, 0] = SOT
        ids[i, 1 : length + 1] = torch.randint(1, SOT, (length,), generator=g)
        ids[i, length + 1] = EOT
    return ids


def _ours_from_hf(hf: Any) -> CLIP:
    sd = from_hf(hf.state_dict())
    model = CLIP(
        infer_config(
            sd,
            vision_heads=hf.config.vision_config.num_attention_heads,
            text_heads=hf.config.text_config.num_attention_heads,
        )
    )
    load_state_dict_strict(model, sd)
    return model.eval()


def _check_equal_to_hf(cfg: CLIPConfig, n_images: int, n_texts: int) -> None:
    hf = _hf_clip(cfg)
    ours = _ours_from_hf(hf)
    assert ours.config.same_architecture(cfg)
    size = cfg.vision.image_size
    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = _tokens(n_texts, cfg.text.context_length)
    with torch.no_grad():
        ref_img = _features(hf.get_image_features(pixel_values=images))
        ref_txt = _features(hf.get_text_features(input_ids=tokens))
        got_img = ours.encode_image(images)
        got_txt = ours.encode_text(tokens)
    assert got_img.shape == ref_img.shape == (n_images, cfg.embed_dim)
    assert got_txt.shape == ref_txt.shape == (n_texts, cfg.embed_dim)
    torch.testing.assert_close(got_img, ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_txt, ref_txt, atol=1e-5, rtol=0)
    # and the weights go back to HF unchanged
    hf_sd = hf.state_dict()
    back = to_hf(ours.state_dict())
    assert set(back) == set(hf_sd) and all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)


def test_equals_hf_clip_tiny() -> None:
    _check_equal_to_hf(TINY, n_images=3, n_texts=4)


def test_equals_hf_clip_custom_heads() -> None:
    # heads other than width // 64 exercise the head split (HF config.json heads win over the rule).
    cfg = CLIPConfig(
        name="custom",
        embed_dim=24,
        vision=VisionConfig(image_size=24, patch_size=6, width=64, layers=1, heads=4),
        text=TextConfig(context_length=16, width=48, layers=2, heads=3),
    )
    _check_equal_to_hf(cfg, n_images=2, n_texts=3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16"])
def test_equals_hf_clip_full_size(name: str) -> None:
    _check_equal_to_hf(get_config(name), n_images=2, n_texts=3)


def test_interpolated_positional_embedding_equals_hf() -> None:
    hf = _hf_clip(TINY)
    ours = _ours_from_hf(hf)
    images = torch.randn(2, 3, 48, 40)  # grid 6 x 5 instead of 4 x 4
    with torch.no_grad():
        ref = _features(hf.get_image_features(pixel_values=images, interpolate_pos_encoding=True))
        got = ours.encode_image(images)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_native_resolution_is_unchanged_by_interpolation_support() -> None:
    model = create_backbone(TINY, seed=0).eval()
    pos = model.visual.positional_embedding
    assert model.visual.positional_embedding_for(4, 4) is pos
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.encode_image(images)
        other = model.encode_image(torch.randn(2, 3, 64, 64))
        after = model.encode_image(images)
        # manual reference: patches + class token + the stored (not interpolated) embedding
        x = model.visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([model.visual.class_embedding.expand(2, 1, -1), x], dim=1) + pos
        ref = model.visual.pool(model.visual.transformer(model.visual.ln_pre(x), ForwardContext("image")))
    assert torch.equal(before, after)
    torch.testing.assert_close(before, ref, atol=1e-6, rtol=0)
    assert other.shape == before.shape and torch.isfinite(other).all()
    grown = model.visual.positional_embedding_for(8, 6)
    assert grown.shape == (1 + 48, TINY.vision.width)
    assert torch.equal(grown[0], pos[0])  # class position is never interpolated


def test_text_is_causal_and_pooled_at_the_end_token() -> None:
    model = create_backbone(TINY, seed=0).eval()
    tokens = _tokens(3)
    changed = tokens.clone()
    changed[tokens == 0] = 5  # anything after the end token must not matter
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), model.encode_text(changed))
        # fewer padding columns (row 0 ends at position 6) give the same embedding
        short = model.encode_text(tokens[:1, :10])
        full = model.encode_text(tokens[:1])
    torch.testing.assert_close(short, full, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_identical_gradients() -> None:
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = create_backbone(TINY, seed=0).train()
        model.set_grad_checkpointing(checkpointing)
        images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        logits = model(images, _tokens(3))
        loss = F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3))
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert set(plain) == set(ckpt) and len(plain) == len(list(create_backbone(TINY).parameters()))
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=0, rtol=0, msg=k)


def test_layernorm_runs_in_fp32_under_autocast() -> None:
    ln = LayerNorm(16)
    x = (torch.randn(4, 16) * 100).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
    assert y.dtype == torch.bfloat16
    ref = F.layer_norm(x.float(), (16,), ln.weight, ln.bias).bfloat16()
    assert torch.equal(y, ref)


def _bf16_matches_fp32(model: CLIP, frames: torch.Tensor) -> float:
    with torch.no_grad():
        ref = model.encode_image(frames)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.encode_image(frames)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    return float(F.cosine_similarity(low.float(), ref, dim=-1).min())


def test_bf16_autocast_tiny_matches_fp32() -> None:
    model = create_backbone(TINY, seed=0).eval()
    assert _bf16_matches_fp32(model, torch.randn(12, 3, 32, 32)) > 0.99


@pytest.mark.slow
def test_bf16_autocast_vit_b16_twelve_frames_matches_fp32() -> None:
    model = create_backbone("ViT-B-16", seed=0).eval()
    frames = torch.randn(12, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # one 12-frame video
    cos = _bf16_matches_fp32(model, frames)
    assert cos > 0.99, cos
