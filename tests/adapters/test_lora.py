"""LoRA: exact identity at init, equations, merge (exact outputs, no hooks left, refusals), trainables, counts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.adapters.helpers import encode, make_inputs, perturb
from vidret.adapters.base import DEFAULT_ADAPTER, Hook, backbone_state_dict, blocks, get_method, inject, unwrap
from vidret.adapters.base import parameter_report as adapter_report
from vidret.adapters.io import load_adapter, save_adapter
from vidret.adapters.lora import LoRAAttentionBranch, LoRAConfig, LoRADelta, lora_parameter_count, merge
from vidret.backbone.clip import Attention, ForwardContext, create_backbone, get_config
from vidret.errors import VidretError
from vidret.model import VideoTextModel, build_model, count_hooks

ALL = ("q", "k", "v", "out", "mlp")


def tiny_model(**overrides: Any) -> VideoTextModel:
    return build_model(create_backbone("pocket-tiny", seed=0), "lora", **overrides)


@pytest.mark.parametrize("overrides", [{}, {"targets": ALL}, {"targets": ("k", "out"), "towers": ("text",), "r": 2}])
def test_exact_identity_at_init(overrides: dict[str, Any]) -> None:
    inputs = make_inputs()
    frozen = build_model(create_backbone("pocket-tiny", seed=0), "frozen")
    model = tiny_model(**overrides)
    with torch.no_grad():
        for ref, got in zip(encode(frozen, inputs), encode(model, inputs), strict=True):
            assert torch.equal(ref, got)
    deltas = [m for m in model.clip.modules() if isinstance(m, LoRADelta)]
    assert deltas and all(torch.count_nonzero(d.lora_B) == 0 and torch.count_nonzero(d.lora_A) > 0 for d in deltas)


def test_attention_branch_equation() -> None:
    """q = W_q x + b_q + (alpha/r) B_q A_q x (same for v); k untouched; attention via the base's attend."""
    torch.manual_seed(0)
    base = Attention(16, 2)
    branch = LoRAAttentionBranch(16, ["q_proj", "v_proj"], r=4, scaling=0.5, dropout=0.0)
    with torch.no_grad():
        for n in branch.targets:
            branch.delta(n).lora_B.normal_()
    ctx = ForwardContext("text", causal=True)
    x = torch.randn(2, 5, 16)
    dq, dv = branch.delta("q_proj"), branch.delta("v_proj")
    q = base.q_proj(x) + 0.5 * x @ dq.lora_A.t() @ dq.lora_B.t()
    v = base.v_proj(x) + 0.5 * x @ dv.lora_A.t() @ dv.lora_B.t()
    expected = base.out_proj(base.attend(q, base.k_proj(x), v, ctx))
    assert torch.allclose(branch(x, base, ctx), expected, atol=1e-6)


def test_default_targets_are_q_and_v_of_every_layer_of_both_towers() -> None:
    model = tiny_model()
    names = {n for n, _ in model.trainable_named_parameters()}
    for tower in ("visual", "text"):
        for i in range(2):
            for proj in ("q_proj", "v_proj"):
                for f in ("lora_A", "lora_B"):
                    assert f"{tower}.transformer.resblocks.{i}.attn.{proj}.{f}" in names
    assert len(names) == 2 * 2 * 2 * 2
    assert isinstance(model.config, LoRAConfig) and model.config.scaling == 1.0


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize("targets", [("q", "v"), ALL])
def test_merge_gives_the_same_outputs_and_leaves_no_hook(targets: tuple[str, ...]) -> None:
    model = tiny_model(targets=targets, alpha=16.0)
    perturb(model, std=0.3)
    inputs = make_inputs()
    with torch.no_grad():
        before = encode(model, inputs)
    weights_before = backbone_state_dict(model.clip)
    weights_before = {k: v.clone() for k, v in weights_before.items()}
    merged = merge(model)
    assert count_hooks(model.clip) == 0
    assert not any(isinstance(m, (Hook, LoRADelta)) for m in model.clip.modules())
    assert model.trainable_named_parameters() == []
    n_linears = sum(2 if t == "mlp" else 1 for t in targets)
    assert len(merged) == 2 * 2 * n_linears
    weights_after = backbone_state_dict(model.clip)
    assert {k for k in weights_after if not torch.equal(weights_after[k], weights_before[k])} == set(merged)
    assert all(not p.requires_grad for p in model.clip.parameters())
    with torch.no_grad():
        after = encode(model, inputs)
        frozen = encode(build_model(create_backbone("pocket-tiny", seed=0), "frozen"), inputs)
    for a, b, ref in zip(before, after, frozen, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a, ref, atol=1e-3)  # the merged update is not a no-op


def test_merge_on_a_clip_needs_the_adapter_name() -> None:
    model = tiny_model()
    with pytest.raises(VidretError, match="name the LoRA adapter"):
        merge(model.clip)
    with pytest.raises(VidretError, match="no adapter named 'other'"):
        merge(model.clip, "other")
    assert len(merge(model.clip, DEFAULT_ADAPTER)) == 8


