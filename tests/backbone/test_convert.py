"""Pure state-dict converters: exact round trips, key tables, architecture inference, strict loading."""

from __future__ import annotations

import pytest
import torch

from vidret.backbone.clip import CLIP, CLIPConfig, TextConfig, VisionConfig, get_config, list_configs
from vidret.backbone.convert import (
    detect_layout,
    from_hf,
    from_openai,
    infer_config,
    load_state_dict_strict,
    to_hf,
    to_openai,
    to_vidret,
    unwrap,
)
from vidret.errors import VidretError

TINY = get_config("pocket-tiny")


def _ours(seed: int = 0, config: CLIPConfig = TINY) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = CLIP(config)
    with torch.no_grad():  # non-trivial values everywhere (biases and LayerNorms are 0/1 at init)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.state_dict()


def _meta_state_dict(config: CLIPConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return CLIP(config).state_dict()


def _assert_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _hf_state_dict(position_ids: bool = False) -> dict[str, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    tc = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2}
    tc |= {"num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
    vc = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    vc |= {"image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu"}
    cfg = transformers.CLIPConfig(text_config=tc, vision_config=vc, projection_dim=32)
    torch.manual_seed(1)
    sd = transformers.CLIPModel(cfg).state_dict()
    sd = {k: v + 0.1 * torch.randn_like(v) for k, v in sd.items()}
    if position_ids:  # older transformers versions saved these index buffers
        sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    return sd


# ---------------------------------------------------------------------------------------- round trips


def test_hf_round_trip_is_exact() -> None:
    sd = _hf_state_dict()
    _assert_exact(to_hf(from_hf(sd)), sd)


def test_from_hf_matches_our_parameter_layout_and_transposes_projections() -> None:
    sd = _hf_state_dict(position_ids=True)
    ours = from_hf(sd)
    expected = _meta_state_dict(TINY)
    assert set(ours) == set(expected)  # position_ids dropped, nothing left over
    for k, v in ours.items():
        assert v.shape == expected[k].shape, k
    assert torch.equal(ours["visual.proj"], sd["visual_projection.weight"].t())
    assert torch.equal(ours["text.text_projection"], sd["text_projection.weight"].t())
    assert torch.equal(ours["visual.ln_pre.weight"], sd["vision_model.pre_layrnorm.weight"])
    assert torch.equal(
        ours["text.transformer.resblocks.1.mlp.c_proj.bias"], sd["text_model.encoder.layers.1.mlp.fc2.bias"]
    )


def test_openai_round_trip_is_exact() -> None:
    ours = _ours()
    _assert_exact(from_openai(to_openai(ours)), ours)


def test_to_openai_layout_matches_openai_names() -> None:
    ours = _ours()
    oa = to_openai(ours)
    D, Dv = TINY.text.width, TINY.vision.width
    assert not any(k.startswith("text.") for k in oa)
    assert not any("q_proj" in k or "k_proj" in k or "v_proj" in k for k in oa)
    assert oa["transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * D, D)
    assert oa["visual.transformer.resblocks.0.attn.in_proj_bias"].shape == (3 * Dv,)
    for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"):
        assert torch.equal(oa[key], ours[f"text.{key}"])
    per_block = 12  # weight + bias of ln_1, attn.in_proj, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj
    top = 5 + 8 + 1  # text: token/positional embedding, ln_final x2, projection; visual: 8; logit_scale
    assert len(oa) == per_block * (TINY.vision.layers + TINY.text.layers) + top


def test_in_proj_split_order_is_q_k_v() -> None:
    ours = _ours()
    oa = to_openai(ours)
    w = oa["visual.transformer.resblocks.0.attn.in_proj_weight"]
    D = TINY.vision.width
    oa["visual.transformer.resblocks.0.attn.in_proj_weight"] = torch.cat(
        [torch.full((D, D), 1.0), torch.full((D, D), 2.0), torch.full((D, D), 3.0)]
    )
    back = from_openai(oa)
    for i, name in enumerate(("q", "k", "v")):
        assert (back[f"visual.transformer.resblocks.0.attn.{name}_proj.weight"] == i + 1).all()
    assert w.shape == (3 * D, D)


def test_from_openai_drops_torchscript_scalars_and_rejects_bad_in_proj() -> None:
    oa = to_openai(_ours())
    oa |= {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77), "vocab_size": torch.tensor(9)}
    assert "input_resolution" not in from_openai(oa)
    oa["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(31, 32)
    with pytest.raises(VidretError, match=r"transformer\.resblocks\.0\.attn\.in_proj_weight"):
        from_openai(oa)


def test_open_clip_variants_convert_to_the_same_state_dict() -> None:
    ours = _ours()
    oa = to_openai(ours)
    wrapped = {"epoch": 7, "name": "run", "state_dict": {"module." + k: v for k, v in oa.items()}}
    _assert_exact(from_openai(wrapped), ours)
    # open_clip CustomTextCLIP: the OpenAI text keys under "text.", plus its non-persistent-era causal mask
    custom = {("text." + k if not k.startswith(("visual.", "logit_scale")) else k): v for k, v in oa.items()}
    custom["text.attn_mask"] = torch.zeros(77, 77)
    _assert_exact(from_openai(custom), ours)
    compiled = {"_orig_mod." + k: v for k, v in oa.items()}
    _assert_exact(to_vidret(compiled), ours)


def test_unknown_keys_pass_through_so_strict_loading_names_them() -> None:
    oa = to_openai(_ours())
    oa["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)
    assert "visual.transformer.resblocks.0.ls_1.gamma" in from_openai(oa)


def test_detect_layout() -> None:
    ours = _ours()
    assert detect_layout(ours) == "vidret"
    assert detect_layout(to_openai(ours)) == "openai"
    assert detect_layout(to_hf(ours)) == "hf"
    with pytest.raises(VidretError, match="unrecognised checkpoint layout.*encoder.weight"):
        detect_layout({"encoder.weight": torch.zeros(1)})


def test_unwrap_errors() -> None:
    with pytest.raises(VidretError, match="not a state dict"):
        unwrap(torch.zeros(3))
    with pytest.raises(VidretError, match="no tensors"):
        unwrap({"epoch": 3})


# -------------------------------------------------------------------------------- architecture inference


@pytest.mark.parametrize("name", list_configs())
def test_infer_config_recognises_every_named_config(name: str) -> None:
    cfg = get_config(name)
    shapes = _meta_state_dict(cfg)
    assert infer_config(shapes) == cfg
    assert infer_config(to_openai(shapes)) == cfg


def test_infer_config_custom_architecture() -> None:
    cfg = CLIPConfig(
        name="custom",
        embed_dim=48,
        vision=VisionConfig(image_size=40, patch_size=10, width=128, layers=3, heads=2, mlp_ratio=2.0),
        text=TextConfig(context_length=20, vocab_size=1000, width=192, layers=1, heads=3),
    )
    shapes = _meta_state_dict(cfg)
    assert infer_config(shapes) == cfg  # heads by OpenAI's rule width // 64
    got = infer_config(shapes, vision_heads=8, text_heads=4)
    assert (got.vision.heads, got.text.heads) == (8, 4)


def test_infer_config_heads_that_differ_from_the_named_config_give_custom() -> None:
    shapes = _meta_state_dict(TINY)
    got = infer_config(shapes, vision_heads=4)
    assert got.name == "custom" and got.vision.heads == 4
    assert got.text.heads == 1  # not told: OpenAI's rule (32 // 64 -> at least one head)


def test_infer_config_errors_name_the_problem() -> None:
    shapes = dict(_meta_state_dict(TINY))
    del shapes["visual.proj"]
    with pytest.raises(VidretError, match=r"missing.*visual\.proj"):
        infer_config(shapes)
    shapes = dict(_meta_state_dict(TINY))
    shapes["visual.positional_embedding"] = torch.zeros(18, 32)
    with pytest.raises(VidretError, match="18 rows"):
        infer_config(shapes)


# ---------------------------------------------------------------------------------------- strict loading


def test_load_state_dict_strict_loads_and_casts_dtype() -> None:
    ours = _ours(seed=3)
    half = {k: v.half() for k, v in ours.items()}
    model = CLIP(TINY)
    load_state_dict_strict(model, half)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, half[k].float())


def test_load_state_dict_strict_names_missing_unexpected_and_misshaped_keys() -> None:
    model = CLIP(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = dict(_ours())
    del sd["text.ln_final.bias"]
    sd["visual.extra"] = torch.zeros(2)
    sd["visual.ln_pre.weight"] = torch.zeros(31)
    with pytest.raises(VidretError) as info:
        load_state_dict_strict(model, sd)
    msg = str(info.value)
    assert "1 missing key(s): text.ln_final.bias" in msg
    assert "1 unexpected key(s): visual.extra" in msg
    assert "visual.ln_pre.weight (31,) != (32,)" in msg
    assert "pocket-tiny" in msg
    _assert_exact(model.state_dict(), before)  # nothing half-loaded


def test_strict_error_lists_first_keys_and_counts() -> None:
    sd = {k: v for k, v in _ours().items() if not k.startswith("text.")}
    with pytest.raises(VidretError, match=r"missing key\(s\): .*\(\+\d+ more\)") as info:
        load_state_dict_strict(CLIP(TINY), sd)
    n_text = sum(1 for k in _ours() if k.startswith("text."))
    assert f"{n_text} missing key(s)" in str(info.value)


def test_resnet_clip_is_refused_by_name() -> None:
    oa = to_openai(_ours())
    oa["visual.layer1.0.conv1.weight"] = torch.zeros(8, 8, 1, 1)
    with pytest.raises(VidretError, match="ResNet CLIP"):
        infer_config(oa)
