"""VideoTextModel: a frozen backbone + one named adapter + a similarity head; and AdapterBank, many adapters
over one backbone.

Model code does no I/O and no ``torch.distributed`` (DESIGN.md rule 9).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from vidret.adapters.base import (
    DEFAULT_ADAPTER,
    AdapterConfig,
    Hook,
    backbone_named_parameters,
    backbone_state_dict,
    blocks,
    get_method,
    inject,
    mark_trainable,
    trainable_parameters,
)
from vidret.adapters.base import parameter_report as _adapter_report
from vidret.backbone.clip import CLIP, ForwardContext, fingerprint
from vidret.errors import VidretError
from vidret.heads import VideoFeatures, make_head

MAX_LOGIT_SCALE = 100.0


class VideoTextModel(nn.Module):
    """Backbone + adapter ``adapter_name`` + head. Build it with :func:`build_model`."""

    def __init__(
        self,
        clip: CLIP,
        config: AdapterConfig,
        adapter_name: str = DEFAULT_ADAPTER,
        preset: str | None = None,
        backbone_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.config = config
        self.adapter_name = adapter_name
        self.preset = preset
        self.head = make_head(config.head, clip.config.embed_dim)
        self.backbone_fingerprint = backbone_fingerprint or fingerprint(backbone_state_dict(clip))
        # NOTE: building another adapter on the same backbone re-freezes everything but the new one;
        # call mark_trainable() on the model you are about to train.

    @property
    def method(self) -> str:
        return self.config.method

    def logit_scale(self) -> Tensor:
        # Frozen at CLIP's value (100 for real CLIP); the clamp guards checkpoints trained past it.
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """[N, L] token ids -> [N, E] text embeddings (not normalised)."""
        ctx = ForwardContext("text", causal=True, adapter=self.adapter_name)
        return self.clip.encode_text(tokens, ctx)

    def encode_video(self, frames: Tensor, frame_mask: Tensor | None = None) -> VideoFeatures:
        """[B, T, 3, H, W] frames + [B, T] bool mask -> per-frame embeddings [B, T, E] and the mask.

        All frames run as one [B*T] image batch; adapters that model time see T and the mask in the context.
        """
        B, T = frames.shape[:2]
        if frame_mask is None:
            frame_mask = torch.ones(B, T, dtype=torch.bool, device=frames.device)
        ctx = ForwardContext("image", num_frames=T, frame_mask=frame_mask, adapter=self.adapter_name)
        flat = frames.flatten(0, 1)  # [B, T, 3, H, W] -> [B*T, 3, H, W]
        emb = self.clip.encode_image(flat, ctx)  # [B*T, E]
        return VideoFeatures(emb.view(B, T, -1), frame_mask)  # [B*T, E] -> [B, T, E]

    def similarity(self, text_feats: Tensor, video_feats: VideoFeatures) -> Tensor:
        """Logits [N_text, N_video], scale included."""
        return self.head(text_feats, video_feats, self.logit_scale())

    def pool_video(self, video_feats: VideoFeatures) -> Tensor | None:
        """Normalised [B, E] video vectors when the head is text-independent (for an index), else None."""
        pool = self.head.pool
        return pool(video_feats)  # type: ignore[operator]  # every head defines pool()

    def forward(self, frames: Tensor, frame_mask: Tensor, tokens: Tensor) -> Tensor:
        return self.similarity(self.encode_text(tokens), self.encode_video(frames, frame_mask))

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """What this model trains: the adapter's parameters, declared backbone extras, and the head."""
        params = trainable_parameters(self.clip, self.config, self.adapter_name)
        params += [("head." + n, p) for n, p in self.head.named_parameters()]
        return params

    def mark_trainable(self) -> int:
        n = mark_trainable(self.clip, self.config, self.adapter_name)
        for p in self.head.parameters():
            p.requires_grad_(True)
        return n + sum(p.numel() for p in self.head.parameters())

    def set_frozen_prefix(self, enabled: bool = True) -> dict[str, int]:
        """Run the leading blocks of each tower under no_grad when nothing trainable is in or below them.

        Numerically identical; saves the activation memory and backward compute of the frozen prefix.
        Returns the prefix length per tower.
        """
        out = {}
        for tower in ("visual", "text"):
            mod = self.clip.visual if tower == "visual" else self.clip.text
            prefix = _frozen_prefix_length(mod, blocks(self.clip, tower)) if enabled else 0
            mod.transformer.no_grad_prefix = prefix
            out[tower] = prefix
        return out


