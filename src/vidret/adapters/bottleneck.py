"""Bottleneck adapter, AdaptFormer style (Chen et al. 2022): ``Down -> ReLU -> Up``, scaled, beside or after the MLP.

Per adapted block (default: the MLP of every block of both towers, r = 64, scale 0.1)::

    par: y = h + MLP(LN2 h) + s * A(LN2 h)        (the adapter reads the MLP's input)
    seq: m = MLP(LN2 h);  y = h + m + s * A(m)    (the adapter reads the MLP's output)
    A(u) = Up(ReLU(Down(u)))

``Up`` is zero-initialised (weights and bias) and ``Down`` kaiming-uniform, as AdaptFormer's ``init_option="lora"``,
so the adapted model starts as an EXACT identity of the frozen backbone.

Switches beyond the brief's default, for comparisons:

* ``par_input="residual"``: the parallel adapter reads the residual stream ``h`` itself, as AdaptFormer's released
  code does (its ``adaptmlp(x)`` runs on the block's pre-norm input; MV-Adapter's code calls this ``par`` and the
  LN2-input variant ``ln_par``). This hooks the whole block instead of the MLP.
* ``sublayers=("attn", "mlp")``: a second adapter around attention (Houlsby-style two adapters per block).
* ``train_biases=True``: also train CLIP's bias terms, as MV-Adapter's training code does for every method.

Trainable share on ViT-B/16 (backbone 149,620,737 parameters; :func:`bottleneck_parameter_count`):

=====================================  ==========  ======
configuration                          parameters  share
=====================================  ==========  ======
default (MLP only, r = 64, 2 towers)    1,982,976  1.325%
  + CLIP biases                         2,153,984  1.440%
attn + MLP                              3,965,952  2.651%
attn + MLP + CLIP biases (preset        4,136,960  2.765%
"mvadapter_table")
=====================================  ==========  ======

The MV-Adapter paper reports 2.78% for its bottleneck baseline without stating its placement. One AdaptFormer
adapter per block cannot reach it (1.33%, 1.44% with biases); the closest reading we found is two adapters per block
plus the bias terms MV-Adapter's trainer unfreezes: 2.765%, 0.015 points (about 22k parameters) below 2.78%.
The remaining gap is not explained by the paper (no released code for the baselines); the preset
"mvadapter_table" is that closest reconstruction, not a verified reproduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from vidret.adapters.base import (
    AdapterConfig,
    Branch,
    MethodSpec,
    Tower,
    attach,
    bias_parameters,
    blocks,
    target_layers,
    unwrap,
)
from vidret.backbone.clip import CLIP, CLIPConfig, ForwardContext, ResidualBlock

Sublayer = Literal["attn", "mlp"]
Mode = Literal["par", "seq"]
ParInput = Literal["ln", "residual"]

# MV-Adapter Table (ViT-B/16): the bottleneck baseline's reported trainable share, percent.
PAPER_PERCENT_B16 = 2.78


@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """AdaptFormer-style bottleneck adapter; defaults: parallel, r = 64, scale 0.1, MLP of every block, both towers."""

    method: ClassVar[str] = "bottleneck"
    mode: Mode = "par"  # par: beside the sublayer; seq: after it (reads the sublayer's output)
    r: int = 64  # bottleneck width
    scale: float = 0.1  # s, multiplies the adapter output (AdaptFormer's 0.1)
    towers: tuple[Tower, ...] = ("visual", "text")  # which encoders get adapters
    layers: tuple[int, ...] | None = None  # block indices adapted in each chosen tower; None = every layer
    sublayers: tuple[Sublayer, ...] = ("mlp",)  # AdaptFormer: MLP only; ("attn", "mlp") = two adapters per block
    par_input: ParInput = "ln"  # par only: "ln" = the sublayer's normed input, "residual" = the raw stream (released)
    train_biases: bool = False  # also train CLIP's bias terms (MV-Adapter's trainer does; see module docstring)

    def __post_init__(self) -> None:
        if self.mode not in ("par", "seq"):
            raise ValueError(f"mode must be 'par' or 'seq', got {self.mode!r}")
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be a finite number, got {self.scale}")
        _check_choices("towers", self.towers, ("visual", "text"))
        _check_choices("sublayers", self.sublayers, ("attn", "mlp"))
        if self.par_input not in ("ln", "residual"):
            raise ValueError(f"par_input must be 'ln' or 'residual', got {self.par_input!r}")
        if self.mode == "seq" and self.par_input != "ln":
            raise ValueError("par_input applies to mode='par' only; leave it at 'ln' for mode='seq'")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers must name at least one block (or be None for every layer)")
            if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers must be distinct non-negative block indices, got {self.layers}")


def _is_int(v: object) -> bool:
    # YAML/JSON may hand us 8.0 or True; sizes must be real ints.
    return isinstance(v, int) and not isinstance(v, bool)


def _check_choices(name: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    if not values:
        raise ValueError(f"{name} must not be empty; choose from {list(allowed)}")
    bad = [v for v in values if v not in allowed]
    if bad or len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct values from {list(allowed)}, got {list(values)}")


def _linear(x: Tensor, lin: nn.Linear) -> Tensor:
    # fp32 adapter weights meet the activation dtype (what autocast does anyway; also covers a .half() backbone).
    bias = lin.bias.to(x.dtype) if lin.bias is not None else None
    return F.linear(x, lin.weight.to(x.dtype), bias)


class Bottleneck(nn.Module):
    """``u -> scale * Up(ReLU(Down(u)))``, Up zero-initialised so the output starts at exactly zero."""

    def __init__(self, width: int, r: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(width, r)
        self.up = nn.Linear(r, width)
        # AdaptFormer's init_option="lora": kaiming-uniform Down, zero Up and biases.
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, u: Tensor) -> Tensor:
        return self.scale * _linear(F.relu(_linear(u, self.down)), self.up)


class BottleneckBranch(Branch):
    """Adapter around one sublayer (``attn`` or ``mlp``), reading its normed input (par) or its output (seq)."""

    def __init__(self, width: int, r: int, scale: float, mode: Mode) -> None:
        super().__init__()
        self.mode = mode
        self.adapter = Bottleneck(width, r, scale)

    def forward(self, x: Tensor, base: nn.Module, ctx: ForwardContext) -> Tensor:
        m = base(x, ctx)
        return m + self.adapter(x if self.mode == "par" else m)


class ResidualParallelBranch(Branch):
    """Parallel adapters reading the block's residual stream (AdaptFormer's released code); hooks a whole block."""

    def __init__(self, width: int, r: int, scale: float, sublayers: tuple[Sublayer, ...]) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict({s: Bottleneck(width, r, scale) for s in sublayers})

    def forward(self, x: Tensor, base: nn.Module, ctx: ForwardContext) -> Tensor:
        if not isinstance(base, ResidualBlock):
            raise TypeError(f"expected a ResidualBlock under the hook, got {type(base).__name__}")
        # The block's own forward, with the adapters added beside each sublayer. Children are called as
        # child(x, ctx) so other adapters' hooks on them still dispatch by name.
        h = x + base.attn(base.ln_1(x), ctx)
        if "attn" in self.adapters:
            h = h + self.adapters["attn"](x)
        y = h + base.mlp(base.ln_2(h), ctx)
        if "mlp" in self.adapters:
            y = y + self.adapters["mlp"](h)
        return y


def _tower_shape(clip_config: CLIPConfig, tower: Tower) -> tuple[int, int]:
    cfg = clip_config.vision if tower == "visual" else clip_config.text
    return cfg.width, cfg.layers


def bottleneck_parameter_count(config: BottleneckConfig, clip_config: CLIPConfig) -> int:
    """Closed-form trainable parameter count: adapters (``2 D r + r + D`` each) plus CLIP biases if trained."""
    total = 0
    for tower in config.towers:
        width, n_layers = _tower_shape(clip_config, tower)
        n = len(target_layers(n_layers, config.layers, tower)) * len(config.sublayers)
        total += n * (2 * width * config.r + config.r + width)
    if config.train_biases:
        for cfg in (clip_config.vision, clip_config.text):
            # per block: ln_1, q, k, v, out, ln_2, c_proj biases (width each) + c_fc bias (hidden)
            total += cfg.layers * (7 * cfg.width + int(cfg.width * cfg.mlp_ratio))
        total += 2 * clip_config.vision.width + clip_config.text.width  # ln_pre, ln_post, ln_final
    return total


def inject(clip: CLIP, config: BottleneckConfig, adapter: str) -> list[str]:
    """Attach bottleneck adapters named ``adapter``; returns the hooked modules' canonical paths."""
    paths = []
    for tower in config.towers:
        width, n_layers = _tower_shape(clip.config, tower)
        tower_blocks = blocks(clip, tower)
        for i in target_layers(n_layers, config.layers, tower):
            prefix = f"{tower}.transformer.resblocks.{i}"
            if config.mode == "par" and config.par_input == "residual":
                attach(
                    tower_blocks,
                    str(i),
                    ResidualParallelBranch(width, config.r, config.scale, config.sublayers),
                    adapter,
                )
                paths.append(prefix)
                continue
            block = unwrap(tower_blocks[i])
            for sub in config.sublayers:
                attach(block, sub, BottleneckBranch(width, config.r, config.scale, config.mode), adapter)
                paths.append(f"{prefix}.{sub}")
    return paths


def extra_trainables(clip: CLIP, config: BottleneckConfig) -> list[tuple[str, nn.Parameter]]:
    return bias_parameters(clip) if config.train_biases else []


SPEC = MethodSpec(
    name="bottleneck",
    config_cls=BottleneckConfig,
    inject=inject,
    description="AdaptFormer bottleneck adapter (Down-ReLU-Up, r=64, scale 0.1) beside (par) or after (seq) the MLP",
    presets={
        "par": {},
        "seq": {"mode": "seq"},
        # Closest reconstruction of MV-Adapter's bottleneck baseline (2.765% vs 2.78% reported on B/16).
        "mvadapter_table": {"sublayers": ["attn", "mlp"], "train_biases": True},
        # pocket-small (width 64): r = 16 beside every MLP, 17,024 trainable, 3.7% of its non-embedding parameters
        "pocket": {"r": 16},
    },
    extra_trainables=extra_trainables,
    reference=(
        "AdaptFormer (Chen et al. 2022); MV-Adapter Table: 2.78% on ViT-B/16. Ours: 1.33% (one MLP adapter per "
        "block), 2.765% for preset mvadapter_table (attn + MLP adapters + CLIP biases)"
    ),
)
