"""ST-Adapter: identity at init, the equation, time sensitivity, padding frames, trainables, round trip, counts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.adapters.helpers import encode, make_inputs, perturb
from vidret.adapters.base import DEFAULT_ADAPTER, Hook, bias_parameters, blocks, get_method, inject, unwrap
from vidret.adapters.base import parameter_report as adapter_report
from vidret.adapters.io import load_adapter, save_adapter
from vidret.adapters.st_adapter import (
    PAPER_PERCENT_B16,
    STAdapter,
    STAdapterConfig,
    STBlockBranch,
    clip_bias_parameter_count,
    st_adapter_parameter_count,
)
from vidret.backbone.clip import ForwardContext, ResidualBlock, create_backbone, get_config
from vidret.errors import VidretError
from vidret.model import VideoTextModel, build_model


def tiny_model(**overrides: Any) -> VideoTextModel:
    return build_model(create_backbone("pocket-tiny", seed=0), "st_adapter", **overrides)


VARIANTS: list[dict[str, Any]] = [
    {},
    {"r": 8, "positions": ("mlp",)},
    {"r": 8, "positions": ("attn", "mlp"), "towers": ("visual", "text")},
    {"r": 8, "zero_init": "up", "kernel": (3, 3, 3), "activation": "quickgelu"},
    {"r": 8, "layers": (1,), "towers": ("text",), "text_r": 4},
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_exact_identity_at_init(overrides: dict[str, Any]) -> None:
    inputs = make_inputs()
    frozen = build_model(create_backbone("pocket-tiny", seed=0), "frozen")
    model = tiny_model(**overrides)
    with torch.no_grad():
        for ref, got in zip(encode(frozen, inputs), encode(model, inputs), strict=True):
            assert torch.equal(ref, got)
    adapters = [m for m in model.clip.modules() if isinstance(m, STAdapter)]
    assert adapters
    for a in adapters:
        assert torch.count_nonzero(a.down.bias) == 0 and torch.count_nonzero(a.up.bias) == 0
        if model.config.zero_init == "conv":  # released code: zero conv, Linear weights at their default init
            assert torch.count_nonzero(a.conv.weight) == 0 and torch.count_nonzero(a.up.weight) > 0
        else:
            assert torch.count_nonzero(a.up.weight) == 0 and torch.count_nonzero(a.conv.weight) > 0


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("kernel", [(3, 1, 1), (5, 1, 1), (3, 3, 3), (1, 3, 3)])
def test_video_adapter_equation(kernel: tuple[int, int, int]) -> None:
    """Patch tokens += Up(DWConv3D(Down(patches))) over [B, r, T, H, W]; the class token is untouched."""
    B, T, side, D, r = 2, 4, 3, 16, 6
    adapter = STAdapter(D, r, kernel)
    _randomise(adapter)
    x = torch.randn(B * T, 1 + side * side, D)
    ctx = ForwardContext("image", num_frames=T)
    conv = torch.nn.Conv3d(r, r, kernel, padding=tuple(k // 2 for k in kernel), groups=r)
    with torch.no_grad():
        conv.weight.copy_(adapter.conv.weight)
        assert conv.bias is not None and adapter.conv.bias is not None
        conv.bias.copy_(adapter.conv.bias)
    z = adapter.down(x[:, 1:]).reshape(B, T, side, side, r).permute(0, 4, 1, 2, 3)
    z = conv(z).permute(0, 2, 3, 4, 1).reshape(B * T, side * side, r)
    expected = torch.cat([x[:, :1], x[:, 1:] + adapter.up(z)], dim=1)
    got = adapter(x, ctx)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(got[:, 0], x[:, 0])


def test_text_adapter_is_a_causal_depthwise_conv() -> None:
    D, r, k, L = 16, 5, 3, 7
    adapter = STAdapter(D, r, (k,))
    _randomise(adapter)
    x = torch.randn(2, L, D)
    z = adapter.down(x)  # [B, L, r]
    w = adapter.conv.weight[:, 0]  # [r, k]
    assert adapter.conv.bias is not None
    conv = torch.stack(
        [
            adapter.conv.bias + sum(w[:, i] * z[:, t - (k - 1) + i] for i in range(k) if t - (k - 1) + i >= 0)
            for t in range(L)
        ],
        dim=1,
    )
    assert torch.allclose(adapter(x, ForwardContext("text")), x + adapter.up(conv), atol=1e-5)
    # Changing a later token never changes an earlier position's output.
    y = x.clone()
    y[:, 4:] = torch.randn(2, L - 4, D)
    assert torch.equal(adapter(x, ForwardContext("text"))[:, :4], adapter(y, ForwardContext("text"))[:, :4])


def test_mlp_position_sits_between_the_two_halves_of_the_block() -> None:
    torch.manual_seed(0)
    block = ResidualBlock(16, 2, 4.0)
    branch = STBlockBranch({"attn": STAdapter(16, 4, (3, 1, 1)), "mlp": STAdapter(16, 4, (3, 1, 1))})
    _randomise(branch)
    ctx = ForwardContext("image", num_frames=2)
    x = torch.randn(4, 5, 16)
    a = branch.adapters["attn"](x, ctx)
    h = branch.adapters["mlp"](a + block.attn(block.ln_1(a), ctx), ctx)
    assert torch.allclose(branch(x, block, ctx), h + block.mlp(block.ln_2(h), ctx), atol=1e-5)


def test_hooks_whole_blocks_of_the_chosen_towers_and_layers() -> None:
    model = tiny_model(r=8)
    assert all(isinstance(b, Hook) for b in blocks(model.clip, "visual"))
    assert not any(isinstance(m, Hook) for m in model.clip.text.modules())  # video method: no text adapters
    both = tiny_model(r=8, towers=("visual", "text"), layers=(1,))
    for tower in ("visual", "text"):
        b0, b1 = blocks(both.clip, tower)
        assert not isinstance(b0, Hook) and isinstance(b1, Hook)
        assert not isinstance(unwrap(b1).attn, Hook)  # the whole block is hooked, not its children


def _features(model: VideoTextModel, frames: Tensor, mask: Tensor | None = None) -> Tensor:
    with torch.no_grad():
        return model.encode_video(frames, mask).frames


def test_temporal_sensitivity() -> None:
    """Reversing the frames changes the features once the adapter is non-zero; the frozen backbone does not care."""
    frames = make_inputs()[0][:1]  # one video of 3 frames
    frozen = build_model(create_backbone("pocket-tiny", seed=0), "frozen")
    ref = _features(frozen, frames)
    assert torch.allclose(_features(frozen, frames.flip(1)).flip(1), ref, atol=1e-6)
    model = tiny_model(r=8)
    assert torch.equal(_features(model, frames), ref)  # identity at init: still order-free
    perturb(model)
    fwd, rev = _features(model, frames), _features(model, frames.flip(1)).flip(1)
    assert not torch.allclose(fwd, rev, atol=1e-3)  # each frame now depends on its neighbours' order
    pooled = [model.pool_video(model.encode_video(f)) for f in (frames, frames.flip(1))]
    assert not torch.allclose(*pooled, atol=1e-4)  # type: ignore[arg-type]


@pytest.mark.parametrize("overrides", [{"r": 8}, {"r": 8, "kernel": (3, 3, 3), "positions": ("attn", "mlp")}])
def test_padding_frames_never_reach_real_frames(overrides: dict[str, Any]) -> None:
    model = tiny_model(**overrides)
    perturb(model)
    g = torch.Generator().manual_seed(3)
    real = torch.randn(1, 2, 3, 32, 32, generator=g)
    mask = torch.tensor([[True, True, False]])
    a = torch.cat([real, torch.randn(1, 1, 3, 32, 32, generator=g)], dim=1)
    b = torch.cat([real, 5 * torch.randn(1, 1, 3, 32, 32, generator=g)], dim=1)
    fa, fb = _features(model, a, mask), _features(model, b, mask)
    assert torch.allclose(fa[:, :2], fb[:, :2], atol=1e-6)
    # A padding frame at the end is the conv's zero padding: the real frames match the unpadded 2-frame video.
    assert torch.allclose(fa[:, :2], _features(model, real), atol=1e-5)
    # Unmasked, the third frame does reach the second one (the check above is not vacuous).
    assert not torch.allclose(_features(model, a)[:, 1], fa[:, 1], atol=1e-4)


def test_frame_count_must_match_num_frames() -> None:
    model = tiny_model(r=8)
    images = torch.randn(3, 3, 32, 32)
    with pytest.raises(VidretError, match="not a multiple of num_frames=2"):
        model.clip.encode_image(images, ForwardContext("image", num_frames=2))


@pytest.mark.parametrize("train_biases", [False, True])
def test_one_step_changes_exactly_the_trainables_and_gradients_reach_all(train_biases: bool) -> None:
    model = tiny_model(r=8, positions=("attn", "mlp"), towers=("visual", "text"), train_biases=train_biases)
    perturb(model)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    trainable = {id(p) for _, p in model.trainable_named_parameters()}
    n_backbone = sum(n.startswith("backbone.") for n, _ in model.trainable_named_parameters())
    assert n_backbone == (len(bias_parameters(model.clip)) if train_biases else 0)
    # The last vision block's pre-MLP adapter changes only patch tokens after the last attention, and pooling
    # reads the class token: it cannot reach the output (the released 24x384 layout carries it too).
    last = len(blocks(model.clip, "visual")) - 1
    dead_prefix = f"clip.visual.transformer.resblocks.{last}.branches.default.adapters.mlp."
    dead = {id(p) for n, p in params.items() if n.startswith(dead_prefix)}
    assert len(dead) == 6 and dead <= trainable
    frames, mask, tokens = make_inputs()
    logits = model(frames, mask, tokens)
    labels = torch.arange(2)
    (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)).backward()
    for name, p in params.items():
        if id(p) in dead:
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
        elif id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        else:
            assert p.grad is None and not p.requires_grad, name
    with torch.no_grad():  # one plain SGD step
        for _, p in model.trainable_named_parameters():
            p.sub_(0.5 * p.grad)
    changed = {id(p) for n, p in params.items() if not torch.equal(p, before[n])}
    # Key biases shift every logit of a softmax row equally: their gradient is zero up to rounding.
    key_biases = {id(p) for n, p in params.items() if n.endswith("k_proj.bias")}
    assert changed <= trainable - dead
    assert changed >= trainable - dead - key_biases


def test_save_load_round_trip_into_a_fresh_backbone(tmp_path: Any) -> None:
    model = tiny_model(r=8, towers=("visual", "text"), kernel=(3, 3, 3), train_biases=True)
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


def test_adapter_weights_stay_fp32_under_bf16_autocast() -> None:
    model = tiny_model(r=8, towers=("visual", "text"))
    perturb(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        video, text = encode(model, make_inputs())
    assert torch.isfinite(video).all() and torch.isfinite(text).all()
    assert all(p.dtype == torch.float32 for _, p in model.trainable_named_parameters())


@pytest.mark.parametrize(
    ("preset", "count", "percent"),
    [("default", 7_110_144, 4.75), ("released_24x384", 14_220_288, 9.50), ("mvadapter_table", 8_867_840, 5.93)],
)
def test_trainable_share_on_vit_b16(preset: str, count: int, percent: float) -> None:
    config = get_method("st_adapter").make_config(preset)
    assert isinstance(config, STAdapterConfig)
    with torch.device("meta"):
        clip = create_backbone("ViT-B-16")
        inject(clip, config, DEFAULT_ADAPTER)
    report = adapter_report(clip, config)
    assert report["trainable"] == count == st_adapter_parameter_count(config, get_config("ViT-B-16"))
    assert round(report["percent"], 2) == percent
    if preset == "mvadapter_table":
        assert round(report["percent"], 2) == PAPER_PERCENT_B16


@pytest.mark.parametrize("overrides", VARIANTS + [{"r": 3, "train_biases": True, "towers": ("visual", "text")}])
def test_parameter_formula_matches_the_modules_on_a_small_config(overrides: dict[str, Any]) -> None:
    model = tiny_model(**overrides)
    assert isinstance(model.config, STAdapterConfig)
    actual = sum(p.numel() for _, p in model.trainable_named_parameters())
    assert actual == st_adapter_parameter_count(model.config, model.clip.config)
    assert clip_bias_parameter_count(model.clip.config) == sum(p.numel() for _, p in bias_parameters(model.clip))


def test_invalid_options_are_rejected() -> None:
    for bad in (
        {"r": 0},
        {"text_r": -1},
        {"kernel": [3, 2, 1]},
        {"kernel": [3, 1]},
        {"positions": []},
        {"positions": ["ffn"]},
        {"towers": ["visual", "visual"]},
        {"zero_init": "down"},
        {"activation": "relu"},
        {"layers": [-1]},
        {"text_kernel": 0},
    ):
        with pytest.raises(VidretError):
            get_method("st_adapter").make_config(None, **bad)
    with pytest.raises(VidretError, match="do not exist in the visual tower"):
        tiny_model(layers=(5,))
