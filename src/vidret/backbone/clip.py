"""CLIP in the project's own compact code: vision ViT + text transformer, batch-first, SDPA.

Hook points on purpose (DESIGN.md rule 4): every block has separate ``q_proj/k_proj/v_proj/out_proj`` Linears
and calls its ``attn`` and ``mlp`` children as ``child(x, ctx)``, so adapters can wrap those children (or whole
blocks) from outside. The blocks themselves contain no adapter branches.

A ``ForwardContext`` travels explicitly through every block: it carries what video adapters need to know
(frames per video, the frame mask) and which named adapter runs, so there is no global state.

Parameter names follow OpenAI's layout (``visual.conv1``, ``visual.transformer.resblocks.N.ln_1`` ...) with the
text tower under ``text.`` and attention ``in_proj`` split into q/k/v; ``convert.py`` holds the rename tables.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vidret.errors import VidretError

Modality = Literal["image", "text"]


@dataclass(frozen=True)
class VisionConfig:
    """Vision ViT architecture."""

    image_size: int = 224  # input resolution the positional embedding was trained for
    patch_size: int = 32  # square patch side in pixels
    width: int = 768  # token width D
    layers: int = 12  # residual blocks
    heads: int = 12  # attention heads (width must divide)
    mlp_ratio: float = 4.0  # MLP hidden = width * mlp_ratio

    def __post_init__(self) -> None:
        _check_tower(self.width, self.heads, self.layers, "vision")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    """Text transformer architecture."""

    context_length: int = 77  # positional embedding rows; shorter inputs slice it
    vocab_size: int = 49408  # OpenAI CLIP BPE vocabulary
    width: int = 512  # token width D
    layers: int = 12  # residual blocks
    heads: int = 8  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden = width * mlp_ratio

    def __post_init__(self) -> None:
        _check_tower(self.width, self.heads, self.layers, "text")
        if self.context_length < 2:
            raise ValueError("context_length must be >= 2 (start and end tokens)")


@dataclass(frozen=True)
class CLIPConfig:
    """A named CLIP architecture (``configs/<name>.json``)."""

    name: str  # e.g. "ViT-B-16"; inferred configs are named after the matching named config
    embed_dim: int  # joint embedding width E
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        if self.embed_dim <= 0:
            raise ValueError("embed_dim must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPConfig:
        unknown = set(d) - {"name", "embed_dim", "vision", "text"}
        if unknown:
            raise ValueError(f"unknown CLIPConfig keys: {sorted(unknown)}")
        return cls(
            name=str(d["name"]),
            embed_dim=int(d["embed_dim"]),
            vision=VisionConfig(**d.get("vision", {})),
            text=TextConfig(**d.get("text", {})),
        )

    def same_architecture(self, other: CLIPConfig) -> bool:
        """True when the two configs build tensors of identical shapes (names may differ)."""
        return (self.embed_dim, self.vision, self.text) == (other.embed_dim, other.vision, other.text)


def _check_tower(width: int, heads: int, layers: int, tower: str) -> None:
    if width <= 0 or heads <= 0 or layers <= 0:
        raise ValueError(f"{tower}: width, heads and layers must be positive")
    if width % heads:
        raise ValueError(f"{tower}: width {width} is not divisible by heads {heads}")


def list_configs() -> list[str]:
    """Names of the bundled architecture configs."""
    files = resources.files("vidret.backbone").joinpath("configs").iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def get_config(name: str) -> CLIPConfig:
    """Load a bundled named config; unknown names raise VidretError listing the known ones."""
    path = resources.files("vidret.backbone").joinpath("configs", f"{name}.json")
    if not path.is_file():
        raise VidretError(f"unknown backbone config {name!r}; known: {', '.join(list_configs())}")
    d = json.loads(path.read_text())
    d.setdefault("name", name)
    return CLIPConfig.from_dict(d)


@dataclass
class ForwardContext:
    """What travels with the tokens through every block (explicit, never global).

    Adapters read it; the backbone itself only uses ``causal`` and ``attn_mask``.
    """

    modality: Modality
    num_frames: int = 1  # T: image batches are videos flattened to [B*T]
    frame_mask: Tensor | None = None  # [B, T] bool, True = real frame; None = all real
    adapter: str = "default"  # which named adapter's branches run in hooked modules
    causal: bool = False  # text tower: causal self-attention
    attn_mask: Tensor | None = None  # optional SDPA mask broadcastable to [B, H, L, L]
    eot_index: Tensor | None = None  # text tower: [B] position pooled at the end (prompt methods shift it)
    # end-token positions before any prompt shift: a checkpointed re-run of a block must not shift twice
    source_eot_index: Tensor | None = None

    @property
    def num_videos(self) -> int:
        if self.frame_mask is not None:
            return int(self.frame_mask.shape[0])
        raise ValueError("num_videos needs a frame_mask")


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (stable under fp16/bf16 autocast), output in the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        orig = x.dtype
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(orig)


class _QuickGELUFunction(torch.autograd.Function):
    """``x * sigmoid(1.702 x)`` that keeps only ``x`` for backward and recomputes the sigmoid there.

    Autograd's own graph of the expression keeps both ``x`` and ``sigmoid(1.702 x)``; in the MLP that is two
    tensors of the block's widest shape [N, L, 4D] and the largest share of what a frozen backbone stores for
    backward (measured in benchmarks/efficiency.md). The forward is bit-identical to the expression (computed in
    one buffer). The backward uses ``d/dx [x sigmoid(a x)] = silu'(a x)`` (the 1/a of ``silu(a x) / a`` and the
    chain rule's a cancel): one fused kernel instead of autograd's seven elementwise passes over [N, L, 4D]
    (3.3x faster on CPU), equal to the graph's gradient to rounding and as close to the float64 gradient
    (tests/bench/test_fast_paths.py).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return _quick_gelu(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable form (silu_backward has no derivative)
            s = torch.sigmoid(1.702 * x)
            return grad * s + torch.ops.aten.sigmoid_backward(grad * x, s) * 1.702
        return torch.ops.aten.silu_backward(grad, 1.702 * x)


def _quick_gelu(x: Tensor) -> Tensor:
    """``x * sigmoid(1.702 x)`` in one new buffer (bitwise the expression: the product commutes exactly)."""
    y = x * 1.702
    return y.sigmoid_().mul_(x)


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuickGELUFunction.apply(x)
        return _quick_gelu(x)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (hook points for LoRA-style methods)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext) -> Tensor:
        """Scaled dot-product attention over projected q/k/v [B, L, D] -> merged heads [B, L, D] (before out_proj)."""
        B, L, D = q.shape
        H = self.heads
        # [B, L, D] -> [B, H, L, D/H]
        q, k, v = (t.view(B, t.shape[1], H, D // H).transpose(1, 2) for t in (q, k, v))
        use_causal = ctx.causal and ctx.attn_mask is None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask, is_causal=use_causal)
        # [B, H, L, D/H] -> [B, L, D]
        return o.transpose(1, 2).reshape(B, L, D)

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        return self.out_proj(self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), ctx))


