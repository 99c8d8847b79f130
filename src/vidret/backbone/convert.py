"""Pure ``state_dict -> state_dict`` converters between checkpoint layouts and vidret's CLIP layout.

Three layouts exist in the wild for the same OpenAI CLIP ViT weights:

* **openai** (OpenAI ``clip/model.py``, also open_clip's ``CLIP``): the text tower at the top level
  (``token_embedding.weight``, ``transformer.resblocks.N...``, ``ln_final``, ``text_projection``), the image
  tower under ``visual.``, attention as one fused ``attn.in_proj_weight`` ``[3D, D]`` (q, k, v stacked).
  open_clip's ``CustomTextCLIP`` puts the same text keys under ``text.``; both are read here.
* **hf** (``transformers.CLIPModel``): ``text_model.*`` / ``vision_model.*`` with separate q/k/v, other
  names (``layer_norm1``, ``fc1``, ``pre_layrnorm`` sic) and the two projections stored as
  ``nn.Linear`` weights, i.e. transposed relative to ours.
* **vidret** (``clip.CLIP``): OpenAI's names with the text tower under ``text.`` and separate
  ``attn.{q,k,v,out}_proj`` Linears.

Every rename is a row in an explicit table below (DESIGN.md rule 3); nothing is rewritten inside a
constructor. Keys a table does not know are passed through unchanged, so :func:`load_state_dict_strict`
names them as unexpected instead of them vanishing silently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vidret.backbone.clip import CLIPConfig, TextConfig, VisionConfig, get_config, list_configs
from vidret.errors import VidretError

__all__ = [
    "Layout",
    "detect_layout",
    "from_hf",
    "from_openai",
    "infer_config",
    "load_state_dict_strict",
    "check_state_dict",
    "to_hf",
    "to_openai",
    "to_vidret",
    "unwrap",
]

Layout = Literal["vidret", "openai", "hf"]
StateDict = dict[str, Tensor]

# --------------------------------------------------------------------------------------------------
# Rename tables. Direction: ours -> theirs. The reverse direction uses the inverted table.
# --------------------------------------------------------------------------------------------------

# Per-block keys, relative to a block prefix, that are plain 1:1 renames.
_OPENAI_BLOCK: dict[str, str] = {
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "attn.out_proj.weight": "attn.out_proj.weight",
    "attn.out_proj.bias": "attn.out_proj.bias",
    "ln_2.weight": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "mlp.c_fc.weight": "mlp.c_fc.weight",
    "mlp.c_fc.bias": "mlp.c_fc.bias",
    "mlp.c_proj.weight": "mlp.c_proj.weight",
    "mlp.c_proj.bias": "mlp.c_proj.bias",
}
# OpenAI's fused attention input projection -> our three Linears, in nn.MultiheadAttention's q, k, v order.
_OPENAI_IN_PROJ: dict[str, tuple[str, str, str]] = {
    "attn.in_proj_weight": ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"),
    "attn.in_proj_bias": ("attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias"),
}
# Top-level keys; "{t}" is where the text tower lives in the OpenAI-style file ("" for OpenAI, "text." for
# open_clip's CustomTextCLIP).
_OPENAI_TOP: dict[str, str] = {
    "logit_scale": "logit_scale",
    "text.token_embedding.weight": "{t}token_embedding.weight",
    "text.positional_embedding": "{t}positional_embedding",
    "text.ln_final.weight": "{t}ln_final.weight",
    "text.ln_final.bias": "{t}ln_final.bias",
    "text.text_projection": "{t}text_projection",
    "visual.conv1.weight": "visual.conv1.weight",
    "visual.class_embedding": "visual.class_embedding",
    "visual.positional_embedding": "visual.positional_embedding",
    "visual.ln_pre.weight": "visual.ln_pre.weight",
    "visual.ln_pre.bias": "visual.ln_pre.bias",
    "visual.ln_post.weight": "visual.ln_post.weight",
    "visual.ln_post.bias": "visual.ln_post.bias",
    "visual.proj": "visual.proj",
}
_OPENAI_TOWERS: tuple[tuple[str, str], ...] = (
    ("visual.transformer.resblocks.", "visual.transformer.resblocks."),
    ("text.transformer.resblocks.", "{t}transformer.resblocks."),
)
# Not weights: OpenAI's TorchScript archives carry these three scalars; old open_clip files the causal mask.
_OPENAI_IGNORED = frozenset({"input_resolution", "context_length", "vocab_size", "attn_mask", "text.attn_mask"})

_HF_BLOCK: dict[str, str] = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.q_proj.bias": "self_attn.q_proj.bias",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.k_proj.bias": "self_attn.k_proj.bias",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.v_proj.bias": "self_attn.v_proj.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_HF_TOP: dict[str, str] = {
    "logit_scale": "logit_scale",
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight",
    "text.ln_final.bias": "text_model.final_layer_norm.bias",
    "text.text_projection": "text_projection.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # (sic) HF's spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",
}
_HF_TOWERS: tuple[tuple[str, str], ...] = (
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("text.transformer.resblocks.", "text_model.encoder.layers."),
)
# Ours are matrices x @ P with P [D, E]; HF stores nn.Linear weights [E, D].
_HF_TRANSPOSED = frozenset({"text.text_projection", "visual.proj"})
# Index buffers older transformers versions saved; recomputed by HF, no counterpart here.
_HF_IGNORED = frozenset({"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"})

# Wrappers around the tensors: open_clip / DDP / torch.compile.
_WRAPPER_KEYS = ("state_dict", "model")
_KEY_PREFIXES = ("module.", "_orig_mod.")


def _invert(table: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def _rename(
    key: str, top: Mapping[str, str], towers: Iterable[tuple[str, str]], block: Mapping[str, str]
) -> str | None:
    """Map one key through a top-level table and a per-block table; None when neither knows it."""
    if key in top:
        return top[key]
    for src, dst in towers:
        if key.startswith(src):
            idx, _, rest = key[len(src) :].partition(".")
            if idx.isdigit() and rest in block:
                return f"{dst}{idx}.{block[rest]}"
    return None


def _fmt(table: Mapping[str, str], t: str) -> dict[str, str]:
    return {k: v.replace("{t}", t) for k, v in table.items()}


def _fmt_towers(t: str) -> tuple[tuple[str, str], ...]:
    return tuple((a, b.replace("{t}", t)) for a, b in _OPENAI_TOWERS)


# --------------------------------------------------------------------------------------------------
# Unwrapping and layout detection
# --------------------------------------------------------------------------------------------------


def unwrap(obj: Any) -> StateDict:
    """Strip checkpoint wrappers: ``{"state_dict": ...}`` / ``{"model": ...}`` and ``module.`` prefixes.

    Args:
        obj: what ``torch.load`` returned (a state dict or a training checkpoint holding one).

    Returns:
        A flat ``{name: tensor}`` dict. Non-tensor entries (epoch counters, ...) are dropped.
    """
    for _ in range(3):  # nested wrappers are rare; three levels is plenty
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping):
        raise VidretError(
            f"the checkpoint holds a {type(obj).__name__}, not a state dict; save weights with "
            "torch.save(model.state_dict(), path)"
        )
    sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise VidretError(f"the checkpoint holds no tensors (keys: {_few(list(map(str, obj)))})")
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def detect_layout(state_dict: Mapping[str, Tensor]) -> Layout:
    """Which layout a (unwrapped) state dict is in, judged by its keys."""
    keys = list(state_dict)
    if any(k.startswith(("text_model.", "vision_model.")) for k in keys):
        return "hf"
    if any(".attn.in_proj_weight" in k for k in keys) or "token_embedding.weight" in state_dict:
        return "openai"
    if any(".attn.q_proj.weight" in k for k in keys) or "text.token_embedding.weight" in state_dict:
        return "vidret"
    raise VidretError(
        "unrecognised checkpoint layout (expected OpenAI/open_clip CLIP, HF CLIPModel or vidret keys); "
        f"first keys: {_few(keys)}"
    )


def to_vidret(obj: Any) -> StateDict:
    """Any supported checkpoint object -> vidret layout (unwrap, detect, convert)."""
    sd = unwrap(obj)
    layout = detect_layout(sd)
    if layout == "hf":
        return from_hf(sd)
    if layout == "openai":
        return from_openai(sd)
    return sd


# --------------------------------------------------------------------------------------------------
# OpenAI / open_clip
# --------------------------------------------------------------------------------------------------


def from_openai(state_dict: Any) -> StateDict:
    """OpenAI (or open_clip) CLIP ViT state dict -> vidret layout.

    Accepts open_clip training checkpoints as they are: a ``{"state_dict": ...}`` wrapper, ``module.``
    prefixes, and the text tower either at the top level (OpenAI, open_clip ``CLIP``) or under ``text.``
    (open_clip ``CustomTextCLIP``). Fused ``in_proj`` tensors are split into q/k/v views.
    """
    sd = unwrap(state_dict)
    t = "text." if "text.token_embedding.weight" in sd else ""
    top = _invert(_fmt(_OPENAI_TOP, t))
    towers = tuple((b, a) for a, b in _fmt_towers(t))
    block = _invert(_OPENAI_BLOCK)
    out: StateDict = {}
    for key, value in sd.items():
        if key in _OPENAI_IGNORED:
            continue
        new = _rename(key, top, towers, block)
        if new is not None:
            out[new] = value
            continue
        split = _rename_in_proj(key, towers, _OPENAI_IN_PROJ)
        if split is not None:
            width = value.shape[0] // 3
            if value.shape[0] != 3 * width or value.shape[0] == 0:
                raise VidretError(f"{key}: fused q/k/v tensor of shape {tuple(value.shape)} is not 3 x width")
            # [3D, ...] -> three [D, ...]: rows are q, then k, then v (nn.MultiheadAttention's order)
            for name, part in zip(split, value.split(width, dim=0)):
                out[name] = part
            continue
        out[key] = value  # unknown: kept so strict loading names it
    return out


def _rename_in_proj(
    key: str, towers: Iterable[tuple[str, str]], table: Mapping[str, tuple[str, str, str]]
) -> tuple[str, str, str] | None:
    for src, dst in towers:
        if key.startswith(src):
            idx, _, rest = key[len(src) :].partition(".")
            if idx.isdigit() and rest in table:
                q, k, v = (f"{dst}{idx}.{name}" for name in table[rest])
                return q, k, v
    return None


def to_openai(state_dict: Mapping[str, Tensor]) -> StateDict:
    """vidret layout -> OpenAI layout (text tower at the top level, q/k/v fused into ``in_proj``)."""
    top = _fmt(_OPENAI_TOP, "")
    towers = _fmt_towers("")
    out: StateDict = {}
    for key, value in state_dict.items():
        new = _rename(key, top, towers, _OPENAI_BLOCK)
        if new is not None:
            out[new] = value
            continue
        fused = _fused_name(key, towers)
        if fused is None:
            out[key] = value  # unknown: kept so strict loading names it
            continue
        fused_key, names = fused
        if fused_key in out:
            continue  # built already from this block's first q/k/v key
        missing = [n for n in names if n not in state_dict]
        if missing:
            raise VidretError(f"cannot fuse q/k/v into {fused_key}: missing {missing}")
        # three [D, ...] -> [3D, ...] in q, k, v row order
        out[fused_key] = torch.cat([state_dict[n] for n in names], dim=0)
    return out


def _fused_name(key: str, towers: Iterable[tuple[str, str]]) -> tuple[str, tuple[str, ...]] | None:
    """For a q/k/v key of ours: (the fused OpenAI key, our three keys it is built from)."""
    for src, dst in towers:
        if key.startswith(src):
            idx, _, rest = key[len(src) :].partition(".")
            for fused_name, parts in _OPENAI_IN_PROJ.items():
                if idx.isdigit() and rest in parts:
                    return f"{dst}{idx}.{fused_name}", tuple(f"{src}{idx}.{p}" for p in parts)
    return None


# --------------------------------------------------------------------------------------------------
# HF transformers CLIPModel
# --------------------------------------------------------------------------------------------------


def from_hf(state_dict: Mapping[str, Tensor]) -> StateDict:
    """HF ``transformers.CLIPModel`` state dict -> vidret layout.

    ``position_ids`` buffers (saved by older transformers versions) are dropped: they are ``arange``
    indices, not weights. The two projections are transposed (HF Linear ``[E, D]`` -> ours ``[D, E]``).
    """
    sd = unwrap(state_dict)
    top = _invert(_HF_TOP)
    towers = tuple((b, a) for a, b in _HF_TOWERS)
    block = _invert(_HF_BLOCK)
    out: StateDict = {}
    for key, value in sd.items():
        if key in _HF_IGNORED:
            continue
        new = _rename(key, top, towers, block)
        if new is None:
            out[key] = value
        elif new in _HF_TRANSPOSED:
            out[new] = value.t().contiguous()
        else:
            out[new] = value
    return out


def to_hf(state_dict: Mapping[str, Tensor]) -> StateDict:
    """vidret layout -> HF ``transformers.CLIPModel`` state dict (``to_hf(from_hf(sd))`` is exact)."""
    out: StateDict = {}
    for key, value in state_dict.items():
        new = _rename(key, _HF_TOP, _HF_TOWERS, _HF_BLOCK)
        if new is None:
            out[key] = value
        elif key in _HF_TRANSPOSED:
            out[new] = value.t().contiguous()
        else:
            out[new] = value
    return out


# --------------------------------------------------------------------------------------------------
# Architecture inference and strict loading
# --------------------------------------------------------------------------------------------------

_REQUIRED_FOR_INFERENCE = (
    "visual.conv1.weight",
    "visual.positional_embedding",
    "visual.proj",
    "visual.transformer.resblocks.0.mlp.c_fc.weight",
    "text.token_embedding.weight",
    "text.positional_embedding",
    "text.text_projection",
    "text.transformer.resblocks.0.mlp.c_fc.weight",
)


def _count_blocks(keys: Iterable[str], prefix: str) -> int:
    """Number of blocks = 1 + the largest index under ``prefix`` (gaps show up later as missing keys)."""
    heads = (k[len(prefix) :].partition(".")[0] for k in keys if k.startswith(prefix))
    idx = [int(h) for h in heads if h.isdigit()]
    return max(idx) + 1 if idx else 0


def _default_heads(width: int) -> int:
    # OpenAI's build_model: heads = width // 64. Narrow custom towers fall back to one head.
    h = width // 64
    return h if h >= 1 and width % h == 0 else 1


def infer_config(state_dict: Any, *, vision_heads: int | None = None, text_heads: int | None = None) -> CLIPConfig:
    """Infer the architecture from tensor shapes.

    Head counts are not visible in the shapes: they come from the arguments (e.g. an HF ``config.json``),
    else from the named config with identical shapes, else OpenAI's rule ``width // 64``.

    Args:
        state_dict: a state dict in any supported layout (or a wrapped checkpoint).
        vision_heads: attention heads of the image tower, when known.
        text_heads: attention heads of the text tower, when known.

    Returns:
        The matching named config (e.g. ``ViT-B-16``) when shapes and heads agree with one, else a config
        named ``"custom"``.
    """
    sd = to_vidret(state_dict)
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
        raise VidretError("this is a ResNet CLIP checkpoint (RN50, ...); vidret's backbone is a ViT: use a ViT-* model")
    missing = [k for k in _REQUIRED_FOR_INFERENCE if k not in sd]
    if missing:
        raise VidretError(
            f"cannot infer the CLIP architecture: {len(missing)} required key(s) missing: {_few(missing)}"
        )
    conv = sd["visual.conv1.weight"]
    if conv.ndim != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
        raise VidretError(f"visual.conv1.weight has shape {tuple(conv.shape)}, expected [D, 3, P, P]")
    v_width, patch = int(conv.shape[0]), int(conv.shape[-1])
    n_pos = int(sd["visual.positional_embedding"].shape[0])
    grid = math.isqrt(max(n_pos - 1, 0))
    if grid * grid != n_pos - 1 or grid == 0:
        raise VidretError(f"visual.positional_embedding has {n_pos} rows: not 1 + a square patch grid")
    vocab, t_width = (int(s) for s in sd["text.token_embedding.weight"].shape)
    embed_dim = int(sd["text.text_projection"].shape[-1])
    v_embed = int(sd["visual.proj"].shape[-1])
    if v_embed != embed_dim:
        raise VidretError(f"visual.proj gives embedding width {v_embed} but text.text_projection {embed_dim}")
    v_hidden = int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    t_hidden = int(sd["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    try:
        vision = VisionConfig(
            image_size=grid * patch,
            patch_size=patch,
            width=v_width,
            layers=_count_blocks(sd, "visual.transformer.resblocks."),
            heads=vision_heads or _default_heads(v_width),
            mlp_ratio=v_hidden / v_width,
        )
        text = TextConfig(
            context_length=int(sd["text.positional_embedding"].shape[0]),
            vocab_size=vocab,
            width=t_width,
            layers=_count_blocks(sd, "text.transformer.resblocks."),
            heads=text_heads or _default_heads(t_width),
            mlp_ratio=t_hidden / t_width,
        )
        cfg = CLIPConfig(name="custom", embed_dim=embed_dim, vision=vision, text=text)
    except ValueError as e:
        raise VidretError(f"the checkpoint's shapes do not form a valid CLIP architecture: {e}") from e
    for tower, hidden in ((cfg.vision, v_hidden), (cfg.text, t_hidden)):
        if int(tower.width * tower.mlp_ratio) != hidden:  # float ratio must rebuild the exact MLP width
            raise VidretError(f"MLP width {hidden} for token width {tower.width} is not representable")
    return _match_named(cfg, heads_given=(vision_heads is not None, text_heads is not None))


def _match_named(cfg: CLIPConfig, heads_given: tuple[bool, bool]) -> CLIPConfig:
    def shapes(c: CLIPConfig, vision_heads: bool, text_heads: bool) -> tuple[Any, ...]:
        v, t = dataclasses.asdict(c.vision), dataclasses.asdict(c.text)
        # Heads must agree only where the caller told us the heads.
        if not vision_heads:
            v.pop("heads")
        if not text_heads:
            t.pop("heads")
        return c.embed_dim, sorted(v.items()), sorted(t.items())

    key = shapes(cfg, *heads_given)
    for name in list_configs():
        named = get_config(name)
        if shapes(named, *heads_given) == key:
            return named
    return cfg


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_state_dict(expected: Mapping[str, Tensor], state_dict: Mapping[str, Any], what: str = "model") -> None:
    """Raise VidretError naming every missing, unexpected or mis-shaped key (first few of each + counts).

    Args:
        expected: the target's ``state_dict()`` (meta tensors are fine: only shapes are read).
        state_dict: the checkpoint's tensors, already in the target's layout.
        what: how to name the target in the message.
    """
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    not_tensor = [k for k in state_dict if k in expected and not isinstance(state_dict[k], Tensor)]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and isinstance(state_dict[k], Tensor) and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if not_tensor:
        problems.append(f"{len(not_tensor)} non-tensor value(s): {_few(not_tensor)}")
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped key(s) (checkpoint != {what}): {_few(shapes, 3)}")
    if problems:
        raise VidretError(
            f"the checkpoint does not fit {what}: " + "; ".join(problems) + ". Is it a CLIP ViT checkpoint "
            "(OpenAI, open_clip or HF CLIPModel) of this architecture?"
        )


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Copy ``state_dict`` (vidret layout) into ``model``; every key and shape must match.

    Values are cast to the model's parameter dtypes (OpenAI ships fp16 weights).
    """
    config = getattr(model, "config", None)
    what = f"the {config.name} architecture" if isinstance(config, CLIPConfig) else type(model).__name__
    check_state_dict(model.state_dict(), state_dict, what)
    with torch.no_grad():
        model.load_state_dict(dict(state_dict), strict=True)
