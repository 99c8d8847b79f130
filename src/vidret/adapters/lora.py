"""LoRA (Hu et al. 2021) on the backbone's attention projections (and optionally its MLP), mergeable into the weights.

For a targeted Linear ``W`` (frozen): ``y = W x + b + (alpha / r) * B A dropout(x)`` with ``A`` (r x in)
kaiming-uniform and ``B`` (out x r) zero, so the model starts as an EXACT identity of the frozen backbone.

Targets: ``q``, ``k``, ``v``, ``out`` (the attention's ``q_proj/k_proj/v_proj/out_proj``) and ``mlp`` (both
``c_fc`` and ``c_proj``). Default ``("q", "v")`` as in the LoRA paper. Default rank 8 with ``alpha = 8`` (scale 1,
peft's defaults): r = 8 on q/v of both ViT-B/16 towers is 491,520 parameters (0.33% of the backbone), below the
other baselines; rank 4 is a config override away.

Attachment: the block's ``attn`` (resp. ``mlp``) is hooked with a branch that recomputes the sublayer from the
frozen base's own Linears plus the low-rank deltas, reusing ``Attention.attend`` for the attention itself.

:func:`merge` folds ``W += (alpha / r) B A`` into the frozen weights and removes the branches (and the hooks), so
inference costs nothing extra. It is refused while any other adapter shares the backbone, since their outputs
would change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidret.adapters.base import AdapterConfig, Branch, Hook, MethodSpec, Tower, attach, blocks, target_layers, unwrap
from vidret.backbone.clip import CLIP, MLP, Attention, CLIPConfig, ForwardContext
from vidret.errors import VidretError

Target = Literal["q", "k", "v", "out", "mlp"]
_ATTN_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """LoRA; defaults: rank 8, alpha 8, no dropout, attention q and v, every layer of both towers."""

    method: ClassVar[str] = "lora"
    r: int = 8  # rank of every low-rank update
    alpha: float = 8.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the input of A (training only)
    targets: tuple[Target, ...] = ("q", "v")  # among q, k, v, out (attention) and mlp (c_fc and c_proj)
    towers: tuple[Tower, ...] = ("visual", "text")  # which encoders get LoRA
    layers: tuple[int, ...] | None = None  # block indices adapted in each chosen tower; None = every layer

    def __post_init__(self) -> None:
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, values, allowed in (
            ("targets", self.targets, ("q", "k", "v", "out", "mlp")),
            ("towers", self.towers, ("visual", "text")),
        ):
            if not values:
                raise ValueError(f"{name} must not be empty; choose from {list(allowed)}")
            if any(v not in allowed for v in values) or len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct values from {list(allowed)}, got {list(values)}")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers must name at least one block (or be None for every layer)")
            if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers must be distinct non-negative block indices, got {self.layers}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRADelta(nn.Module):
    """The low-rank update of one Linear: ``x -> scaling * dropout(x) A^T B^T``."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # zero: exact identity at init
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and the LoRA reference code
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # fp32 factors meet the activation dtype (what autocast does anyway; also covers a .half() backbone).
        z = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # [..., in] -> [..., r]
        return F.linear(z, self.lora_B.to(x.dtype)) * self.scaling  # [..., r] -> [..., out]

    def delta_weight(self) -> Tensor:
        """The dense update ``scaling * B A`` [out, in] (fp32)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


class _LoRABranch(Branch):
    """Holds one :class:`LoRADelta` per targeted Linear, registered under that Linear's name.

    So tensors read like the base weights they update: ``...attn.q_proj.lora_A``, ``...mlp.c_fc.lora_B``.
    """

    def __init__(self, deltas: dict[str, LoRADelta]) -> None:
        super().__init__()
        self.targets = tuple(deltas)
        for name, delta in deltas.items():
            self.add_module(name, delta)

    def delta(self, name: str) -> LoRADelta:
        d = getattr(self, name)
        assert isinstance(d, LoRADelta)
        return d

    def _apply_linear(self, base: nn.Module, name: str, x: Tensor) -> Tensor:
        y = getattr(base, name)(x)
        return y + self.delta(name)(x) if name in self.targets else y


class LoRAAttentionBranch(_LoRABranch):
    """Attention with low-rank updates on some of q/k/v/out; the attention itself is the base's ``attend``."""

    def __init__(self, width: int, names: list[str], r: int, scaling: float, dropout: float) -> None:
        super().__init__({n: LoRADelta(width, width, r, scaling, dropout) for n in names})

    def forward(self, x: Tensor, base: nn.Module, ctx: ForwardContext) -> Tensor:
        if not isinstance(base, Attention):
            raise TypeError(f"expected an Attention under the hook, got {type(base).__name__}")
        q, k, v = (self._apply_linear(base, n, x) for n in ("q_proj", "k_proj", "v_proj"))
        return self._apply_linear(base, "out_proj", base.attend(q, k, v, ctx))