class MLP(nn.Module):
    """c_fc -> QuickGELU -> c_proj."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualBlock(nn.Module):
    """Pre-LN block: h = x + attn(ln_1 x); y = h + mlp(ln_2 h)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        x = x + self.attn(self.ln_1(x), ctx)
        return x + self.mlp(self.ln_2(x), ctx)


class Transformer(nn.Module):
    """A stack of residual blocks over [B, L, D] tokens."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList([ResidualBlock(width, heads, mlp_ratio) for _ in range(layers)])
        self.grad_checkpointing = False  # trade compute for activation memory during training
        # Blocks [0, no_grad_prefix) run under torch.no_grad: set by the model when nothing trainable
        # sits in or below them, so their activations are never stored (see model.py).
        self.no_grad_prefix = 0

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        for i, block in enumerate(self.resblocks):
            if i < self.no_grad_prefix:
                with torch.no_grad():
                    x = block(x, ctx)
            elif self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
        return x


class VisionTransformer(nn.Module):
    """CLIP's image tower: patches + class token -> blocks -> ln_post(class token) @ proj."""

    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        scale = cfg.width**-0.5
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid**2 + 1, cfg.width))
        self.ln_pre = LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_post = LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, embed_dim))

    def positional_embedding_for(self, grid_h: int, grid_w: int) -> Tensor:
        """Positional embedding for a grid, bicubically interpolated when it differs from the config's."""
        pos = self.positional_embedding
        g = self.cfg.grid
        if (grid_h, grid_w) == (g, g):
            return pos
        cls_pos, patch_pos = pos[:1], pos[1:]
        # [g*g, D] -> [1, D, g, g]
        patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        # [1, D, h, w] -> [h*w, D]
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1).to(pos.dtype)
        return torch.cat([cls_pos, patch_pos], dim=0)

    def embed(self, images: Tensor) -> Tensor:
        """[N, 3, H, W] -> tokens [N, 1 + P, D] after ln_pre."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [N, D, h, w]
        N, D, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [N, D, h, w] -> [N, h*w, D]
        cls = self.class_embedding.to(x.dtype).expand(N, 1, D)
        x = torch.cat([cls, x], dim=1)  # [N, 1 + h*w, D]
        x = x + self.positional_embedding_for(h, w).to(x.dtype)
        return self.ln_pre(x)

    def forward_tokens(self, images: Tensor, ctx: ForwardContext) -> Tensor:
        """[N, 3, H, W] -> final block tokens [N, 1 + P, D] (before ln_post)."""
        return self.transformer(self.embed(images), ctx)

    def pool(self, tokens: Tensor) -> Tensor:
        """Final tokens [N, L, D] -> image embedding [N, E] (class token, ln_post, projection)."""
        return self.ln_post(tokens[:, 0]) @ self.proj.to(tokens.dtype)

    def forward(self, images: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        ctx = ctx if ctx is not None else ForwardContext("image")
        return self.pool(self.forward_tokens(images, ctx))


class TextTransformer(nn.Module):
    """CLIP's text tower: token + positional embedding -> causal blocks -> ln_final(EOT token) @ projection."""

    def __init__(self, cfg: TextConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        # OpenAI's initialisation (matters only for training from scratch, e.g. the pocket world).
        cfg = self.cfg
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = (cfg.width**-0.5) * ((2 * cfg.layers) ** -0.5)
        attn_std = cfg.width**-0.5
        fc_std = (2 * cfg.width) ** -0.5
        for block in self.transformer.resblocks:
            assert isinstance(block, ResidualBlock)
            for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
                nn.init.normal_(lin.weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)

    def embed(self, tokens: Tensor) -> Tensor:
        """[N, L] ids -> [N, L, D] token + positional embeddings (positional embedding sliced to L)."""
        L = tokens.shape[1]
        if self.cfg.context_length < L:
            raise VidretError(f"text of {L} tokens is longer than the model's context length {self.cfg.context_length}")
        return self.token_embedding(tokens) + self.positional_embedding[:L]

    def forward_tokens(self, tokens: Tensor, ctx: ForwardContext) -> Tensor:
        """[N, L] ids -> final block tokens [N, L', D]; sets ``ctx.eot_index`` if a prompt did not."""
        if ctx.eot_index is None:
            # The end token has the largest id in the CLIP vocabulary, so argmax finds it.
            ctx.eot_index = tokens.argmax(dim=-1)
        return self.transformer(self.embed(tokens), ctx)

    def pool(self, x: Tensor, eot_index: Tensor) -> Tensor:
        """Final tokens [N, L, D] -> text embedding [N, E] taken at the end token."""
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index]  # [N, D]
        return x @ self.text_projection.to(x.dtype)

    def forward(self, tokens: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        ctx = ctx if ctx is not None else ForwardContext("text", causal=True)
        x = self.forward_tokens(tokens, ctx)
        assert ctx.eot_index is not None
        return self.pool(x, ctx.eot_index)


class CLIP(nn.Module):
    """CLIP: ``visual`` + ``text`` towers and a logit scale."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.vision, config.embed_dim)
        self.text = TextTransformer(config.text, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def name(self) -> str:
        return self.config.name

    def encode_image(self, images: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        """[N, 3, H, W] CLIP-normalised images -> [N, E] embeddings (not normalised)."""
        return self.visual(images, ctx)

    def encode_text(self, tokens: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        """[N, L] token ids -> [N, E] embeddings (not normalised)."""
        return self.text(tokens, ctx)

    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        """Image-text logits [N_img, N_text] with the learned scale."""
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(tokens), dim=-1)
        return self.logit_scale.exp() * img @ txt.t()

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enabled
        self.text.transformer.grad_checkpointing = enabled


def create_backbone(name_or_config: str | CLIPConfig, seed: int | None = None) -> CLIP:
    """A randomly initialised CLIP from a named config (no download)."""
    cfg = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return CLIP(cfg)
    return CLIP(cfg)


def fingerprint(state_dict: Mapping[str, Tensor]) -> str:
    """A short, stable hash of a backbone's weights (bias terms excluded: some methods train them).

    Hashes every key and shape plus a strided sample of each tensor's values, so it is cheap for ViT-L
    and changes when any tensor is replaced by another checkpoint's.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        if key.endswith("bias"):
            continue
        t = state_dict[key].detach()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.reshape(-1).float().cpu()
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].numpy().tobytes())
    return h.hexdigest()[:16]
