"""The adapter framework: config base, method registry, hooks, ``inject``, trainable marking, parameter report.

How adapters attach (DESIGN.md rule 4): ``inject`` replaces a backbone child module (a block's ``attn`` or
``mlp``, or a whole block) by a :class:`Hook` that keeps the original as ``base`` and holds one
:class:`Branch` per *named* adapter. A forward call runs the branch named by ``ctx.adapter`` around ``base``
(or ``base`` alone when that adapter does not touch this module). So several adapters - even of different
methods - can live over ONE backbone instance, and each call picks one explicitly (``model.py``'s
``AdapterBank``).

Parameters shared between the two towers of one adapter (Cross Modality Tying factors, Cross-Modal Adapter's
shared up-projections, prompts) live in an :class:`AdapterRoot` stored at ``clip.adapter_roots[name]``;
branches reach them through :func:`shared_ref` without registering them twice.

Freezing is by structure (rule 7): trainable = parameters of ``Branch``/``AdapterRoot`` modules of the adapter
plus the method's declared extra trainables (e.g. MV-Adapter trains CLIP's bias terms). Never by name substrings.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from vidret.backbone.clip import CLIP, CLIPConfig, ForwardContext, LayerNorm
from vidret.errors import VidretError

HeadName = Literal["meanP", "text_conditioned", "seq_transformer"]
DEFAULT_ADAPTER = "default"

Tower = Literal["visual", "text"]  # the two encoders of a CLIP backbone


@dataclass(frozen=True)
class AdapterConfig:
    """Base of every method's config. Subclasses add their own fields, each with a comment."""

    method: ClassVar[str] = ""
    head: HeadName = "meanP"  # frame -> video similarity head used with this method

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls: type[_C], d: Mapping[str, Any]) -> _C:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise VidretError(f"unknown option(s) {unknown} for method {cls.method!r}; valid options: {sorted(names)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                kwargs[f.name] = tuple(v) if isinstance(v, list) else v
        try:
            return cls(**kwargs)  # type: ignore[arg-type]  # values are checked by __post_init__
        except (TypeError, ValueError) as e:
            raise VidretError(f"invalid option for method {cls.method!r}: {e}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


_C = TypeVar("_C", bound=AdapterConfig)


class Branch(nn.Module):
    """An adapter module placed in a :class:`Hook`; it decides how to run around the wrapped ``base``."""

    def forward(self, x: Tensor, base: nn.Module, ctx: ForwardContext) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class AdapterRoot(nn.Module):
    """Parameters of one adapter that are not tied to a single hooked module (shared factors, prompts)."""


class Hook(nn.Module):
    """Wraps a backbone module; runs the branch of the adapter named in ``ctx`` around it."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.branches = nn.ModuleDict()

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        if ctx.adapter in self.branches:
            return self.branches[ctx.adapter](x, self.base, ctx)
        return self.base(x, ctx)


def shared_ref(owner: nn.Module, attr: str, target: nn.Module) -> None:
    """Let ``owner`` use ``target`` (owned elsewhere) without registering its parameters a second time.

    The reference is also listed in ``owner._shared_refs`` so structural walks (e.g. which blocks read a
    trainable parameter) can still see it.
    """
    object.__setattr__(owner, attr, target)
    refs = owner.__dict__.setdefault("_shared_refs", [])
    refs.append(target)


def attach(parent: nn.Module, child_name: str, branch: Branch, adapter: str) -> Hook:
    """Wrap ``parent.<child_name>`` in a Hook (once) and add ``branch`` for ``adapter``."""
    child = parent[int(child_name)] if isinstance(parent, nn.ModuleList) else getattr(parent, child_name)
    if not isinstance(child, Hook):
        child = Hook(child)
        if isinstance(parent, nn.ModuleList):
            parent[int(child_name)] = child
        else:
            setattr(parent, child_name, child)
    if adapter in child.branches:
        raise VidretError(f"adapter {adapter!r} is already attached to this module; use another adapter name")
    child.branches[adapter] = branch
    return child


def unwrap(module: nn.Module) -> nn.Module:
    """The backbone module under any Hook."""
    while isinstance(module, Hook):
        module = module.base
    return module


def get_root(clip: CLIP, adapter: str, create: bool = True) -> AdapterRoot:
    """The AdapterRoot of ``adapter`` on this backbone (created on first use)."""
    roots = getattr(clip, "adapter_roots", None)
    if roots is None:
        if not create:
            raise KeyError(adapter)
        roots = nn.ModuleDict()
        clip.adapter_roots = roots
    if adapter not in roots:
        if not create:
            raise KeyError(adapter)
        roots[adapter] = AdapterRoot()
    root = roots[adapter]
    assert isinstance(root, AdapterRoot)
    return root


def blocks(clip: CLIP, tower: Tower) -> nn.ModuleList:
    """The residual blocks of one tower (hooks may wrap them)."""
    return (clip.visual if tower == "visual" else clip.text).transformer.resblocks


# ----------------------------------------------------------------------------- structure walks


def backbone_named_parameters(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Parameter]]:
    """The backbone's own parameters under their canonical (un-hooked) names, adapters excluded."""
    if isinstance(module, (Branch, AdapterRoot)):
        return
    for n, p in module.named_parameters(recurse=False):
        yield prefix + n, p
    for n, child in module.named_children():
        if isinstance(module, Hook):
            if n == "base":
                yield from backbone_named_parameters(child, prefix)  # the Hook is transparent
            continue
        if isinstance(module, CLIP) and n == "adapter_roots":
            continue
        yield from backbone_named_parameters(child, prefix + n + ".")


def backbone_state_dict(clip: CLIP) -> dict[str, Tensor]:
    """The backbone's weights in the plain CLIP layout, whatever adapters are attached."""
    return {k: p.detach() for k, p in backbone_named_parameters(clip)}


def adapter_named_parameters(clip: CLIP, adapter: str) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters of ``adapter``'s branches and root, named independently of the adapter's name.

    Branch parameters are named ``<canonical hooked module path>.<param path in the branch>``,
    root parameters ``root.<path>``, so an adapter saved as "default" loads under any name.
    """
    yield from _branch_params(clip, adapter, "")
    roots = getattr(clip, "adapter_roots", None)
    if roots is not None and adapter in roots:
        for n, p in roots[adapter].named_parameters():
            yield "root." + n, p


def _branch_params(module: nn.Module, adapter: str, prefix: str) -> Iterator[tuple[str, nn.Parameter]]:
    if isinstance(module, (Branch, AdapterRoot)):
        return
    for n, child in module.named_children():
        if isinstance(module, Hook):
            if n == "base":
                yield from _branch_params(child, adapter, prefix)
            elif n == "branches" and adapter in module.branches:
                for pn, p in module.branches[adapter].named_parameters():
                    yield prefix + pn, p
            continue
        if isinstance(module, CLIP) and n == "adapter_roots":
            continue
        yield from _branch_params(child, adapter, prefix + n + ".")


def bias_parameters(clip: CLIP) -> list[tuple[str, nn.Parameter]]:
    """CLIP's bias terms (Linear and LayerNorm biases), found by module type."""
    out: list[tuple[str, nn.Parameter]] = []
    names = {id(p): n for n, p in backbone_named_parameters(clip)}
    for m in _backbone_modules(clip):
        if isinstance(m, (nn.Linear, nn.LayerNorm, LayerNorm, nn.Conv2d)) and m.bias is not None:
            bias = m.bias
            assert isinstance(bias, nn.Parameter)
            out.append((names[id(bias)], bias))
    return out


def clip_bias_parameter_count(clip_config: CLIPConfig) -> int:
    """Number of CLIP bias terms (what :func:`bias_parameters` returns), in closed form."""
    total = 0
    for cfg in (clip_config.vision, clip_config.text):
        # per block: ln_1, q, k, v, out, ln_2, c_proj biases (width each) + c_fc bias (hidden)
        total += cfg.layers * (7 * cfg.width + int(cfg.width * cfg.mlp_ratio))
    return total + 2 * clip_config.vision.width + clip_config.text.width  # ln_pre, ln_post, ln_final


def target_layers(n_layers: int, layers: tuple[int, ...] | None, tower: str) -> list[int]:
    """The block indices to adapt in a tower of ``n_layers`` blocks (clear error for indices beyond it)."""
    if layers is None:
        return list(range(n_layers))
    bad = [i for i in layers if i >= n_layers]
    if bad:
        raise VidretError(f"layers {bad} do not exist in the {tower} tower ({n_layers} layers); use indices below it")
    return sorted(layers)


def _backbone_modules(module: nn.Module) -> Iterator[nn.Module]:
    if isinstance(module, (Branch, AdapterRoot)):
        return
    yield module
    for n, child in module.named_children():
        if isinstance(module, Hook) and n != "base":
            continue
        if isinstance(module, CLIP) and n == "adapter_roots":
            continue
        yield from _backbone_modules(child)


# ----------------------------------------------------------------------------- registry

InjectFn = Callable[[CLIP, Any, str], list[str]]
ExtraTrainablesFn = Callable[[CLIP, Any], list[tuple[str, nn.Parameter]]]


def _no_extra(clip: CLIP, cfg: Any) -> list[tuple[str, nn.Parameter]]:
    return []


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: its config class, how it attaches, its presets."""

    name: str  # registry key, e.g. "mv_adapter"
    config_cls: type[AdapterConfig]  # the method's frozen config dataclass
    inject: InjectFn  # attaches branches/root for one adapter name; returns targeted module paths
    description: str  # one line for `vidret adapters list`
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # name -> config overrides
    # Backbone parameters this method trains besides its own modules (canonical name, parameter).
    extra_trainables: ExtraTrainablesFn = _no_extra
    # Where the paper's numbers come from, shown by `vidret adapters report`.
    reference: str = ""
    # True when adapters of this method can share one backbone with others (False for full fine-tuning).
    shareable: bool = True
    # What the model computes at initialisation (checked by the contract tests): "identity" = exactly the frozen
    # backbone (zero-initialised up-projections), "near_identity" = within a stated bound, "changes" = no bound
    # (e.g. prompt tokens change attention from the start).
    init_behaviour: Literal["identity", "near_identity", "changes"] = "identity"

    def make_config(self, preset: str | None = None, **overrides: Any) -> AdapterConfig:
        """Config from a preset name plus keyword overrides (unknown keys are a clear error)."""
        base: dict[str, Any] = {}
        if preset is not None:
            if preset not in self.presets:
                known = ", ".join(sorted(self.presets)) or "(none)"
                raise VidretError(f"unknown preset {preset!r} for method {self.name!r}; known: {known}")
            base.update(self.presets[preset])
        base.update(overrides)
        return self.config_cls.from_dict(base)


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Register a method once by name (each method file calls this for itself)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise RuntimeError(f"method {spec.name!r} registered twice")
    if spec.config_cls.method != spec.name:
        raise RuntimeError(f"{spec.config_cls.__name__}.method must be {spec.name!r}")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise VidretError(f"unknown method {name!r}; known: {', '.join(list_methods())}")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def _load_builtin_methods() -> None:
    # Imported lazily so that importing the framework has no side effects.
    import vidret.adapters.methods  # noqa: F401


# ----------------------------------------------------------------------------- inject / freeze / report


def inject(clip: CLIP, config: AdapterConfig, adapter: str = DEFAULT_ADAPTER) -> list[str]:
    """Attach ``config``'s method to ``clip`` under the name ``adapter``; returns the targeted module paths."""
    if not adapter.isidentifier():
        raise VidretError(f"adapter name {adapter!r} must be a Python identifier (letters, digits, _)")
    spec = get_method(config.method)
    return spec.inject(clip, config, adapter)


def trainable_parameters(clip: CLIP, config: AdapterConfig, adapter: str) -> list[tuple[str, nn.Parameter]]:
    """The adapter's own parameters plus the method's declared extra trainables, named and de-duplicated."""
    spec = get_method(config.method)
    out: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for n, p in list(adapter_named_parameters(clip, adapter)) + [
        ("backbone." + n, p) for n, p in spec.extra_trainables(clip, config)
    ]:
        if id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    return out


def mark_trainable(clip: CLIP, config: AdapterConfig, adapter: str) -> int:
    """Freeze everything, then unfreeze exactly the adapter's trainables; returns their element count."""
    for p in clip.parameters():
        p.requires_grad_(False)
    params = trainable_parameters(clip, config, adapter)
    for _, p in params:
        p.requires_grad_(True)
    return sum(p.numel() for _, p in params)


def count_backbone_parameters(clip: CLIP) -> dict[str, int]:
    """Backbone parameter counts: total and per tower."""
    counts = {"visual": 0, "text": 0, "other": 0}
    for n, p in backbone_named_parameters(clip):
        tower = n.split(".", 1)[0]
        counts[tower if tower in counts else "other"] += p.numel()
    counts["total"] = counts["visual"] + counts["text"] + counts["other"]
    return counts


def parameter_report(
    clip: CLIP, config: AdapterConfig, adapter: str = DEFAULT_ADAPTER, head: nn.Module | None = None
) -> dict[str, Any]:
    """Trainable parameters of one adapter against the backbone, and its file size."""
    params = trainable_parameters(clip, config, adapter)
    head_params = [p for p in head.parameters()] if head is not None else []
    own = sum(p.numel() for n, p in params if not n.startswith("backbone."))
    extra = sum(p.numel() for n, p in params if n.startswith("backbone."))
    head_n = sum(p.numel() for p in head_params)
    trainable = own + extra + head_n
    bb = count_backbone_parameters(clip)
    return {
        "method": config.method,
        "trainable": trainable,
        "adapter_modules": own,  # the method's new parameters
        "backbone_trained": extra,  # backbone parameters it also trains (e.g. biases)
        "head": head_n,
        "backbone": bb["total"],
        "backbone_visual": bb["visual"],
        "backbone_text": bb["text"],
        "percent": 100.0 * trainable / bb["total"],
        "bytes_fp32": 4 * trainable,
        "bytes_fp16": 2 * trainable,
    }


def zeros_like_init(module: nn.Module) -> None:
    """Zero every parameter of a module (used for zero-initialised up-projections)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