class LoRAMLPBranch(_LoRABranch):
    """The MLP with low-rank updates on ``c_fc`` and ``c_proj``."""

    def __init__(self, width: int, hidden: int, r: int, scaling: float, dropout: float) -> None:
        super().__init__(
            {
                "c_fc": LoRADelta(width, hidden, r, scaling, dropout),
                "c_proj": LoRADelta(hidden, width, r, scaling, dropout),
            }
        )

    def forward(self, x: Tensor, base: nn.Module, ctx: ForwardContext) -> Tensor:
        if not isinstance(base, MLP):
            raise TypeError(f"expected an MLP under the hook, got {type(base).__name__}")
        h = base.gelu(self._apply_linear(base, "c_fc", x))
        return self._apply_linear(base, "c_proj", h)


def _is_int(v: object) -> bool:
    # YAML/JSON may hand us 8.0 or True; sizes must be real ints.
    return isinstance(v, int) and not isinstance(v, bool)


def lora_parameter_count(config: LoRAConfig, clip_config: CLIPConfig) -> int:
    """Closed-form trainable parameter count: ``r (in + out)`` per targeted Linear."""
    total = 0
    for tower in config.towers:
        cfg = clip_config.vision if tower == "visual" else clip_config.text
        hidden = int(cfg.width * cfg.mlp_ratio)
        per_layer = sum(config.r * 2 * cfg.width for t in config.targets if t != "mlp")
        if "mlp" in config.targets:
            per_layer += 2 * config.r * (cfg.width + hidden)
        total += per_layer * len(target_layers(cfg.layers, config.layers, tower))
    return total


def inject(clip: CLIP, config: LoRAConfig, adapter: str) -> list[str]:
    """Attach LoRA named ``adapter`` to the chosen towers/layers/targets; returns the hooked modules' paths."""
    attn_names = [_ATTN_TARGETS[t] for t in ("q", "k", "v", "out") if t in config.targets]
    paths = []
    for tower in config.towers:
        cfg = clip.config.vision if tower == "visual" else clip.config.text
        tower_blocks = blocks(clip, tower)
        for i in target_layers(cfg.layers, config.layers, tower):
            block = unwrap(tower_blocks[i])  # another adapter may have hooked the whole block
            prefix = f"{tower}.transformer.resblocks.{i}"
            if attn_names:
                branch = LoRAAttentionBranch(cfg.width, attn_names, config.r, config.scaling, config.dropout)
                attach(block, "attn", branch, adapter)
                paths.append(f"{prefix}.attn")
            if "mlp" in config.targets:
                hidden = int(cfg.width * cfg.mlp_ratio)
                attach(
                    block, "mlp", LoRAMLPBranch(cfg.width, hidden, config.r, config.scaling, config.dropout), adapter
                )
                paths.append(f"{prefix}.mlp")
    return paths


