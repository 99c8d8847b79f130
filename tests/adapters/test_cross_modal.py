"""Cross-Modal Adapter: near-identity bound, shared up-projection, trainables, round trip, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.adapters.helpers import encode
from vidret.adapters.base import DEFAULT_ADAPTER, Hook, blocks, get_method, get_root, inject, unwrap
from vidret.adapters.base import parameter_report as adapter_report
from vidret.adapters.cross_modal import (
    PAPER_PARAMETERS_M,
    CrossModalBranch,
    CrossModalConfig,
    cross_modal_parameter_count,
)
from vidret.adapters.io import load_adapter, save_adapter
from vidret.backbone.clip import CLIP, CLIPConfig, TextConfig, VisionConfig, create_backbone, get_config
from vidret.errors import VidretError
from vidret.heads import TextConditionedHead
from vidret.model import VideoTextModel, build_model

EOT = 49407  # the largest id of the CLIP vocabulary: the text tower pools there


def make_inputs(clip: CLIP, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Two videos of 3 frames (the second with one padding frame) and two captions of 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    size = clip.config.vision.image_size
    frames = torch.randn(2, 3, 3, size, size, generator=g)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    tokens = torch.randint(1, 1000, (2, 8), generator=g)
    tokens[:, 0] = EOT - 1
    tokens[0, 5], tokens[0, 6:] = EOT, 0
    tokens[1, 7] = EOT
    return frames, mask, tokens


def perturb(model: VideoTextModel, std: float = 0.2, seed: int = 1) -> None:
    """Give every trainable random non-zero values (so no gradient is zero by construction)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def clip_loss(model: VideoTextModel, inputs: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    frames, mask, tokens = inputs
    logits = model(frames, mask, tokens)  # [N_text, N_video]
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def tiny_model(seed: int = 0, **overrides: object) -> VideoTextModel:
    return build_model(create_backbone("pocket-tiny", seed=seed), "cross_modal", **overrides)


def branches(model: VideoTextModel, name: str = DEFAULT_ADAPTER) -> dict[str, CrossModalBranch]:
    out = {}
    for tower in ("visual", "text"):
        for i, blk in enumerate(blocks(model.clip, tower)):
            for slot in ("attn", "mlp"):
                hook = getattr(unwrap(blk), slot)
                assert isinstance(hook, Hook)
                branch = hook.branches[name]
                assert isinstance(branch, CrossModalBranch)
                out[f"{tower}.{i}.{slot}"] = branch
    return out


# ----------------------------------------------------------------------------- identity (bounded) at init


def test_each_adapter_moves_its_input_by_at_most_the_operator_norm_bound() -> None:
    """|Ad(u) - u| <= ||W_up||_2 ||W_down||_2 |u| per token, because |QuickGELU(y)| <= |y| and the biases are 0.

    For Gaussian weights of std s, each operator norm is about s (sqrt(D) + sqrt(r)) (+ a few s of spread), so the
    factor is ~ s^2 (sqrt(D) + sqrt(r))^2: 0.7% of |u| for pocket-tiny (D 32, r 8), 9% for ViT-B's D 768 (a worst
    case over directions; typical inputs move far less). We assert it with 3 s of slack: 1.3% on pocket-tiny.
    """
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    for key, br in branches(model).items():
        w_up = torch.cat([w.weight for w in (br.up_unique, br.up_share) if w is not None], dim=0)  # [D, r]
        factor = torch.linalg.matrix_norm(w_up, 2) * torch.linalg.matrix_norm(br.down.weight, 2)
        D, r = br.width, br.down.out_features
        assert factor <= (0.01 * (math.sqrt(D) + math.sqrt(r) + 3)) ** 2, key
        u = torch.randn(64, D, generator=g) * 5
        d = br.delta(u)
        assert torch.all(d.norm(dim=-1) <= factor * u.norm(dim=-1) * (1 + 1e-5)), key
        assert d.abs().max() > 0, key  # near-identity, not an exact one


def test_model_at_init_is_close_to_the_frozen_backbone() -> None:
    """End to end, the 4 adapters per tower of pocket-tiny move the embeddings by < 0.5% (measured 0.02-0.12%).

    Each adapter perturbs one sublayer output by <= 1.3% (test above), and that output is only part of the residual
    stream. 0.5% is 4x the largest measured value and still catches a wrong init: std 0.1 moves them 1.3-10%.
    """
    inputs = make_inputs(create_backbone("pocket-tiny", seed=0))
    frozen = build_model(create_backbone("pocket-tiny", seed=0), "frozen")
    model = tiny_model()
    with torch.no_grad():
        for ref, got in zip(encode(frozen, inputs), encode(model, inputs), strict=True):
            rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
            assert torch.all(rel < 0.005), rel
            assert torch.all(rel > 0), "the paper's init is near-identity, not exact"


def test_init_statistics_follow_the_released_code() -> None:
    model = tiny_model()
    for name, p in model.trainable_named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        else:
            assert abs(p.std().item() - 0.01) < 0.004, name


# ----------------------------------------------------------------------------- the shared up-projection


def test_shared_up_projection_is_one_tensor_per_slot_used_by_both_towers() -> None:
    model = tiny_model()
    root = get_root(model.clip, DEFAULT_ADAPTER, create=False)
    br = branches(model)
    for i in range(2):
        for slot in ("attn", "mlp"):
            shared = root.up_share[slot][str(i)]
            assert br[f"visual.{i}.{slot}"].up_share is shared
            assert br[f"text.{i}.{slot}"].up_share is shared
            assert tuple(shared.weight.shape) == (16, 8)  # [d_s, r]
    names = [n for n, _ in model.trainable_named_parameters()]
    assert len(names) == len(set(names))
    assert sum(n.startswith("root.up_share.") for n in names) == 2 * 2 * 2  # (weight, bias) x 2 slots x 2 layers
    # the shared tensors are stored once, under the root, not under each branch
    assert not any("up_share" in n for n in names if not n.startswith("root."))


@pytest.mark.parametrize("tower", ["visual", "text"])
def test_shared_part_writes_only_the_last_ds_channels(tower: str) -> None:
    model = tiny_model()
    br = branches(model)[f"{tower}.0.mlp"]
    assert br.up_share is not None and br.up_unique is not None
    u = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    d_s = 16
    with torch.no_grad():
        before = br.delta(u)
        br.up_share.weight.add_(1.0)
        br.up_share.bias.add_(1.0)
        after_share = br.delta(u)
        br.up_unique.weight.add_(1.0)
        after_unique = br.delta(u)
    assert torch.equal(after_share[:, :-d_s], before[:, :-d_s])
    assert torch.all(after_share[:, -d_s:] != before[:, -d_s:])
    assert torch.equal(after_unique[:, -d_s:], after_share[:, -d_s:])
    assert torch.all(after_unique[:, :-d_s] != after_share[:, :-d_s])


def test_share_dim_equal_to_width_leaves_no_unique_part() -> None:
    model = tiny_model(share_dim=32)  # = text (and vision) width of pocket-tiny, like ActivityNet's 512 on B/32
    br = branches(model)["text.1.attn"]
    assert br.up_unique is None and br.up_share is not None
    assert br.delta(torch.randn(4, 32)).shape == (4, 32)


def test_shared_up_projection_gets_gradients_from_both_towers() -> None:
    model = tiny_model()
    perturb(model)
    root = get_root(model.clip, DEFAULT_ADAPTER, create=False)
    shared = [p for _, p in root.named_parameters()]
    frames, mask, tokens = make_inputs(model.clip)
    for loss_of in (
        lambda: model.encode_text(tokens).square().sum(),
        lambda: model.encode_video(frames, mask).frames.square().sum(),
    ):
        model.zero_grad(set_to_none=True)
        loss_of().backward()
        for p in shared:
            assert p.grad is not None and p.grad.abs().sum() > 0
    # and the video-only loss gives nothing to the text tower's own weights
    text_down = branches(model)["text.0.attn"].down.weight
    assert text_down.grad is None or text_down.grad.abs().sum() == 0


def test_share_dim_zero_gives_independent_unimodal_adapters() -> None:
    model = tiny_model(share_dim=0)
    assert all(b.up_share is None for b in branches(model).values())
    assert not any(n.startswith("root.") for n, _ in model.trainable_named_parameters())


# ----------------------------------------------------------------------------- trainables, gradients, round trip


def test_backbone_fully_frozen_and_head_is_text_conditioned() -> None:
    model = tiny_model()
    assert isinstance(model.head, TextConditionedHead)
    trainable_ids = {id(p) for _, p in model.trainable_named_parameters()}
    for name, p in model.clip.named_parameters():
        assert p.requires_grad == (id(p) in trainable_ids), name
    assert not any(n.startswith("backbone.") for n, _ in model.trainable_named_parameters())


def test_one_step_changes_exactly_the_trainables_and_gradients_reach_all() -> None:
    model = tiny_model()
    perturb(model)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    trainable = {id(p) for _, p in model.trainable_named_parameters()}
    clip_loss(model, make_inputs(model.clip)).backward()
    for name, p in params.items():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        else:
            assert p.grad is None, name
    with torch.no_grad():  # one plain SGD step (torch.optim's first use costs seconds of imports)
        for _, p in model.trainable_named_parameters():
            p.sub_(0.5 * p.grad)
    changed = {id(p) for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_save_load_round_trip_into_a_fresh_backbone(tmp_path) -> None:
    model = tiny_model(preset="didemo")
    perturb(model, std=0.3)
    inputs = make_inputs(model.clip)
    with torch.no_grad():
        ref = encode(model, inputs)
        ref_logits = model.similarity(ref[1], model.encode_video(inputs[0], inputs[1]))
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(create_backbone("pocket-tiny", seed=0), tmp_path / "a")
    assert loaded.config == model.config and loaded.preset == "didemo"
    with torch.no_grad():
        got = encode(loaded, inputs)
        got_logits = loaded.similarity(got[1], loaded.encode_video(inputs[0], inputs[1]))
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(ref_logits, got_logits)


def test_adapter_weights_stay_fp32_under_bf16_autocast() -> None:
    model = tiny_model()
    perturb(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        video, text = encode(model, make_inputs(model.clip))
    assert torch.isfinite(video).all() and torch.isfinite(text).all()
    assert all(p.dtype == torch.float32 for _, p in model.trainable_named_parameters())


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("preset", sorted(PAPER_PARAMETERS_M))
def test_parameter_counts_on_vit_b32_match_the_paper(preset: str) -> None:
    exact = {"msrvtt": 519_168, "didemo": 520_896, "msvd": 1_008_000, "vatex": 988_416, "activitynet": 805_632}
    config = get_method("cross_modal").make_config(preset)
    assert isinstance(config, CrossModalConfig)
    with torch.device("meta"):  # real shapes, no memory, no init cost
        clip = create_backbone("ViT-B-32")
        inject(clip, config, DEFAULT_ADAPTER)
    report = adapter_report(clip, config)
    assert report["trainable"] == exact[preset] == cross_modal_parameter_count(config, get_config("ViT-B-32"))
    assert report["backbone_trained"] == 0
    if preset == "msvd":
        # The paper prints 1.00M; (16, 16) gives 1.008M (see cross_modal.py's docstring).
        assert abs(report["trainable"] / 1e6 - PAPER_PARAMETERS_M[preset]) < 0.01
    else:
        assert round(report["trainable"] / 1e6, 2) == PAPER_PARAMETERS_M[preset]
    if preset == "msrvtt":
        assert round(report["percent"], 2) == 0.34


@pytest.mark.parametrize(("r", "share_dim", "layers"), [(8, 16, None), (4, 0, None), (16, 32, None), (3, 5, (1,))])
def test_parameter_formula_matches_the_modules_on_a_small_config(r: int, share_dim: int, layers: tuple | None) -> None:
    model = tiny_model(r=r, share_dim=share_dim, layers=layers)
    n_layers = 2 if layers is None else len(layers)
    assert len(branches_in(model.clip)) == 2 * 2 * n_layers  # 2 towers x (attn, mlp) x layers
    actual = sum(p.numel() for _, p in model.trainable_named_parameters())
    assert actual == cross_modal_parameter_count(model.config, model.clip.config)  # type: ignore[arg-type]


def branches_in(clip: CLIP) -> list[CrossModalBranch]:
    return [m for m in clip.modules() if isinstance(m, CrossModalBranch)]


# ----------------------------------------------------------------------------- configuration errors


def test_share_dim_wider_than_a_tower_is_a_clear_error() -> None:
    with pytest.raises(VidretError, match=r"share_dim \(d_s = 512\).*narrower tower's width \(32\)"):
        tiny_model(preset="activitynet")
    with pytest.raises(VidretError, match="share_dim"):
        cross_modal_parameter_count(CrossModalConfig(share_dim=64), get_config("pocket-tiny"))


def test_invalid_options_are_rejected() -> None:
    for bad in ({"r": 0}, {"r": 8.0}, {"share_dim": -1}, {"init_std": 0.0}, {"layers": [0, 0]}, {"layers": []}):
        with pytest.raises(VidretError):
            get_method("cross_modal").make_config(None, **bad)
    with pytest.raises(VidretError, match="do not exist in both towers"):
        tiny_model(layers=(2,))


def test_towers_of_different_depth_need_explicit_layers() -> None:
    cfg = CLIPConfig(
        name="uneven",
        embed_dim=16,
        vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=3, heads=2),
        text=TextConfig(context_length=16, vocab_size=EOT + 1, width=16, layers=2, heads=2),
    )
    with pytest.raises(VidretError, match="3 vision and 2 text layers"):
        build_model(create_backbone(cfg, seed=0), "cross_modal", share_dim=8)
    model = build_model(create_backbone(cfg, seed=0), "cross_modal", share_dim=8, layers=(0, 1))
    assert len(branches_in(model.clip)) == 8


# ----------------------------------------------------------------------------- two methods on one backbone


def test_cross_modal_and_lora_share_a_backbone_without_interfering() -> None:
    clip = create_backbone("pocket-tiny", seed=0)
    inputs = make_inputs(clip)
    a = build_model(clip, "cross_modal", adapter_name="a")
    b = build_model(clip, "lora", adapter_name="b", targets=("q", "v", "mlp"))
    perturb(a, seed=1)
    perturb(b, seed=2)
    # References: each adapter alone on its own copy of the backbone, with the same weights.
    refs = {}
    for name, shared_model in (("a", a), ("b", b)):
        alone = build_model(create_backbone("pocket-tiny", seed=0), shared_model.method, config=shared_model.config)
        weights = dict(shared_model.trainable_named_parameters())  # names do not depend on the adapter name
        with torch.no_grad():
            for n, p in alone.trainable_named_parameters():
                p.copy_(weights.pop(n))
            refs[name] = encode(alone, inputs)
        assert not weights
    frozen = build_model(create_backbone("pocket-tiny", seed=0), "frozen")
    with torch.no_grad():
        got_a, got_b, ref_frozen = encode(a, inputs), encode(b, inputs), encode(frozen, inputs)
        plain = VideoTextModel(clip, frozen.config, adapter_name="none")  # no branch of that name anywhere
        got_plain = encode(plain, inputs)
    for x, y in zip(got_a, refs["a"], strict=True):
        assert torch.equal(x, y)
    for x, y in zip(got_b, refs["b"], strict=True):
        assert torch.equal(x, y)
    for x, y in zip(got_plain, ref_frozen, strict=True):
        assert torch.equal(x, y)
    assert not torch.allclose(got_a[0], got_b[0])
