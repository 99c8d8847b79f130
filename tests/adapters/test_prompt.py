"""Prompt tuning: VPT-deep/shallow against a hand-built reference, CoOp context tokens and the shifted end token.

Prompts are not an identity at init and no bound is stated: inserted tokens are extra keys in every attention
softmax, so outputs move by an amount set by the backbone's weights, whatever the prompts' size. The tests instead
check that the model equals the frozen blocks run on the prompted sequence, built here by hand.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.adapters.helpers import encode, perturb
from vidret.adapters.base import DEFAULT_ADAPTER, Hook, blocks, get_method, inject, unwrap
from vidret.adapters.base import parameter_report as adapter_report
from vidret.adapters.io import load_adapter, save_adapter
from vidret.adapters.prompt import PromptConfig, TextContextBranch, VisualPromptBranch, prompt_parameter_count
from vidret.backbone.clip import CLIP, ForwardContext, create_backbone, get_config
from vidret.errors import VidretError
from vidret.model import VideoTextModel, build_model

SOT, EOT = 49406, 49407


def make_tokens(seed: int = 0, L: int = 12) -> Tensor:
    """Three captions of L tokens: a short one, one ending 2 before L, and one filling L."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 1000, (3, L), generator=g)
    tokens[:, 0] = SOT
    tokens[0, 4], tokens[0, 5:] = EOT, 0
    tokens[1, L - 3], tokens[1, L - 2 :] = EOT, 0
    tokens[2, L - 1] = EOT
    return tokens