def _params_used_by(module: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters a module reads: its own plus shared ones its branches reference (see ``shared_ref``)."""
    yield from module.parameters()
    for m in module.modules():
        for target in getattr(m, "_shared_refs", ()):
            yield from target.parameters()


def _frozen_prefix_length(tower: nn.Module, tower_blocks: nn.ModuleList) -> int:
    # Anything trainable before the blocks (embeddings, class token, ln_pre) needs gradients everywhere.
    for name, child in tower.named_children():
        if name == "transformer":
            continue
        if name in ("conv1", "ln_pre", "token_embedding") and any(p.requires_grad for p in child.parameters()):
            return 0
    for name, p in tower.named_parameters(recurse=False):
        if name in ("class_embedding", "positional_embedding") and p.requires_grad:
            return 0
    for i, block in enumerate(tower_blocks):
        if any(p.requires_grad for p in _params_used_by(block)):
            return i
    return len(tower_blocks)


def build_model(
    clip: CLIP,
    method: str = "mv_adapter",
    preset: str | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    config: AdapterConfig | None = None,
    **overrides: Any,
) -> VideoTextModel:
    """Attach a method to ``clip`` (in place) and return the video-text model.

    Args:
        clip: the backbone; its weights stay frozen except what the method declares.
        method: a registered method name (``vidret.list_methods()``).
        preset: a named config of the method, e.g. "msrvtt" (METHODS.md), or None for defaults.
        adapter_name: name under which the adapter is attached (several can share one backbone).
        config: a ready config instead of preset + overrides.
        **overrides: config fields overriding the preset.
    """
    spec = get_method(method)
    if config is None:
        config = spec.make_config(preset, **overrides)
    elif config.method != method:
        raise VidretError(f"config is for method {config.method!r}, not {method!r}")
    # A meta-device backbone (parameter counting without memory) has no values to fingerprint.
    fp = "meta" if next(clip.parameters()).is_meta else fingerprint(backbone_state_dict(clip))
    inject(clip, config, adapter_name)
    model = VideoTextModel(clip, config, adapter_name, preset, backbone_fingerprint=fp)
    model.mark_trainable()
    return model


def parameter_report(model: VideoTextModel) -> dict[str, Any]:
    """Trainable parameters (count and share of the backbone) and adapter file size of a model."""
    report = _adapter_report(model.clip, model.config, model.adapter_name, head=model.head)
    report["preset"] = model.preset
    report["backbone_name"] = model.clip.name
    return report


class AdapterBank:
    """Several trained adapters over ONE backbone in memory; run any of them per call.

    Memory is the backbone plus the adapters, not a model copy per task. Each adapter's branches live in
    the shared backbone's hooks under its own name, so switching is free for methods that train only their
    own modules. Methods that also train backbone tensors (MV-Adapter's bias terms) keep a private copy of
    those tensors here and swap them in on use; calls are serialised by a lock so a switch never races a
    forward pass.
    """

    def __init__(self, clip: CLIP) -> None:
        self.clip = clip
        self.models: dict[str, VideoTextModel] = {}
        self._backbone_overrides: dict[str, dict[str, Tensor]] = {}
        self._pristine: dict[str, Tensor] = {}
        self._active: str | None = None
        self.lock = threading.RLock()
        self.fingerprint = fingerprint(backbone_state_dict(clip))

    def add(self, name: str, model: VideoTextModel, backbone_tensors: dict[str, Tensor] | None = None) -> None:
        """Register a model built over this bank's backbone under ``name`` (its adapter name)."""
        if model.clip is not self.clip:
            raise VidretError("the model must be built over this bank's backbone instance")
        if name != model.adapter_name:
            raise VidretError(f"adapter name mismatch: {name!r} vs {model.adapter_name!r}")
        if not get_method(model.method).shareable:
            raise VidretError(f"method {model.method!r} changes the whole backbone and cannot share it")
        with self.lock:
            self.models[name] = model
            if backbone_tensors:
                params = dict(backbone_named_parameters(self.clip))
                for k in backbone_tensors:
                    if k not in self._pristine:
                        self._pristine[k] = params[k].detach().clone()
                self._backbone_overrides[name] = {k: v.detach().clone() for k, v in backbone_tensors.items()}

    def load(self, path: str, name: str) -> VideoTextModel:
        """Load an adapter folder under ``name`` over this bank's backbone (refusing another backbone's)."""
        from vidret.adapters.io import build_from_adapter_state, check_backbone, read_adapter

        meta, tensors = read_adapter(path)
        check_backbone(meta, self.clip, where=f"adapter {path}")
        prefix = "backbone."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        with self.lock:
            params = dict(backbone_named_parameters(self.clip))
            for k in own:  # remember the backbone's own values before this adapter overwrites them
                if k not in self._pristine:
                    self._pristine[k] = params[k].detach().clone()
            model = build_from_adapter_state(self.clip, meta, tensors, name, source=str(path))
            model.eval()
            self._active = None  # the load wrote this adapter's tensors; re-apply on next use
            self.add(name, model, own)
        return model

    def names(self) -> list[str]:
        return sorted(self.models)

    def use(self, name: str) -> VideoTextModel:
        """Activate ``name`` (swap its backbone tensors in if any) and return its model; hold ``lock`` while using."""
        if name not in self.models:
            raise VidretError(f"unknown adapter {name!r}; loaded: {', '.join(self.names()) or '(none)'}")
        with self.lock:
            if self._active != name:
                params = dict(backbone_named_parameters(self.clip))
                overrides = self._backbone_overrides.get(name, {})
                with torch.no_grad():
                    for k, pristine in self._pristine.items():
                        params[k].copy_(overrides.get(k, pristine))
                self._active = name
            return self.models[name]


def count_hooks(clip: CLIP) -> int:
    """Number of hooked backbone modules (for reports and tests)."""
    return sum(isinstance(m, Hook) for m in clip.modules())
