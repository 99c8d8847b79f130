"""Prompt tuning: VPT-deep visual prompts (Jia et al. 2022) and CoOp-style text context vectors (Zhou et al. 2022).

Visual prompts (``visual_tokens`` = n > 0): n learnable tokens inserted right after the class token of every frame,
``[CLS, p_1..p_n, patches]``. VPT-deep (default) gives every block its own prompts: block 0 inserts them, every later
block REPLACES the previous block's prompt outputs with its own, and the last block drops them from its output, so
the tower's output has the usual ``1 + P`` tokens and pooling (class token) is unchanged. VPT-shallow inserts once
at block 0 and lets the prompts evolve through the blocks. Prompts enter after ``ln_pre`` (the hook sees block
inputs), carry no positional embedding (as in VPT) and are the same for every frame. Init: VPT's xavier-uniform,
``U(-a, a)`` with ``a = sqrt(6 / (3 * patch^2 + D))``.

Text context (``text_tokens`` = n > 0), CoOp's "[SOT] [V]_1 .. [V]_n words [EOT]": block 0 of the text tower is hooked
(the token + positional embedding happens before any block) and builds the prompted sequence from the embedded
tokens. Every token gets the positional embedding of its NEW position, as CoOp does (it embeds the whole prompted
sequence and adds ``positional_embedding`` once): the branch takes the original position's embedding off the word
tokens and adds the shifted one; the context vectors live in token-embedding space and get positions 1..n. The
sequence keeps its length L (the positional table is never exceeded): the tail beyond L is dropped, and a caption
too long to fit keeps its end token at L - 1, losing its last words. ``ctx.eot_index`` moves to the end token's new
position, so the tower pools there. Init: CoOp's generic context, N(0, 0.02^2).

No identity at init, and no useful bound: inserted tokens are extra keys in every attention softmax, so every
output moves by an amount that depends on the backbone's weights, not on the prompts' size (a zero prompt still
takes attention mass). The tests check the construction instead: with prompts in place the model equals the frozen
blocks run on the prompted sequence, pooled where the end token went. With ``visual_tokens = 0`` (or
``text_tokens = 0``) that tower is untouched and exactly the frozen one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from vidret.adapters.base import AdapterConfig, Branch, MethodSpec, attach, blocks
from vidret.backbone.clip import CLIP, CLIPConfig, ForwardContext, TextTransformer
from vidret.errors import VidretError

Depth = Literal["deep", "shallow"]

COOP_INIT_STD = 0.02  # CoOp's generic-context init


@dataclass(frozen=True)
class PromptConfig(AdapterConfig):
    """Prompt tuning; defaults: 8 VPT-deep visual prompts per vision block and 4 CoOp context vectors."""

    method: ClassVar[str] = "prompt"
    visual_tokens: int = 8  # VPT prompt tokens per vision block (n); 0 = no visual prompts
    visual_depth: Depth = "deep"  # deep: new prompts at every block (VPT-deep); shallow: inserted at block 0 only
    text_tokens: int = 4  # CoOp context vectors after the start token; 0 = no text prompts
    text_init_std: float = COOP_INIT_STD  # std of the context vectors' normal init

    def __post_init__(self) -> None:
        if self.visual_tokens < 0 or self.text_tokens < 0:
            raise ValueError("visual_tokens and text_tokens must be >= 0")
        if self.visual_tokens == 0 and self.text_tokens == 0:
            raise ValueError("at least one of visual_tokens and text_tokens must be positive")
        if self.visual_depth not in ("deep", "shallow"):
            raise ValueError(f"visual_depth must be 'deep' or 'shallow', got {self.visual_depth!r}")
        if not (math.isfinite(self.text_init_std) and self.text_init_std > 0):
            raise ValueError(f"text_init_std must be a positive number, got {self.text_init_std}")


class VisualPromptBranch(Branch):
    """A vision block under VPT: insert (block 0) or replace (deep) the prompts; drop them after the last block."""

    def __init__(self, width: int, n: int, insert: bool, replace: bool, remove: bool, init_bound: float) -> None:
        super().__init__()
        self.n = n
        self.insert = insert
        self.replace = replace
        self.remove = remove
        if insert or replace:
            self.prompt = nn.Parameter(torch.empty(n, width))
            nn.init.uniform_(self.prompt, -init_bound, init_bound)

    def forward(self, x: Tensor, base: nn.Module, ctx: ForwardContext) -> Tensor:
        n = self.n
        if self.insert or self.replace:
            p = self.prompt.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # [n, D] -> [N, n, D]
            rest = x[:, 1:] if self.insert else x[:, 1 + n :]  # patches (replace: drop the previous prompts)
            x = torch.cat([x[:, :1], p, rest], dim=1)  # [N, 1 + n + P, D]
        y = base(x, ctx)
        if self.remove:
            y = torch.cat([y[:, :1], y[:, 1 + n :]], dim=1)  # [N, 1 + n + P, D] -> [N, 1 + P, D]
        return y


class TextContextBranch(Branch):
    """Text block 0: insert n context vectors after the start token, shift positions and the end-token index."""

    _text: TextTransformer  # set in __init__ without registering it as a child

    def __init__(self, text: TextTransformer, n: int, std: float) -> None:
        super().__init__()
        self.n = n
        self.context = nn.Parameter(torch.empty(n, text.cfg.width))
        nn.init.normal_(self.context, std=std)
        # The frozen tower, for its positional embedding: referenced, not registered (its weights are the backbone's).
        object.__setattr__(self, "_text", text)

    def prompted(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """Embedded tokens [B, L, D] -> the prompted sequence [B, L, D]; moves ``ctx.eot_index``."""
        B, L, D = x.shape
        n = self.n
        if n + 2 > L:
            raise VidretError(
                f"{n} text context tokens need captions of at least {n + 2} tokens (start, context, end), "
                f"got {L}; raise max_words or lower text_tokens"
            )
        src_eot = ctx.source_eot_index
        if src_eot is None:
            if ctx.eot_index is None:
                raise VidretError("text prompts need ctx.eot_index (run the text tower through encode_text)")
            src_eot = ctx.eot_index
            ctx.source_eot_index = src_eot
        src_eot = src_eot.to(x.device)
        new_eot = (src_eot + n).clamp(max=L - 1)  # a caption that fills L loses its last words, keeps its end
        j = torch.arange(L, device=x.device)
        # Source position of every new position: words move right by n; the end token lands on new_eot.
        src = (j - n).clamp(min=0).unsqueeze(0).expand(B, L)  # [B, L]
        src = torch.where(j.unsqueeze(0) == new_eot.unsqueeze(1), src_eot.unsqueeze(1), src)
        pos = self._text.positional_embedding[:L].to(x.dtype)  # [L, D]
        words = (x - pos).gather(1, src.unsqueeze(-1).expand(B, L, D))  # token embeddings at their new places
        context = self.context.to(x.dtype)
        is_context = ((j >= 1) & (j <= n)).view(1, L, 1)
        context_full = torch.cat([context.new_zeros(1, D), context, context.new_zeros(L - 1 - n, D)])  # [L, D]
        ctx.eot_index = new_eot
        return torch.where(is_context, context_full.unsqueeze(0), words) + pos

    def forward(self, x: Tensor, base: nn.Module, ctx: ForwardContext) -> Tensor:
        return base(self.prompted(x, ctx), ctx)


def prompt_parameter_count(config: PromptConfig, clip_config: CLIPConfig) -> int:
    """Closed-form trainable count: ``n_v * D_v`` per prompted vision block (all, or 1 if shallow) + ``n_t * D_t``."""
    vision = clip_config.vision
    prompted_blocks = vision.layers if config.visual_depth == "deep" else 1
    return config.visual_tokens * vision.width * prompted_blocks + config.text_tokens * clip_config.text.width


def inject(clip: CLIP, config: PromptConfig, adapter: str) -> list[str]:
    """Attach prompt branches named ``adapter``; returns the hooked blocks' paths."""
    paths = []
    n = config.visual_tokens
    if n > 0:
        vision = clip.config.vision
        bound = math.sqrt(6.0 / (3 * vision.patch_size**2 + vision.width))  # VPT's xavier-uniform for prompts
        last = vision.layers - 1
        targets = range(vision.layers) if config.visual_depth == "deep" else sorted({0, last})
        tower_blocks = blocks(clip, "visual")
        for i in targets:
            replace = config.visual_depth == "deep" and i > 0
            branch = VisualPromptBranch(
                vision.width, n, insert=i == 0, replace=replace, remove=i == last, init_bound=bound
            )
            attach(tower_blocks, str(i), branch, adapter)
            paths.append(f"visual.transformer.resblocks.{i}")
    if config.text_tokens > 0:
        attach(
            blocks(clip, "text"), "0", TextContextBranch(clip.text, config.text_tokens, config.text_init_std), adapter
        )
        paths.append("text.transformer.resblocks.0")
    return paths


SPEC = MethodSpec(
    name="prompt",
    config_cls=PromptConfig,
    inject=inject,
    description="prompt tuning: VPT-deep visual prompts (8 per block) + CoOp text context vectors (4)",
    presets={
        "default": {},
        "vpt_deep": {"text_tokens": 0},
        "vpt_shallow": {"text_tokens": 0, "visual_depth": "shallow"},
        "coop": {"visual_tokens": 0},
        # pocket-small (width 64): 8 visual prompts per block + 4 text context vectors: 2,304 trainable, 0.5% of
        # its non-embedding parameters
        "pocket": {},
    },
    init_behaviour="changes",  # inserted tokens take attention mass: not an identity, no bound (module docstring)
    reference=(
        "VPT (Jia et al., ECCV 2022) and CoOp (Zhou et al., IJCV 2022); MV-Adapter compares against prompt tuning. "
        "Default on ViT-B/16: 75,776 parameters (0.051%)"
    ),
)