def make_inputs(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Two videos of 3 frames of 32 px (one padding frame) and two captions of 12 tokens."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(2, 3, 3, 32, 32, generator=g)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return frames, mask, make_tokens(seed)[:2]


def tiny_model(**overrides: Any) -> VideoTextModel:
    return build_model(create_backbone("pocket-tiny", seed=0), "prompt", **overrides)


def visual_prompts(model: VideoTextModel) -> dict[int, Tensor]:
    out = {}
    for i, b in enumerate(blocks(model.clip, "visual")):
        if isinstance(b, Hook) and hasattr(b.branches[DEFAULT_ADAPTER], "prompt"):
            out[i] = b.branches[DEFAULT_ADAPTER].prompt.detach()
    return out


def reference_video(clip: CLIP, prompts: dict[int, Tensor], deep: bool, frames: Tensor) -> Tensor:
    """The frozen blocks on [CLS, prompts, patches]: prompts of block i replace the previous ones (deep)."""
    B, T = frames.shape[:2]
    x = clip.visual.embed(frames.flatten(0, 1))
    n = prompts[0].shape[0]
    ctx = ForwardContext("image", num_frames=T, adapter="none")
    for i, blk in enumerate(blocks(clip, "visual")):
        if i == 0 or (deep and i in prompts):
            rest = x[:, 1:] if i == 0 else x[:, 1 + n :]
            x = torch.cat([x[:, :1], prompts[i].expand(x.shape[0], n, -1), rest], dim=1)
        x = unwrap(blk)(x, ctx)
    assert x.shape[1] == 1 + n + 16
    return clip.visual.pool(x).view(B, T, -1)  # pooling reads the class token only


def reference_text(clip: CLIP, context: Tensor, tokens: Tensor) -> tuple[Tensor, list[int]]:
    """CoOp by hand: embed [SOT, ctx, words, EOT, pad...] with positions 0..L-1, truncating words to fit L."""
    B, L = tokens.shape
    n = context.shape[0]
    emb = clip.text.token_embedding(tokens)
    seqs, eots = [], []
    for b in range(B):
        e = int(tokens[b].argmax())
        words, tail = list(emb[b, 1:e]), list(emb[b, e + 1 :])
        if 1 + n + len(words) + 1 > L:  # too long: drop the last words, keep the end token
            words, tail = words[: L - 2 - n], []
        seq = [emb[b, 0], *context, *words, emb[b, e], *tail][:L]
        eots.append(1 + n + len(words))
        seqs.append(torch.stack(seq))
    x = torch.stack(seqs) + clip.text.positional_embedding[:L]
    ctx = ForwardContext("text", causal=True, adapter="none")
    for blk in blocks(clip, "text"):
        x = unwrap(blk)(x, ctx)
    return clip.text.pool(x, torch.tensor(eots)), eots


@pytest.mark.parametrize("depth", ["deep", "shallow"])
def test_visual_prompts_equal_the_hand_built_reference(depth: str) -> None:
    model = tiny_model(visual_tokens=3, visual_depth=depth, text_tokens=0)
    perturb(model)
    prompts = visual_prompts(model)
    assert sorted(prompts) == ([0, 1] if depth == "deep" else [0])
    frames, mask, _ = make_inputs()
    with torch.no_grad():
        got = model.encode_video(frames, mask).frames
        ref = reference_video(model.clip, prompts, depth == "deep", frames)
    assert torch.allclose(got, ref, atol=1e-5)


def test_text_context_equals_coop_by_hand_and_the_end_token_moves() -> None:
    model = tiny_model(visual_tokens=0, text_tokens=3)
    perturb(model)
    tokens = make_tokens()  # L = 12: ends at 4 (-> 7), at 9 (-> 11, exactly fits), at 11 (truncated, stays 11)
    ctx = ForwardContext("text", causal=True, adapter=DEFAULT_ADAPTER)
    with torch.no_grad():
        got = model.clip.encode_text(tokens, ctx)
        branch = blocks(model.clip, "text")[0].branches[DEFAULT_ADAPTER]
        assert isinstance(branch, TextContextBranch)
        ref, eots = reference_text(model.clip, branch.context, tokens)
    assert eots == [7, 11, 11]
    assert ctx.eot_index is not None and ctx.eot_index.tolist() == eots
    assert torch.allclose(got, ref, atol=1e-5)


def test_text_output_changes_only_through_the_prompt() -> None:
    model = tiny_model(visual_tokens=0, text_tokens=2)
    perturb(model)
    tokens = make_tokens()
    with torch.no_grad():
        ref = model.encode_text(tokens)
        # Tokens after the end token are not seen (causal tower, causal prompt insertion).
        other = tokens.clone()
        other[0, 5:] = 7
        assert torch.allclose(model.encode_text(other)[0], ref[0], atol=1e-6)
        # The context vectors are seen.
        branch = blocks(model.clip, "text")[0].branches[DEFAULT_ADAPTER]
        assert isinstance(branch, TextContextBranch)
        branch.context.add_(0.5 * torch.randn(branch.context.shape))  # not a constant: LayerNorm removes those
        assert not torch.allclose(model.encode_text(tokens), ref, atol=1e-4)


def test_untouched_towers_are_exactly_frozen_and_prompts_are_not_an_identity() -> None:
    inputs = make_inputs()
    frozen = build_model(create_backbone("pocket-tiny", seed=0), "frozen")
    with torch.no_grad():
        ref_video, ref_text = encode(frozen, inputs)
        video_only = encode(tiny_model(text_tokens=0), inputs)
        text_only = encode(tiny_model(visual_tokens=0), inputs)
        both = encode(tiny_model(), inputs)
    assert torch.equal(video_only[1], ref_text) and torch.equal(text_only[0], ref_video)
    # No identity at init: the inserted tokens take attention mass (see the module docstring: no bound exists).
    for got, ref in ((video_only[0], ref_video), (text_only[1], ref_text), (both[0], ref_video), (both[1], ref_text)):
        assert torch.isfinite(got).all() and not torch.allclose(got, ref, atol=1e-4)


def test_hooks_and_branch_roles() -> None:
    model = tiny_model(visual_tokens=2, text_tokens=1)
    v0, v1 = (b.branches[DEFAULT_ADAPTER] for b in blocks(model.clip, "visual"))
    assert isinstance(v0, VisualPromptBranch) and isinstance(v1, VisualPromptBranch)
    assert (v0.insert, v0.replace, v0.remove) == (True, False, False)
    assert (v1.insert, v1.replace, v1.remove) == (False, True, True)
    t0, t1 = blocks(model.clip, "text")
    assert isinstance(t0, Hook) and not isinstance(t1, Hook)
    shallow = tiny_model(visual_depth="shallow", text_tokens=0)
    s1 = blocks(shallow.clip, "visual")[1].branches[DEFAULT_ADAPTER]
    assert isinstance(s1, VisualPromptBranch) and not hasattr(s1, "prompt") and s1.remove


def _loss(model: VideoTextModel) -> Tensor:
    frames, mask, tokens = make_inputs()
    logits = model(frames, mask, tokens)
    labels = torch.arange(2)
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)