def merge(model: Any, adapter_name: str | None = None) -> list[str]:
    """Fold a LoRA adapter into the backbone's weights and remove its branches and hooks (zero inference overhead).

    Args:
        model: a ``VideoTextModel`` built with method "lora", or a ``CLIP`` (then ``adapter_name`` is required).
        adapter_name: the LoRA adapter to merge (default: the model's own adapter).

    Returns:
        Canonical names of the backbone weights that were updated.

    Raises:
        VidretError: if no LoRA adapter of that name is attached, or another adapter shares the backbone (merging
            would change its outputs too). After merging the backbone's weights differ from the pretrained ones
            (any other model holding this backbone instance, even a frozen one, sees the merged weights), and the
            model has no adapter tensors left: save the adapter file BEFORE merging.
    """
    clip: CLIP = model if isinstance(model, CLIP) else model.clip
    name = adapter_name if adapter_name is not None else getattr(model, "adapter_name", None)
    if name is None:
        raise VidretError("merge(clip, adapter_name): name the LoRA adapter to merge")
    # (parent, child name, hook) for every hooked module, collected before anything is replaced.
    hooked = [
        (parent, child_name, child)
        for parent in clip.modules()
        for child_name, child in parent.named_children()
        if isinstance(child, Hook)
    ]
    ours = [(p, c, h) for p, c, h in hooked if name in h.branches]
    if not ours:
        raise VidretError(f"no adapter named {name!r} is attached to this backbone; nothing to merge")
    if not all(isinstance(h.branches[name], _LoRABranch) for _, _, h in ours):
        raise VidretError(f"adapter {name!r} is not a LoRA adapter; only LoRA can be merged into the weights")
    others = {n for _, _, hook in hooked for n in hook.branches if n != name}
    roots = getattr(clip, "adapter_roots", None)
    others |= {n for n in (roots.keys() if roots is not None else ()) if n != name}
    if others:
        raise VidretError(
            f"cannot merge LoRA adapter {name!r}: other adapters share this backbone ({', '.join(sorted(others))}) "
            "and merging would change their outputs; merge on a backbone that holds only this adapter"
        )
    paths = {id(m): n for n, m in _canonical_modules(clip)}
    merged = []
    with torch.no_grad():
        for parent, child_name, hook in ours:
            branch = hook.branches[name]
            assert isinstance(branch, _LoRABranch)
            for lin_name in branch.targets:
                lin = getattr(hook.base, lin_name)
                lin.weight.copy_((lin.weight.float() + branch.delta(lin_name).delta_weight()).to(lin.weight.dtype))
                merged.append(f"{paths[id(hook.base)]}.{lin_name}.weight")
            del hook.branches[name]
            if len(hook.branches) == 0:  # nothing else hooks this module: put the plain module back
                if isinstance(parent, nn.ModuleList):
                    parent[int(child_name)] = hook.base
                else:
                    setattr(parent, child_name, hook.base)
    return sorted(merged)


def _canonical_modules(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    # Module paths with Hooks made transparent (the name the module has in a plain CLIP).
    out = [(prefix.rstrip("."), module)]
    for n, child in module.named_children():
        if isinstance(module, Hook):
            if n == "base":
                out += _canonical_modules(child, prefix)
            continue
        out += _canonical_modules(child, prefix + n + ".")
    return out


SPEC = MethodSpec(
    name="lora",
    config_cls=LoRAConfig,
    inject=inject,
    description="LoRA on attention q/v (configurable: k, out, mlp), rank 8, both towers; merge() folds it into W",
    presets={
        "qv": {},
        "qkvo": {"targets": ["q", "k", "v", "out"]},
        "all": {"targets": ["q", "k", "v", "out", "mlp"]},
        # pocket-small (width 64): rank 8 on q and v, 16,384 trainable, 3.5% of its non-embedding parameters
        "pocket": {"r": 8},
    },
    reference="Hu et al., LoRA (arXiv 2106.09685)",
)