def test_merge_is_refused_while_another_adapter_shares_the_backbone() -> None:
    clip = create_backbone("pocket-tiny", seed=0)
    build_model(clip, "bottleneck", adapter_name="a")
    b = build_model(clip, "lora", adapter_name="b")
    perturb(b)
    hooks = count_hooks(clip)
    weights = {k: v.clone() for k, v in backbone_state_dict(clip).items()}
    with pytest.raises(VidretError, match=r"other adapters share this backbone \(a\)"):
        merge(b)
    assert count_hooks(clip) == hooks
    assert all(torch.equal(v, weights[k]) for k, v in backbone_state_dict(clip).items())
    with pytest.raises(VidretError, match="not a LoRA adapter"):
        merge(build_model(create_backbone("pocket-tiny", seed=0), "bottleneck"))


def test_merge_puts_the_plain_module_back() -> None:
    model = tiny_model(targets=("q",), layers=(0,), towers=("visual",))
    blk = unwrap(blocks(model.clip, "visual")[0])
    assert isinstance(blk.attn, Hook)
    merge(model)
    assert isinstance(blk.attn, Attention)


# ----------------------------------------------------------------------------- trainables, round trip, dtype


def test_one_step_changes_exactly_the_trainables_and_gradients_reach_all() -> None:
    model = tiny_model(targets=ALL)
    perturb(model)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    trainable = {id(p) for _, p in model.trainable_named_parameters()}
    frames, mask, tokens = make_inputs()
    logits = model(frames, mask, tokens)
    labels = torch.arange(2)
    (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)).backward()
    for name, p in params.items():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        else:
            assert p.grad is None and not p.requires_grad, name
    with torch.no_grad():  # one plain SGD step
        for _, p in model.trainable_named_parameters():
            p.sub_(0.5 * p.grad)
    changed = {id(p) for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_save_load_round_trip_into_a_fresh_backbone(tmp_path: Any) -> None:
    model = tiny_model(preset="all", r=3, alpha=6.0)
    perturb(model, std=0.3)
    inputs = make_inputs()
    with torch.no_grad():
        ref = encode(model, inputs)
    save_adapter(model, tmp_path / "lora")
    loaded = load_adapter(create_backbone("pocket-tiny", seed=0), tmp_path / "lora")
    assert loaded.config == model.config
    with torch.no_grad():
        got = encode(loaded, inputs)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)


def test_dropout_acts_in_training_only() -> None:
    model = tiny_model(dropout=0.5)
    perturb(model)
    inputs = make_inputs()
    model.eval()
    with torch.no_grad():
        assert torch.equal(encode(model, inputs)[1], encode(model, inputs)[1])
        model.train()
        torch.manual_seed(0)
        a = encode(model, inputs)[1]
        b = encode(model, inputs)[1]
    assert not torch.equal(a, b)


def test_adapter_weights_stay_fp32_under_bf16_autocast() -> None:
    model = tiny_model(targets=ALL)
    perturb(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        video, text = encode(model, make_inputs())
    assert torch.isfinite(video).all() and torch.isfinite(text).all()
    assert all(p.dtype == torch.float32 for _, p in model.trainable_named_parameters())


# ----------------------------------------------------------------------------- counts and options


@pytest.mark.parametrize(("preset", "count"), [("qv", 491_520), ("qkvo", 983_040), ("all", 2_211_840)])
def test_parameter_counts_on_vit_b16(preset: str, count: int) -> None:
    config = get_method("lora").make_config(preset)
    assert isinstance(config, LoRAConfig)
    with torch.device("meta"):
        clip = create_backbone("ViT-B-16")
        inject(clip, config, DEFAULT_ADAPTER)
    report = adapter_report(clip, config)
    assert report["trainable"] == count == lora_parameter_count(config, get_config("ViT-B-16"))
    assert report["backbone_trained"] == 0


@pytest.mark.parametrize(
    "overrides",
    [{}, {"targets": ALL, "r": 5}, {"targets": ("mlp",), "towers": ("visual",)}, {"targets": ("k",), "layers": (1,)}],
)
def test_parameter_formula_matches_the_modules_on_a_small_config(overrides: dict[str, Any]) -> None:
    model = tiny_model(**overrides)
    assert isinstance(model.config, LoRAConfig)
    actual = sum(p.numel() for _, p in model.trainable_named_parameters())
    assert actual == lora_parameter_count(model.config, model.clip.config)


def test_invalid_options_are_rejected() -> None:
    for bad in (
        {"r": 0},
        {"alpha": 0.0},
        {"dropout": 1.0},
        {"targets": []},
        {"targets": ["q", "proj"]},
        {"towers": ["audio"]},
        {"layers": [1, 1]},
    ):
        with pytest.raises(VidretError):
            get_method("lora").make_config(None, **bad)
    with pytest.raises(VidretError, match="do not exist in the text tower"):
        tiny_model(layers=(0, 2), towers=("text",))