def test_one_step_changes_exactly_the_trainables_and_gradients_reach_all() -> None:
    model = tiny_model()
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    trainable = {id(p) for _, p in model.trainable_named_parameters()}
    assert len(trainable) == 3  # two vision blocks' prompts + the text context
    _loss(model).backward()
    for name, p in params.items():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        else:
            assert p.grad is None and not p.requires_grad, name
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.sub_(0.5 * p.grad)
    changed = {id(p) for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_gradient_checkpointing_recomputes_the_same_prompted_sequence() -> None:
    """Checkpointing re-runs text block 0 in backward with the already shifted context: gradients must not change."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the prompts' init draws from the global generator
        model = tiny_model()
        perturb(model)
        model.clip.set_grad_checkpointing(checkpointing)
        _loss(model).backward()
        grads.append([p.grad.clone() for _, p in model.trainable_named_parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) == 3
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_save_load_round_trip_into_a_fresh_backbone(tmp_path: Any) -> None:
    model = tiny_model(visual_depth="shallow", text_tokens=2)
    perturb(model, std=0.3)
    inputs = make_inputs()
    with torch.no_grad():
        ref = encode(model, inputs)
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(create_backbone("pocket-tiny", seed=0), tmp_path / "a")
    assert loaded.config == model.config
    with torch.no_grad():
        got = encode(loaded, inputs)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)


def test_prompt_weights_stay_fp32_under_bf16_autocast() -> None:
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        video, text = encode(model, make_inputs())
    assert torch.isfinite(video).all() and torch.isfinite(text).all()
    assert all(p.dtype == torch.float32 for _, p in model.trainable_named_parameters())


def test_captions_too_short_for_the_context_are_refused() -> None:
    model = tiny_model(visual_tokens=0, text_tokens=4)
    with pytest.raises(VidretError, match="at least 6 tokens"):
        model.encode_text(make_tokens(L=5))


@pytest.mark.parametrize(
    ("preset", "count"), [("default", 12 * 8 * 768 + 4 * 512), ("vpt_shallow", 8 * 768), ("coop", 4 * 512)]
)
def test_parameter_count_on_vit_b16(preset: str, count: int) -> None:
    config = get_method("prompt").make_config(preset)
    assert isinstance(config, PromptConfig)
    with torch.device("meta"):
        clip = create_backbone("ViT-B-16")
        inject(clip, config, DEFAULT_ADAPTER)
    report = adapter_report(clip, config)
    assert report["trainable"] == count == prompt_parameter_count(config, get_config("ViT-B-16"))
    if preset == "default":
        assert round(report["percent"], 3) == 0.051


@pytest.mark.parametrize("overrides", [{}, {"visual_depth": "shallow"}, {"visual_tokens": 0}, {"text_tokens": 0}])
def test_parameter_formula_matches_the_modules_on_a_small_config(overrides: dict[str, Any]) -> None:
    model = tiny_model(**overrides)
    assert isinstance(model.config, PromptConfig)
    actual = sum(p.numel() for _, p in model.trainable_named_parameters())
    assert actual == prompt_parameter_count(model.config, model.clip.config)


def test_invalid_options_are_rejected() -> None:
    for bad in (
        {"visual_tokens": -1},
        {"visual_tokens": 0, "text_tokens": 0},
        {"visual_depth": "medium"},
        {"text_init_std": 0.0},
    ):
        with pytest.raises(VidretError):
            get_method("prompt").make_config(None, **bad)
